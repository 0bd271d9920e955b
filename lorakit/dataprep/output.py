"""The folders `prepare` writes: each carries a marker file listing what the run wrote (size and modification time
of every file), so that a re-run (`replace_output`) may replace what an earlier run wrote — and never a folder of
the user's, nor a file the user added to it or edited since (a hand-corrected caption)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DatasetError
from ..fileio import write_text

OUTPUT_MARKER = ".lorakit-prepare"


def _files(folder: Path) -> dict[str, list[int]]:
    """`{relative path: [size, mtime_ns]}` of every file under `folder` but the marker and the latents a training
    run cached beside the images (`cache_latents_to_disk`: lorakit's own, made again when needed)."""
    from ..data.latents import CACHE_DIR

    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != OUTPUT_MARKER and CACHE_DIR not in path.relative_to(folder).parts:
            stat = path.stat()
            out[path.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return out


def mark_output(folder: Path) -> None:
    """Mark `folder` as prepare's output, listing the files it holds now (call when the action is done)."""
    write_text(folder / OUTPUT_MARKER, json.dumps({
        "written_by": "lorakit prepare", "note": "`replace_output = true` may replace these files",
        "files": _files(folder)}, indent=1) + "\n")


def has_files(folder: Path) -> bool:
    """Whether `folder` holds anything besides prepare's marker."""
    return folder.is_dir() and any(p.name != OUTPUT_MARKER for p in folder.iterdir())


def changed_since_marked(folder: Path) -> list[str] | None:
    """The files of a marked `folder` that its prepare run did not write as they are now (added or edited since),
    [] when there are none; None for a marker that lists no files (written by an earlier lorakit)."""
    try:
        written = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return None
    return [name for name, stat in _files(folder).items() if written.get(name) != stat]


def claim_output(folder: Path, *, replace: bool) -> list[tuple[Path, Path]]:
    """With `replace`, move the folder an earlier prepare run wrote (it holds the marker), with its
    `<name>_set_aside` folder, out of the way: `replaced` deletes them once the new output is done, `put_back`
    restores them if the action fails. A non-empty folder that lorakit did not write is never touched, nor one holding
    files added or edited since that run. Nothing is created here: the action creates its output, and `mark_output`
    marks it when the action is done. Returns the (folder, where it was moved) pairs."""
    aside = folder.parent / f"{folder.name}_set_aside"
    if replace and has_files(folder):
        if not (folder / OUTPUT_MARKER).is_file():
            held = sorted(folder.parent.glob(f".{folder.name}.replaced.*/{folder.name}"))
            raise DatasetError(f"`output_dir` {folder} is not empty and was not written by `lorakit prepare`: "
                               f"`replace_output` only replaces prepare's own outputs; choose a new folder"
                               + (f" (an interrupted `replace_output` run left the earlier output in {held[-1]})"
                                  if held else ""))
        marked_aside = (aside / OUTPUT_MARKER).is_file()
        for place in (folder, aside) if marked_aside else (folder,):
            changed = changed_since_marked(place)
            if changed:
                shown = ", ".join(changed[:5]) + (f" (and {len(changed) - 5} more)" if len(changed) > 5 else "")
                raise DatasetError(f"`replace_output` would delete {len(changed)} file(s) in {place} that the "
                                   f"earlier prepare run did not write or that changed since: {shown}; move them "
                                   f"out first (or choose a new `output_dir`)")
        print(f"replacing the earlier output in {folder}")
        moved = []
        for place in (folder, aside) if marked_aside else (folder,):
            holder = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced.", dir=place.parent))
            os.replace(place, holder / place.name)
            moved.append((place, holder / place.name))
        return moved
    return []


def replaced(moved: list[tuple[Path, Path]]) -> None:
    """The new output is done: delete the earlier one `claim_output` moved aside."""
    for _, held in moved:
        shutil.rmtree(held.parent, ignore_errors=True)


def put_back(moved: list[tuple[Path, Path]]) -> None:
    """The action failed: its partial output goes, the earlier output comes back as it was."""
    for place, held in moved:
        if place.exists():
            shutil.rmtree(place)
        os.replace(held, place)
        shutil.rmtree(held.parent, ignore_errors=True)
