"""lorakit's LoRA layers: the fused training step computes what peft's layer computes — output and every gradient,
for Linear and 1x1 conv layers, in fp32 and under autocast — and every other case runs peft's forward; dropout acts
on the down-projection's output, as in sd-scripts."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import layer as peft_lora
from torch import nn

from lorakit.lora_layers import CUSTOM_MODULES, LoraConv2d, LoraLinear, _fused_plan


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def pair(base: nn.Module, dropout: float = 0.0, seed: int = 0):
    """(lorakit's layer, peft's layer) on copies of `base`, with the same random adapter (rank 4, alpha 2)."""
    torch.manual_seed(seed)
    base.requires_grad_(False)

    def wrapped(custom: bool) -> nn.Module:
        config = LoraConfig(r=4, lora_alpha=2, target_modules=["layer"], lora_dropout=dropout)
        if custom:
            config._register_custom_module(CUSTOM_MODULES)
        return inject_adapter_in_model(config, Holder(copy.deepcopy(base))).layer

    ours, ref = wrapped(True), wrapped(False)
    for p in (ours.lora_A["default"].weight, ours.lora_B["default"].weight):
        nn.init.normal_(p, std=0.3)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def forward_backward(layer: nn.Module, x: torch.Tensor, input_grad: bool = True):
    """Output and gradients of x (None without `input_grad`), A, B for a fixed random output gradient."""
    x = x.detach().clone().requires_grad_(input_grad)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = (y.detach(), x.grad, a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    return out


def fused_plan(layer: nn.Module, x: torch.Tensor, **kwargs):
    """What the layer's forward(x, **kwargs) would hand the fused step (None: it runs peft's forward)."""
    return _fused_plan(layer, layer.get_base_layer(), x, (), kwargs)


def assert_same(ours, ref, **tol):
    for name, got, want in zip(("output", "grad x", "grad A", "grad B"), ours, ref):
        if got is None and want is None:  # no input gradient asked for
            continue
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{n}: {m}", **tol)


# (base layer, input shape)
CASES = {
    "linear, batch of sequences": (lambda: nn.Linear(24, 40), (2, 300, 24)),
    "linear, 2-D input, no bias": (lambda: nn.Linear(24, 40, bias=False), (7, 24)),
    "1x1 conv, batch": (lambda: nn.Conv2d(24, 40, 1), (2, 24, 16, 16)),
    "1x1 conv, no bias": (lambda: nn.Conv2d(40, 24, 1, bias=False), (1, 40, 2, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_step_matches_peft(case):
    make, shape = CASES[case]
    ours, ref = pair(make())
    assert isinstance(ours, (LoraLinear, LoraConv2d)) and not isinstance(ref, (LoraLinear, LoraConv2d))
    x = torch.randn(shape)
    plan = fused_plan(ours, x)  # the fused step runs, with the adapter's A and B
    assert plan is not None and plan[0] is ours.lora_A["default"].weight and plan[1] is ours.lora_B["default"].weight
    assert_same(forward_backward(ours, x), forward_backward(ref, x), rtol=1e-5, atol=1e-5)
    # the first adapted layer of a model: its input needs no gradient, A and B still get theirs
    got, want = forward_backward(ours, x, input_grad=False), forward_backward(ref, x, input_grad=False)
    assert got[1] is None and want[1] is None
    assert_same(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["linear, batch of sequences", "1x1 conv, batch"])
def test_fused_step_under_autocast(case, dtype):
    """Mixed precision: computed in the autocast dtype like peft's (same output dtype), gradients in the
    parameters' and input's dtypes, and as accurate as peft's against an exact (float64) step."""
    make, shape = CASES[case]
    ours, ref = pair(make())
    x = torch.randn(shape)
    exact = forward_backward(copy.deepcopy(ref).double(), x.double())
    with torch.autocast("cpu", dtype=dtype):
        got, want = forward_backward(ours, x), forward_backward(ref, x)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [dtype, torch.float32, torch.float32, torch.float32]
    for name, g, w, e in zip(("output", "grad x", "grad A", "grad B"), got, want, exact):
        ours_err, peft_err = ((t.double() - e).norm() / e.norm() for t in (g, w))
        assert ours_err < 1.5 * peft_err + 1e-3, (name, ours_err, peft_err)


def test_half_precision_base_with_fp32_adapter():
    """The GPU set-up: fp16 base weights and activations, fp32 LoRA weights, fp16 autocast — same as peft's."""
    ours, ref = pair(nn.Linear(24, 40))
    for layer in (ours, ref):
        layer.base_layer.half()
    x = torch.randn(2, 30, 24).half()
    with torch.autocast("cpu", dtype=torch.float16):
        got, want = forward_backward(ours, x), forward_backward(ref, x)
    assert [t.dtype for t in got] == [torch.float16, torch.float16, torch.float32, torch.float32]
    assert_same(got, want, rtol=2e-2, atol=2e-2)
    # without autocast the dtypes differ: peft's forward (which casts per product) runs, with peft's results
    assert_same(forward_backward(ours, x), forward_backward(ref, x), rtol=0, atol=0)


