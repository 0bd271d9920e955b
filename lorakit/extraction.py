"""`lorakit extract`: a LoRA approximating `model_tuned − model_org` (KOHYA_FORMAT.md §6).

For every target layer the difference of the two weights is factorised to rank `dim` (`conv_dim` for 3x3 convs) by
a truncated SVD — randomized (`torch.svd_lowrank`, oversampled, with power iterations) by default, exact on request.
The two models are read one tensor at a time (see `model_weights`), so peak memory stays near one layer, not two
models. The relative reconstruction error ‖Δ − up·down‖ / ‖Δ‖ of each component is printed and returned: it is the
honest measure of how much of the fine-tune the LoRA keeps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config.jobs import ExtractConfig
from .errors import ConfigError, ModelLoadError
from .families import get_family
from .formats import component_of
from .lora_math import factorize, rank_summary, squared_norms
from .model_weights import ModelWeights, open_weights
from .models import resolve_builtin

COMPONENT_WORDS = {"text_encoder": "text encoder", "unet": "U-Net"}


@dataclass
class ExtractResult:
    """What `extract` produced: the file, per-component relative errors and module counts."""

    path: Path | None
    errors: dict[str, float] = field(default_factory=dict)  # component -> relative reconstruction error
    modules: dict[str, int] = field(default_factory=dict)
    text_encoder_skipped: bool = False
    max_text_encoder_diff: float = 0.0
    seconds: float = 0.0
    svd_seconds: float = 0.0  # of `seconds`, the time spent in the SVDs (the rest is reading the models)
    family: object = None  # lorakit.families.Family of the models
    prediction_type: str = "epsilon"  # of model_org ("epsilon" or "v_prediction")
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    ranks: dict[str, int] = field(default_factory=dict, repr=False)  # kohya module name -> its rank

    def __str__(self) -> str:
        parts = [f"{COMPONENT_WORDS[c]}: {self.modules[c]} modules, relative error {e:.4f}"
                 for c, e in self.errors.items()]
        if self.text_encoder_skipped:
            parts.append(f"text encoder skipped (largest weight difference {self.max_text_encoder_diff:.2e})")
        return "; ".join(parts)


def extract_lora(model_org, model_tuned, *, dim: int = 4, conv_dim: int | None = None, svd: str = "lowrank",
                 clamp_quantile: float = 1.0, min_diff: float = 0.01, device: str = "cpu", v2: bool | None = None,
                 dynamic: tuple[str, float] | None = None, log: Callable[[str], None] | None = print
                 ) -> ExtractResult:
    """Extract kohya LoRA tensors from two models (paths, `SDComponents` or `ModelWeights`); nothing is written.
    `dynamic` (method, target): each module's rank by `lora_math.dynamic_rank`, dim / conv_dim at most.

    Returns an `ExtractResult` whose `state_dict` holds `<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`
    (alpha = rank, so scale 1), in float32 on the CPU.
    """
    start = time.perf_counter()
    log = log or (lambda _msg: None)
    org = open_weights(model_org, what="model_org")
    tuned = open_weights(model_tuned, what="model_tuned")
    try:
        return _extract(org, tuned, dim=dim, conv_dim=conv_dim, svd=svd, clamp_quantile=clamp_quantile,
                        min_diff=min_diff, device=device, v2=v2, dynamic=dynamic, log=log, start=start)
    finally:
        org.close()
        tuned.close()


def _extract(org: ModelWeights, tuned: ModelWeights, *, dim, conv_dim, svd, clamp_quantile, min_diff, device, v2,
             dynamic, log, start) -> ExtractResult:
    if v2 is None and org.family.name != tuned.family.name:
        raise ModelLoadError(f"model_org is {org.family.name.upper()} but model_tuned is {tuned.family.name.upper()}"
                             f": extract needs two models of one architecture")
    targets = org.targets(conv=conv_dim is not None)
    tuned_shapes = tuned.shapes()
    for t in targets:
        if tuned_shapes.get(t.param) != t.shape:
            raise ModelLoadError(f"model_tuned does not match model_org at {t.param}: shape "
                                 f"{tuned_shapes.get(t.param)} vs {t.shape} — different architectures")
    dev = torch.device(device)

    def delta_of(name: str) -> torch.Tensor:
        return tuned.get(name).to(dev, torch.float32) - org.get(name).to(dev, torch.float32)

    # "U-Net only LoRA" when the text encoders are the same (sd-scripts: no |ΔW| above min_diff anywhere)
    te_targets = [t for t in targets if t.component == "text_encoder"]
    max_te = 0.0
    for t in te_targets:
        max_te = max(max_te, float(delta_of(t.param).abs().max()))
    skip_te = max_te <= min_diff
    if skip_te:
        log(f"text encoders are the same (largest difference {max_te:.2e} ≤ min_diff {min_diff}): U-Net only LoRA")
        targets = [t for t in targets if t.component != "text_encoder"]

    state: dict[str, torch.Tensor] = {}
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    ranks: dict[str, int] = {}
    svd_seconds = 0.0
    for t in targets:
        delta = delta_of(t.param)
        rank = conv_dim if t.conv3x3 else dim
        rank = min(rank, delta.shape[0], math.prod(delta.shape[1:]))
        t0 = time.perf_counter()
        f = factorize(delta, rank, method=svd, clamp_quantile=clamp_quantile, dynamic=dynamic)
        svd_seconds += time.perf_counter() - t0
        err2, norm2 = squared_norms(delta, f.delta())
        acc = sums.setdefault(t.component, [0.0, 0.0])
        acc[0] += err2
        acc[1] += norm2
        counts[t.component] = counts.get(t.component, 0) + 1
        state[t.kohya + ".lora_down.weight"] = f.down.cpu()
        state[t.kohya + ".lora_up.weight"] = f.up.cpu()
        state[t.kohya + ".alpha"] = torch.tensor(float(f.rank))
        ranks[t.kohya] = f.rank
    if not state:
        raise ModelLoadError("no LoRA target layers found in model_org")
    errors = {c: (math.sqrt(e / n) if n > 0 else 0.0) for c, (e, n) in sums.items()}
    family = get_family(v2) if v2 is not None else org.family
    prediction = org.prediction_type if family.v2 == org.family.v2 else family.default_prediction
    result = ExtractResult(path=None, errors=errors, modules=counts, text_encoder_skipped=skip_te,
                           max_text_encoder_diff=max_te, seconds=time.perf_counter() - start, svd_seconds=svd_seconds,
                           state_dict=state, family=family, prediction_type=prediction, ranks=ranks)
    for c, e in errors.items():
        chosen = [r for n, r in ranks.items() if component_of(n) == c]
        log(f"{COMPONENT_WORDS[c]}: {counts[c]} modules, relative reconstruction error {e:.4f}"
            + (f"; {rank_summary(chosen, *dynamic)}" if dynamic else ""))
    return result


def _check_paths(cfg: ExtractConfig) -> Path:
    for name in ("model_org", "model_tuned", "save_to"):
        if not getattr(cfg, name):
            raise ConfigError(f"`{name}` is required for `extract`")
    out = Path(cfg.save_to)
    if out.suffix.lower() not in (".safetensors", ".ckpt", ".pt"):
        raise ConfigError(f"`save_to` must end in .safetensors, .ckpt or .pt, got {out.name!r}")
    if out.is_dir():
        raise ConfigError(f"`save_to` {out} is a folder; the LoRA is not written over a folder: choose another name")
    for name in ("model_org", "model_tuned"):
        src = Path(getattr(cfg, name))
        if src.exists() and out.exists() and src.resolve() == out.resolve():
            raise ConfigError(f"`save_to` is the `{name}` file; choose another output path")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise ConfigError(f"`save_to` {out} is inside the `{name}` folder {src}: a LoRA there could replace a "
                              f"file of the model; write it outside the model's folder")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"`save_to` {out} exists; set `overwrite` to replace it")
    return out


def extract(cfg: ExtractConfig | None = None, /, **kwargs) -> ExtractResult:
    """Extract a LoRA file from `model_org` and `model_tuned` (see `ExtractConfig` for the options).

    `extract(model_org="base.safetensors", model_tuned="tuned.safetensors", save_to="out.safetensors", dim=16)`.
    """
    from .formats import save_lora
    from .lora_metadata import lora_base_metadata

    cfg = ExtractConfig.from_dict(kwargs) if cfg is None else (cfg.replace(**kwargs) if kwargs else cfg)
    cfg = cfg.replace(model_org=resolve_builtin(cfg.model_org), model_tuned=resolve_builtin(cfg.model_tuned))
    out = _check_paths(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device` is cuda but no CUDA GPU is available; use `device = cpu`")
    dynamic = (cfg.dynamic_method, cfg.dynamic_param) if cfg.dynamic_method else None
    result = extract_lora(cfg.model_org, cfg.model_tuned, dim=cfg.dim, conv_dim=cfg.conv_dim, svd=cfg.svd,
                          clamp_quantile=cfg.clamp_quantile, min_diff=cfg.min_diff, device=cfg.device, v2=cfg.v2,
                          dynamic=dynamic)
    family, prediction = result.family, result.prediction_type
    errors = {f"{c}": f"{e:.6f}" for c, e in result.errors.items()}
    # SD2 at 768 px is the v-prediction model; SD2-base (epsilon) is a 512 px model
    resolution = 512 if family.v2 and prediction == "epsilon" else None
    # the largest rank written (below dim / conv_dim where a dynamic rank chose less everywhere)
    downs = [t for k, t in result.state_dict.items() if k.endswith(".lora_down.weight")]
    dim = max((t.shape[0] for t in downs if t.dim() == 2 or t.shape[2] == 1), default=cfg.dim)
    conv_dim = max((t.shape[0] for t in downs if t.dim() == 4 and t.shape[2] > 1), default=cfg.conv_dim)
    meta = lora_base_metadata(family, prediction, network_dim=dim, resolution=resolution,
                              network_alpha=float(dim), conv_dim=conv_dim,
                              conv_alpha=None if conv_dim is None else float(conv_dim),
                              title=out.stem,
                              extra={"ss_training_comment": f"extracted by lorakit; relative error {errors}",
                                     "lorakit.extract_config": cfg.to_dict(),
                                     **({"lorakit.dynamic_rank": f"{dynamic[0]}={dynamic[1]:g}"} if dynamic else {})})
    result.path = save_lora(out, result.state_dict, metadata=meta, save_precision=cfg.save_precision)
    print(f"saved {out} ({result})")
    return result
