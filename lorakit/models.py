"""Load the Stable Diffusion components from whatever the user has; save them back.

`load_models(name_or_path)` accepts a Hub repo id (diffusers layout), a local diffusers folder, a single-file
LDM checkpoint (.safetensors/.ckpt, SD1.x/SD2.x, loaded fully offline from configs bundled with lorakit) or the
built-in `lorakit-toy`, and returns `SDComponents`. `save_single_file(components, path)` writes the single-file
layout A1111/ComfyUI/sd-scripts read. Key names live in `checkpoint_keys`, state-dict conversion in `checkpoint`.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .families import SD1, SD2, Family

TOY_NAME = "lorakit-toy"
TOY_PATH = Path(__file__).parent / "toy" / "weights" / "lorakit-toy.safetensors"


def resolve_builtin(name_or_path):
    """The file behind a built-in model name (`lorakit-toy`); any other value is returned unchanged.

    A local file or folder of the same name wins, as in `load_models`."""
    if name_or_path is not None and str(name_or_path) == TOY_NAME and not Path(TOY_NAME).exists():
        return str(TOY_PATH)
    return name_or_path
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


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
        """Move/cast the three networks; modules already on `device` in `dtype` are left alone (no copies)."""
        for m in (self.text_encoder, self.vae, self.unet):
            _move(m, device, dtype)
        return self

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the diffusers folder layout (model_index.json + one subfolder per component)."""
        from .fileio import write_json

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
        write_json(folder / "model_index.json", index)
        return folder

    def save_single_file(self, path: str | Path, save_precision: str | None = "float") -> Path:
        """Write a single-file LDM checkpoint (see `lorakit.models.save_single_file`)."""
        return save_single_file(self, path, save_precision=save_precision)

    def pipeline(self, scheduler=None):
        """A diffusers `StableDiffusionPipeline` sharing these modules (no copies)."""
        import logging

        # the pipeline's module imports transformers' image processors, which say once that torchvision (which no
        # part of lorakit needs: there is no safety checker) is not installed
        hints = logging.getLogger("transformers.utils.import_utils")
        level = hints.level
        hints.setLevel(logging.ERROR)
        try:
            from diffusers import StableDiffusionPipeline

            return StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=scheduler or self.noise_scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        finally:
            hints.setLevel(level)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _move(module, device, dtype) -> None:
    """`module.to(device, dtype)` only where something changes. Plain (unquantized) diffusers models are cast with
    `torch.nn.Module.to`: diffusers' override adds nothing for them but a warning on every dtype cast."""
    p = next(module.parameters(), None)
    if p is None:
        return
    kw = {}
    if device is not None and p.device != torch.device(device):
        kw["device"] = device
    if dtype is not None and p.dtype != dtype:
        kw["dtype"] = dtype
    if not kw:
        return
    if getattr(module, "_keep_in_fp32_modules", None) or getattr(module, "is_quantized", False):
        module.to(**kw)
    else:
        torch.nn.Module.to(module, **kw)


