"""The LoRA maths as pure tensor functions: no files, no models, no key names.

One LoRA module is `delta = scale · up @ down` with `scale = alpha / rank` (KOHYA_FORMAT.md §1). Conv kernels are
flattened once (`[out, in, kh, kw]` → `[out, in·kh·kw]`) so one code path serves Linear, 1x1 conv and 3x3 conv:
`down` keeps the kernel (`[rank, in, kh, kw]`), `up` is 1x1 (`[out, rank, 1, 1]`), and the kernel product of the
two convolutions is exactly `up[:, :, 0, 0] @ down.flatten(1)` reshaped.

Functions:
- `lora_delta`, `merge_weight` — the delta of one module, and `W + Σ ratio·delta` (merging into a model);
- `sum_loras` — sd-scripts' approximate LoRA+LoRA merge (same ranks), kept for compatibility;
- `concat_loras` — exact LoRA+LoRA merge: stack along the rank axis, rank = Σ ranks;
- `svd_loras` — exact delta of several LoRAs re-factorised to `new_rank` (also: resize one LoRA), or to a rank
  chosen per module from its singular values (`dynamic_rank`: sd-scripts' resize_lora methods);
- `factorize` — best rank-r factors of a dense delta (extraction), randomized or exact SVD, optional clamping;
- `relative_error` — ‖Δ − Δ̂‖ / ‖Δ‖, the honest measure of a factorisation's quality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config.jobs import DYNAMIC_METHODS

# Randomized SVD settings (Halko, Martinsson & Tropp 2011, "Finding structure with randomness"): sample
# rank + OVERSAMPLE directions and run POWER_ITERATIONS subspace iterations. Fine-tuning deltas have slowly decaying
# spectra, where the plain sketch is noticeably worse than the truncated SVD; with these settings the error of the
# rank-r factors is within 1% (relative) of the exact SVD's on SD1.5-shaped deltas (benchmarks/merge_extract.py).
OVERSAMPLE = 8
POWER_ITERATIONS = 2


@dataclass
class LoraFactors:
    """One LoRA module: `up` [out, rank] or [out, rank, 1, 1], `down` [rank, in] or [rank, in, kh, kw], `alpha`."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module changes: [out, in] or [out, in, kh, kw]."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return lora_delta(self.up, self.down, self.alpha, dtype=dtype)


def lora_scale(alpha: float | torch.Tensor | None, rank: int) -> float:
    """`alpha / rank`; a missing or zero alpha means alpha = rank (scale 1), as in sd-scripts."""
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha)
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight or factor as a matrix: conv kernels flattened to [out, in·kh·kw] (a view when contiguous)."""
    return w.reshape(w.shape[0], -1) if w.ndim != 2 else w


def max_norm_factor(norm: float, max_norm: float) -> float:
    """sd-scripts' `scale_weight_norms`: the factor that brings a module's ‖ΔW‖ to at most `max_norm` (1 when it is
    within it); the up and the down weights are each multiplied by its square root."""
    return 1.0 if norm <= max_norm else max_norm / norm


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None = None, *,
               shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """`scale · up @ down`, shaped like the weight it changes (or like `shape`, e.g. a Linear stored as 1x1 conv).

    Computed as `(up @ down) * scale` in `dtype`, in that order, so merges are reproducible bit for bit.
    """
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(f"LoRA factors disagree on the rank: up {tuple(up.shape)}, down {tuple(down.shape)}")
    mat = (as_matrix(up).to(device, dtype) @ as_matrix(down).to(device, dtype)) * lora_scale(alpha, rank)
    target = tuple(shape) if shape is not None else (up.shape[0], *down.shape[1:])
    if math.prod(target) != mat.numel():
        raise ValueError(f"a LoRA delta of shape {tuple(mat.shape)} cannot change a weight of shape {target}")
    return mat.reshape(target)


def merge_weight(weight: torch.Tensor, modules: Sequence[tuple[LoraFactors, float]], *,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`W + Σ ratio · scale · up @ down`, computed in `dtype`, returned in the weight's dtype (`weight` unchanged).

    Each term is one fused `addmm` (`W + c · up @ down` with `c = ratio · scale`) on the flattened weight: a merge
    into a 4 GB model is memory-bound, and one pass per LoRA instead of four (product, scale, ratio, sum) is what
    keeps it fast. The result equals the term-by-term formula up to float rounding.
    """
    w = as_matrix(weight.to(dtype))
    out = None
    for f, ratio in modules:
        up = as_matrix(f.up).to(w.device, dtype)
        down = as_matrix(f.down).to(w.device, dtype)
        if up.shape[0] != w.shape[0] or down.shape[1] != w.shape[1] or up.shape[1] != down.shape[0]:
            raise ValueError(f"a LoRA delta of shape {(up.shape[0], down.shape[1])} (rank up {up.shape[1]}, down "
                             f"{down.shape[0]}) cannot change a weight of shape {tuple(weight.shape)}")
        c = ratio * lora_scale(f.alpha, f.rank)
        out = torch.addmm(w, up, down, alpha=c) if out is None else out.addmm_(up, down, alpha=c)
    if out is None:
        out = w.clone()
    return out.reshape(weight.shape).to(weight.dtype)


