"""The device a job runs on: the one asked for (checked), else the best available (CUDA, then MPS, then CPU)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def has_mps() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(cfg) -> torch.device:
    """`cfg.device` (cpu, cuda, cuda:N, mps) when set, after checking this machine has it; else the best one."""
    if cfg.device:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(f"`device` must be cpu, cuda, cuda:N or mps (or unset: the best available), got "
                              f"{cfg.device!r}") from None
        if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not has_mps()):
            raise ConfigError(f"`device` is {cfg.device} but this machine has no {device.type.upper()} device; "
                              f"leave `device` unset to use the best one available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if has_mps() else "cpu")
