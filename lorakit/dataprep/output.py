"""The folders `prepare` writes: each carries a marker file, so that a re-run (`replace_output`) may replace what an
earlier run wrote, and never a folder of the user's."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import DatasetError
from ..fileio import write_text

OUTPUT_MARKER = ".lorakit-prepare"


def mark_output(folder: Path) -> None:
    write_text(folder / OUTPUT_MARKER, "written by lorakit prepare; `replace_output = true` may replace it\n")


def has_files(folder: Path) -> bool:
    """Whether `folder` holds anything besides prepare's marker."""
    return folder.is_dir() and any(p.name != OUTPUT_MARKER for p in folder.iterdir())


def claim_output(folder: Path, *, replace: bool) -> None:
    """With `replace`, empty the folder an earlier prepare run wrote (it holds the marker), with its
    `<name>_set_aside` folder; a non-empty folder that lorakit did not write is never touched. Nothing is created
    here: the action creates its output, and `mark_output` marks it when the action is done."""
    aside = folder.parent / f"{folder.name}_set_aside"
    if replace and has_files(folder):
        if not (folder / OUTPUT_MARKER).is_file():
            raise DatasetError(f"`output_dir` {folder} is not empty and was not written by `lorakit prepare`: "
                               f"`replace_output` only replaces prepare's own outputs; choose a new folder")
        print(f"replacing the earlier output in {folder}")
        shutil.rmtree(folder)
        if (aside / OUTPUT_MARKER).is_file():
            shutil.rmtree(aside)