def _check_kinds(parts: Sequence[LoraFactors]) -> None:
    shapes = {p.weight_shape if len(p.weight_shape) == 4 and p.weight_shape[2:] != (1, 1)
              else (p.weight_shape[0], math.prod(p.weight_shape[1:])) for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"LoRA modules of one layer change weights of different shapes: {sorted(shapes)}")


def _like_first(t: torch.Tensor, first: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Reshape a factor to the layout (2-D or 1x1 4-D) of the first LoRA's factor, keeping its own rank."""
    if t.ndim == first.ndim:
        return t
    shape = list(first.shape)
    shape[rank_dim] = t.shape[rank_dim]
    return t.reshape(shape)


def sum_loras(parts: Sequence[LoraFactors], ratios: Sequence[float]) -> LoraFactors:
    """sd-scripts' default LoRA+LoRA merge (merge_lora.py): add the factors themselves.

    `up = Σ |c_i|·up_i`, `down = Σ c_i·down_i` with `c_i = sqrt(alpha_i / alpha_base) · ratio_i`, alpha = alpha_base
    (the first LoRA's). Ranks must match. The result equals `ratio·|ratio| · scale · up @ down` only when there is
    one input; with several it adds cross terms `up_i @ down_j` — an approximation, kept for users who expect it.
    Use `concat_loras` or `svd_loras` for exact merges.
    """
    _check_kinds(parts)
    ranks = {p.rank for p in parts}
    if len(ranks) > 1:
        raise ValueError(f"merge_mode `sum` needs LoRAs of the same rank, got ranks {sorted(ranks)}; use "
                         f"merge_mode `concat` or `svd` to merge different ranks exactly")
    base_alpha = parts[0].alpha if parts[0].alpha else float(parts[0].rank)
    up = down = None
    for p, ratio in zip(parts, ratios):
        alpha = p.alpha if p.alpha else float(p.rank)
        c = math.sqrt(alpha / base_alpha) * ratio
        u = _like_first(p.up.float(), parts[0].up, 1) * abs(c)
        d = _like_first(p.down.float(), parts[0].down, 0) * c
        up, down = (u, d) if up is None else (up + u, down + d)
    return LoraFactors(up, down, float(base_alpha))


def concat_loras(parts: Sequence[LoraFactors], ratios: Sequence[float]) -> LoraFactors:
    """Exact LoRA+LoRA merge: stack the factors along the rank axis (rank = Σ rank_i).

    The result's alpha is Σ alpha_i, so its scale is the rank-weighted mean of the input scales (LoRAs that share a
    scale keep it). Each part i is multiplied by `sqrt(|c_i|)` on both factors (sign on `down`) with
    `c_i = ratio_i · scale_i / scale`, so `scale · up @ down = Σ ratio_i · scale_i · up_i @ down_i` exactly.
    """
    _check_kinds(parts)
    alphas = [p.alpha if p.alpha else float(p.rank) for p in parts]
    rank = sum(p.rank for p in parts)
    alpha = sum(alphas)
    if alpha <= 0:  # negative alphas are legal but unusual: fall back to scale 1
        alpha = float(rank)
    scale = alpha / rank
    ups, downs = [], []
    for p, a, ratio in zip(parts, alphas, ratios):
        c = ratio * (a / p.rank) / scale
        root = math.sqrt(abs(c))
        ups.append(_like_first(p.up.float(), parts[0].up, 1) * root)
        downs.append(_like_first(p.down.float(), parts[0].down, 0) * (root if c >= 0 else -root))
    return LoraFactors(torch.cat(ups, dim=1), torch.cat(downs, dim=0), float(alpha))


def _factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, weight_shape: Sequence[int],
                      clamp_quantile: float) -> LoraFactors:
    """up = U·diag(S), down = Vh (sd-scripts' convention, alpha = rank), optionally clamped, reshaped to the layer."""
    up = u * s.unsqueeze(0)
    down = vh
    if clamp_quantile < 1.0:
        # sd-scripts clamps both factors at the quantile of all their values (outliers hurt fp16 files)
        values = torch.cat([up.flatten(), down.flatten()])
        k = max(1, min(values.numel(), int(math.ceil(clamp_quantile * values.numel()))))
        hi = values.kthvalue(k).values
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    rank = s.shape[0]
    if len(weight_shape) == 4:
        up = up.reshape(weight_shape[0], rank, 1, 1)
        down = down.reshape(rank, *weight_shape[1:])
    return LoraFactors(up.contiguous(), down.contiguous(), float(rank))


