"""The kohya LoRA file format at the edge: file <-> lorakit's in-memory adapter state. Nothing else spells keys.

In memory a LoRA is `dict[module_name, LoraWeights]`, keyed by the kohya module name
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, `lora_te_text_model_encoder_layers_0_mlp_fc1`).
On disk it is the flat kohya tensor dict: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`
(see docs/KOHYA_FORMAT.md §1–4), in a `.safetensors` file (with string metadata) or a plain pickle `.ckpt`/`.pt`.

Public API:
- `kohya_module_name(component, path) -> str` — the fixed interchange spelling of a module's LoRA name;
  `canonical_module_name(name)` normalises names read from files, `component_of(name)` -> 'unet'/'text_encoder'.
- `LoraWeights(up=, down=, alpha=)` — one module (a `lora_math.LoraFactors`); `.rank`, `.scale`, `.is_conv`.
- `parse_kohya(tensors) -> dict[name, LoraWeights]` and `to_kohya(weights, dtype=None) -> tensors` (inverse).
- `load_lora_file(path) -> (tensors, metadata)` (alias `load_lora`), `save_lora(path, state, metadata, save_precision)`.
- `detect_family(weights, metadata) -> (family name | None, reason)`.
- `summarize_lora(path) -> LoraSummary` and `inspect(cfg: InspectConfig | None = None, /, **kwargs)` — the
  `lorakit inspect` job (prints the summary, returns it).

A file is written with NaN/inf values (fp16 overflow), rank 0 or foreign keys never: `save_lora` and `parse_kohya`
refuse them with `LoraFormatError`; pickles are read with `weights_only=True` (`UnsafeCheckpointError`).

Alpha semantics (lorakit's choice, matching sd-scripts): a module without `.alpha`, or with alpha 0, has
alpha = rank, i.e. scale 1. `LoraWeights.alpha` is always the resolved float.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LoraFormatError, ModelLoadError, UnsafeCheckpointError
from .lora_math import LoraFactors

SUFFIX_DOWN = ".lora_down.weight"
SUFFIX_UP = ".lora_up.weight"
SUFFIX_ALPHA = ".alpha"
SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# prefixes of the components lorakit handles (SD1/SD2); SDXL's are recognised only to refuse them clearly
COMPONENT_PREFIXES = {"text_encoder": "lora_te", "unet": "lora_unet"}
_FOREIGN_HINTS = {
    "hada_w1": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", ".diff": "LyCORIS full-diff", "dora_scale": "DoRA",
    ".oft_": "OFT",
}


def kohya_module_name(component: str, path: str) -> str:
    """The kohya LoRA name of module `path` (dotted, as in the diffusers/transformers component) of `component`.

    The text encoder is always spelled `text_model.encoder...` — transformers ≥ 5 flattened `CLIPTextModel`
    (its modules are `encoder.layers.N...`), but the interchange names kept the classic spelling that A1111,
    ComfyUI, sd-scripts and diffusers read.
    """
    if component == "text_encoder":
        path = "text_model." + path.removeprefix("text_model.")
    elif component != "unet":
        raise ValueError(f"unknown component {component!r}; expected 'unet' or 'text_encoder'")
    return f"{COMPONENT_PREFIXES[component]}_{path.replace('.', '_')}"


def canonical_module_name(name: str) -> str:
    """Normalise a module name read from a file: accept the flat text-encoder spelling some tools write
    (`lora_te_encoder_layers_0_...`) as the classic `lora_te_text_model_encoder_layers_0_...`."""
    if name.startswith("lora_te_") and not name.startswith("lora_te_text_model_"):
        return "lora_te_text_model_" + name.removeprefix("lora_te_")
    return name


def component_of(name: str) -> str | None:
    """'unet', 'text_encoder', or None for a name with another prefix."""
    if name.startswith("lora_unet_"):
        return "unet"
    if name.startswith("lora_te_"):
        return "text_encoder"
    return None


@dataclass
class LoraWeights(LoraFactors):
    """One LoRA module: `delta_W = up @ down * alpha / rank` (convs: `down` has the layer's kernel, `up` is 1x1).

    Linear: down `[rank, in]`, up `[out, rank]`. Conv2d: down `[rank, in, kh, kw]`, up `[out, rank, 1, 1]`.
    `alpha` is the resolved alpha (a missing or zero alpha in a file means alpha = rank). A `LoraFactors`
    (lorakit.lora_math), so the pure maths functions take it directly.
    """

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.down.shape[2:]) if self.is_conv else (1, 1)


_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, n)}


def parse_kohya(tensors: dict[str, torch.Tensor], *, where: str = "LoRA") -> dict[str, LoraWeights]:
    """Group a flat kohya tensor dict into `{module_name: LoraWeights}`, validating structure and values.

    Raises `LoraFormatError` for keys that are not kohya LoRA keys (naming the format they look like), modules
    missing `lora_up`/`lora_down`, rank 0, rank disagreement between up and down, non-float tensors and NaN/inf
    values. Tensors keep their dtype (fp8 ones are read as fp16); names are normalised with `canonical_module_name`.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        for suffix, part in ((SUFFIX_DOWN, "down"), (SUFFIX_UP, "up"), (SUFFIX_ALPHA, "alpha")):
            if key.endswith(suffix) and "." not in key[: -len(suffix)]:
                if not isinstance(value, torch.Tensor):
                    raise LoraFormatError(f"{where}: `{key}` is a {type(value).__name__}, not a tensor")
                groups.setdefault(canonical_module_name(key[: -len(suffix)]), {})[part] = value
                break
        else:
            foreign.append(key)
    if foreign:
        raise LoraFormatError(f"{where}: {len(foreign)} key(s) are not kohya LoRA keys{_foreign_hint(foreign)}, "
                              f"e.g. {', '.join(foreign[:3])}")
    if not groups:
        raise LoraFormatError(f"{where}: contains no LoRA modules")
    weights = {}
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            missing = "lora_down.weight" if "down" not in g else "lora_up.weight"
            raise LoraFormatError(f"{where}: module `{name}` has no `{missing}`")
        for part, t in g.items():
            if t.dtype in _FLOAT8:  # stored in 8 bits to save space: every fp8 value is exact in fp16
                g[part] = t.to(torch.float16)
            elif not t.is_floating_point():
                raise LoraFormatError(f"{where}: module `{name}` has {str(t.dtype).removeprefix('torch.')} values in "
                                      f"its {part} tensor; a LoRA holds floating-point weights")
        down, up = g["down"], g["up"]
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise LoraFormatError(f"{where}: module `{name}` has lora_down {tuple(down.shape)} and lora_up "
                                  f"{tuple(up.shape)}; expected 2-D (Linear) or 4-D (Conv2d) tensors of equal rank")
        rank = down.shape[0]
        if rank == 0 or up.shape[1] != rank:
            raise LoraFormatError(f"{where}: module `{name}` has rank {rank} in lora_down but {up.shape[1]} in "
                                  f"lora_up; the rank must be ≥ 1 and the same in both")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoraFormatError(f"{where}: module `{name}`: conv lora_up must be 1x1, got {tuple(up.shape)}")
        for part in ("down", "up", "alpha"):
            if part in g and not torch.isfinite(g[part]).all():
                raise LoraFormatError(f"{where}: module `{name}` has NaN or infinite values in its {part} tensor — "
                                      f"the file is corrupt (or training diverged); do not use it")
        alpha = float(g["alpha"].float().reshape(-1)[0]) if "alpha" in g and g["alpha"].numel() else 0.0
        weights[name] = LoraWeights(down=down, up=up, alpha=alpha if alpha else float(rank))
    return weights


_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def _foreign_hint(keys: list[str]) -> str:
    from .diffusers_lora import is_diffusers_format

    if any(k.startswith("diffusion_model.") and ".lora_" in k for k in keys):
        return (" (they look like a LoRA saved by ComfyUI, with the original model's `diffusion_model.` names, "
                "which lorakit does not read)")
    if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys):
        return (" (this is a model checkpoint, not a LoRA: use it as the model, `sd_model` or "
                "`pretrained_model_name_or_path`)")
    if is_diffusers_format(keys):
        return (" (they look like a diffusers/peft-format LoRA: `load_lora_file` reads such files with kohya keys, "
                "`lorakit.diffusers_lora.diffusers_to_kohya` converts such a dict)")
    for marker, what in _FOREIGN_HINTS.items():
        if any(marker in k for k in keys):
            return f" (they look like a {what} file, which lorakit does not read)"
    return ""