def test_scale_follows_the_layer_scaling():
    """A multiplier set after injection (peft's `scaling`) is what the fused step uses."""
    ours, ref = pair(nn.Linear(24, 40))
    for layer in (ours, ref):
        layer.scaling["default"] = 0.25
    x = torch.randn(3, 50, 24)
    assert_same(forward_backward(ours, x), forward_backward(ref, x), rtol=1e-5, atol=1e-5)


def test_other_cases_run_peft_forward():
    """Inference, several adapters, merged or disabled adapters, a frozen adapter and a kxk conv all go to peft's
    forward — and still give peft's results."""
    x = torch.randn(2, 30, 24)
    ours, ref = pair(nn.Linear(24, 40))
    with torch.no_grad():
        assert fused_plan(ours, x) is None
        torch.testing.assert_close(ours(x), ref(x))

    assert fused_plan(ours, x, adapter_names=["default"]) is None
    ours.base_layer.bias.requires_grad_(True)  # a trainable base: peft's forward gives it its gradient
    assert fused_plan(ours, x) is None
    ours.base_layer.bias.requires_grad_(False)
    ours.requires_grad_(False)  # a frozen adapter (e.g. the text encoder's while only the U-Net trains)
    assert fused_plan(ours, x) is None
    ours.lora_A["default"].weight.requires_grad_(True)
    ours.lora_B["default"].weight.requires_grad_(True)

    ours.merge()
    assert fused_plan(ours, x) is None
    ours.unmerge()
    ours.enable_adapters(False)
    assert fused_plan(ours, x) is None
    ours.enable_adapters(True)

    ours.update_layer("second", r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights=True, config=LoraConfig(r=2))
    ours.set_adapter(["default", "second"])
    assert fused_plan(ours, x) is None

    conv, conv_ref = pair(nn.Conv2d(6, 8, 3, padding=1))
    image = torch.randn(1, 6, 8, 8)
    assert isinstance(conv, LoraConv2d)
    assert_same(forward_backward(conv, image), forward_backward(conv_ref, image), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unet_gradients_match_peft_layers(tiny_sd1_dir, checkpointing, one_thread):
    """On a whole (tiny) U-Net, with and without gradient checkpointing: every LoRA gradient equals the one peft's
    own layers give."""
    from lorakit.models import load_models
    from lorakit.network import add_lora

    comps = load_models(str(tiny_sd1_dir), dtype=torch.float32)
    net = add_lora(comps, dim=4, alpha=2, text_encoder=False)
    params = net.trainable_parameters()["unet"]
    torch.manual_seed(0)
    for p in params:
        nn.init.normal_(p, std=0.1)
    unet = comps.unet
    ref = copy.deepcopy(unet)
    swapped = 0
    for module in ref.modules():
        for ours_cls, peft_cls in ((LoraLinear, peft_lora.Linear), (LoraConv2d, peft_lora.Conv2d)):
            if type(module) is ours_cls:
                module.__class__ = peft_cls
                swapped += 1
    assert swapped == len(net.layers)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        ref.enable_gradient_checkpointing()
    unet.train(), ref.train()
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    grads = []
    for model in (unet, ref):
        model(x, t, text).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(net.layers)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_both_fused_variants_match_peft(case, merged, monkeypatch):
    """In fp32 a layer computes with the effective weight W + s·B·A or adds the rank-r products separately (by its
    shape); both give peft's output and gradients."""
    from lorakit import lora_layers

    decisions = []

    def decide(*args):
        decisions.append(args)
        return merged

    monkeypatch.setattr(lora_layers, "_merge_weight", decide)
    make, shape = CASES[case]
    ours, ref = pair(make())
    x = torch.randn(shape)
    assert_same(forward_backward(ours, x), forward_backward(ref, x), rtol=1e-5, atol=1e-5)
    assert len(decisions) == 1


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
@pytest.mark.parametrize("case", CASES)
def test_one_frozen_projection(case, frozen, merged, monkeypatch):
    """With A or B frozen (the other trains) the fused step runs and gives peft's output, input gradient and the
    trained projection's gradient; the frozen one gets none."""
    from lorakit import lora_layers

    monkeypatch.setattr(lora_layers, "_merge_weight", lambda *args: merged)
    make, shape = CASES[case]
    ours, ref = pair(make())
    for layer in (ours, ref):
        getattr(layer, frozen)["default"].weight.requires_grad_(False)
    x = torch.randn(shape)
    assert fused_plan(ours, x) is not None
    trained = "lora_B" if frozen == "lora_A" else "lora_A"
    results = []
    for layer in (ours, ref):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        assert getattr(layer, frozen)["default"].weight.grad is None
        results.append((y.detach(), xi.grad, getattr(layer, trained)["default"].weight.grad))
    for name, got, want in zip(("output", "grad x", f"grad {trained}"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_which_layers_merge_the_weight():
    """SD1.5 at 512 px: the 64x64 and 32x32 levels merge, the 16x16 and 8x8 levels and the text cross-attention
    (77 tokens) do not; half precision never does."""
    from lorakit.lora_layers import _merge_weight

    f32 = torch.float32
    assert _merge_weight(4096, 320, 320, f32) and _merge_weight(4096, 2560, 320, f32)
    assert _merge_weight(1024, 640, 640, f32) and _merge_weight(1024, 640, 2560, f32)
    assert not _merge_weight(256, 1280, 1280, f32) and not _merge_weight(64, 1280, 1280, f32)
    assert not _merge_weight(77, 320, 768, f32)
    assert not _merge_weight(4096, 320, 320, torch.float16) and not _merge_weight(4096, 320, 320, torch.bfloat16)


DROPOUT_CASES = {  # (base layer, input shape, fused step)
    "linear": (lambda: nn.Linear(24, 40), (2, 30, 24), True),
    "1x1 conv": (lambda: nn.Conv2d(24, 40, 1), (2, 24, 6, 6), True),
    "3x3 conv (LoCon)": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 6, 6), False),
}


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., features] for a Linear's tensors, [n, c, h, w] -> [n·h·w, c] for a conv's."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_acts_on_the_down_projection_output(case, grad):
    """sd-scripts' `up(dropout(down(x)))`: the adapter's output is s·B applied to A(x) with each of its entries
    either dropped or scaled by 1/(1-p) — not B·A applied to a dropped-out input (peft's order). In training mode,
    with and without gradients, fused or not; in eval mode no dropout at all."""
    make, shape, fused = DROPOUT_CASES[case]
    ours, ref = pair(make(), dropout=0.5)
    x = torch.randn(shape)
    down, up, base = ours.lora_A["default"], ours.lora_B["default"], ours.get_base_layer()
    with torch.no_grad():
        kept = _as_rows(down(x))  # A(x), one row per token/pixel, rank-4 columns
        delta = _as_rows(base(x))
    with torch.set_grad_enabled(grad):
        y = ours(x)
    if grad:
        assert ("LoraProduct" in type(y.grad_fn).__name__) is fused
    # undo B: the adapter's rank-4 activations after dropout, recovered by least squares (B has full column rank)
    b = up.weight.detach().reshape(up.weight.shape[0], -1)
    dropped = torch.linalg.lstsq(b, (_as_rows(y.detach()) - delta).t() / ours.scaling["default"]).solution.t()
    off, on = dropped.abs(), (dropped - 2 * kept).abs()  # distance to "dropped" and to "kept, × 1/(1-p)"
    assert torch.minimum(off, on).max() < 1e-4 * kept.abs().max()
    assert 0.3 < (off < on).float().mean() < 0.7  # about half of the entries dropped
    with torch.no_grad():  # peft's order gives other values for the same adapter
        peft_y = ref(x)
    assert not torch.allclose(peft_y, ours(x).detach())
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours(x), ours(x))