def truncated_svd(mat: torch.Tensor, rank: int, method: str = "lowrank", *, seed: int = 0,
                  oversample: int = OVERSAMPLE, niter: int = POWER_ITERATIONS):
    """The top-`rank` singular triplets (U [m, r], S [r], Vh [r, n]) of a matrix.

    `method="exact"`: full `torch.linalg.svd`. `"lowrank"`: `torch.svd_lowrank` with `oversample` extra directions
    and `niter` power iterations, seeded so the same input gives the same factors; it falls back to the exact SVD
    when the sketch would not be smaller than the matrix.
    """
    if method not in ("lowrank", "exact"):
        raise ValueError(f"`svd` must be `lowrank` or `exact`, got {method!r}")
    m, n = mat.shape
    rank = min(rank, m, n)
    q = min(rank + oversample, m, n)
    if method == "exact" or q >= min(m, n):
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    with torch.random.fork_rng(devices=[mat.device] if mat.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(mat, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].mT


def factorize(delta: torch.Tensor, rank: int, *, method: str = "lowrank", clamp_quantile: float = 1.0,
              seed: int = 0, dynamic: tuple[str, float] | None = None) -> LoraFactors:
    """Rank-`rank` LoRA factors approximating a dense `delta` (KOHYA_FORMAT.md §6); alpha = rank. With `dynamic`
    (method, target): the rank is `dynamic_rank` of the delta's singular values, `rank` at most (sv_cumulative needs
    the sum of all of them: a full singular-value decomposition of the delta besides the truncated one).

    Conv deltas `[out, in, kh, kw]` are flattened to `[out, in·kh·kw]`; `down` keeps the kernel, `up` is 1x1.
    """
    mat = as_matrix(delta.float())
    u, s, vh = truncated_svd(mat, rank, method, seed=seed)
    if dynamic is not None:
        how, target = dynamic
        total = None  # of the whole spectrum, which the truncated SVD does not give (sv_ratio needs none)
        if how == "sv_fro":
            total = float(mat.double().square().sum())
        elif how == "sv_cumulative":
            total = float(torch.linalg.svdvals(mat).sum())
        k = dynamic_rank(s, how, target, rank, total)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    return _factors_from_svd(u, s, vh, delta.shape, clamp_quantile)


def dynamic_rank(s: torch.Tensor, method: str, target: float, max_rank: int | None = None,
                 total: float | None = None) -> int:
    """The smallest rank whose singular values `s` (descending) meet `target`, at most `max_rank`, at least 1:

    - `sv_fro`: the rank-k factors keep ≥ `target` of the delta's Frobenius norm, √(Σ_{i≤k} σ_i² / Σ σ_i²);
    - `sv_cumulative`: Σ_{i≤k} σ_i / Σ σ_i ≥ `target`;
    - `sv_ratio`: every kept σ_i ≥ σ_1 / `target` (`target` ≥ 1).

    When `s` holds only the largest singular values, `total` is the whole spectrum's Σ σ_i² (sv_fro: the delta's
    squared Frobenius norm) or Σ σ_i (sv_cumulative); if even all of `s` falls short, the rank is `len(s)`.
    These are sd-scripts' resize_lora methods; it keeps one rank more than the smallest that meets the target. A
    zero delta gets rank 1 (as there).
    """
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"dynamic rank method must be one of {', '.join(DYNAMIC_METHODS)}, got {method!r}")
    s = s.double()
    cap = s.numel() if max_rank is None else min(max_rank, s.numel())
    if s.numel() == 0 or float(s[0]) <= 0:
        return 1
    if method == "sv_ratio":
        k = int((s >= s[0] / target).sum())
    else:
        values = s.square() if method == "sv_fro" else s
        goal = target * target if method == "sv_fro" else target
        kept = values.cumsum(0) / (values.sum() if total is None else max(total, float(values.sum())))
        k = int((kept < goal * (1 - 1e-9)).sum()) + 1  # the first k whose share reaches the goal (rounding aside)
    return max(1, min(k, cap))


