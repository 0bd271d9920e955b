"""Single-file Stable Diffusion checkpoints (original LDM layout): state-dict conversion, detection, file I/O.

- `components_to_ldm(comps)` / `diffusers_to_ldm(state_dicts, configs)`: diffusers weights -> one LDM state dict.
- `ldm_to_diffusers(ldm, configs)`: the reverse, per component, shaped for the diffusers modules.
- `detect_family`, `detect_prediction_type`: what a file is, from its keys and shapes (and metadata when present).
- `read_single_file(path)` / `write_single_file(state_dict, path, ...)`: `.safetensors` or `.ckpt` by extension;
  `.ckpt` only through `fileio.safe_torch_load` (never runs pickled code); writes are atomic.

Files lorakit writes carry the diffusers configs (JSON) in the safetensors metadata (`lorakit.configs`) or as a string
entry of the `.ckpt` dict, so non-standard architectures (tiny/toy models) load back exactly; files without them use
the full-size SD1.5/SD2.1 configs bundled in `lorakit/configs/<family>/`. Key names come from `checkpoint_keys`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from .checkpoint_keys import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    LdmKey,
    LdmLayout,
    family_from_configs,
    ldm_extra_keys,
    ldm_key_for,
    resolve_layout,
)
from .errors import ModelLoadError
from .families import SD1, SD2, Family

CONFIGS_META_KEY = "lorakit.configs"  # JSON {"unet": ..., "vae": ..., "text_encoder": ..., "scheduler": ...}
TOKENIZER_META_KEY = "lorakit.tokenizer"  # JSON {file name: text} of a non-standard tokenizer
CLIP_VOCAB_SIZE = 49408
SAVE_PRECISIONS = {None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
                   "bf16": torch.bfloat16}
_CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                 "scheduler": "scheduler/scheduler_config.json"}

__all__ = ["LdmKey", "LdmLayout", "components_to_ldm", "diffusers_to_ldm", "ldm_to_diffusers", "ldm_key_for",
           "detect_family", "detect_prediction_type", "read_single_file", "write_single_file", "bundled_configs",
           "components_configs", "empty_modules", "modules_from_configs"]


@cache
def _bundled(name: str) -> str:
    root = SD1.config_dir.parent / name
    return json.dumps({c: json.loads((root / f).read_text()) for c, f in _CONFIG_FILES.items()})


def bundled_configs(family: Family | str) -> dict:
    """The full-size diffusers configs shipped with lorakit (SD1.5 for sd1, SD2.1-768-v for sd2); a fresh copy."""
    name = family if isinstance(family, str) else family.name
    return json.loads(_bundled(name))


def components_configs(comps) -> dict:
    """The diffusers configs of loaded `SDComponents` as plain dicts (what `lorakit.configs` stores)."""
    def clean(cfg: dict) -> dict:
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_") or k == "_class_name"}

    te = comps.text_encoder.config.to_dict()
    te = {k: v for k, v in te.items() if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    return {"unet": clean(comps.unet.config), "vae": clean(comps.vae.config), "text_encoder": te,
            "scheduler": {**clean(comps.noise_scheduler.config), "prediction_type": comps.prediction_type},
            "family": comps.family.name}


# ------------------------------------------------------------------------------------------ diffusers -> LDM
def _te_names(state_dict: dict) -> dict:
    """Text-encoder state dict with the fixed `text_model.` spelling (transformers >= 5 drops that level)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state_dict.items()
            if not k.endswith("position_ids")}


def diffusers_to_ldm(state_dicts: dict[str, dict], configs_or_layout) -> dict[str, torch.Tensor]:
    """`{"unet": sd, "vae": sd, "text_encoder": sd}` -> one LDM state dict with the standard key set.

    Works on meta tensors too (to list keys and shapes without allocating weights).
    """
    layout = resolve_layout(configs_or_layout)
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for component, sd in state_dicts.items():
        if component == "text_encoder":
            sd = _te_names(sd)
        for name, tensor in sd.items():
            target = ldm_key_for(f"{component}.{name}", layout)
            if target.rows is not None:
                stacked.setdefault(target.key, []).append((target.rows.start, tensor))
            elif target.conv1x1:
                out[target.key] = tensor.reshape(*tensor.shape, 1, 1)
            else:
                out[target.key] = tensor
    for key, parts in stacked.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    out.update(_extra_tensors(out, layout))
    return out


