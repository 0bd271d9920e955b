"""Job config schemas: one dataclass per job, the single source for CLI, TOML, forms and metadata."""

from .jobs import ExtractConfig, GenerateConfig, InspectConfig, MergeConfig, PushConfig, TinyConfig
from .prepare import PrepareConfig
from .schema import FieldSpec, JobConfig, option, parse_resolution, read_toml
from .train import TrainConfig

JOB_CONFIGS = {c.job: c for c in (TrainConfig, MergeConfig, ExtractConfig, GenerateConfig, PrepareConfig,
                                  PushConfig, InspectConfig, TinyConfig)}

__all__ = ["ExtractConfig", "FieldSpec", "GenerateConfig", "InspectConfig", "JOB_CONFIGS", "JobConfig", "MergeConfig",
           "PrepareConfig", "PushConfig", "TinyConfig", "TrainConfig", "option", "parse_resolution", "read_toml"]