# ------------------------------------------------------------------------------------------------------- loading
def load_models(name_or_path: str, *, v2: bool | None = None, v_parameterization: bool | None = None,
                vae: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None,
                local_files_only: bool = False) -> SDComponents:
    """Load SD components from what users have, and detect the family (sd1/sd2) and prediction type.

    `name_or_path`:
    - a single-file checkpoint `.safetensors` / `.ckpt` (SD1.x or SD2.x, original LDM layout): loaded offline;
      family from the text-encoder keys, prediction type from metadata or the weights (see
      `checkpoint.detect_prediction_type`). `.ckpt` is unpickled with weights_only=True (no code runs).
    - a local diffusers folder (with `model_index.json`);
    - a Hugging Face Hub repo id in diffusers layout, e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`
      (downloads once);
    - `lorakit-toy`, the small pretrained model shipped with lorakit.
    `v2` / `v_parameterization` override what was detected (None = detect). `vae`: a VAE to use instead (diffusers
    folder, single file, or repo id). Errors are `ModelLoadError` naming the input and the fix.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == TOY_NAME and not path.exists():
        if not TOY_PATH.is_file():
            raise ModelLoadError(f"the built-in model {TOY_NAME!r} is not installed in this copy of lorakit "
                                 f"(expected {TOY_PATH}); use `lorakit tiny` for a random test model")
        path = TOY_PATH
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: folder has no model_index.json — not a diffusers model folder "
                                 "(give the folder that contains unet/, vae/, text_encoder/, or a .safetensors file)")
        comps = _load_diffusers(str(path), local_files_only=True, dtype=dtype)
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path.name}: unsupported model file type; give a .safetensors or .ckpt "
                                 "single-file checkpoint, or a diffusers folder")
        comps = load_single_file(path, v2=v2, v_parameterization=v_parameterization, dtype=dtype,
                                 with_vae=vae is None)
    elif _looks_like_repo_id(name):
        comps = _load_diffusers(name, local_files_only=local_files_only, dtype=dtype)
    else:
        raise ModelLoadError(f"model not found: {name} (no such file or folder, and not a Hub repo id "
                             "like `owner/name`)")
    _apply_overrides(comps, v2, v_parameterization)
    if vae is not None:
        comps.vae = load_vae(vae, like=comps.vae, local_files_only=local_files_only)
    return comps.to(device=device, dtype=dtype)


def load_models_from_config(cfg, **kwargs) -> SDComponents:
    """Load the model a job config names: its `pretrained_model_name_or_path`, `v2`, `v_parameterization` and
    `vae` fields (those it has); `kwargs` (e.g. `dtype`, `device`) go to `load_models`."""
    opts = {k: getattr(cfg, k) for k in ("v2", "v_parameterization", "vae") if getattr(cfg, k, None) is not None}
    return load_models(cfg.pretrained_model_name_or_path, **{**opts, **kwargs})


def _looks_like_repo_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.lower().endswith(SINGLE_FILE_SUFFIXES)


def _apply_overrides(comps: SDComponents, v2: bool | None, v_parameterization: bool | None) -> None:
    if v2 is not None and v2 != comps.family.v2:
        raise ModelLoadError(f"`v2={v2}` contradicts the model: {comps.source} has the "
                             f"{'OpenCLIP (SD2)' if comps.family.v2 else 'CLIP (SD1)'} text encoder; drop `v2`")
    if v_parameterization is not None:
        _set_prediction_type(comps, "v_prediction" if v_parameterization else "epsilon")


def _set_prediction_type(comps: SDComponents, prediction_type: str) -> None:
    comps.prediction_type = prediction_type
    if comps.noise_scheduler.config.prediction_type != prediction_type:
        sched = comps.noise_scheduler
        comps.noise_scheduler = type(sched).from_config(sched.config, prediction_type=prediction_type)


def _load_diffusers(repo_or_folder: str, local_files_only: bool, dtype: torch.dtype | None = None) -> SDComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .checkpoint import check_text_to_image
    from .checkpoint_keys import family_from_configs

    kw = dict(local_files_only=local_files_only)
    folder = Path(repo_or_folder).is_dir()
    variant = _folder_variant(Path(repo_or_folder)) if folder else "fp16" if dtype == torch.float16 else None

    def load(variant):
        weights = dict(kw, variant=variant) if variant else kw
        with warnings.catch_warnings():
            # diffusers still passes a deprecated huggingface_hub argument; the warning means nothing to users
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            unet = UNet2DConditionModel.from_pretrained(repo_or_folder, subfolder="unet", torch_dtype=dtype,
                                                        **weights)
            scheduler = DDPMScheduler.from_pretrained(repo_or_folder, subfolder="scheduler", **kw)
            tokenizer = CLIPTokenizer.from_pretrained(repo_or_folder, subfolder="tokenizer", **kw)
            text_encoder = CLIPTextModel.from_pretrained(repo_or_folder, subfolder="text_encoder",
                                                         **_transformers_dtype(dtype), **weights)
            vae_model = AutoencoderKL.from_pretrained(repo_or_folder, subfolder="vae", torch_dtype=dtype, **weights)
        return unet, scheduler, tokenizer, text_encoder, vae_model

    if not folder and not _hub_offline(local_files_only) and not _cached(repo_or_folder) and \
            _hub_reachable() is False:
        raise _unreachable(repo_or_folder)  # at once, not after huggingface_hub's retries
    try:
        try:
            unet, scheduler, tokenizer, text_encoder, vae_model = load(variant)
        except (OSError, ValueError) as e:
            if folder or variant is None or "fp16" not in str(e):
                raise
            # a Hub repo without the fp16 files (half the download, for fp16 training): its full-precision ones
            unet, scheduler, tokenizer, text_encoder, vae_model = load(None)
    except (OSError, ValueError, RuntimeError) as e:
        if not folder and _hub_offline(local_files_only):
            raise ModelLoadError(f"cannot load Hub repo {repo_or_folder}: it is not in the local Hugging Face cache "
                                 "and downloads are off (HF_HUB_OFFLINE / local_files_only); go online once, or give "
                                 "a local folder or .safetensors file") from None
        if not folder and _hub_reachable() is False:
            raise _unreachable(repo_or_folder) from None
        where = "folder" if folder else "Hub repo"
        hint = "" if folder else \
            (" (no local file or folder has this name; offline or no access? download it once online, log in for "
             "gated repos, or give a local path)")
        raise ModelLoadError(f"cannot load diffusers {where} {repo_or_folder}: {_first_line(e)}{hint}") from None
    check_text_to_image(unet.config.in_channels, repo_or_folder)  # a diffusers inpainting model
    family = family_from_configs({"text_encoder": text_encoder.config.to_dict()})
    return SDComponents(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae_model, unet=unet,
                        noise_scheduler=scheduler, family=family, prediction_type=scheduler.config.prediction_type,
                        source=repo_or_folder)


def _folder_variant(folder: Path) -> str | None:
    """The weights variant a diffusers folder holds when it has no plain weight files: `fp16` for
    `unet/diffusion_pytorch_model.fp16.safetensors` (as `save_pretrained(variant="fp16")` writes)."""
    unet = folder / "unet"
    if any((unet / f"diffusion_pytorch_model{ext}").is_file() for ext in (".safetensors", ".bin")):
        return None
    plain = re.compile(r"diffusion_pytorch_model\.(?:(?:safetensors|bin)\.index\.)?(\w+)\.(?:safetensors|bin|json)")
    names = sorted({m[1] for p in unet.glob("diffusion_pytorch_model.*") if (m := plain.fullmatch(p.name))})
    return names[0] if names else None


def _hub_offline(local_files_only: bool) -> bool:
    import os

    return local_files_only or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cached(repo_id: str) -> bool:
    """Whether a Hub repo's pipeline index is in the local Hugging Face cache (downloaded once)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _unreachable(repo_id: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load Hub repo {repo_id}: the Hub ({_hub_host()}) cannot be reached from this "
                          "machine (no network?) and the repo is not in the local Hugging Face cache; connect and "
                          "run again, or give a local folder or .safetensors file")


