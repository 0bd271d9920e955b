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


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message as one line of a lorakit error: its first line (its type's name when empty), cut."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class OutOfMemory(LorakitError, RuntimeError):
    """The GPU's (or the machine's) memory ran out; the message says which settings need less."""


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e)
    return isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
        isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text))


class memory_advice:  # noqa: N801 (used as a context manager, like contextlib's)
    """Turn running out of memory inside the block into `error_class` (an `OutOfMemory` by default) saying what
    uses less (`advice`), the framework's own message kept as its cause; the GPU's cache is emptied so that a
    notebook can try again with other settings."""

    def __init__(self, advice: str, error_class: type[LorakitError] | None = None):
        self.advice, self.error_class = advice, error_class or OutOfMemory

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, LorakitError) or not _is_out_of_memory(exc):
            return False
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        first = first_line(exc, 160)
        where = "the GPU" if "CUDA" in first or "cuda" in first else "this machine"
        raise self.error_class(f"out of memory on {where} ({first}): {self.advice}") from exc
