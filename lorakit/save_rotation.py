"""Keep only the latest intermediate saves (sd-scripts' `save_last_n_epochs` / `save_last_n_steps` and their
`_state` variants), so a long run on Colab does not fill Google Drive.

Intermediate LoRAs are `<output_name>-<epoch:06d>.<ext>` (epoch saves) and `<output_name>-step<step:08d>.<ext>`
(step saves); a saved state `state-<step>/` names the save it was written with in `saved_with.txt`. Rules, as
sd-scripts': epoch saves — the N newest are kept; step saves — those of the last N steps (step ≥ current − N).
The final LoRA, an `-interrupted` save, the state `state-latest.txt` points at and states without a
`saved_with.txt` are never deleted.
"""

from __future__ import annotations

import glob
import re
import shutil
from pathlib import Path

from .train_state import LATEST, SAVED_WITH


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