def rank_summary(ranks: Sequence[int], method: str, target: float) -> str:
    """How a dynamic rank came out over modules, for a job's log: `ranks 2-16 (mean 7.3) by sv_fro 0.9`."""
    return f"ranks {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}) by {method} {target:g}"


def svd_loras(parts: Sequence[LoraFactors], ratios: Sequence[float], new_rank: int | None, *,
              clamp_quantile: float = 1.0, dynamic: tuple[str, float] | None = None) -> tuple[LoraFactors, float]:
    """Exact delta `Σ ratio_i · scale_i · up_i @ down_i` re-factorised to `new_rank`; returns (factors, rel. error).
    With `dynamic` (method, target), the rank is `dynamic_rank` of the delta's singular values, `new_rank` at most
    (None: no cap).

    The delta is never formed: with `U = [c_i·up_i]` and `D = [down_i]` stacked along the rank axis, QR of both
    gives `delta = Q1 (R1 R2ᵀ) Q2ᵀ`, and the SVD of the small `R×R` core is the exact SVD of the delta. With one input
    this resizes a LoRA; at `new_rank ≥ Σ rank_i` the result is exact (up to rounding).
    """
    _check_kinds(parts)
    weight_shape = parts[0].weight_shape
    ups = torch.cat([as_matrix(p.up.float()) * (ratio * p.scale) for p, ratio in zip(parts, ratios)], dim=1)
    downs = torch.cat([as_matrix(p.down.float()) for p in parts], dim=0)
    q1, r1 = torch.linalg.qr(ups)
    q2, r2 = torch.linalg.qr(downs.mT)
    uc, s, vch = torch.linalg.svd(r1 @ r2.mT)
    total = float(s.square().sum())
    if dynamic is not None:
        rank = dynamic_rank(s, *dynamic, max_rank=new_rank)
    elif new_rank is None:
        raise ValueError("svd_loras needs `new_rank` (or `dynamic`)")
    else:
        rank = min(new_rank, s.shape[0])
    lost = float(s[rank:].square().sum())
    rel_error = math.sqrt(lost / total) if total > 0 else 0.0
    u = q1 @ uc[:, :rank]
    vh = vch[:rank] @ q2.mT
    factors = _factors_from_svd(u, s[:rank], vh, weight_shape, clamp_quantile)
    if clamp_quantile < 1.0:
        approx = factors.delta()
        exact = as_matrix(ups) @ downs
        rel_error = relative_error(exact, approx)
    return factors, rel_error


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """‖Δ − Δ̂‖_F / ‖Δ‖_F (0 when Δ = 0 and Δ̂ = 0)."""
    delta, approx = as_matrix(delta.float()), as_matrix(approx.float()).reshape(as_matrix(delta).shape)
    norm = float(torch.linalg.matrix_norm(delta))
    err = float(torch.linalg.matrix_norm(delta - approx))
    return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)


def squared_norms(delta: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(‖Δ − Δ̂‖², ‖Δ‖²): summed over modules they give a component's relative error."""
    delta = as_matrix(delta.float())
    approx = as_matrix(approx.float()).reshape(delta.shape)
    return float((delta - approx).square().sum()), float(delta.square().sum())