def _extra_tensors(ldm: dict, layout: LdmLayout) -> dict[str, torch.Tensor]:
    """Conventional values for keys diffusers has no parameter for (see `ldm_extra_keys`), as sd-scripts writes."""
    keys = ldm_extra_keys(layout)
    if layout.te_layout == "clip":
        positions = ldm[CLIP_PREFIX + "text_model.embeddings.position_embedding.weight"].shape[0]
        device = ldm[CLIP_PREFIX + "text_model.embeddings.position_embedding.weight"].device
        return {keys[0]: torch.arange(positions, device=device).unsqueeze(0)}
    # SD2 conditions on the penultimate OpenCLIP layer: the unused last block is a copy of the one before it
    src = f"{OPENCLIP_PREFIX}transformer.resblocks.{layout.te_layers - 1}."
    dst = f"{OPENCLIP_PREFIX}transformer.resblocks.{layout.te_layers}."
    extra = {k: ldm[src + k[len(dst):]].clone() for k in keys if k.startswith(dst)}
    ref = ldm[OPENCLIP_PREFIX + "ln_final.weight"]
    extra[OPENCLIP_PREFIX + "text_projection"] = torch.eye(layout.te_hidden_size, dtype=ref.dtype, device=ref.device)
    extra[OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052, dtype=ref.dtype, device=ref.device)  # ln(100)
    return extra


def components_to_ldm(comps) -> dict[str, torch.Tensor]:
    """The single-file (LDM) state dict of `SDComponents` (tensors shared with the modules, not copied)."""
    return diffusers_to_ldm({"unet": comps.unet.state_dict(), "vae": comps.vae.state_dict(),
                             "text_encoder": comps.text_encoder.state_dict()}, resolve_layout(comps))


# ------------------------------------------------------------------------------------------ LDM -> diffusers
def modules_from_configs(configs: dict):
    """(unet, vae, text_encoder) built from configs, with freshly initialised (random) weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    te_cfg = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    return unet, vae, CLIPTextModel(CLIPTextConfig(**te_cfg))


def empty_modules(configs: dict):
    """(unet, vae, text_encoder) built from configs with parameters on the meta device (no memory, no init cost)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return modules_from_configs(configs)


