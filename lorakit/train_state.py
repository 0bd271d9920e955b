"""`save_state` / `resume`: everything a run needs to continue exactly where it stopped (Colab disconnects).

A state folder `<output_dir>/state-<step>/` holds:
- `lora_params.safetensors` — the trainable LoRA parameters, fp32, by parameter name;
- `train_state.pt` — optimizer, LR scheduler and grad-scaler states, the position (optimizer step, epoch, batches
  done in that epoch), the torch RNG states, and the loss history; read back with `weights_only=True`;
- `config.toml` — the run's config: a resumed run must have the same training options (`check_config`).
`<output_dir>/state-latest.txt` names the newest one (`resume = "latest"`).

Together with the dataset's per-(epoch, batch) seeding and the per-step noise generator, this makes a run that is
killed and resumed end with the same weights as one that never stopped (on CPU; GPU kernels may differ in the last
bits). The folder appears atomically: it is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TrainingError, first_line
from .fileio import safe_torch_load, save_safetensors, sync, temp_folder, torch_save, write_text

LATEST = "state-latest.txt"
STATE_FOLDER = re.compile(r"state-\d{8}")  # `state-<step>`, the name of a state folder
CLEARED = "none"  # what state-latest.txt holds when it deliberately names no state
SAVED_WITH = "saved_with.txt"  # in a state folder: the tag of the LoRA save it was written with


@dataclass
class TrainState:
    params: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    step: int
    epoch: int
    batches_done: int  # batches of `epoch` already trained
    rng: dict
    loss_history: list
    folder: Path
    layout: dict | None = None  # the run's batch layout when saved (`run_layout`); None in older states
    session_id: int | None = None  # the run's ss_session_id, kept by the resumed run; None in older states
    replaces: dict | None = None  # {path in output_dir: identity}: what an `overwrite` run removes when it ends


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(output_dir: str | Path, *, params: dict[str, torch.Tensor], optimizer, scheduler, scaler=None,
               step: int, epoch: int, batches_done: int, loss_history: list, config_toml: str = "",
               layout: dict | None = None, saved_with: str | None = None, rng: dict | None = None,
               session_id: int | None = None, replaces: dict[Path, tuple[int, int]] | None = None) -> Path:
    """Write `state-<step>/` atomically and point `state-latest.txt` at it. Returns the folder. `saved_with`: the
    tag of the LoRA saved with it (`lorakit.save_rotation` deletes the two together); `rng`: the random numbers'
    state as of `step` (`rng_state()` then; default: now); `replaces`: the earlier run's files that an `overwrite`
    run removes when it ends (`save_rotation.earlier_run`), so that it still does after a resume."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"state-{step:08d}"
    tmp = temp_folder(final)
    old = None
    try:
        save_safetensors({k: v.detach().float().cpu() for k, v in params.items()}, tmp / "lora_params.safetensors")
        torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "step": step, "epoch": epoch,
                    "batches_done": batches_done, "rng": rng if rng is not None else rng_state(),
                    "loss_history": loss_history, "layout": layout, "session_id": session_id, "format": 1,
                    "replaces": {str(p.relative_to(output_dir)): list(i) for p, i in (replaces or {}).items()}},
                   tmp / "train_state.pt")
        if config_toml:
            write_text(tmp / "config.toml", config_toml)
        if saved_with:
            write_text(tmp / SAVED_WITH, saved_with + "\n")
        if final.exists():  # the same step saved again: the old folder moves aside until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=output_dir))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        sync(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old / final.name, final)  # put back: `state-latest.txt` may name it
        raise
    finally:
        if old is not None and final.exists():
            shutil.rmtree(old, ignore_errors=True)
    write_text(output_dir / LATEST, final.name + "\n")
    return final


