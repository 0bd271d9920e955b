"""The U-Net's backward pass skips the input gradient of skip channels that need none: every gradient that is
needed stays exactly what autograd computes without it, and the shortcut runs only where it is exact."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from lorakit.network import add_lora
from lorakit.skip_gradients import _eligible, frozen_skip_gradients
from lorakit.tiny import build_tiny


@pytest.fixture(scope="module")
def lora_unet():
    comps = build_tiny()
    net = add_lora(comps, dim=4, alpha=4)
    torch.manual_seed(0)
    for p in net.trainable_parameters()["unet"]:  # up = 0 at init would leave half the gradients zero
        nn.init.normal_(p, std=0.1)
    return comps.unet, net.trainable_parameters()["unet"]


def step(unet, params, input_grad=False, autocast=None):
    """LoRA gradients (and the input's) of one loss, and the grad_fn names of the up blocks' ResNet convolutions."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen).requires_grad_(input_grad)
    text = torch.randn(2, 77, 32, generator=gen)
    seen = []
    hooks = [conv.register_forward_hook(lambda m, i, out: seen.append(type(out.grad_fn).__name__))
             for block in unet.up_blocks for r in block.resnets for conv in (r.conv1, r.conv_shortcut) if conv]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = unet(x, torch.tensor([10, 700]), text).sample.float().square().mean()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads, x.grad, seen


def test_lora_gradients_are_exact_and_the_skip_channels_are_skipped(lora_unet):
    unet, params = lora_unet
    want, _, plain = step(unet, params)
    with frozen_skip_gradients(unet):
        got, _, seen = step(unet, params)
    # SD's first skip (conv_in's output) needs no gradient: the last ResNet's conv1 and shortcut take the shortcut
    assert seen.count("_InputGradOfFirstBackward") == 2 and "_InputGradOfFirstBackward" not in plain
    assert len(seen) == len(plain)
    assert any(g.abs().max() > 0 for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_an_input_that_trains_gets_the_full_backward_pass(lora_unet):
    """The bare step's case: the latents need a gradient, so every skip does."""
    unet, params = lora_unet
    want, want_x, _ = step(unet, params, input_grad=True)
    with frozen_skip_gradients(unet):
        got, got_x, seen = step(unet, params, input_grad=True)
    assert "_InputGradOfFirstBackward" not in seen
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_under_autocast(lora_unet):
    unet, params = lora_unet
    want, _, _ = step(unet, params, autocast=torch.bfloat16)
    with frozen_skip_gradients(unet):
        got, _, seen = step(unet, params, autocast=torch.bfloat16)
    assert seen.count("_InputGradOfFirstBackward") == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


def test_the_model_is_left_as_it_was(lora_unet):
    unet, params = lora_unet
    with frozen_skip_gradients(unet):
        pass
    for block in unet.up_blocks:
        assert not block._forward_pre_hooks
        for resnet in block.resnets:
            assert "_lorakit_skip_from" not in vars(resnet)
            assert all("forward" not in vars(c) for c in (resnet.conv1, resnet.conv_shortcut) if c is not None)
    _, _, seen = step(unet, params)
    assert "_InputGradOfFirstBackward" not in seen


def test_only_where_the_shortcut_is_exact():
    """norm1 mixes the channels of a GroupNorm group: the split must fall on a group boundary; the convolutions
    must be frozen plain convolutions."""
    resnet = ResnetBlock2D(in_channels=64, out_channels=32, temb_channels=8, groups=8)  # groups of 8 channels
    resnet.requires_grad_(False)
    assert _eligible(resnet, 32) and _eligible(resnet, 8)
    assert not _eligible(resnet, 36)  # inside a group
    assert not _eligible(resnet, 0) and not _eligible(resnet, 64)
    resnet.conv1.weight.requires_grad_(True)  # a trainable convolution needs its weight gradient
    assert not _eligible(resnet, 32)
    resnet.conv1.weight.requires_grad_(False)
    resnet.conv_shortcut = nn.Conv2d(64, 32, 1, padding_mode="reflect")
    resnet.conv_shortcut.requires_grad_(False)
    assert not _eligible(resnet, 32)


def test_a_split_inside_a_group_would_change_the_gradient():
    """Why `_eligible` checks group boundaries: the shortcut on a split inside a GroupNorm group gives a wrong
    gradient for the channels that need one (the test above would otherwise guard nothing)."""
    from lorakit.skip_gradients import _InputGradOfFirst

    torch.manual_seed(0)
    norm, conv = nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 3, padding=1)
    conv.requires_grad_(False)
    h = torch.randn(1, 10, 6, 6, requires_grad=True)
    skip = torch.randn(1, 6, 6, 6)

    def grad_of_h(keep):
        h.grad = None
        x = torch.nn.functional.silu(norm(torch.cat([h, skip], 1)))
        y = conv(x) if keep is None else _InputGradOfFirst.apply(x, conv.weight, conv.bias, keep, conv.stride,
                                                                  conv.padding, conv.dilation, conv.groups)
        y.square().sum().backward()
        return h.grad.clone()

    exact = grad_of_h(None)
    assert not torch.allclose(grad_of_h(10), exact, rtol=1e-4, atol=1e-6)  # 10 is inside the third group of 4
    torch.testing.assert_close(grad_of_h(12), exact)  # on a group boundary: exact
