"""Typed exceptions. Library code raises these; the CLI turns them into one clear line and a non-zero exit."""


class LorakitError(Exception):
    """Base class for every error lorakit raises on purpose (bad input, not a bug)."""


class ConfigError(LorakitError, ValueError):
    """A job config has an unknown key, a wrong type, an out-of-range value or a contradiction."""


class ModelLoadError(LorakitError, ValueError):
    """A model path or file cannot be read as a Stable Diffusion model."""


class UnsafeCheckpointError(ModelLoadError):
    """A pickle (.ckpt/.pt) file wants to run code while loading; it was refused and nothing was executed."""


class LoraFormatError(LorakitError, ValueError):
    """A LoRA file is malformed or does not fit the model it is applied to."""


class DatasetError(LorakitError, ValueError):
    """A dataset folder or file cannot be used for training."""


class TrainingError(LorakitError, RuntimeError):
    """Training stopped for a reason the user must act on (e.g. NaN loss)."""


class HubError(LorakitError, RuntimeError):
    """A Hugging Face Hub request failed (network, permissions, a repo name taken); the message never holds a token."""