def find_state(resume: str, output_dir: str | Path) -> Path | None:
    """The state folder named by `resume`: a folder path, `latest` (the newest in `output_dir`), or `auto` (the
    newest in `output_dir` if there is one, else None: a new run). The newest is the one `state-latest.txt` names;
    when that file is lost or damaged, the state folder of the highest step."""
    output_dir = Path(output_dir)
    if resume in ("latest", "auto"):
        folder = _latest_named(output_dir)
        if folder is None:
            folder = _highest_state(output_dir)
            if folder is None:
                if resume == "auto":
                    return None
                raise TrainingError(f"`resume = latest` but {output_dir} has no saved state yet ({LATEST} is "
                                    f"missing): train with `save_state = true` first")
            print(f"note: {LATEST} in {output_dir} is missing or names no state; resuming from the state of the "
                  f"highest step, {folder.name}", flush=True)
    else:
        folder = Path(resume)
    if not (folder / "train_state.pt").is_file() or not (folder / "lora_params.safetensors").is_file():
        if any((folder / name).is_file() for name in ("optimizer.bin", "random_states_0.pkl", "scheduler.bin")):
            raise TrainingError(f"`resume`: {folder} is a state saved by sd-scripts (accelerate's files), which "
                                f"lorakit cannot continue; start a new run from the LoRA saved with it "
                                f"(`network_weights = \"<that .safetensors>\"`)")
        raise TrainingError(f"`resume`: {folder} is not a state folder written by `save_state` "
                            f"(needs train_state.pt and lora_params.safetensors)")
    return folder


def _pointer_text(output_dir: Path) -> str | None:
    pointer = output_dir / LATEST
    return pointer.read_bytes().decode("utf-8", errors="replace").strip() if pointer.is_file() else None


def clear_latest(output_dir: str | Path) -> None:
    """Make `state-latest.txt` name no state (a run replacing an earlier one, until it saves its own): `resume =
    auto` then starts afresh rather than continuing the replaced run's highest state."""
    write_text(Path(output_dir) / LATEST, CLEARED + "\n")


def _latest_named(output_dir: Path) -> Path | None:
    """The state folder `state-latest.txt` names (a state of this folder: `state-<step>`), or None."""
    name = _pointer_text(output_dir)
    if name is None or not STATE_FOLDER.fullmatch(name):
        return None
    folder = output_dir / name
    _put_back(folder)
    return folder if folder.is_dir() else None


def _complete_states(output_dir: Path) -> list[Path]:
    """The state folders in `output_dir` that hold both files, by step."""
    return sorted(f for f in output_dir.glob("state-*") if STATE_FOLDER.fullmatch(f.name)
                  and (f / "train_state.pt").is_file() and (f / "lora_params.safetensors").is_file())


def _highest_state(output_dir: Path) -> Path | None:
    """The complete state of the highest step, the newest when `state-latest.txt` is lost or damaged; None when
    there is none or the pointer was cleared on purpose (`clear_latest`)."""
    states = [] if _pointer_text(output_dir) == CLEARED else _complete_states(output_dir)
    return states[-1] if states else None


def _put_back(folder: Path) -> None:
    """A state saved again at its step moves aside while the new one is renamed in (`save_state`): after a kill
    between the two renames, the one set aside goes back."""
    if not folder.exists():
        aside = sorted(folder.parent.glob(f".{folder.name}.old.*/{folder.name}"))
        if aside:
            os.replace(aside[-1], folder)


def load_state(folder: str | Path) -> TrainState:
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        data = safe_torch_load(folder / "train_state.pt")
        params = load_file(str(folder / "lora_params.safetensors"))
        if not isinstance(data, dict) or "optimizer" not in data:
            raise ValueError("train_state.pt holds no training state")
    except Exception as e:  # a state damaged on the disk (a sync gone wrong): name it, and the one before
        earlier = [f for f in _complete_states(folder.parent) if f.name < folder.name]
        hint = (f"; resume from the one before it: `resume = \"{earlier[-1]}\"`" if earlier else
                "; no earlier state is in its folder (`resume = none` starts afresh)")
        raise TrainingError(f"`resume`: the state {folder} is damaged ({first_line(e)}){hint}") from None
    return TrainState(params=params, optimizer=data["optimizer"], scheduler=data["scheduler"], scaler=data["scaler"],
                      step=int(data["step"]), epoch=int(data["epoch"]), batches_done=int(data["batches_done"]),
                      rng=data["rng"], loss_history=list(data["loss_history"]), folder=folder,
                      layout=data.get("layout"), session_id=data.get("session_id"),
                      replaces={rel: tuple(i) for rel, i in (data.get("replaces") or {}).items()})


