"""Skip connections whose gradient nobody needs: the U-Net's backward pass skips computing it.

An up block of Stable Diffusion's U-Net feeds each ResNet `cat([h, skip])`, `skip` being the output of a down
block layer. When `skip` needs no gradient, autograd still computes the input gradient of the ResNet's first
convolution and of its shortcut for all channels, then drops the skip's channels at the `cat`. That happens in
every LoRA step: the first skip is `conv_in`'s output, which nothing trainable precedes. In SD1.5 at 512 px it is
the last ResNet's 3x3 convolution at 64x64 (640 -> 320 channels, half of them the skip's) and its 1x1 shortcut:
~8 GFLOP of the backward pass, measured as 45 ms of a ~20 s CPU step (`benchmarks/RESULTS.md`). A bare frozen
U-Net step, whose input gradient needs every channel, does all of it.

`frozen_skip_gradients(unet)` makes those two convolutions compute the input gradient of the channels that need
one only (`_InputGradOfFirst`). The gradients of everything that trains are unchanged:
- which skips need no gradient is read at each call (a forward pre-hook on each up block looks at its
  `res_hidden_states_tuple`), so a step whose input or `conv_in` trains gets the full backward pass;
- the skip's channels of the first convolution's input come from `norm1` -> activation, which mix channels only
  inside a GroupNorm group, so it applies only when the split falls on a group boundary (SD1.5: 320 of 640
  channels, groups of 20), a plain elementwise activation and no up/downsampling inside the ResNet;
- the convolutions must be plain frozen `nn.Conv2d`s (not LoCon-adapted, not trainable).

Public API: `frozen_skip_gradients`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["frozen_skip_gradients"]

_ELEMENTWISE = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)


class _InputGradOfFirst(torch.autograd.Function):
    """`conv2d(x, weight, bias)` with a frozen weight; the backward pass computes the input gradient of the first
    `keep` channels of `x` and leaves the others zero (their gradient is not needed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, keep: int, stride, padding, dilation, groups):
        ctx.keep, ctx.conv = keep, (stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        n, _, height, width = ctx.x_shape
        grad_x = grad.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
        # in the dtype the forward computed in (autocast's, when it was on)
        grad_x[:, :ctx.keep] = torch.nn.grad.conv2d_input((n, ctx.keep, height, width),
                                                          weight[:, :ctx.keep].to(grad.dtype), grad, stride, padding,
                                                          dilation, groups)
        return grad_x, None, None, None, None, None, None, None


def _frozen_conv(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)) and not any(p.requires_grad for p in conv.parameters())


def _eligible(resnet, keep: int) -> bool:
    """Whether the ResNet's first convolution and shortcut may skip the input gradient from channel `keep` on."""
    norm = getattr(resnet, "norm1", None)
    if not (isinstance(norm, nn.GroupNorm) and 0 < keep < norm.num_channels
            and keep % (norm.num_channels // norm.num_groups) == 0):
        return False
    if getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None:
        return False
    shortcut = getattr(resnet, "conv_shortcut", None)
    return (isinstance(getattr(resnet, "nonlinearity", None), _ELEMENTWISE) and _frozen_conv(resnet.conv1)
            and (shortcut is None or _frozen_conv(shortcut)))


def _mark_skips(resnets, block, args, kwargs) -> None:
    """Up block pre-hook: tell each ResNet from which input channel on it needs no input gradient (or None).
    ResNet i receives `cat([h, res_hidden_states_tuple[-1 - i]])`."""
    skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else ())
    for i, resnet in enumerate(resnets):
        keep = None
        if torch.is_grad_enabled() and i < len(skips) and not skips[-1 - i].requires_grad:
            keep = resnet.in_channels - skips[-1 - i].shape[1]
            keep = keep if _eligible(resnet, keep) else None
        resnet._lorakit_skip_from = keep


def _conv_forward(resnet, conv, x):
    keep = getattr(resnet, "_lorakit_skip_from", None)
    if keep is None or not torch.is_grad_enabled() or not x.requires_grad or x.shape[1] != conv.in_channels:
        return nn.Conv2d.forward(conv, x)
    return _InputGradOfFirst.apply(x, conv.weight, conv.bias, keep, conv.stride, conv.padding, conv.dilation,
                                   conv.groups)


@contextlib.contextmanager
def frozen_skip_gradients(unet: nn.Module):
    """While the block runs, `unet`'s up-block ResNets compute no input gradient for skip channels that need none
    (see the module docstring). A model without up blocks of ResNets is left as it is."""
    hooks, patched, marked = [], [], []
    for block in getattr(unet, "up_blocks", ()):
        resnets = getattr(block, "resnets", None)
        if not resnets:
            continue
        hooks.append(block.register_forward_pre_hook(functools.partial(_mark_skips, resnets), with_kwargs=True))
        marked.extend(resnets)
        for resnet in resnets:
            for conv in (getattr(resnet, "conv1", None), getattr(resnet, "conv_shortcut", None)):
                if type(conv) is nn.Conv2d and "forward" not in vars(conv):
                    conv.forward = functools.partial(_conv_forward, resnet, conv)
                    patched.append(conv)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for conv in patched:
            del conv.forward
        for resnet in marked:
            vars(resnet).pop("_lorakit_skip_from", None)
