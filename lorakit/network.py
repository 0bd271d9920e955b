"""LoRA on a Stable Diffusion model: which layers get one, and the adapters themselves (peft layers).

lorakit owns the target selection (the same layer set as sd-scripts' `networks.lora`) and the kohya names; peft
provides the layers (`LoraLayer` keeps the original as `base_layer`, handles Linear and Conv2d, merges/unmerges) —
the same layers diffusers' `load_lora_weights` builds, so training and inference run one implementation. lorakit's
subclasses (`lorakit.lora_layers`) only fuse the training forward/backward of a layer into fewer passes.

Targets are sd-scripts' layer set, chosen in `lorakit.lora_targets` (SD1.5: 72 text-encoder + 192 U-Net modules;
LoCon adds the resnet/down/upsampler layers, kxk convs at `conv_dim`/`conv_alpha`).

Scale is `alpha / rank` (not rsLoRA), times the network's multiplier. Dropout (`network_dropout`) is sd-scripts':
on the down-projection's output, `up(dropout(down(x)))` (lorakit's layers run it so; peft's own forward would drop
the adapter's input), in training mode only; so are sd-scripts' rank dropout and module dropout (`network_args`).

Public API:
- `lora_targets(components, conv=False) -> {kohya_name: LoraTarget(component, path, kind)}`
- `add_lora(components, *, dim, alpha, conv_dim=None, conv_alpha=None, dropout=0.0, rank_dropout=0.0,
  module_dropout=0.0, unet=True, text_encoder=True, adapter_name="default", dtype=None) -> LoraNetwork` — a fresh,
  trainable LoRA (up = 0: output unchanged).
- `apply_lora_file(components, path, *, multiplier=1.0, adapter_name=None, ...) -> LoraNetwork` and
  `apply_lora_weights(components, weights, metadata=None, ...)` — a LoRA from a file/in-memory state, ranks and
  alphas per module as stored; refuses files for another family or with keys that match no layer, before
  touching the model.
- `LoraNetwork`: `.trainable_parameters() -> {"unet": [...], "text_encoder": [...]}`, `.state_dict()` (kohya
  tensors, fp32), `.weights()` (`{name: LoraWeights}`), `.load_state_dict(state, strict=True)`,
  `.set_multiplier(m)`, `.enable()`/`.disable()`, `.merge()`/`.unmerge()`, `.remove()`.
- `remove_lora(components, adapter_name=None)` — take LoRA layers out again (all adapters when None).

Several networks can be applied at once under different adapter names, each with its own multiplier; all enabled
ones act together. `merge()` folds one network into the base weights; while any adapter of a layer is merged,
peft runs that layer from its (merged) base weight only, so merge all applied networks or none.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .errors import LoraFormatError
from .formats import FAMILY_WORDS, LoraWeights, component_of, detect_family, load_lora_file, parse_kohya, to_kohya
from .lora_layers import CUSTOM_MODULES, set_extra_dropout
from .lora_math import LoraFactors, lora_delta, max_norm_factor
from .lora_targets import (
    COMPONENTS,
    LoraTarget,
    base_layer_of,
    component_modules,
    loadable_layers,
    lora_targets,
    model_family_of,
)

__all__ = ["LoraNetwork", "LoraTarget", "add_lora", "apply_lora_file", "apply_lora_weights", "lora_targets",
           "remove_lora"]

_DISABLED = "_lorakit_disabled"  # set of adapter names switched off on a component
_FROZEN = "_lorakit_frozen"  # set of adapter names that must not train (applied for inference)


def _existing_adapters(modules: dict[str, nn.Module]) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {a for m in modules.values() for layer in m.modules() if isinstance(layer, LoraLayer)
            for a in layer.lora_A.keys()}


def _check_adapter_name(name: str, modules: dict[str, nn.Module]) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name or ""):
        raise ValueError(f"`adapter_name` must be letters, digits and underscores, got {name!r}")
    if name in _existing_adapters(modules):
        raise ValueError(f"an adapter named {name!r} is already applied to this model: pass another "
                         f"`adapter_name`, or remove it first (`remove_lora(components, {name!r})`)")


def _unique_adapter_name(stem: str, modules: dict[str, nn.Module]) -> str:
    """`stem` made a valid adapter name (letters, digits, _) not yet used on the model: `style`, `style_2`, ..."""
    existing = _existing_adapters(modules)
    base = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "lora"
    name, i = base, 2
    while name in existing:
        name, i = f"{base}_{i}", i + 1
    return name


def _inject(modules: dict[str, nn.Module], adapter_name: str, plan: dict[str, tuple[LoraTarget, int, float]],
            dropout: float) -> None:
    """Wrap the planned layers with peft LoRA layers: plan = {kohya_name: (target, rank, alpha)}."""
    from peft import LoraConfig, inject_adapter_in_model

    for component, module in modules.items():
        entries = [(t.path, r, a) for t, r, a in plan.values() if t.component == component]
        if not entries:
            continue
        # the most common rank/alpha is the config default; exact-path patterns carry the others
        r0 = Counter(r for _, r, _ in entries).most_common(1)[0][0]
        a0 = Counter(a for _, _, a in entries).most_common(1)[0][0]
        config = LoraConfig(
            r=r0, lora_alpha=a0, target_modules=[p for p, _, _ in entries], lora_dropout=dropout, bias="none",
            rank_pattern={re.escape(p): r for p, r, _ in entries if r != r0},
            alpha_pattern={re.escape(p): a for p, _, a in entries if a != a0}, init_lora_weights=True)
        config._register_custom_module(CUSTOM_MODULES)  # peft's layers with lorakit's fused training step
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")  # several adapters on one model is intended
            inject_adapter_in_model(config, module, adapter_name=adapter_name)


def _sync(module: nn.Module) -> None:
    """Make every LoRA layer of `module` run its enabled adapters, and train only enabled, unfrozen ones."""
    from peft.tuners.lora import LoraLayer

    disabled, frozen = getattr(module, _DISABLED, set()), getattr(module, _FROZEN, set())
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            active = [a for a in layer.lora_A.keys() if a not in disabled]
            layer.set_adapter(active)
            for a in layer.lora_A.keys():
                for p in (*layer.lora_A[a].parameters(), *layer.lora_B[a].parameters()):
                    p.requires_grad_(a in active and a not in frozen)


def _fit(tensor: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    """`tensor` reshaped to `shape` when they differ only by 1x1 kernel dims (2-D <-> 4-D 1x1 storage)."""
    if tensor.shape == shape:
        return tensor
    squeeze = [d for d in tensor.shape if d != 1] == [d for d in shape if d != 1]
    if tensor.numel() == shape.numel() and squeeze and max(tensor.dim(), len(shape)) == 4:
        return tensor.reshape(shape)
    raise LoraFormatError(f"{what}: shape {tuple(tensor.shape)} does not fit the model's layer, which needs "
                          f"{tuple(shape)}")


def _expected_shapes(layer: nn.Module, rank: int) -> tuple[torch.Size, torch.Size]:
    if isinstance(layer, nn.Linear):
        return torch.Size((rank, layer.in_features)), torch.Size((layer.out_features, rank))
    return (torch.Size((rank, layer.in_channels // layer.groups, *layer.kernel_size)),
            torch.Size((layer.out_channels, rank, 1, 1)))


def _as_weights(state: dict, where: str = "LoRA state") -> dict[str, LoraWeights]:
    """`{name: LoraWeights}` from a kohya tensor dict or a dict of `LoraFactors` (alpha None/0 = rank)."""
    if state and isinstance(next(iter(state.values())), LoraFactors):
        return {n: LoraWeights(up=w.up, down=w.down, alpha=float(w.alpha or w.rank)) for n, w in state.items()}
    return parse_kohya(state, where=where)


class LoraNetwork:
    """One named LoRA adapter on a model's text encoder and/or U-Net (see the module docstring for the API)."""

    def __init__(self, modules: dict[str, nn.Module], adapter_name: str, targets: dict[str, LoraTarget],
                 multiplier: float = 1.0):
        from peft.tuners.lora import LoraLayer

        self.adapter_name = adapter_name
        self.modules = modules  # the adapted components, e.g. {"text_encoder": te, "unet": unet}
        self.targets = targets
        self.layers: dict[str, LoraLayer] = {}
        for name, t in targets.items():
            layer = modules[t.component].get_submodule(t.path)
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                raise RuntimeError(f"peft did not wrap `{t.path}` of the {t.component} with adapter {adapter_name!r}")
            self.layers[name] = layer
        self.merged = False
        self._multiplier = 1.0
        self.set_multiplier(multiplier)

    def __repr__(self) -> str:
        te = sum(t.component == "text_encoder" for t in self.targets.values())
        ranks = sorted({layer.r[self.adapter_name] for layer in self.layers.values()})
        return (f"LoraNetwork({self.adapter_name!r}: {te} text-encoder + {len(self.targets) - te} U-Net modules, "
                f"rank {ranks[0] if len(ranks) == 1 else ranks}, multiplier {self._multiplier:g}"
                f"{', merged' if self.merged else ''}{'' if self.enabled else ', disabled'})")

    # ---- parameters and state
    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The adapter's parameters per component, for optimizer groups: {"unet": [...], "text_encoder": [...]}
        (a component without LoRA gets an empty list). Makes them trainable (`requires_grad=True`)."""
        groups = {c: [] for c in COMPONENTS}
        for name, layer in self.layers.items():
            for p in (*layer.lora_A[self.adapter_name].parameters(), *layer.lora_B[self.adapter_name].parameters()):
                p.requires_grad_(True)
                groups[self.targets[name].component].append(p)
        for module in self.modules.values():
            getattr(module, _FROZEN, set()).discard(self.adapter_name)
        return groups

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """Max-norm regularisation (sd-scripts' `scale_weight_norms`): scale each module whose ‖ΔW‖ (scale·up@down,
        Frobenius) exceeds `max_norm` back to it, up and down alike. Returns (modules scaled, mean and largest norm
        after scaling)."""
        norms, scaled = [], 0
        a = self.adapter_name
        for layer in self.layers.values():
            down, up = layer.lora_A[a].weight, layer.lora_B[a].weight
            norm = lora_delta(up, down, float(layer.lora_alpha[a]), device=down.device).norm().item()
            factor = max_norm_factor(norm, max_norm)
            if factor < 1:
                scaled += 1
                down.mul_(factor ** 0.5)
                up.mul_(factor ** 0.5)
            norms.append(norm * factor)
        return scaled, sum(norms) / len(norms), max(norms)

    def weights(self) -> dict[str, LoraWeights]:
        """The adapter as `{kohya_name: LoraWeights}` (fp32 copies on the CPU; conv modules 4-D, Linear 2-D)."""
        out = {}
        for name, layer in self.layers.items():
            a = self.adapter_name
            out[name] = LoraWeights(down=layer.lora_A[a].weight.detach().float().cpu().clone(),
                                    up=layer.lora_B[a].weight.detach().float().cpu().clone(),
                                    alpha=float(layer.lora_alpha[a]))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kohya tensor dict (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`), fp32, CPU."""
        return to_kohya(self.weights(), torch.float32)

    def load_state_dict(self, state, strict: bool = True) -> list[str]:
        """Copy a kohya tensor dict (or `{name: LoraWeights}`) into this network; ranks must match.

        Alphas are taken from the state. `strict`: every module of the network must be in the state and
        every module of the state in the network; otherwise modules missing from the state keep their values
        and the names of unexpected ones are returned.
        """
        weights = _as_weights(state)
        unexpected = sorted(set(weights) - set(self.layers))
        missing = sorted(set(self.layers) - set(weights))
        if strict and (unexpected or missing):
            raise LoraFormatError(f"LoRA state does not match the network: {len(missing)} module(s) missing "
                                  f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        a = self.adapter_name
        for name, w in weights.items():
            if name not in self.layers:
                continue
            layer = self.layers[name]
            if w.rank != layer.r[a]:
                raise LoraFormatError(f"module `{name}` has rank {w.rank} in the state but {layer.r[a]} in the "
                                      f"network; build the network from the file instead (`apply_lora_file`)")
            down, up = layer.lora_A[a].weight, layer.lora_B[a].weight
            with torch.no_grad():
                down.copy_(_fit(w.down, down.shape, f"`{name}` lora_down"))
                up.copy_(_fit(w.up, up.shape, f"`{name}` lora_up"))
            layer.lora_alpha[a] = float(w.alpha)
        self.set_multiplier(self._multiplier)  # scaling = multiplier * alpha / rank with the new alphas
        return unexpected

    # ---- strength, switching, merging
    @property
    def multiplier(self) -> float:
        return self._multiplier

    def set_multiplier(self, multiplier: float) -> None:
        """Scale the adapter's effect: output = base + multiplier * alpha/rank * up(down(x))."""
        merged = self.merged
        if merged:
            self.unmerge()
        for layer in self.layers.values():
            layer.set_scale(self.adapter_name, float(multiplier))
        self._multiplier = float(multiplier)
        if merged:
            self.merge()

    @property
    def enabled(self) -> bool:
        return not any(self.adapter_name in getattr(m, _DISABLED, set()) for m in self.modules.values())

    def enable(self) -> None:
        for module in self.modules.values():
            getattr(module, _DISABLED, set()).discard(self.adapter_name)
            _sync(module)

    def disable(self) -> None:
        """Switch the adapter off (the model computes as if it were absent) without removing it."""
        if self.merged:
            self.unmerge()
        for module in self.modules.values():
            if not hasattr(module, _DISABLED):
                setattr(module, _DISABLED, set())
            getattr(module, _DISABLED).add(self.adapter_name)
            _sync(module)

    def merge(self) -> None:
        """Fold `multiplier * alpha/rank * up @ down` into each base weight (faster inference; see module doc)."""
        if not self.enabled:
            raise ValueError(f"adapter {self.adapter_name!r} is disabled; enable() it before merging")
        if not self.merged:
            for layer in self.layers.values():
                layer.merge(adapter_names=[self.adapter_name])
            self.merged = True

    def unmerge(self) -> None:
        """Subtract this adapter's delta from the base weights again (other merged adapters stay merged)."""
        if not self.merged:
            return
        for layer in self.layers.values():
            if self.adapter_name in layer.merged_adapters:
                weight = layer.get_base_layer().weight
                with torch.no_grad():
                    weight -= layer.get_delta_weight(self.adapter_name).to(weight.dtype)
                layer.merged_adapters.remove(self.adapter_name)
        self.merged = False

    def remove(self) -> None:
        """Take this adapter out of the model (unmerging it first); layers left without adapters become plain."""
        self.unmerge()
        for module in self.modules.values():
            _remove_adapter(module, self.adapter_name)
        self.layers = {}


def _remove_adapter(module: nn.Module, adapter_name: str | None) -> None:
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]
    for path, layer in wrapped:
        names = list(layer.lora_A.keys()) if adapter_name is None else [adapter_name]
        for name in names:
            if name not in layer.lora_A:
                continue
            if name in layer.merged_adapters:
                weight = layer.get_base_layer().weight
                with torch.no_grad():
                    weight -= layer.get_delta_weight(name).to(weight.dtype)
                layer.merged_adapters.remove(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer.delete_adapter(name)
        if not layer.lora_A:
            parent_path, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent_path) if parent_path else module, child, layer.get_base_layer())
    peft_config = getattr(module, "peft_config", None)
    if isinstance(peft_config, dict):
        for name in list(peft_config) if adapter_name is None else [adapter_name]:
            peft_config.pop(name, None)
    for attr in (_DISABLED, _FROZEN):
        if adapter_name is None:
            getattr(module, attr, set()).clear()
        else:
            getattr(module, attr, set()).discard(adapter_name)
    _sync(module)