def restore_params(named: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy saved LoRA parameters into the network; the set of parameters and their shapes must match."""
    missing, extra = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
    if missing or extra:
        raise TrainingError(f"`resume`: the state in {folder} was saved for a different network "
                            f"({len(missing)} parameters missing, {len(extra)} unexpected, e.g. "
                            f"{(missing or extra)[0]}): resume with the same network_dim/conv_dim/train-only options")
    with torch.no_grad():
        for name, p in named.items():
            if p.shape != saved[name].shape:
                raise TrainingError(f"`resume`: parameter {name} has shape {tuple(saved[name].shape)} in the state "
                                    f"but {tuple(p.shape)} now: resume with the same `network_dim`")
            p.copy_(saved[name].to(p.device, p.dtype))


def saved_state_in(output_dir: str | Path) -> Path | None:
    """The newest state folder `save_state` left in `output_dir`, or None."""
    output_dir = Path(output_dir)
    folder = _latest_named(output_dir)
    return folder if folder is not None and (folder / "train_state.pt").is_file() else _highest_state(output_dir)


def check_layout(saved: dict | None, current: dict, folder: Path) -> None:
    """A state continues exactly only over the same batches: refuse one saved with another dataset, batch size or
    gradient accumulation (its position would point into a different epoch), naming what changed."""
    if saved is None:
        return
    changed = [f"{key} {saved.get(key)!r} → {current.get(key)!r}" for key in current if saved.get(key) != current[key]]
    if changed:
        raise TrainingError(f"cannot resume from {folder}: since it was saved, {'; '.join(changed)}. Resume with the "
                            f"same data and batch settings, or set `resume = 'none'` to start a new run")


# options a resumed run may change: where things are and what is saved, sampled or validated along the way, how long
# it trains, and how the same maths is computed; any other change would make the weights differ from the run's own
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "device", "output_dir", "output_name", "train_data_dir", "reg_data_dir", "dataset_config",
    "conditioning_data_dir", "max_train_steps", "max_train_epochs", "save_every_n_epochs", "save_every_n_steps",
    "save_n_epoch_ratio", "save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps",
    "save_last_n_steps_state", "save_model_as", "save_precision", "save_state", "save_state_on_train_end",
    "training_comment", "no_metadata", "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs",
    "sample_at_end", "sample_at_first", "sample_sampler", "validate_every_n_steps", "validate_every_n_epochs",
    "max_validation_steps", "cache_latents_to_disk", "gradient_checkpointing", "xformers", "sdpa",
    "network_weights"})  # (the LoRA a run started from: the state's own weights replace it)


def check_config(saved: dict | None, current: dict, folder: Path) -> None:
    """A state continues its own run: refuse one saved with other training options (learning rates, network,
    optimizer, noise, captions, ...), naming what changed, instead of continuing with the saved optimizer's rates
    under the new settings' name. `saved`/`current`: `TrainConfig.to_dict()` of the state's config and this run's."""
    if saved is None:  # lost, damaged, or written by another version: the options cannot be compared
        print(f"warning: {folder} has no readable config.toml, so this run's options cannot be checked against "
              f"those it was saved with: resuming exactly needs the same options", flush=True)
        return
    changed = [f"{key} {saved.get(key)!r} → {current.get(key)!r}" for key in sorted(set(saved) | set(current))
               if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]
    if changed:
        raise TrainingError(f"cannot resume from {folder}: it was saved with other training options ("
                            f"{'; '.join(changed)}). Resume with the options it was saved with, or set "
                            f"`resume = 'none'` (and another `output_name` to keep the first run) to start a new run")

