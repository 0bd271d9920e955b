"""The pure LoRA maths: formulas checked against independent computations (conv2d, dense SVD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.lora_math import (
    LoraFactors,
    concat_loras,
    dynamic_rank,
    factorize,
    lora_delta,
    lora_scale,
    merge_weight,
    relative_error,
    sum_loras,
    svd_loras,
    truncated_svd,
)


def _factors(kind: str, rank: int, seed: int, alpha: float | None = None, out: int = 12, inp: int = 10):
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        up, down = torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)
    elif kind == "conv1":
        up, down = torch.randn(out, rank, 1, 1, generator=g), torch.randn(rank, inp, 1, 1, generator=g)
    else:
        up, down = torch.randn(out, rank, 1, 1, generator=g), torch.randn(rank, inp, 3, 3, generator=g)
    return LoraFactors(up, down, alpha)


KINDS = ["linear", "conv1", "conv3"]


def test_scale_defaults_to_one_without_alpha():
    assert lora_scale(None, 8) == 1.0
    assert lora_scale(0.0, 8) == 1.0
    assert lora_scale(torch.tensor(4.0), 8) == 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_delta_equals_the_layers_composition(kind):
    """The delta applied as a weight equals running down then up (the LoRA forward), for every layer kind."""
    f = _factors(kind, 3, 0, alpha=1.5)
    x = torch.randn(2, 10) if kind == "linear" else torch.randn(2, 10, 7, 7)
    if kind == "linear":
        via_layers = F.linear(F.linear(x, f.down), f.up) * 0.5
        via_delta = F.linear(x, f.delta())
    else:
        pad = 1 if kind == "conv3" else 0
        via_layers = F.conv2d(F.conv2d(x, f.down, padding=pad), f.up) * 0.5
        via_delta = F.conv2d(x, f.delta(), padding=pad)
    torch.testing.assert_close(via_delta, via_layers, rtol=1e-5, atol=1e-5)


def test_delta_reshapes_to_a_linear_target_from_4d_factors():
    f = _factors("conv1", 2, 1)
    d = lora_delta(f.up, f.down, None, shape=(12, 10))
    assert d.shape == (12, 10)
    with pytest.raises(ValueError, match="cannot change a weight"):
        lora_delta(f.up, f.down, None, shape=(12, 11))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_weight_is_w_plus_sum_of_ratio_scale_up_down(kind):
    a, b = _factors(kind, 4, 1, alpha=2.0), _factors(kind, 2, 2, alpha=None)
    w = torch.randn(a.weight_shape)
    merged = merge_weight(w, [(a, 0.7), (b, -0.3)])
    expected = w.clone()
    for f, r in ((a, 0.7), (b, -0.3)):
        expected += r * f.scale * (f.up.flatten(1) @ f.down.flatten(1)).reshape(w.shape)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(merged, w)


def test_merge_weight_keeps_dtype_and_uses_float_arithmetic():
    f = _factors("linear", 2, 3)
    w = torch.randn(12, 10).half()
    merged = merge_weight(w, [(f, 1.0)])
    assert merged.dtype == torch.float16
    torch.testing.assert_close(merged, (w.float() + f.delta()).half())


@pytest.mark.parametrize("kind", KINDS)
def test_concat_is_exact_and_ranks_add(kind):
    a, b = _factors(kind, 4, 1, alpha=2.0), _factors(kind, 2, 2, alpha=8.0)
    merged = concat_loras([a, b], [0.8, -0.5])
    assert merged.rank == 6
    assert merged.alpha == 10.0  # sum of alphas: shared scales are kept
    torch.testing.assert_close(merged.delta(), 0.8 * a.delta() - 0.5 * b.delta(), rtol=1e-5, atol=1e-5)


def test_concat_keeps_the_layout_of_the_first_lora():
    """A 1x1 conv LoRA stored 2-D in one file and 4-D in another (SD2 proj_in) still concatenates."""
    a = _factors("conv1", 2, 1)
    b2d = _factors("linear", 3, 2)
    merged = concat_loras([a, b2d], [1.0, 1.0])
    assert merged.up.shape == (12, 5, 1, 1) and merged.down.shape == (5, 10, 1, 1)
    torch.testing.assert_close(merged.delta().flatten(1), a.delta().flatten(1) + b2d.delta(), rtol=1e-5,
                               atol=1e-5)


def test_mismatched_layers_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        concat_loras([_factors("linear", 2, 1), _factors("conv3", 2, 2)], [1.0, 1.0])


def test_sum_matches_sd_scripts_formula():
    a, b = _factors("linear", 4, 1, alpha=2.0), _factors("linear", 4, 2, alpha=8.0)
    ra, rb = 0.8, -0.5
    merged = sum_loras([a, b], [ra, rb])
    ca, cb = math.sqrt(2.0 / 2.0) * ra, math.sqrt(8.0 / 2.0) * rb
    torch.testing.assert_close(merged.up, abs(ca) * a.up + abs(cb) * b.up)
    torch.testing.assert_close(merged.down, ca * a.down + cb * b.down)
    assert merged.alpha == 2.0
    # one input: the delta is ratio·|ratio| times the original (the documented approximation)
    single = sum_loras([a], [-0.5])
    torch.testing.assert_close(single.delta(), -0.25 * a.delta())


def test_sum_refuses_different_ranks():
    with pytest.raises(ValueError, match="same rank"):
        sum_loras([_factors("linear", 4, 1), _factors("linear", 2, 2)], [1.0, 1.0])


@pytest.mark.parametrize("kind", KINDS)
def test_svd_merge_at_sufficient_rank_is_exact(kind):
    a, b = _factors(kind, 3, 1, alpha=1.0), _factors(kind, 2, 2, alpha=4.0)
    merged, err = svd_loras([a, b], [0.6, 0.9], new_rank=5)
    assert merged.rank == 5 and merged.alpha == 5.0
    target = 0.6 * a.delta() + 0.9 * b.delta()
    torch.testing.assert_close(merged.delta(), target, rtol=1e-4, atol=1e-4)
    assert err < 1e-5
    assert merged.up.ndim == a.up.ndim and merged.down.shape[1:] == a.down.shape[1:]


def test_resize_reports_the_best_rank_r_error():
    f = _factors("linear", 8, 4, alpha=4.0, out=30, inp=20)
    small, err = svd_loras([f], [1.0], new_rank=3)
    dense = f.delta()
    s = torch.linalg.svdvals(dense)
    best = math.sqrt(float(s[3:].square().sum() / s.square().sum()))
    assert err == pytest.approx(best, rel=1e-4)
    assert relative_error(dense, small.delta()) == pytest.approx(best, rel=1e-3)
    assert 0.0 < err < 1.0


@pytest.mark.parametrize("method", ["exact", "lowrank"])
@pytest.mark.parametrize("kind", KINDS)
def test_factorize_recovers_a_low_rank_delta(kind, method):
    true = _factors(kind, 3, 5, out=64, inp=48)
    delta = true.delta()
    f = factorize(delta, 4, method=method)
    assert f.rank == 4 and f.alpha == 4.0
    assert f.up.shape[0] == 64 and f.down.shape[1:] == true.down.shape[1:]
    assert relative_error(delta, f.delta()) < 1e-5


def test_lowrank_is_close_to_exact_on_a_decaying_spectrum_and_deterministic():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(320, 320, generator=g))
    v, _ = torch.linalg.qr(torch.randn(768, 320, generator=g))
    s = 1.0 / torch.arange(1, 321).float() ** 0.7
    delta = (u * s) @ v.T
    exact = relative_error(delta, factorize(delta, 16, method="exact").delta())
    fast1 = factorize(delta, 16, method="lowrank")
    fast2 = factorize(delta, 16, method="lowrank")
    assert torch.equal(fast1.up, fast2.up)
    assert relative_error(delta, fast1.delta()) <= exact * 1.01


def test_clamping_limits_factor_values():
    delta = _factors("linear", 6, 7, out=40, inp=40).delta()
    f = factorize(delta, 6, method="exact", clamp_quantile=0.9)
    free = factorize(delta, 6, method="exact")
    hi = max(float(f.up.abs().max()), float(f.down.abs().max()))
    assert hi < max(float(free.up.abs().max()), float(free.down.abs().max()))
    assert relative_error(delta, f.delta()) > relative_error(delta, free.delta())


def test_truncated_svd_rejects_unknown_method():
    with pytest.raises(ValueError, match="lowrank"):
        truncated_svd(torch.randn(4, 4), 2, "qr")


def _smallest_rank_meeting(s: torch.Tensor, method: str, target: float) -> int:
    """The oracle: try k = 1, 2, … and return the first whose kept singular values meet the target."""
    for k in range(1, len(s) + 1):
        kept = s[:k]
        if method == "sv_fro" and math.sqrt(float(kept.square().sum() / s.square().sum())) >= target - 1e-12:
            return k
        if method == "sv_cumulative" and float(kept.sum() / s.sum()) >= target - 1e-12:
            return k
        if method == "sv_ratio" and (k == len(s) or float(s[k]) < float(s[0]) / target):
            return k
    return len(s)


def test_dynamic_rank_is_the_smallest_rank_that_meets_the_target():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    # sv_fro 0.9: rank 1 keeps √(64/85.25) = 0.87, rank 2 keeps √(80/85.25) = 0.97
    assert dynamic_rank(s, "sv_fro", 0.9) == 2
    assert dynamic_rank(s, "sv_cumulative", 0.9) == 3  # 12/15.5 = 0.77, 14/15.5 = 0.90
    assert dynamic_rank(s, "sv_ratio", 4.0) == 3 and dynamic_rank(s, "sv_ratio", 1.0) == 1  # σ ≥ 8/4
    assert dynamic_rank(s, "sv_fro", 1.0) == 5  # every non-zero singular value, not the zero one
    assert dynamic_rank(s, "sv_cumulative", 0.9, max_rank=2) == 2  # capped
    assert dynamic_rank(torch.zeros(4), "sv_fro", 0.9) == 1  # a zero delta: rank 1, as sd-scripts
    # only the top of a spectrum known (a truncated SVD): the shares are of the whole spectrum's total
    full = torch.tensor([3.0, 2.0, 2.0])
    assert dynamic_rank(full, "sv_fro", 0.8) == 2 == dynamic_rank(full[:2], "sv_fro", 0.8, total=17.0)
    assert dynamic_rank(full[:2], "sv_fro", 0.8) == 1  # 9/13 of the top two alone would be enough
    assert dynamic_rank(full[:2], "sv_cumulative", 0.9, total=7.0) == 2  # 5/7 < 0.9: all that is known
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        spectrum = torch.rand(12, generator=g).pow(3).sort(descending=True).values
        for method, target in (("sv_fro", 0.8), ("sv_fro", 0.97), ("sv_cumulative", 0.6), ("sv_ratio", 5.0)):
            assert dynamic_rank(spectrum, method, target) == _smallest_rank_meeting(spectrum, method, target)
    with pytest.raises(ValueError, match="sv_fro"):
        dynamic_rank(s, "sv_knee", 0.5)


def test_svd_resize_with_a_dynamic_rank_keeps_what_the_target_asks():
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(30, 6, generator=g))
    v, _ = torch.linalg.qr(torch.randn(20, 6, generator=g))
    sigma = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.2, 0.1])
    lora = LoraFactors(u * sigma, v.T, alpha=6.0)  # scale 1: its delta's singular values are sigma
    small, err = svd_loras([lora], [1.0], None, dynamic=("sv_fro", 0.99))
    kept = math.sqrt(float(sigma[:small.rank].square().sum() / sigma.square().sum()))
    assert small.rank == 2 and kept >= 0.99  # rank 1 keeps 0.89
    assert err == pytest.approx(math.sqrt(1 - kept**2), rel=1e-4)
    assert relative_error(lora.delta(), small.delta()) == pytest.approx(err, rel=1e-3)
    assert svd_loras([lora], [1.0], 4, dynamic=("sv_ratio", 100.0))[0].rank == 4  # 6 meet it; capped at 4
    with pytest.raises(ValueError, match="new_rank"):
        svd_loras([lora], [1.0], None)