def remove_lora(components, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all, `adapter_name=None`) from the text encoder and U-Net, unmerging merged ones."""
    for module in component_modules(components).values():
        _remove_adapter(module, adapter_name)


def _finish(modules, adapter_name, plan, multiplier, trainable, dtype, rank_dropout: float = 0.0,
            module_dropout: float = 0.0) -> LoraNetwork:
    targets = {name: t for name, (t, _, _) in plan.items()}
    used = {t.component for t in targets.values()}
    modules = {c: m for c, m in modules.items() if c in used}
    for module in modules.values():
        if not hasattr(module, _FROZEN):
            setattr(module, _FROZEN, set())
        if not trainable:
            getattr(module, _FROZEN).add(adapter_name)
    net = LoraNetwork(modules, adapter_name, targets, multiplier)
    if dtype is not None:
        for layer in net.layers.values():
            layer.lora_A[adapter_name].to(dtype)
            layer.lora_B[adapter_name].to(dtype)
    if rank_dropout or module_dropout:
        for layer in net.layers.values():
            set_extra_dropout(layer, adapter_name, rank=rank_dropout, module=module_dropout)
    for module in modules.values():
        _sync(module)
    return net


def add_lora(components, *, dim: int, alpha: float | None, conv_dim: int | None = None,
             conv_alpha: float | None = None, dropout: float = 0.0, rank_dropout: float = 0.0,
             module_dropout: float = 0.0, unet: bool = True, text_encoder: bool = True,
             adapter_name: str = "default", dtype: torch.dtype | None = None) -> LoraNetwork:
    """Add a fresh, trainable LoRA (down kaiming-uniform, up zero: outputs unchanged) to the model.

    `dim`/`alpha`: rank and alpha of Linear and 1x1-conv modules (alpha None or 0 = dim, scale 1);
    `conv_dim`/`conv_alpha`: LoCon on the U-Net's kxk convs (conv_alpha None = conv_dim); `unet`/`text_encoder`:
    which components get modules (`network_train_unet_only` → text_encoder=False); the base weights of both
    components are frozen (`requires_grad=False`), only the adapter trains. `dtype`: the adapter's
    weight dtype (default: the base layer's; use torch.float32 to train fp32 adapters on an fp16 model).
    `dropout`, `rank_dropout`, `module_dropout`: sd-scripts' three dropouts, in training mode only.
    """
    if dim < 1:
        raise ValueError(f"`network_dim` must be ≥ 1, got {dim}")
    if conv_dim is not None and conv_dim < 1:
        raise ValueError(f"`conv_dim` must be ≥ 1, got {conv_dim}")
    for name, p in (("network_dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
        if not (0.0 <= p < 1.0):
            raise ValueError(f"`{name}` must be in [0, 1), got {p}")
    if not (unet or text_encoder):
        raise ValueError("a LoRA needs the U-Net or the text encoder (or both): both were switched off")
    all_modules = component_modules(components)
    modules = {c: m for c, m in all_modules.items()
               if (c == "unet" and unet) or (c == "text_encoder" and text_encoder)}
    _check_adapter_name(adapter_name, modules)
    for module in all_modules.values():  # only the LoRA trains (peft freezes the adapted components' own weights)
        module.requires_grad_(False)
    alpha = float(alpha) if alpha else float(dim)
    conv_alpha = float(conv_alpha) if conv_alpha else float(conv_dim or 0)
    plan = {name: (t, conv_dim, conv_alpha) if t.kind == "conv" else (t, dim, alpha)
            for name, t in lora_targets(modules, conv=conv_dim is not None).items()}
    if not plan:
        raise LoraFormatError("found no layers to put a LoRA on: is this a Stable Diffusion text encoder/U-Net?")
    _inject(modules, adapter_name, plan, dropout)
    return _finish(modules, adapter_name, plan, 1.0, True, dtype, rank_dropout, module_dropout)


def check_lora_fits(components, weights: dict, metadata: dict | None = None, where: str = "LoRA") -> None:
    """Refuse a LoRA (`{name: LoraWeights}` or a kohya tensor dict) that does not fit the model, naming why: made
    for another family (an SD2 LoRA on SD1, an SDXL one), a module that matches no layer, a shape that does not fit."""
    weights = _as_weights(weights, where)
    modules = component_modules(components)
    family, reason = detect_family(weights, metadata)
    model_family = getattr(getattr(components, "family", None), "name", None) or model_family_of(modules)
    if family and model_family and family != model_family:
        raise LoraFormatError(f"{where} is a LoRA for {FAMILY_WORDS[family]} ({reason}) but the model is "
                              f"{FAMILY_WORDS.get(model_family, model_family)}: use a LoRA made for this model "
                              f"family — nothing was applied")
    targets = loadable_layers(modules)
    unknown = sorted(n for n in weights if n not in targets)
    if unknown:
        missing_parts = sorted({component_of(n) or n.split("_")[0] + "_" + n.split("_")[1] for n in unknown})
        raise LoraFormatError(f"{where}: {len(unknown)} of {len(weights)} modules match no layer of this model "
                              f"(e.g. {', '.join(unknown[:3])}; parts: {', '.join(missing_parts)}) — is it for "
                              f"another model family or architecture? Nothing was applied")
    problems = []
    for name, w in weights.items():
        t = targets[name]
        down_shape, up_shape = _expected_shapes(base_layer_of(modules[t.component].get_submodule(t.path)), w.rank)
        try:
            _fit(w.down, down_shape, f"`{name}` lora_down")
            _fit(w.up, up_shape, f"`{name}` lora_up")
        except LoraFormatError as e:
            problems.append(str(e))
    if problems:
        raise LoraFormatError(f"{where}: {len(problems)} module(s) have shapes that do not fit this model "
                              f"(another model family or size?); nothing was applied. First: {problems[0]}")


def apply_lora_weights(components, weights: dict, metadata: dict | None = None, *, multiplier: float = 1.0,
                       adapter_name: str | None = None, unet: bool = True, text_encoder: bool = True,
                       trainable: bool = False, dropout: float = 0.0, rank_dropout: float = 0.0,
                       module_dropout: float = 0.0, dtype: torch.dtype | None = None,
                       where: str = "LoRA") -> LoraNetwork:
    """Apply an in-memory LoRA (`{name: LoraWeights}` or a kohya tensor dict) with its own ranks and alphas.

    Everything is checked before the model is touched: the family (a LoRA for SD2 on an SD1 model is refused,
    naming both), that every module matches a layer of this model, and every shape. `unet`/`text_encoder`
    False drops that component's modules. `trainable=True` continues training it (sd-scripts' `network_weights`).
    `adapter_name` defaults to "lora" (made unique). As with any peft injection, the adapted components' own
    weights are left with `requires_grad=False`.
    """
    weights = _as_weights(weights, where)
    check_lora_fits(components, weights, metadata, where)
    weights = {n: w for n, w in weights.items()
               if (component_of(n) != "unet" or unet) and (component_of(n) != "text_encoder" or text_encoder)}
    modules = component_modules(components)
    targets = loadable_layers(modules)
    if not weights:
        raise LoraFormatError(f"{where}: no modules left to apply (unet={unet}, text_encoder={text_encoder})")
    adapter_name = adapter_name or _unique_adapter_name("lora", modules)
    _check_adapter_name(adapter_name, modules)
    plan = {name: (targets[name], w.rank, w.alpha) for name, w in weights.items()}
    _inject(modules, adapter_name, plan, dropout)
    net = _finish(modules, adapter_name, plan, multiplier, trainable, dtype, rank_dropout, module_dropout)
    net.load_state_dict(weights)
    return net


def apply_lora_file(components, path: str | Path, *, multiplier: float = 1.0, adapter_name: str | None = None,
                    **kwargs) -> LoraNetwork:
    """Load a kohya LoRA file (.safetensors/.ckpt/.pt) and apply it at `multiplier` (see `apply_lora_weights`).

    `adapter_name` defaults to the file's stem (made unique), so several files can be applied at once.
    """
    path = Path(path)
    tensors, metadata = load_lora_file(path)
    weights = parse_kohya(tensors, where=path.name)
    if adapter_name is None:
        adapter_name = _unique_adapter_name(path.stem, component_modules(components))
    return apply_lora_weights(components, weights, metadata, multiplier=multiplier, adapter_name=adapter_name,
                              where=path.name, **kwargs)
