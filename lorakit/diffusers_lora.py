"""LoRA files in diffusers' own formats, read as kohya LoRAs (so generate, merge, inspect and `network_weights` take
them, and `merge` can write them out in kohya format for A1111, ComfyUI and sd-scripts).

Formats read (what diffusers' training examples and `save_lora_weights` write, `pytorch_lora_weights.safetensors`):
- peft: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>.…`; the scale comes from the
  `lora_adapter_metadata` header (peft's `LoraConfig` per component: `lora_alpha`, `alpha_pattern`, `use_rslora`),
  and without it is 1 (alpha = rank: what diffusers' training scripts train with; a note says so). Keys without a
  component prefix are told apart by the module path.
- the older formats: `<module>.lora.down.weight` / `.lora.up.weight` (with optional `<module>.alpha`), the text
  encoder's `….lora_linear_layer.down.weight` and `…self_attn.to_q_lora.down.weight`, and attention processors
  `…attn1.processor.to_q_lora.down.weight`.
- a peft adapter (`adapter_model.safetensors`, keys `base_model.model.<module>…`) with the `adapter_config.json`
  beside it, and a model's own `save_lora_adapter` file (its metadata unprefixed).

`lora_A` is kohya's `lora_down`, `lora_B` its `lora_up`; module paths are the same diffusers / transformers paths
kohya names are made of (`kohya_module_name`). DoRA and embedding LoRAs are refused by name.
"""

from __future__ import annotations

import json
import math
import re
import sys

import torch

from .errors import LoraFormatError
from .formats import SUFFIX_ALPHA, SUFFIX_DOWN, SUFFIX_UP, kohya_module_name

METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry: peft LoraConfig per component, JSON
# peft's `…lora_A.weight`, also `…lora_A.<adapter>.weight`
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_OLD = re.compile(r"^(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up)\.weight$")
# attention-processor keys: the U-Net's `…attn1.processor.to_q_lora.down.weight`, the text encoder's
# `…self_attn.to_q_lora.down.weight`; each projection's module name in the U-Net and in CLIP
_PROCESSOR = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_PROJ_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROJ_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PARTS = {"A": "down", "B": "up", "down": "down", "up": "up"}
_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
_TEXT_ROOTS = ("text_model.", "encoder.layers.")


def is_diffusers_format(keys) -> bool:
    """Whether a LoRA's keys are diffusers' (peft or older) rather than kohya's."""
    return any(_split(k) is not None for k in keys) and not any(k.endswith(SUFFIX_DOWN) for k in keys)


def _split(key: str) -> tuple[str, str] | None:
    """(module path with its component prefix, 'down'/'up') of a diffusers LoRA key, else None."""
    if m := _PROCESSOR.match(key):
        names = _PROJ_TEXT if m["module"].endswith(".self_attn") else _PROJ_UNET
        return f"{m['module']}.{names[m['proj']]}", m["part"]
    for pattern in (_PEFT, _OLD):
        if m := pattern.match(key):
            return m["module"], _PARTS[m["part"]]
    return None


def _component(module: str, where: str) -> tuple[str, str]:
    """('unet' | 'text_encoder', the module's path inside it)."""
    module = module.removeprefix("base_model.model.")
    if module.startswith("text_encoder_2."):
        raise LoraFormatError(f"{where}: has LoRA weights for a second text encoder (`text_encoder_2`): an SDXL "
                              f"LoRA; lorakit handles SD 1.x and 2.x")
    for prefix, component in _PREFIXES.items():
        if module.startswith(prefix):
            return component, module.removeprefix(prefix)
    if module.startswith(_UNET_ROOTS):
        return "unet", module
    if module.startswith(_TEXT_ROOTS):
        return "text_encoder", module
    raise LoraFormatError(f"{where}: cannot tell which model `{module}` belongs to (expected a `unet.` or "
                          f"`text_encoder.` prefix, or a U-Net / CLIP module path)")


