"""Load the Stable Diffusion components from whatever the user has; save them back.

`load_models(name_or_path)` accepts a Hub repo id (diffusers layout), a local diffusers folder, a single-file
LDM checkpoint (.safetensors/.ckpt, SD1.x/SD2.x) or the built-in `lorakit-toy`, and returns `SDComponents`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .families import Family


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    family: Family
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def v2(self) -> bool:
        return self.family.v2

    @property
    def native_resolution(self) -> int:
        """Image size the model was trained at: U-Net sample size × VAE downsampling factor."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> SDComponents:
        for m in (self.text_encoder, self.vae, self.unet):
            m.to(device=device, dtype=dtype)
        return self

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the diffusers folder layout (model_index.json + one subfolder per component)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.noise_scheduler.save_pretrained(folder / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", type(self.noise_scheduler).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", type(self.unet).__name__],
            "vae": ["diffusers", type(self.vae).__name__],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return folder

    def pipeline(self, scheduler=None):
        """A diffusers `StableDiffusionPipeline` sharing these modules (no copies)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def load_models(name_or_path: str, *, v2: bool | None = None, v_parameterization: bool | None = None,
                vae: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None,
                local_files_only: bool = False) -> SDComponents:
    """Load SD components from a repo id, a diffusers folder, a single file, or `lorakit-toy`."""
    from .families import SD1, SD2

    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: folder has no model_index.json — not a diffusers model folder")
        comps = _load_diffusers(str(path), local_files_only=True)
    else:
        raise ModelLoadError(f"model not found: {name_or_path}")
    if v2 is not None:
        comps.family = SD2 if v2 else SD1
    if v_parameterization is not None:
        comps.prediction_type = "v_prediction" if v_parameterization else "epsilon"
    return comps.to(device=device, dtype=dtype)


def _load_diffusers(repo_or_folder: str, local_files_only: bool) -> SDComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .families import SD1, SD2

    kw = dict(local_files_only=local_files_only)
    unet = UNet2DConditionModel.from_pretrained(repo_or_folder, subfolder="unet", **kw)
    scheduler = DDPMScheduler.from_pretrained(repo_or_folder, subfolder="scheduler", **kw)
    comps = SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(repo_or_folder, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(repo_or_folder, subfolder="text_encoder", **kw),
        vae=AutoencoderKL.from_pretrained(repo_or_folder, subfolder="vae", **kw),
        unet=unet, noise_scheduler=scheduler,
        family=SD2 if unet.config.cross_attention_dim == 1024 or unet.config.use_linear_projection else SD1,
        prediction_type=scheduler.config.prediction_type, source=repo_or_folder)
    return comps
