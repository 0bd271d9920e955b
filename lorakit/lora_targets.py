"""Which layers of a Stable Diffusion model get a LoRA, and their kohya names (docs/KOHYA_FORMAT.md §3).

The same layer set as sd-scripts' `networks.lora`:
- text encoder: the Linear layers of every `CLIPAttention` (q/k/v/out_proj) and `CLIPMLP` (fc1/fc2) — SD1.5: 72;
- U-Net: every Linear and 1x1 Conv2d inside every `Transformer2DModel` (attention, feed-forward, proj_in/out) —
  SD1.5: 192;
- LoCon (`conv=True`): also the layers of `ResnetBlock2D`, `Downsample2D`, `Upsample2D`: their kxk convs (kind
  "conv", trained at `conv_dim`), their Linear `time_emb_proj` and 1x1 `conv_shortcut` (at `dim`) — SD1.5: +86.

Selection is by module class, looking through peft wrappers, so it also works on a model that already carries
adapters. `loadable_layers` is the wider set a LoRA *file* may adapt (every Linear/Conv2d). Names come from
`formats.kohya_module_name` (the fixed interchange spelling).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .formats import kohya_module_name

COMPONENTS = ("text_encoder", "unet")
TE_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
UNET_PARENTS = ("Transformer2DModel",)
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


class LoraTarget(NamedTuple):
    """A layer that can carry a LoRA: its component, its dotted path there, and `kind`:
    "linear", "conv1x1" (both at `dim`) or "conv" (a kxk conv, at `conv_dim`)."""

    component: str
    path: str
    kind: str


def base_layer_of(module: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def component_modules(components) -> dict[str, nn.Module]:
    """{'text_encoder': module, 'unet': module} from SDComponents, any object with those attributes, or a dict."""
    get = components.get if isinstance(components, dict) else (lambda k: getattr(components, k, None))
    return {c: get(c) for c in COMPONENTS if get(c) is not None}


def _leaf_layers(module: nn.Module, prefix: str):
    """(path, layer) of each Linear/Conv2d below `module`, looking through peft wrappers (not into them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        base = base_layer_of(child)
        if isinstance(base, (nn.Linear, nn.Conv2d)):
            yield path, base
        elif not isinstance(child, BaseTunerLayer):
            yield from _leaf_layers(child, path)


def _parents(module: nn.Module, prefix: str, classes: tuple[str, ...]):
    """(path, module) of the outermost submodules whose class name is in `classes`."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if type(child).__name__ in classes:
            yield path, child
        else:
            yield from _parents(child, path, classes)


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    return "conv1x1" if tuple(layer.kernel_size) == (1, 1) else "conv"


def lora_targets(components, conv: bool = False) -> dict[str, LoraTarget]:
    """Every layer that gets a LoRA, keyed by its kohya name; `conv=True` adds the LoCon layers (§3 above)."""
    modules = component_modules(components)
    targets: dict[str, LoraTarget] = {}
    for component, parents in (("text_encoder", TE_PARENTS), ("unet", UNET_PARENTS + (UNET_CONV_PARENTS if conv
                                                                                        else ()))):
        if component not in modules:
            continue
        for parent_path, parent in _parents(modules[component], "", parents):
            for path, layer in _leaf_layers(parent, parent_path):
                kind = _kind(layer)
                if component == "unet" and kind == "conv" and type(parent).__name__ not in UNET_CONV_PARENTS:
                    continue  # a kxk conv inside a transformer block is not a LoRA target in sd-scripts
                targets[kohya_module_name(component, path)] = LoraTarget(component, path, kind)
    return targets


def loadable_layers(components) -> dict[str, LoraTarget]:
    """Every Linear/Conv2d of the text encoder and U-Net, keyed by its kohya name: what a LoRA file may adapt.

    A superset of `lora_targets(conv=True)`: other trainers (LyCORIS presets, some Colab kits) also adapt e.g.
    `conv_in`, `conv_out` or `time_embedding.linear_1`; such files load too, as diffusers'
    loader reads them. Keys matching none of these layers are refused.
    """
    targets = {}
    for component, module in component_modules(components).items():
        for path, layer in _leaf_layers(module, ""):
            targets[kohya_module_name(component, path)] = LoraTarget(component, path, _kind(layer))
    return {**targets, **lora_targets(components, conv=True)}


def model_family_of(modules: dict[str, nn.Module]) -> str | None:
    """'sd1'/'sd2' from the widths of a full-size model (CLIP-L 768 vs OpenCLIP-H 1024); None for other sizes."""
    widths = {"text_encoder": "hidden_size", "unet": "cross_attention_dim"}
    for component, key in widths.items():
        width = getattr(getattr(modules.get(component), "config", None), key, None)
        if width in (768, 1024):
            return "sd1" if width == 768 else "sd2"
    return None