def _adapter_configs(metadata: dict | None, where: str) -> dict[str, dict]:
    """{component: its peft LoraConfig values} from diffusers' `lora_adapter_metadata` header entry."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFormatError(f"{where}: its `{METADATA_KEY}` header entry is not valid JSON") from None
    if "lora_alpha" in flat or "r" in flat:  # one model's peft config, unprefixed (`save_lora_adapter`, peft)
        return {"*": flat}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _alpha(path: str, rank: int, config: dict) -> float:
    """kohya's alpha (scale = alpha / rank) for a module trained with peft's `config` (none: scale 1)."""
    if not config:
        return float(rank)
    alpha = float(config.get("lora_alpha") or rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # peft's rule: the pattern ends the path
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = float(value)
            break
    if config.get("use_rslora"):  # peft scales by alpha / sqrt(rank)
        return alpha * math.sqrt(rank)
    return alpha


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict | None = None, *,
                       where: str = "LoRA") -> dict[str, torch.Tensor]:
    """The kohya tensor dict (`lora_down`, `lora_up`, `alpha` per module) of a LoRA in a diffusers format."""
    configs = _adapter_configs(metadata, where)
    adapters = sorted({m["adapter"] for k in tensors if (m := _PEFT.match(k)) and m["adapter"]})
    if len(adapters) > 1:
        raise LoraFormatError(f"{where} holds {len(adapters)} peft adapters ({', '.join(adapters)}): lorakit reads one "
                              f"LoRA per file; save each adapter to a file of its own")
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], torch.Tensor] = {}
    for key, value in tensors.items():
        if "lora_magnitude_vector" in key:
            raise LoraFormatError(f"{where}: a DoRA LoRA (`{key}`), which lorakit does not read")
        if "lora_embedding_" in key:
            raise LoraFormatError(f"{where}: a LoRA on embedding layers (`{key}`), which lorakit does not read")
        if key.endswith(SUFFIX_ALPHA):  # the older format's per-module alpha, named as the module or as its weights
            base = key.removesuffix(SUFFIX_ALPHA)
            split = _split(base + ".down.weight")  # `…to_q_lora.alpha`, `…fc1.lora_linear_layer.alpha`
            alphas[_component(split[0] if split else base, where)] = value
            continue
        split = _split(key)
        if split is None:
            raise LoraFormatError(f"{where}: `{key}` is neither a kohya nor a diffusers LoRA key")
        module, part = split
        parts = modules.setdefault(_component(module, where), {})
        if part in parts:
            raise LoraFormatError(f"{where}: module `{module}` has two {part} weights (`{key}` is the second)")
        parts[part] = value
    unmatched = sorted(f"{c}.{p}" for c, p in set(alphas) - set(modules))
    if unmatched:  # a module left at scale 1 by an alpha that names nothing would be applied too strongly
        raise LoraFormatError(f"{where}: {len(unmatched)} alpha value(s) match no module's weights (e.g. "
                              f"`{unmatched[0]}.alpha`): their modules' scale is unknown")
    if not configs and not alphas:
        print(f"note: {where} holds no LoRA scale (peft's `lora_alpha`): read with scale 1 (alpha = rank), as "
              f"diffusers' training scripts train", file=sys.stderr)
    out = {}
    for (component, path), parts in modules.items():
        if "down" not in parts or "up" not in parts:
            missing = "lora_A / down" if "down" not in parts else "lora_B / up"
            raise LoraFormatError(f"{where}: module `{component}.{path}` has no {missing} weight")
        name = kohya_module_name(component, path)
        down = parts["down"]
        rank = down.shape[0]
        explicit = alphas.get((component, path))
        config = configs.get(component) or configs.get("*", {})
        alpha = float(explicit) if explicit is not None else _alpha(path, rank, config)
        out[name + SUFFIX_DOWN], out[name + SUFFIX_UP] = down, parts["up"]
        out[name + SUFFIX_ALPHA] = torch.tensor(alpha, dtype=down.dtype)
    return out