def to_kohya(weights: dict[str, LoraFactors], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The flat kohya tensor dict of `weights` (alpha as a 0-d tensor; None/0 written as the rank), optionally
    cast to `dtype`, on the CPU."""
    out = {}
    for name, w in weights.items():
        dt = dtype or w.down.dtype
        out[name + SUFFIX_DOWN] = w.down.detach().to("cpu", dt).contiguous()
        out[name + SUFFIX_UP] = w.up.detach().to("cpu", dt).contiguous()
        out[name + SUFFIX_ALPHA] = torch.tensor(float(w.alpha or w.rank), dtype=dt)
    return out


# ---------------------------------------------------------------------------------------------------- files

def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file: `.safetensors` (tensors + metadata) or a pickle `.ckpt`/`.pt` (tensors; no metadata).

    Pickles are read with `weights_only=True`: one that wants to run code raises `UnsafeCheckpointError` and
    nothing in it is executed. Returns the raw kohya tensor dict (use `parse_kohya` to validate and group it); a
    file in one of diffusers' LoRA formats comes back with kohya keys (`lorakit.diffusers_lora`).
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _as_kohya(_load_pickle(path), {}, path), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFormatError(f"{path.name}: not a readable safetensors file — truncated or corrupt? "
                              f"({str(e).splitlines()[0][:200]})") from None
    return _as_kohya(tensors, metadata, path), metadata


def _as_kohya(tensors: dict[str, torch.Tensor], metadata: dict, path: Path) -> dict[str, torch.Tensor]:
    """A LoRA saved in one of diffusers' formats, with its keys as kohya's (`lorakit.diffusers_lora`)."""
    from .diffusers_lora import METADATA_KEY, diffusers_to_kohya, is_diffusers_format

    if not is_diffusers_format(tensors):
        return tensors
    config = path.parent / "adapter_config.json"  # a peft adapter's scale lives beside its weights
    if METADATA_KEY not in metadata and path.name.startswith("adapter_model") and config.is_file():
        metadata = {**metadata, METADATA_KEY: config.read_text(encoding="utf-8")}
    return diffusers_to_kohya(tensors, metadata, where=path.name)


load_lora = load_lora_file  # the name `lorakit.load_lora` re-exports


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    from .fileio import safe_torch_load

    try:
        obj = safe_torch_load(path)
    except UnsafeCheckpointError:
        raise
    except ModelLoadError as e:
        raise LoraFormatError(str(e)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraFormatError(f"{path.name}: holds a {type(obj).__name__}, not a dict of LoRA tensors")
    return obj


def save_lora(path: str | Path, state, metadata: dict | None = None, save_precision: str | None = "float") -> Path:
    """Write a kohya-format LoRA atomically; the format follows the extension (.safetensors, .ckpt, .pt).

    `state` is a kohya tensor dict or `{name: LoraWeights | LoraFactors}`. `save_precision`: float/fp32, fp16,
    bf16, or None (keep dtypes). `.safetensors` files get `metadata` (values made strings: numbers/bools via
    `str`, dicts/lists as JSON, None dropped) plus `sshs_model_hash`/`sshs_legacy_hash` computed exactly as
    sd-scripts does. Pickle files hold the plain tensor dict (as sd-scripts writes them) and no metadata.
    """
    from .fileio import save_safetensors, torch_save
    from .lora_metadata import sshs_hashes, stringify_metadata

    path = Path(path)
    if save_precision is not None and save_precision not in SAVE_DTYPES:
        raise ValueError(f"`save_precision` must be one of {', '.join(SAVE_DTYPES)}, got {save_precision!r}")
    dtype = SAVE_DTYPES[save_precision] if save_precision else None
    if state and isinstance(next(iter(state.values())), LoraFactors):
        tensors = to_kohya(state, dtype)
    else:
        tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    parse_kohya(tensors, where=path.name)  # never write what no reader accepts (foreign keys, rank 0, NaN/inf)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        meta = stringify_metadata(metadata or {})
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(tensors, meta)
        return save_safetensors(tensors, path, meta)
    if suffix in (".ckpt", ".pt"):
        return torch_save(tensors, path)
    raise ValueError(f"LoRA file name must end in .safetensors, .ckpt or .pt, got {path.name!r}")


# ---------------------------------------------------------------------------------------------------- families

_TE_HIDDEN_INPUTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1")
_TE_LAYER = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_")
_METADATA_FAMILY = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("stable-diffusion-xl", "sdxl"),
                    ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))


def detect_family(weights: dict[str, LoraWeights], metadata: dict[str, str] | None = None,
                  ) -> tuple[str | None, str]:
    """Which model family a LoRA was made for: ('sd1' | 'sd2' | 'sdxl' | None, the evidence in words).

    Shapes are hard evidence (the text encoder's width 768 = SD1 CLIP-L, 1024 = SD2 OpenCLIP-H; more than 12
    text-encoder layers = SD2; the U-Net cross-attention width), then the metadata (`ss_base_model_version`,
    `ss_v2`, `modelspec.architecture`). None for models of other sizes (the tiny test models) without metadata.
    """
    metadata = metadata or {}
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in weights):
        return "sdxl", "it has SDXL keys (lora_te1_/lora_te2_)"
    if any("input_blocks" in n or "output_blocks" in n for n in weights):  # A1111 also loads SD1 LoRAs spelt so
        return "sdxl", ("its U-Net keys use the original model's block names (input_blocks/output_blocks), as SDXL "
                        "LoRAs do; an SD 1.x LoRA in that spelling is not read by lorakit either")
    for name, w in weights.items():
        if name.startswith("lora_te_") and name.endswith(_TE_HIDDEN_INPUTS):
            width = w.down.shape[1]
            if width in (768, 1024):
                fam = "sd1" if width == 768 else "sd2"
                return fam, f"its text-encoder layers are {width} wide"
        m = _TE_LAYER.match(name)
        if m and int(m.group(1)) >= 12:
            return "sd2", f"it has text-encoder layer {m.group(1)} (SD1's CLIP has 12)"
        if name.endswith("attn2_to_k") and name.startswith("lora_unet_") and w.down.shape[1] in (768, 1024):
            width = w.down.shape[1]
            return ("sd1" if width == 768 else "sd2"), f"its U-Net cross-attention input is {width} wide"
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(key, "")
        for marker, fam in _METADATA_FAMILY:
            if value.startswith(marker):
                return fam, f"its metadata says {key}={value}"
    if metadata.get("ss_v2") in ("True", "False"):
        return ("sd2" if metadata["ss_v2"] == "True" else "sd1"), f"its metadata says ss_v2={metadata['ss_v2']}"
    return None, "no evidence"


FAMILY_WORDS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


# ---------------------------------------------------------------------------------------------------- inspect

@dataclass(repr=False)
class LoraSummary:
    """What `inspect` found in a LoRA file; `str()` is the printed report."""

    def __repr__(self) -> str:  # short: a notebook cell ending in `lorakit.inspect(...)` echoes it after the report
        ranks = ", ".join(f"{r}" for r in sorted(self.ranks))
        return (f"LoraSummary({Path(self.path).name!r}, family={self.family}, {self.te_modules + self.unet_modules} "
                f"modules, rank {ranks or '-'})")


    path: str
    family: str | None
    family_reason: str
    te_modules: int
    unet_modules: int
    conv_modules: int
    ranks: dict[int, int]  # rank -> number of modules
    alphas: dict[float, int]
    alpha_missing: int
    dtypes: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    training_config: dict | None = None

    def __str__(self) -> str:
        from .lora_metadata import metadata_summary

        fam = FAMILY_WORDS.get(self.family, "unknown") if self.family else "unknown"
        lines = [
            f"file:       {self.path}",
            f"family:     {fam} ({self.family_reason})",
            f"modules:    {self.te_modules + self.unet_modules} "
            f"(text encoder {self.te_modules}, U-Net {self.unet_modules}, of which conv 3x3 {self.conv_modules})",
            f"rank(s):    {_counts(self.ranks)}",
            f"alpha(s):   {_counts(self.alphas)}" + (f"; {self.alpha_missing} without alpha (= rank)"
                                                      if self.alpha_missing else ""),
            f"dtype:      {', '.join(self.dtypes)}",
        ]
        summary = metadata_summary(self.metadata)
        lines.append("metadata:" + ("" if summary else "   none"))
        lines += [f"  {k}: {v}" for k, v in summary.items()]
        if self.training_config:
            changed = _non_defaults(self.training_config)
            lines.append(f"training config (lorakit; {len(changed)} options set, the rest at their defaults):")
            lines += [f"  {k} = {json.dumps(v)}" for k, v in changed.items()]
        return "\n".join(lines)


def _non_defaults(config: dict) -> dict:
    """The options of a stored training config that differ from the current `TrainConfig` defaults."""
    from .config import TrainConfig

    defaults = {spec.name: spec.default for spec in TrainConfig.specs()}
    return {k: v for k, v in config.items() if k not in defaults or defaults[k] != v}


def _counts(counter: dict) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    if len(counter) == 1:
        return fmt(next(iter(counter)))
    return ", ".join(f"{fmt(k)} ×{n}" for k, n in sorted(counter.items()))


def summarize_lora(path: str | Path) -> LoraSummary:
    """Read and validate a LoRA file and describe it (no model needed)."""
    from .lora_metadata import training_config_of

    tensors, metadata = load_lora_file(path)
    weights = parse_kohya(tensors, where=Path(path).name)
    family, reason = detect_family(weights, metadata)
    names_with_alpha = {canonical_module_name(k[: -len(SUFFIX_ALPHA)]) for k in tensors if k.endswith(SUFFIX_ALPHA)}
    return LoraSummary(
        path=str(path), family=family, family_reason=reason,
        te_modules=sum(component_of(n) == "text_encoder" for n in weights),
        unet_modules=sum(component_of(n) == "unet" for n in weights),
        conv_modules=sum(w.kernel_size != (1, 1) for w in weights.values()),
        ranks=dict(Counter(w.rank for w in weights.values())),
        alphas=dict(Counter(round(w.alpha, 6) for w in weights.values())),
        alpha_missing=sum(n not in names_with_alpha for n in weights),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        metadata=metadata, training_config=training_config_of(metadata))


def inspect(cfg=None, /, **kwargs) -> LoraSummary:
    """`lorakit inspect file.safetensors`: print family, module counts, ranks, alphas, metadata and the training
    config of a LoRA file; return the `LoraSummary` (notebooks: `lorakit.inspect(path="x.safetensors")`)."""
    from .config import InspectConfig

    if cfg is None:
        cfg = InspectConfig.from_dict(kwargs)
    elif isinstance(cfg, (str, Path)):
        cfg = InspectConfig.from_dict({"path": str(cfg), **kwargs})
    elif kwargs:
        cfg = cfg.replace(**kwargs)
    if not cfg.path:
        raise LoraFormatError("inspect: give the LoRA file to read (`lorakit inspect file.safetensors`)")
    summary = summarize_lora(cfg.path)
    print(summary)
    return summary
