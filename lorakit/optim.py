"""Optimizers and learning-rate schedules by their sd-scripts names.

`make_optimizer(name, param_groups, lr, args)` — AdamW (torch's fused kernel on CPU and CUDA), Lion (lion-pytorch),
Prodigy (prodigyopt; learning rates around 1.0, it adapts them), Adafactor (transformers; its relative step size,
or a fixed LR with `relative_step=False`), SGD,
SGDNesterov (momentum 0.9 unless set), and bitsandbytes' 8-bit and paged optimizers (CUDA only: `BNB_OPTIMIZERS`).
`make_scheduler(...)` — diffusers' `get_scheduler` (constant, linear, cosine, cosine_with_restarts, polynomial,
constant_with_warmup) and transformers' cosine_with_min_lr, inverse_sqrt and warmup_stable_decay, with warm-up.
Optional packages are imported only when chosen, and their absence is a `TrainingError` that says what to install.
"""

from __future__ import annotations

import ast

import torch

from .errors import ConfigError, TrainingError


def parse_optimizer_args(args: list[str]) -> dict:
    """`["weight_decay=0.01", "betas=(0.9,0.99)", "decouple=True"]` → a dict of Python values."""
    out = {}
    for arg in args:
        key, _, raw = arg.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


# sd-scripts' names of bitsandbytes optimizers -> the class in `bitsandbytes.optim` (SGDNesterov8bit: SGD8bit with
# nesterov=True)
BNB_OPTIMIZERS = {"AdamW8bit": "AdamW8bit", "PagedAdamW8bit": "PagedAdamW8bit", "PagedAdamW": "PagedAdamW",
                  "PagedAdamW32bit": "PagedAdamW32bit", "Lion8bit": "Lion8bit", "PagedLion8bit": "PagedLion8bit",
                  "SGDNesterov8bit": "SGD8bit"}


def make_optimizer(name: str, param_groups: list[dict], lr: float, args: list[str] | None = None,
                   device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """Build the optimizer `name` over `param_groups` (each group may carry its own "lr"). A value in `args` the
    optimizer refuses is a ConfigError naming `optimizer_args`."""
    kwargs = parse_optimizer_args(args or [])
    try:
        return _make_optimizer(name, param_groups, lr, kwargs, device)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError) or not args:
            raise
        raise ConfigError(f"`optimizer_args` {args} are not accepted by {name}: {e}") from None


def check_optimizer(name: str, lr: float, args: list[str] | None, device: torch.device | str,
                    warmup: bool = False) -> None:
    """Build the optimizer (and a schedule, with `warmup` or not) once over a dummy parameter, so that a missing
    package or a bad `optimizer_args` value is reported before the model is downloaded and the latents are cached."""
    opt = make_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(1, device=device))]}], lr, args, device)
    make_scheduler("constant", opt, warmup_steps=int(warmup), total_steps=2)


