"""Model families as data: what differs between SD1 and SD2 (and later SDXL) lives in this table, not in classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_ROOT = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2"
    base_model_version: str  # ss_base_model_version ("sd_v1", "sd_v2"); "_v" is appended for v-prediction
    modelspec_architecture: str  # modelspec.architecture of a LoRA for this family
    te_prefixes: tuple[str, ...]  # kohya LoRA prefixes of the text encoder(s)
    unet_prefix: str
    te_layout: str  # "clip" (HF CLIP keys in LDM files) or "openclip" (stacked q/k/v resblocks)
    latent_scale: float
    default_resolution: int
    default_prediction: str  # "epsilon" | "v_prediction" (SD2 768 models are v; detection refines)
    config_dir: Path  # bundled diffusers configs for the full-size model (offline single-file loading)

    @property
    def v2(self) -> bool:
        return self.name == "sd2"


SD1 = Family(
    name="sd1",
    base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
    te_prefixes=("lora_te",),
    unet_prefix="lora_unet",
    te_layout="clip",
    latent_scale=0.18215,
    default_resolution=512,
    default_prediction="epsilon",
    config_dir=CONFIG_ROOT / "sd1",
)

SD2 = Family(
    name="sd2",
    base_model_version="sd_v2",
    modelspec_architecture="stable-diffusion-v2-512/lora",
    te_prefixes=("lora_te",),
    unet_prefix="lora_unet",
    te_layout="openclip",
    latent_scale=0.18215,
    default_resolution=768,
    default_prediction="v_prediction",
    config_dir=CONFIG_ROOT / "sd2",
)

FAMILIES = {f.name: f for f in (SD1, SD2)}


def get_family(name_or_v2: str | bool) -> Family:
    if isinstance(name_or_v2, bool):
        return SD2 if name_or_v2 else SD1
    try:
        return FAMILIES[name_or_v2]
    except KeyError:
        raise ValueError(f"unknown model family {name_or_v2!r}; known: {', '.join(FAMILIES)}") from None


def base_model_version(family: Family, prediction_type: str) -> str:
    """ss_base_model_version: `sd_v1`, `sd_v2`, and `_v` after either for v-prediction (`sd_v2_v`; an SD1
    v-prediction fine-tune's `sd_v1_v`), as sd-scripts' `get_model_version_str_for_sd1_sd2` writes it."""
    return family.base_model_version + ("_v" if prediction_type == "v_prediction" else "")


def modelspec_architecture(family: Family, prediction_type: str) -> str:
    """modelspec.architecture of a LoRA: SD2's v-prediction models are `768-v` whatever size it was trained at
    (sd-scripts' `determine_architecture`)."""
    if family.v2 and prediction_type == "v_prediction":
        return "stable-diffusion-v2-768-v/lora"
    return family.modelspec_architecture