def _fit(name: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reshape 1x1-conv <-> Linear weights (`[o, i, 1, 1]` <-> `[o, i]`); anything else must match exactly."""
    if tensor.shape == shape:
        return tensor
    if tensor.numel() == shape.numel() and tensor.shape[:2] == shape[:2] and \
            all(s == 1 for s in (*tensor.shape[2:], *shape[2:])):
        return tensor.reshape(shape)
    raise ModelLoadError(f"tensor {name} has shape {list(tensor.shape)}, the architecture expects {list(shape)}; "
                         "the file does not match the model configs (wrong family? pass `v2`, or a matching "
                         "diffusers config)")


def ldm_to_diffusers(ldm: dict[str, torch.Tensor], configs: dict, modules=None,
                     components=("unet", "vae", "text_encoder")) -> dict[str, dict]:
    """One LDM state dict -> `{"unet": sd, "vae": sd, "text_encoder": sd}` for modules built from `configs`.

    `modules`: (unet, vae, text_encoder) to take key names and shapes from (default: built on the meta device).
    `components`: those to convert (a VAE given separately need not be in the file).
    Text-encoder keys are returned in the spelling of the installed transformers' `CLIPTextModel`. Keys of the file
    with no diffusers counterpart (EMA copies, schedule buffers, SD2's unused last block) are ignored; a missing key
    raises `ModelLoadError` naming it.
    """
    layout = resolve_layout(configs)
    unet, vae, text_encoder = modules or empty_modules(configs)
    out: dict[str, dict] = {}
    for component, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        if component not in components:
            continue
        sd = {}
        for name, param in module.state_dict().items():
            if component == "text_encoder" and name.endswith("position_ids"):
                continue
            spelled = "text_model." + name if component == "text_encoder" and not name.startswith("text_model.") \
                else name
            target = ldm_key_for(f"{component}.{spelled}", layout)
            if target.key not in ldm:
                raise ModelLoadError(f"checkpoint has no tensor {target.key} (needed for {component}.{spelled}); "
                                     "the file is incomplete or of another architecture")
            tensor = ldm[target.key]
            if target.rows is not None:
                tensor = tensor[target.rows]
            sd[name] = _fit(target.key, tensor, param.shape)
        out[component] = sd
    return out


def normalize_ldm_keys(ldm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a spelling variant seen in older SD1 files: CLIP keys without the `text_model.` level
    (`cond_stage_model.transformer.encoder...`), which A1111 also accepts."""
    bare = CLIP_PREFIX
    if not any(k.startswith(bare + "text_model.") for k in ldm) and any(k.startswith(bare) for k in ldm):
        return {(bare + "text_model." + k[len(bare):]) if k.startswith(bare) else k: v for k, v in ldm.items()}
    return ldm


# ------------------------------------------------------------------------------------------------- detection
def detect_family(ldm: dict) -> Family:
    """SD2 files carry an OpenCLIP text encoder (`cond_stage_model.model.*`), SD1 files HF-CLIP keys.

    Raises `ModelLoadError` for files that are not SD1/SD2 single-file checkpoints (a LoRA, SDXL, anything else).
    """
    keys = list(ldm)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("lora_unet_", "lora_te", "unet.", "down_blocks.")) for k in keys):
            hint = "it looks like a LoRA or a diffusers component file, not a full checkpoint"
        else:
            hint = f"{len(keys)} tensors, e.g. {', '.join(keys[:3]) or 'none'}"
        raise ModelLoadError(f"not a Stable Diffusion single-file checkpoint: no {UNET_PREFIX}* keys ({hint})")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError("this is an SDXL checkpoint (conditioner.embedders.* keys); lorakit supports SD1.x/SD2.x")
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return SD2
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return SD1
    # no text encoder in the file: the cross-attention width tells (SD1: 768, SD2: 1024)
    for k in keys:
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return SD2 if ldm[k].shape[-1] == 1024 else SD1
    raise ModelLoadError("cannot tell SD1 from SD2: the file has no text encoder and no cross-attention weights")


def detect_prediction_type(ldm: dict, family: Family, configs: dict | None = None,
                           metadata: dict | None = None) -> str:
    """"epsilon" or "v_prediction", from the strongest evidence available.

    1. lorakit's stored scheduler config; 2. `modelspec.prediction_type` metadata; 3. a `v_pred` marker key;
    4. SD1 -> epsilon; SD2: `global_step == 875000` is the SD2-512-base release (epsilon, diffusers' rule);
       otherwise the community heuristic (ComfyUI): the last output block's `transformer_blocks.0.norm1.bias` has a
       standard deviation > 0.09 in the 768-v models, ~0 in epsilon models; inpainting models (9 input
       channels) are epsilon.
    """
    if configs and "prediction_type" in configs.get("scheduler", {}):
        return configs["scheduler"]["prediction_type"]
    spec = (metadata or {}).get("modelspec.prediction_type", "")
    if spec:
        return "v_prediction" if spec.startswith("v") else "epsilon"
    if "v_pred" in ldm:
        return "v_prediction"
    if not family.v2:
        return "epsilon"
    if (metadata or {}).get("global_step") == "875000":
        return "epsilon"
    conv_in = ldm.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        return "epsilon"
    norms = sorted((k for k in ldm if k.startswith(UNET_PREFIX + "output_blocks.")
                    and k.endswith(".1.transformer_blocks.0.norm1.bias")), key=lambda k: int(k.split(".")[3]))
    if norms and torch.std(ldm[norms[-1]].float(), unbiased=False) > 0.09:
        return "v_prediction"
    return "epsilon"