def _hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool | None:
    """Whether a TCP connection to the Hub opens (so that a failed download can say "no network" rather than
    what the last retry saw); None when a proxy is set, as the direct connection then proves nothing."""
    import os
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _transformers_dtype(dtype) -> dict:
    """transformers >= 4.56 names the argument `dtype`; older versions `torch_dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def load_single_file(path: str | Path, *, v2: bool | None = None, v_parameterization: bool | None = None,
                     dtype: torch.dtype | None = None, with_vae: bool = True) -> SDComponents:
    """Load a single-file SD1.x/SD2.x checkpoint offline (see `load_models`). `with_vae=False`: leave the file's
    VAE out (one given separately replaces it; the file need not have one) — the VAE is then an empty module."""
    from .checkpoint import read_single_file

    ldm, metadata = read_single_file(path)
    return components_from_ldm(ldm, metadata=metadata, v2=v2, v_parameterization=v_parameterization,
                               source=str(path), dtype=dtype, with_vae=with_vae)


def components_from_ldm(ldm: dict[str, torch.Tensor], configs: dict | None = None, *,
                        metadata: dict[str, str] | None = None, v2: bool | None = None,
                        v_parameterization: bool | None = None, source: str = "",
                        tokenizer=None, dtype: torch.dtype | None = None, with_vae: bool = True) -> SDComponents:
    """Build `SDComponents` from an LDM state dict (the tensors are used as parameters, not copied).

    `configs` (diffusers configs) default to the file's `lorakit.configs` metadata, else the bundled full-size
    configs of the detected family (SD2 epsilon files get the 512-px SD2-base sample size). `tokenizer` defaults
    to the one stored in `metadata`, else the standard CLIP tokenizer. `dtype`: cast floating-point tensors
    while loading (None keeps the file's precision).
    """
    from .checkpoint import (
        CLIP_PREFIX,
        OPENCLIP_PREFIX,
        UNET_PREFIX,
        check_text_to_image,
        configs_from_metadata,
        detect_family,
        detect_prediction_type,
        empty_modules,
        ldm_to_diffusers,
        normalize_ldm_keys,
        standard_configs,
    )
    from .checkpoint_tokenizer import load_tokenizer_for

    metadata = metadata or {}
    ldm = normalize_ldm_keys(ldm)
    family = detect_family(ldm)
    has_te = any(k.startswith((CLIP_PREFIX, OPENCLIP_PREFIX)) for k in ldm)
    if v2 is not None and v2 != family.v2:
        if has_te:
            raise ModelLoadError(f"`v2={v2}` contradicts the checkpoint {source or ''}: its text encoder is "
                                 f"{'OpenCLIP (SD2)' if family.v2 else 'CLIP (SD1)'}; drop `v2`")
        family = SD2 if v2 else SD1
    configs = configs or configs_from_metadata(metadata)
    bundled = configs is None
    if bundled:
        configs = standard_configs(ldm, family)
    if v_parameterization is not None:
        prediction = "v_prediction" if v_parameterization else "epsilon"
    else:
        prediction = detect_prediction_type(ldm, family, None if bundled else configs, metadata)
    if bundled and family.v2 and prediction == "epsilon":  # SD2-base: 512 px
        configs["unet"]["sample_size"], configs["vae"]["sample_size"] = 64, 512
    conv_in = ldm.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:  # before converting: a 9-channel file with 4-channel configs fails on the shape
        check_text_to_image(int(conv_in.shape[1]), source)
    unet, vae, text_encoder = empty_modules(configs)
    parts = ("unet", "vae", "text_encoder") if with_vae else ("unet", "text_encoder")
    state_dicts = ldm_to_diffusers(ldm, configs, modules=(unet, vae, text_encoder), components=parts)
    for component, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        if component not in state_dicts:
            continue
        sd = state_dicts[component]
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        module.load_state_dict(sd, strict=True, assign=True)
        module.eval()
    return SDComponents(
        tokenizer=tokenizer or load_tokenizer_for(configs, family, metadata), text_encoder=text_encoder, vae=vae,
        unet=unet,
        noise_scheduler=_noise_scheduler(configs.get("scheduler", {}), prediction), family=family,
        prediction_type=prediction, source=source)


def _noise_scheduler(config: dict, prediction_type: str):
    """The DDPM training scheduler (SD's scaled-linear betas unless the config says otherwise)."""
    import inspect

    from diffusers import DDPMScheduler

    allowed = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
           "num_train_timesteps": 1000, "steps_offset": 1}
    cfg.update({k: v for k, v in config.items() if k in allowed})
    cfg["prediction_type"] = prediction_type
    return DDPMScheduler(**cfg)


# ----------------------------------------------------------------------------------------------------------- VAE
def load_vae(spec: str | Path, like=None, local_files_only: bool = False):
    """A VAE from a diffusers folder (or a model folder's `vae/`), a single file (LDM or diffusers keys, with or
    without the `first_stage_model.` prefix), or a Hub repo id. `like`: a VAE whose config a single file uses."""
    from diffusers import AutoencoderKL

    from .checkpoint import VAE_PREFIX, read_single_file
    from .checkpoint_keys import LdmLayout, vae_ldm_name

    path = Path(spec).expanduser()
    if path.is_dir():
        sub = "" if (path / "config.json").is_file() else "vae" if (path / "vae" / "config.json").is_file() else None
        if sub is None:
            raise ModelLoadError(f"`vae` {path}: folder has no config.json (nor vae/config.json)")
        return AutoencoderKL.from_pretrained(str(path), subfolder=sub or None, local_files_only=True)
    if path.is_file():
        sd, _ = read_single_file(path)
        sd = {k.removeprefix(VAE_PREFIX): v for k, v in sd.items()}
        config = dict(like.config) if like is not None else json.loads(
            (SD1.config_dir / "vae" / "config.json").read_text())
        vae = AutoencoderKL.from_config(config)
        layout = LdmLayout(0, (), (), len(config["block_out_channels"]), "clip", 0, 0)
        from .checkpoint import _fit

        new = {}
        for name, param in vae.state_dict().items():
            key = name if name in sd else vae_ldm_name(name, layout)[0]
            if key not in sd:
                raise ModelLoadError(f"`vae` {path.name}: no tensor for {name} (expected {key}); not a VAE file")
            new[name] = _fit(key, sd[key], param.shape)
        vae.load_state_dict(new, strict=True)
        return vae.eval()
    if _looks_like_repo_id(str(spec)):
        try:
            return AutoencoderKL.from_pretrained(str(spec), local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load `vae` {spec} from the Hub: {_first_line(e)}") from None
    raise ModelLoadError(f"`vae` not found: {spec}")


# -------------------------------------------------------------------------------------------------------- saving
def single_file_metadata(comps: SDComponents, title: str = "") -> dict[str, str]:
    """Header metadata of a single file: lorakit's configs (exact reload) and ModelSpec fields other tools read."""
    from .checkpoint import CLIP_VOCAB_SIZE, CONFIGS_META_KEY, TOKENIZER_META_KEY, components_configs
    from .checkpoint_tokenizer import tokenizer_files

    v = comps.prediction_type == "v_prediction"
    res = comps.native_resolution
    arch = "stable-diffusion-v1" if not comps.v2 else f"stable-diffusion-v2-{res}{'-v' if v else ''}"
    meta = {
        CONFIGS_META_KEY: json.dumps(components_configs(comps)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion" if comps.v2
        else "https://github.com/CompVis/stable-diffusion",
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if comps.text_encoder.config.vocab_size != CLIP_VOCAB_SIZE or len(comps.tokenizer) != CLIP_VOCAB_SIZE:
        meta[TOKENIZER_META_KEY] = json.dumps(tokenizer_files(comps.tokenizer))
    return meta


def save_single_file(components: SDComponents, path: str | Path, save_precision: str | None = "float",
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `components` as one single-file LDM checkpoint, `.safetensors` or `.ckpt` by extension, atomically.

    `save_precision`: "float" (fp32), "fp16", "bf16", or None to keep the modules' dtypes. The file loads in
    A1111/ComfyUI/sd-scripts/diffusers, and back into lorakit with identical weights and configs.
    """
    from .checkpoint import components_to_ldm, write_single_file

    path = Path(path)
    meta = {**single_file_metadata(components, title=path.stem), **(metadata or {})}
    return write_single_file(components_to_ldm(components), path, metadata=meta, save_precision=save_precision)
