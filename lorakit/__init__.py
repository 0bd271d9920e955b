"""lorakit — LoRA training for Stable Diffusion: notebooks backed by a tested package.

The verbs: `train`, `merge`, `extract`, `generate`, `prepare`, `push_to_hub`, `load_models`, `inspect`; and one
config dataclass per job. Heavy modules are imported on first use so `import lorakit` stays fast.
"""

from __future__ import annotations

import importlib

from .config import (
    ExtractConfig,
    GenerateConfig,
    InspectConfig,
    MergeConfig,
    PrepareConfig,
    PushConfig,
    TinyConfig,
    TrainConfig,
)
from .errors import (
    ConfigError,
    DatasetError,
    LoraFormatError,
    LorakitError,
    ModelLoadError,
    TrainingError,
    UnsafeCheckpointError,
)

__version__ = "0.1.0"

_LAZY = {
    "train": "lorakit.training",
    "merge": "lorakit.merging",
    "extract": "lorakit.extraction",
    "generate": "lorakit.generation",
    "prepare": "lorakit.dataprep",
    "push_to_hub": "lorakit.hub",
    "load_models": "lorakit.models",
    "SDComponents": "lorakit.models",
    "save_single_file": "lorakit.models",
    "build_tiny": "lorakit.tiny",
    "inspect": "lorakit.formats",
    "load_lora": "lorakit.formats",
    "save_lora": "lorakit.formats",
    "add_lora": "lorakit.network",
    "apply_lora_file": "lorakit.network",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = ["ConfigError", "DatasetError", "ExtractConfig", "GenerateConfig", "InspectConfig", "LoraFormatError",
           "LorakitError", "MergeConfig", "ModelLoadError", "PrepareConfig", "PushConfig", "TinyConfig",
           "TrainConfig", "TrainingError", "UnsafeCheckpointError", *_LAZY]