# ----------------------------------------------------------------------------------------------------- file I/O
def read_single_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a `.safetensors` or `.ckpt` single file -> (state dict, metadata strings).

    For `.ckpt`, lorakit's string entries (`lorakit.configs`, ...) and `global_step` become metadata. Raises
    `ModelLoadError` for missing/unreadable files and `UnsafeCheckpointError` for pickles that want to run code.
    """
    from .fileio import safe_torch_load

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers and data
            raise ModelLoadError(f"{path.name}: not a readable safetensors file ({str(e).splitlines()[0][:200]}); "
                                 "the download may be incomplete") from None
    obj = safe_torch_load(path, mmap=True)
    metadata: dict[str, str] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        metadata.update({k: str(v) for k, v in obj.items() if isinstance(v, (str, int)) and not isinstance(v, bool)})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    metadata.update({k: v for k, v in obj.items() if isinstance(v, str)})
    return tensors, metadata


def cast_for_saving(ldm: dict[str, torch.Tensor], save_precision: str | None) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to `save_precision` ("float"/"fp32", "fp16", "bf16"; None keeps them)."""
    if save_precision not in SAVE_PRECISIONS:
        raise ValueError(f"`save_precision` must be one of float, fp16, bf16, got {save_precision!r}")
    dtype = SAVE_PRECISIONS[save_precision]
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in ldm.items()}


def write_single_file(ldm: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                      save_precision: str | None = "float") -> Path:
    """Write an LDM state dict atomically: `.safetensors` (metadata in the header) or `.ckpt`
    (`{"state_dict": ..., "global_step": 0, "epoch": 0, <metadata strings>}`, loadable with weights_only=True)."""
    from .fileio import save_safetensors, torch_save

    path = Path(path)
    tensors = cast_for_saving(ldm, save_precision)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return save_safetensors(tensors, path, metadata=metadata)
    if suffix in (".ckpt", ".pt", ".pth"):
        return torch_save({"state_dict": tensors, "global_step": 0, "epoch": 0, **metadata}, path)
    raise ValueError(f"{path.name}: a single-file checkpoint must end in .safetensors or .ckpt")


def configs_from_metadata(metadata: dict[str, str]) -> dict | None:
    raw = metadata.get(CONFIGS_META_KEY)
    if not raw:
        return None
    try:
        configs = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"the file's `{CONFIGS_META_KEY}` metadata is not valid JSON ({e})") from None
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in configs]
    if missing:
        raise ModelLoadError(f"the file's `{CONFIGS_META_KEY}` metadata lacks the {', '.join(missing)} config")
    return configs


def standard_configs(ldm: dict, family: Family) -> dict:
    """Bundled full-size configs, adjusted by what the file's shapes say (inpainting: 9 input channels)."""
    configs = bundled_configs(family)
    conv_in = ldm.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:
        configs["unet"]["in_channels"] = int(conv_in.shape[1])
    return configs


def check_text_to_image(channels: int, source: str) -> None:
    """Refuse a U-Net whose input is not the 4 latent channels alone (`channels`): an inpainting model's 9
    (latents, mask, masked image) or an instruct-pix2pix model's 8, which training and generation cannot feed."""
    if channels != 4:
        kind = "an inpainting model" if channels == 9 else "not a text-to-image model"
        raise ModelLoadError(
            f"{source or 'this model'} is {kind} (its U-Net takes {channels} input channels, not the 4 latent "
            f"channels): lorakit trains and generates with text-to-image models. Train on its base model (e.g. "
            f"SD1.5): A1111 and ComfyUI apply that LoRA to the inpainting version too. merge and extract take this "
            f"file.")


__all__ += ["normalize_ldm_keys", "family_from_configs", "configs_from_metadata", "standard_configs",
            "cast_for_saving", "VAE_PREFIX"]