@pytest.mark.parametrize("rank", [0.0, 0.25])
@pytest.mark.parametrize("case", ["linear", "1x1 conv"])
def test_fused_dropout_gradients_match_a_reference(case, rank):
    """Output and gradients of the fused step with dropout (and rank dropout q) equal a plain autograd computation
    of base(x) + s·B(m ⊙ A(x)) (× the rank mask r ∈ {0, 1/(1-q)} per sample and rank) with the same masks."""
    from lorakit.lora_layers import set_extra_dropout

    make, shape, _ = DROPOUT_CASES[case]
    ours, _ = pair(make(), dropout=0.3)
    if rank:
        set_extra_dropout(ours, "default", rank=rank)
    x = torch.randn(shape)
    torch.manual_seed(7)
    got = forward_backward(ours, x)

    down, up = (ours.lora_A["default"].weight.detach().clone().requires_grad_(True),
                ours.lora_B["default"].weight.detach().clone().requires_grad_(True))
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    conv = x.dim() == 4
    h = torch.nn.functional.conv2d(xr, down) if conv else xr @ down.t()
    keep = torch.empty_like(h).bernoulli_(0.7).div_(0.7)
    if rank:
        ranks = (torch.rand(shape[0], 4) > rank).float() / (1 - rank)
        keep = keep * (ranks[:, :, None, None] if conv else ranks[:, None, :])
    lora = torch.nn.functional.conv2d(h * keep, up) if conv else (h * keep) @ up.t()
    y = ours.get_base_layer()(xr) + ours.scaling["default"] * lora
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    assert_same(got, (y.detach(), xr.grad, down.grad, up.grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropouts", [dict(dropout=0.5), dict(rank_dropout=0.3, module_dropout=0.2)])
def test_dropout_masks_repeat_under_gradient_checkpointing(tiny_sd1_dir, one_thread, dropouts):
    """With dropout (each of sd-scripts' three kinds), gradient checkpointing recomputes the forward with the same
    masks: the LoRA gradients equal those of the same step (same seed) without checkpointing."""
    from lorakit.models import load_models
    from lorakit.network import add_lora

    comps = load_models(str(tiny_sd1_dir), dtype=torch.float32)
    net = add_lora(comps, dim=4, alpha=2, text_encoder=False, **dropouts)
    torch.manual_seed(0)
    for p in net.trainable_parameters()["unet"]:
        nn.init.normal_(p, std=0.1)
    unet = comps.unet.train()
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    grads = []
    for seed, checkpointing in ((1, False), (1, True), (2, False)):
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        torch.manual_seed(seed)
        unet(x, torch.tensor([300]), text).sample.square().mean().backward()
        # a module dropped for the whole step has no gradient at all: zeros here, compared like the others
        grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                      for n, p in unet.named_parameters() if p.requires_grad})
        unet.zero_grad(set_to_none=True)
    plain, checkpointed, other_masks = grads
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.allclose(other_masks[n], plain[n]) for n in plain)  # the masks do change the gradients
    if "module_dropout" in dropouts:  # some modules were dropped in one step and not in the other
        assert any(bool(plain[n].any()) != bool(other_masks[n].any()) for n in plain)


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_rank_dropout_keeps_or_drops_each_rank_for_a_whole_sample(case):
    """sd-scripts' rank dropout: each of a sample's rank channels of A(x) is dropped or scaled by 1/(1-p) for all of
    its tokens (pixels) alike, fused or not; in eval mode it does nothing."""
    from lorakit.lora_layers import set_extra_dropout

    make, shape, fused = DROPOUT_CASES[case]
    ours, ref = pair(make())
    set_extra_dropout(ours, "default", rank=0.5)
    x = torch.randn(shape)
    down, up, base = ours.lora_A["default"], ours.lora_B["default"], ours.get_base_layer()
    with torch.no_grad():
        kept = _as_rows(down(x))
        delta = _as_rows(base(x))
    torch.manual_seed(3)
    y = ours(x)
    assert ("LoraProduct" in type(y.grad_fn).__name__) is fused
    b = up.weight.detach().reshape(up.weight.shape[0], -1)
    dropped = torch.linalg.lstsq(b, (_as_rows(y.detach()) - delta).t() / ours.scaling["default"]).solution.t()
    n = shape[0]
    dropped, kept = dropped.reshape(n, -1, 4), kept.reshape(n, -1, 4)
    tol = 1e-4 * kept.abs().max()
    off = dropped.abs().amax(1) < tol  # [sample, rank]: the whole channel is zero
    on = (dropped - 2 * kept).abs().amax(1) < tol  # the whole channel kept, × 1/(1-p)
    assert (off ^ on).all(), (off, on)
    assert off.any() and on.any()
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_module_dropout_runs_the_base_layer_alone_on_some_calls(case):
    """sd-scripts' module dropout: in training mode a call either runs the base layer alone (and the adapter gets
    no gradient from it) or the whole adapter; about a fraction p of the calls are dropped; never in eval mode."""
    from lorakit.lora_layers import set_extra_dropout

    make, shape, _ = DROPOUT_CASES[case]
    ours, ref = pair(make())
    set_extra_dropout(ours, "default", module=0.4)
    x = torch.randn(shape)
    with torch.no_grad():
        base_only, full = ours.get_base_layer()(x), ref(x)
    torch.manual_seed(0)
    dropped = 0
    for _ in range(50):
        y = ours(x)
        if torch.equal(y.detach(), base_only):
            dropped += 1
            assert y.grad_fn is None or ours.lora_A["default"].weight.grad is None
        else:
            torch.testing.assert_close(y.detach(), full, rtol=1e-5, atol=1e-5)
    assert 10 <= dropped <= 30
    ours.eval()
    with torch.no_grad():
        assert all(torch.allclose(ours(x), full, atol=1e-5) for _ in range(10))
