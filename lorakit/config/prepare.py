"""Options of the `prepare` job: check, repair, caption edits, DreamBooth layout, regularisation images."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import JobConfig, option

PREPARE_ACTIONS = ("check", "repair", "captions", "dreambooth", "reg")


@dataclass(repr=False)
class PrepareConfig(JobConfig):
    job = "prepare"
    positional = ("action",)

    action: str = option("check", "What to do: check, repair, captions, dreambooth, reg.", group="basic",
                         choices=PREPARE_ACTIONS, basic=True)
    input_dir: str = option("", "The folder (or .zip) of images to work on.", group="basic", basic=True)
    output_dir: str | None = option(None, "Where repaired / laid-out data goes (never the input folder).",
                                    group="basic", basic=True)
    resolution: int = option(512, "Target training resolution (for 'too small' and bucket checks).",
                             group="basic", min=8)
