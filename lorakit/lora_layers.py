"""LoRA layers with a fused training step: peft's `lora.Linear` / `lora.Conv2d` plus one autograd function for the
case that dominates training.

peft runs an adapter as `result + lora_B(lora_A(dropout(x))) * scaling`: separate modules, so each LoRA layer adds a
full-activation-size multiply and add in forward and as many passes again in backward, plus the accumulation of
the input gradient. On a CPU those passes are memory-bound and cost more than the rank-r products themselves
(full-size SD1.5, CPU fp32, one thread: a U-Net forward + backward with peft's layers costs 1.16x the bare frozen
step, with these 1.03x; `benchmarks/train_step.py --peft-layers` compares whole training steps). The classes here
keep everything of peft's (parameters, state dict, merge/unmerge, several adapters, the inference forward diffusers
uses) and replace only the forward of a layer that trains one plain adapter — gradients on, no DoRA, not merged —
by `_LoraProduct`:

    forward   y = x·Wᵀ + b + s·h·Bᵀ,  h = m ⊙ x·Aᵀ     h is saved (rank r); x is saved for ∂A
    backward  gh = s·(g·B) ⊙ m    ∂B = s·gᵀ·h    ∂A = ghᵀ·x    ∂x = g·W + gh·A

`m` is the dropout mask (`network_dropout` p: each entry 0 or 1/(1-p); m = 1 without dropout). As in sd-scripts
(`up(dropout(down(x)))`), dropout acts on the down-projection's output, where peft's own forward drops the
adapter's input; any call with the dropout active takes sd-scripts' order (`_unfused_forward` where the fused
product does not apply, e.g. a kxk LoCon conv). sd-scripts' two other dropouts act in training mode too:
rank dropout (`network_args` rank_dropout p) multiplies m by a mask that keeps or drops each rank channel for a
whole sample (0 or 1/(1-p), the same for all of its tokens), and module dropout (module_dropout p) runs the base
layer alone on a fraction p of the calls (`set_extra_dropout` sets them on a layer's adapter).

The rank-r products are added in place (`addmm_`/`baddbmm_`) into the base product and into the input gradient, so a
layer costs its base products plus six rank-r products (two forward, four backward) and no full-size elementwise
pass. In fp32 a layer that sees many tokens (SD1.5 at 512 px: the 64x64 and 32x32 levels, `_merge_weight`) computes
with the effective weight W' = W + s·B·A instead: `y = x·W'ᵀ + b` and `∂x = g·W'`, so its step adds only the four
rank-r products the gradients need (x·Aᵀ, g·B, gᵀ·h, ghᵀ·x) and one pass over W; the other two and their
read-modify-write passes over the output and the input gradient are gone. (Not in fp16/bf16: there W' would round
the adapter's small delta to the base weight's precision; nor with dropout, which W' cannot express.) A 1x1
convolution is computed as the same products over channels ([out, in] @ [n, in, h·w]), which is also faster on a
CPU than the convolution kernels.

Public API: `LoraLinear`, `LoraConv2d`, `CUSTOM_MODULES` ({nn.Linear: LoraLinear, nn.Conv2d: LoraConv2d}, for
`LoraConfig._register_custom_module`), `set_extra_dropout(layer, adapter_name, rank=, module=)`.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import layer as peft_lora
from torch import nn

__all__ = ["CUSTOM_MODULES", "LoraConv2d", "LoraLinear", "set_extra_dropout"]


def _compute_dtype(x: torch.Tensor, *weights: torch.Tensor) -> torch.dtype | None:
    """The dtype the layer computes in: autocast's when it is on; else the common dtype, or None when the dtypes
    differ (peft's forward then casts per product)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if all(w.dtype == x.dtype for w in weights) else None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`: itself when it already is (no call: the layers run a few hundred times a step)."""
    return t if t.dtype == dtype else t.to(dtype)


class _LoraProduct(torch.autograd.Function):
    """y = base(x) + s·B(A(x)) for a Linear (`x` [..., in]) or a 1x1 Conv2d (`x` [n, in, h, w]); gradients for x,
    A and B (the base weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float, conv: bool, dtype: torch.dtype, dropout: float = 0.0,
                rank_dropout: float = 0.0):
        if torch.is_autocast_enabled(x.device.type):  # the products run in `dtype`, not in autocast's choice
            with torch.autocast(x.device.type, enabled=False):
                return _LoraProduct._forward(ctx, x, weight, bias, down, up, scale, conv, dtype, dropout,
                                             rank_dropout)
        return _LoraProduct._forward(ctx, x, weight, bias, down, up, scale, conv, dtype, dropout, rank_dropout)

    @staticmethod
    def _forward(ctx, x, weight, bias, down, up, scale, conv, dtype, dropout, rank_dropout):
        ctx.conv, ctx.scale, ctx.dtype = conv, scale, dtype
        ctx.shapes = (x.shape, x.dtype, down.shape, down.dtype, up.shape, up.dtype)
        xc, w, a, b = _as(x, dtype), _as(weight, dtype), _as(down, dtype), _as(up, dtype)
        if conv:
            w, a, b = w.flatten(1), a.flatten(1), b.flatten(1)
        bias = None if bias is None else _as(bias, dtype)
        xs = xc.flatten(2) if conv else xc.reshape(-1, xc.shape[-1])  # conv [n, in, h·w]; linear [N, in]
        tokens = xs.shape[0] * xs.shape[2] if conv else xs.shape[0]
        ctx.merged = merged = not (dropout or rank_dropout) and _merge_weight(tokens, *w.shape, dtype)
        if merged:  # W' = W + s·B·A: the base product computes the adapter's output too
            w = torch.addmm(w, b, a, alpha=scale)
        # a 1x1 convolution is a product over channels: [out, in] @ [n, in, h·w]
        h = a @ xs if conv else torch.nn.functional.linear(xs, a)  # [n, r, h·w] / [N, r]
        keep = None  # the dropout mask m, scaled: 0 or 1/(1-p)
        if dropout:
            keep = torch.empty_like(h).bernoulli_(1 - dropout).div_(1 - dropout)
        if rank_dropout:  # [n, r] for each sample, over its tokens: [n, r, 1] (conv) or [n·tokens, r] rows
            ranks = _rank_mask(x.shape[0], h.shape[1] if conv else h.shape[-1], rank_dropout, h)
            ranks = ranks[:, :, None] if conv else ranks.view(ranks.shape[0], *[1] * (x.dim() - 2), -1).expand(
                *x.shape[:-1], -1).reshape(-1, ranks.shape[1])
            keep = ranks if keep is None else keep * ranks
        if keep is not None:
            h = h * keep
        if conv:
            y = w @ xs
            if not merged:
                y.baddbmm_(b.expand(xs.shape[0], -1, -1), h, alpha=scale)
            if bias is not None:
                y += bias[:, None]
            y = y.view(x.shape[0], -1, *x.shape[2:])
        else:
            y = torch.nn.functional.linear(xc, w, bias)
            if not merged:
                y.view(-1, y.shape[-1]).addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(xs, h, w if merged else weight, a, b, keep)
        return y

    @staticmethod
    def backward(ctx, grad):
        xs, h, weight, a, b, keep = ctx.saved_tensors
        x_shape, x_dtype, down_shape, down_dtype, up_shape, up_dtype = ctx.shapes
        s, dtype, merged, conv = ctx.scale, ctx.dtype, ctx.merged, ctx.conv
        w = _as(weight, dtype)  # W' when merged
        g = _as(grad, dtype)
        # ∂x is not needed before the first adapted layer (nothing upstream trains); ∂A or ∂B not for a frozen one
        need_down, need_up = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        need_gh = need_down or (ctx.needs_input_grad[0] and not merged)
        grad_x = grad_down = grad_up = None
        if conv:
            w = w.flatten(1)
            gs = g.flatten(2)  # [n, out, h·w]
            if need_gh:
                gh = (b.t() @ gs).mul_(s)  # [n, r, h·w]
                if keep is not None:
                    gh.mul_(keep)
            if need_up:
                grad_up = (gs @ h.transpose(1, 2)).sum(0).mul_(s).reshape(up_shape)
            if need_down:
                grad_down = (gh @ xs.transpose(1, 2)).sum(0).reshape(down_shape)
            if ctx.needs_input_grad[0]:
                grad_x = w.t() @ gs
                if not merged:
                    grad_x.baddbmm_(a.t().expand(gs.shape[0], -1, -1), gh)
        else:
            gs = g.reshape(-1, g.shape[-1])  # [N, out]
            if need_gh:
                gh = (gs @ b).mul_(s)  # [N, r]
                if keep is not None:
                    gh.mul_(keep)
            if need_up:  # ∂B as (hᵀ·g)ᵀ: the product that reads g row by row, 1.4-1.8x faster than gᵀ·h on a CPU
                grad_up = (h.t() @ gs).mul_(s).t().contiguous()
            if need_down:
                grad_down = gh.t() @ xs
            if ctx.needs_input_grad[0]:
                grad_x = gs @ w
                if not merged:
                    grad_x.addmm_(gh, a)
        if grad_x is not None:
            grad_x = _as(grad_x.reshape(x_shape), x_dtype)
        grad_down = None if grad_down is None else _as(grad_down, down_dtype)
        grad_up = None if grad_up is None else _as(grad_up, up_dtype)
        return (grad_x, None, None, grad_down, grad_up, None, None, None, None, None)


def _rank_mask(samples: int, rank: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """sd-scripts' rank dropout: for each sample, each rank channel kept (1/(1-p)) or dropped (0)."""
    return (torch.rand(samples, rank, device=like.device) > p).to(like.dtype).div_(1 - p)


def _merge_weight(tokens: int, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether the step computes with the effective weight W' = W + s·B·A. Forming W' costs one pass over W (and
    out·in·r multiply-adds) and saves, per step, the rank-r products x·Aᵀ·Bᵀ and gh·A with their read-modify-write
    passes over the output and the input gradient (tokens·(in + out) values): worth it when the layer sees more
    tokens than in·out / (in + out) — SD1.5 at 512 px: the 64x64 and 32x32 levels, not the 16x16 and 8x8 ones
    nor the text cross-attention. W' is kept for the backward pass (out·in values a layer: ~0.2 GB for SD1.5 in
    fp32). Only in single or double precision: in fp16/bf16, W' would round the adapter's small delta to the base
    weight's precision."""
    full_precision = dtype in (torch.float32, torch.float64)
    return full_precision and tokens * (in_features + out_features) >= in_features * out_features


def _dropout(layer: peft_lora.LoraLayer, name: str) -> float | None:
    """The adapter's dropout probability for this call: 0 without dropout or in eval mode; None for a kind of dropout
    the layers here do not run."""
    module = layer.lora_dropout[name]
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout and 0.0 <= module.p < 1.0:
        return module.p if module.training else 0.0
    return None


def set_extra_dropout(layer: peft_lora.LoraLayer, adapter_name: str, *, rank: float = 0.0,
                      module: float = 0.0) -> None:
    """sd-scripts' rank dropout and module dropout (probabilities in [0, 1)) for one adapter of `layer`, in training
    mode (see the module docstring)."""
    for attr, p in (("lorakit_rank_dropout", rank), ("lorakit_module_dropout", module)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"a dropout probability must be in [0, 1), got {p}")
        if not hasattr(layer, attr):
            setattr(layer, attr, {})
        getattr(layer, attr)[adapter_name] = float(p)


def _extra_dropout(layer: peft_lora.LoraLayer, attr: str, name: str) -> float:
    return getattr(layer, attr, {}).get(name, 0.0) if layer.training else 0.0


def _module_dropped(layer: peft_lora.LoraLayer, args: tuple, kwargs: dict) -> bool:
    """Module dropout: this training-mode call runs the base layer alone (probability p, one draw per call)."""
    if not getattr(layer, "lorakit_module_dropout", None) or not layer.training:
        return False
    adapter = _plain_adapter(layer, args, kwargs)
    p = _extra_dropout(layer, "lorakit_module_dropout", adapter[0]) if adapter else 0.0
    return bool(p) and torch.rand(1).item() < p


def _plain_adapter(layer: peft_lora.LoraLayer, args: tuple, kwargs: dict) -> tuple[str, float] | None:
    """(name, dropout p) of the layer's one active, plain adapter (enabled, not merged, no DoRA or other variant, a
    dropout the layers here run), else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    (name,) = active
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    p = _dropout(layer, name)
    return None if p is None else (name, p)


def _fused_plan(layer: peft_lora.LoraLayer, base: nn.Module, x: torch.Tensor, args: tuple,
                kwargs: dict) -> tuple | None:
    """(A, B, scale, compute dtype, dropout p, rank dropout p) when the fused step can run this call — gradients on,
    the one plain adapter trains (A, B or both), the base layer is frozen — else None."""
    adapter = _plain_adapter(layer, args, kwargs) if torch.is_grad_enabled() else None
    if adapter is None:
        return None
    name, p = adapter
    down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not (down.requires_grad or up.requires_grad) or any(w.requires_grad for w in base.parameters(recurse=False)):
        return None
    dtype = _compute_dtype(x, base.weight, down, up)
    rank_p = _extra_dropout(layer, "lorakit_rank_dropout", name)
    return None if dtype is None else (down, up, layer.scaling[name], dtype, p, rank_p)


def _unfused_forward(layer: peft_lora.LoraLayer, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """A call the fused product does not run: with a dropout active (training mode), sd-scripts' order
    `base(x) + s·B(rank_mask ⊙ dropout(A(x)))` (one plain adapter); otherwise peft's forward."""
    adapter = _plain_adapter(layer, args, kwargs) if layer.training else None  # eval mode (inference): no dropout
    rank_p = _extra_dropout(layer, "lorakit_rank_dropout", adapter[0]) if adapter else 0.0
    if adapter is None or not (adapter[1] or rank_p):
        return super(type(layer), layer).forward(x, *args, **kwargs)
    name, p = adapter
    down, up = layer.lora_A[name], layer.lora_B[name]
    result = layer.get_base_layer()(x)
    h = torch.nn.functional.dropout(down(x.to(down.weight.dtype)), p, training=True)
    if rank_p:  # [n, r] → [n, r, 1, 1] for a conv's [n, r, h, w]; [n, 1, …, r] for a Linear's [n, …, r]
        ranks = _rank_mask(h.shape[0], h.shape[1] if h.dim() == 4 else h.shape[-1], rank_p, h)
        h = h * (ranks[:, :, None, None] if h.dim() == 4 else ranks.view(h.shape[0], *[1] * (h.dim() - 2), -1))
    return result + (up(h) * layer.scaling[name]).to(result.dtype)


class LoraLinear(peft_lora.Linear):
    """peft's LoRA Linear with the fused training step (see the module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if _module_dropped(self, args, kwargs):
            return base(x, *args, **kwargs)
        plan = _fused_plan(self, base, x, args, kwargs) if type(base) is nn.Linear else None
        if plan is None:
            return _unfused_forward(self, x, args, kwargs)
        down, up, scale, dtype, dropout, rank_dropout = plan
        return _LoraProduct.apply(x, base.weight, base.bias, down, up, scale, False, dtype, dropout, rank_dropout)


def _pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1)


class LoraConv2d(peft_lora.Conv2d):
    """peft's LoRA Conv2d with the fused training step for 1x1 convolutions (sd-scripts' `proj_in`/`proj_out`);
    kxk convolutions (LoCon) run peft's forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if _module_dropped(self, args, kwargs):
            return base(x, *args, **kwargs)
        plan = _fused_plan(self, base, x, args, kwargs) if x.dim() == 4 and _pointwise(base) else None
        if plan is None or plan[0].shape[2:] != (1, 1):  # a kxk down-projection (LoCon) is not a 1x1 product
            return _unfused_forward(self, x, args, kwargs)
        down, up, scale, dtype, dropout, rank_dropout = plan
        return _LoraProduct.apply(x, base.weight, base.bias, down, up, scale, True, dtype, dropout, rank_dropout)


CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: LoraLinear, nn.Conv2d: LoraConv2d}