def _make_optimizer(name: str, param_groups: list[dict], lr: float, kwargs: dict,
                    device: torch.device | str) -> torch.optim.Optimizer:
    if name == "AdamW":
        if torch.device(device).type in ("cpu", "cuda") and not {"fused", "foreach"} & kwargs.keys():
            # one fused kernel over all tensors: on a CPU 3x faster than the default per-tensor loop for a LoRA's
            # ~500 small tensors (same update; `optimizer_args = ["fused=False"]` turns it off)
            kwargs["fused"] = True
        return torch.optim.AdamW(param_groups, lr=lr, **kwargs)
    if name == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, **kwargs)
    if name in ("SGDNesterov", "SGDNesterov8bit"):  # sd-scripts: Nesterov momentum, 0.9 unless set
        kwargs = {"momentum": 0.9, "nesterov": True, **kwargs}
        if name == "SGDNesterov":
            return torch.optim.SGD(param_groups, lr=lr, **kwargs)
    if name in BNB_OPTIMIZERS:
        if torch.device(device).type != "cuda":
            raise TrainingError(f"`optimizer_type = {name}` needs a CUDA GPU (bitsandbytes has no CPU kernels); "
                                f"use AdamW on this machine — for a LoRA the 8-bit states save only ~0.1 GB anyway")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainingError(f"`optimizer_type = {name}` needs bitsandbytes: `pip install bitsandbytes` "
                                f"({e})") from None
        return getattr(bnb.optim, BNB_OPTIMIZERS[name])(param_groups, lr=lr, **kwargs)
    if name == "Lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise TrainingError("`optimizer_type = Lion` needs lion-pytorch: `pip install lion-pytorch`") from None
        return Lion(param_groups, lr=lr, **kwargs)
    if name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainingError("`optimizer_type = Prodigy` needs prodigyopt: `pip install prodigyopt`") from None
        return Prodigy(param_groups, lr=lr, **kwargs)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        # as sd-scripts: Adafactor's own relative step size unless `relative_step=False` (then `lr` and lorakit's
        # schedules drive it); `warmup_init` needs the relative step; transformers' other defaults
        kwargs = {"relative_step": True, **kwargs}
        kwargs["relative_step"] = bool(kwargs["relative_step"] or kwargs.get("warmup_init"))
        return Adafactor(param_groups, lr=None if kwargs["relative_step"] else lr, **kwargs)
    raise ConfigError(f"unknown `optimizer_type` {name!r}")


def relative_step_size(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` sets its own learning rate (Adafactor's relative step): the configured rates and the
    schedule do not apply."""
    return bool(optimizer.defaults.get("relative_step")) and type(optimizer).__name__ == "Adafactor"


def resolve_warmup_steps(value: int | float, total_steps: int) -> int:
    """`lr_warmup_steps` (or `lr_decay_steps`) as a number of steps: an integer is one already, a fraction (< 1) is
    that share of the training steps, rounded down (sd-scripts)."""
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   num_cycles: int = 1, power: float = 1.0, decay_steps: int = 0, timescale: int | None = None,
                   min_lr_ratio: float | None = None):
    """A LambdaLR-style schedule stepping once per optimizer step. `constant` with warm-up steps becomes
    `constant_with_warmup` (what users mean). As in sd-scripts: `cosine_with_min_lr` falls to `min_lr_ratio` × the
    rate over `num_cycles` half-waves; `inverse_sqrt` decays as 1/√(step/timescale) after the warm-up;
    `warmup_stable_decay` warms up, holds, then decays over the last `decay_steps` to `min_lr_ratio` × the rate."""
    from diffusers.optimization import get_scheduler
    from transformers import optimization as hf

    if relative_step_size(optimizer):  # sd-scripts: Adafactor's own rate, whatever `lr_scheduler` says
        if warmup_steps:
            raise ConfigError("Adafactor with its relative step size (sd-scripts' default) warms up by itself: set "
                              "`lr_warmup_steps = 0`, or `optimizer_args = [\"relative_step=False\"]` for a fixed "
                              "learning rate with warm-up")
        return hf.AdafactorSchedule(optimizer, optimizer.param_groups[0]["lr"] or 0.0)  # steps: Adafactor's rate
    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    if name == "cosine_with_min_lr":
        return hf.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio or 0.0)
    if name == "inverse_sqrt":
        return hf.get_inverse_sqrt_schedule(optimizer, warmup_steps, timescale=timescale)
    if name == "warmup_stable_decay":
        stable = total_steps - warmup_steps - decay_steps
        if decay_steps < 1 or stable < 0:
            raise ConfigError(f"`lr_scheduler = warmup_stable_decay` needs `lr_decay_steps` ≥ 1 and warm-up + decay "
                              f"within the {total_steps} training steps; got {warmup_steps} + {decay_steps}")
        return hf.get_wsd_schedule(optimizer, warmup_steps, decay_steps, num_stable_steps=stable,
                                   num_cycles=num_cycles / 2, min_lr_ratio=min_lr_ratio or 0.0)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
