"""Keep only the latest intermediate saves (sd-scripts' `save_last_n_epochs` / `save_last_n_steps` and their
`_state` variants), so a long run on Colab does not fill Google Drive.

Intermediate LoRAs are `<output_name>-<epoch:06d>.<ext>` (epoch saves) and `<output_name>-step<step:08d>.<ext>`
(step saves); a saved state `state-<step>/` names the save it was written with in `saved_with.txt`. Rules, as
sd-scripts': epoch saves — the N newest are kept; step saves — those of the last N steps (step ≥ current − N).
The final LoRA, an `-interrupted` save, the state `state-latest.txt` points at and states without a
`saved_with.txt` are never deleted.
"""

from __future__ import annotations

import contextlib
import glob
import re
import shutil
from pathlib import Path

from .errors import LorakitError
from .lora_metadata import SESSION_TEXT
from .train_state import LATEST, SAVED_WITH, STATE_FOLDER


def _epoch_number(tag: str) -> int | None:
    return int(tag) if re.fullmatch(r"\d{6}", tag) else None


def _step_number(tag: str) -> int | None:
    m = re.fullmatch(r"step(\d{8})", tag)
    return int(m[1]) if m else None


def intermediate_saves(output_dir: str | Path, output_name: str, extension: str) -> dict[str, Path]:
    """The intermediate LoRAs of `output_name` in `output_dir`, by tag: `000002` (an epoch), `step00000400`,
    `interrupted`."""
    prefix, suffix = f"{output_name}-", f".{extension}"
    found = {p.name[len(prefix):-len(suffix)]: p for p in Path(output_dir).glob(f"{glob.escape(prefix)}*{suffix}")
             if p.is_file()}
    return {tag: p for tag, p in found.items()
            if tag == "interrupted" or _epoch_number(tag) is not None or _step_number(tag) is not None}


def _stale(tagged: dict, step: int, last_n_epochs: int | None, last_n_steps: int | None) -> list:
    """The entries of `tagged` ({tag: item}) the rules delete."""
    stale = []
    if last_n_epochs:
        epochs = sorted((n, t) for t in tagged if (n := _epoch_number(t)) is not None)
        stale += [tagged[t] for _, t in epochs[:-last_n_epochs]]
    if last_n_steps:
        stale += [tagged[t] for t in tagged if (n := _step_number(t)) is not None and n < step - last_n_steps]
    return stale


def prune_saves(output_dir: str | Path, output_name: str, extension: str, *, step: int,
                last_n_epochs: int | None = None, last_n_steps: int | None = None,
                last_n_epochs_state: int | None = None, last_n_steps_state: int | None = None) -> list[Path]:
    """Delete the intermediate LoRAs and saved states the rules leave out, after a save at optimizer step `step`.
    The `_state` counts default to the LoRAs' ones; with none set nothing is looked at. Returns what was deleted."""
    if not (last_n_epochs or last_n_steps or last_n_epochs_state or last_n_steps_state):
        return []
    output_dir = Path(output_dir)
    deleted = _stale(intermediate_saves(output_dir, output_name, extension), step, last_n_epochs, last_n_steps)
    for path in deleted:
        path.unlink(missing_ok=True)
    latest = output_dir / LATEST
    keep = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    states = {}
    for folder in output_dir.glob("state-*"):
        tag_file = folder / SAVED_WITH
        if folder.is_dir() and tag_file.is_file():
            states[tag_file.read_text(encoding="utf-8").strip()] = folder
    old_states = [f for f in _stale(states, step, last_n_epochs_state or last_n_epochs,
                                    last_n_steps_state or last_n_steps) if f.name != keep]
    for folder in old_states:
        shutil.rmtree(folder, ignore_errors=True)
    return deleted + old_states



def earlier_run(output_dir: str | Path, output_name: str, extension: str) -> dict[Path, tuple[int, int]]:
    """What an earlier run of `output_name` left in `output_dir` that a run with `overwrite` replaces: its
    intermediate saves, its saved states (their config names `output_name`), the sample images and samples grid
    tagged with its session (the `ss_session_id` of its LoRAs) and its loss plot. Another name's run in the same
    folder keeps its files. Each path comes with its identity now (inode, modification time), by which
    `remove_replaced` tells it from a file the new run writes at the same path (lorakit writes by rename, so a
    rewritten file is a new inode)."""
    from .hub import read_lora_metadata

    output_dir = Path(output_dir)
    saves = list(intermediate_saves(output_dir, output_name, extension).values())
    sessions = set()
    for lora in saves + [output_dir / f"{output_name}.{extension}"]:
        with contextlib.suppress(OSError, LorakitError):
            sessions.add(read_lora_metadata(lora).get("ss_session_id"))
    sessions.discard(None)
    paths = list(saves) + [folder for folder, name in state_names(output_dir).items() if name == output_name]
    images = [p for p in (output_dir / "samples").glob("*.png") if re.fullmatch(r"\d{6}_\d{2,}\.png", p.name)]
    paths += [p for p in images + [output_dir / "samples_grid.png"] if sessions and _session_of(p) in sessions]
    paths.append(output_dir / f"{output_name}_loss.png")
    return {p: _identity(p) for p in paths if p.exists()}


def state_names(output_dir: str | Path) -> dict[Path, str | None]:
    """The saved states in `output_dir` (`state-<step>`) and the `output_name` of the run each belongs to (from
    its `config.toml`; None when unreadable)."""
    import tomllib

    names = {}
    for folder in sorted(Path(output_dir).glob("state-*")):
        if folder.is_dir() and STATE_FOLDER.fullmatch(folder.name):
            names[folder] = None
            with contextlib.suppress(OSError, ValueError):
                names[folder] = tomllib.loads((folder / "config.toml").read_text(encoding="utf-8")).get("output_name")
    return names


def _session_of(image: Path) -> str | None:
    """The run session a training PNG is tagged with (`SESSION_TEXT`), or None."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            value = im.info.get(SESSION_TEXT)
    except OSError:
        return None
    return None if value is None else str(value)


def remove_replaced(earlier: dict[Path, tuple[int, int]]) -> list[Path]:
    """Delete the files of `earlier` (from `earlier_run`) that are still as they were: the new run, now finished,
    wrote none of them again. Returns what was deleted."""
    removed = []
    for path, identity in earlier.items():
        if path.exists() and _identity(path) == identity:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns
