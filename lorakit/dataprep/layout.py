"""DreamBooth folders: `<repeats>_<identifier> <class>/` (KOHYA_FORMAT.md §8) built from a flat folder of images.

Steps per epoch = images x repeats / batch size (doubled when regularisation images are used, because every
training draw is matched by a class-image draw). `suggest_repeats` picks repeats so that the planned number of
epochs reaches about `target_steps`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, DatasetError
from ..fileio import write_bytes
from .probe import probe
from .sources import IMAGE_EXTENSIONS, DatasetSource, dreambooth_name_tokens, stem_key, unique_name


def steps_per_epoch(n_images: int, repeats: int, batch_size: int = 1, with_reg: bool = False) -> int:
    """Optimizer steps in one epoch (sd-scripts' count; reg images double the draws)."""
    return math.ceil(n_images * repeats * (2 if with_reg else 1) / max(1, batch_size))


def suggest_repeats(n_images: int, target_steps: int = 1600, epochs: int = 10, batch_size: int = 1,
                    with_reg: bool = False) -> int:
    """Repeats so that `epochs` epochs take about `target_steps` steps (at least 1)."""
    if n_images < 1:
        raise ConfigError("no images to lay out")
    per_epoch_needed = target_steps / max(1, epochs)
    return max(1, round(per_epoch_needed * max(1, batch_size) / (n_images * (2 if with_reg else 1))))


def folder_name(repeats: int, identifier: str, class_name: str) -> str:
    """`10_sks dog` — the name sd-scripts and lorakit read repeats and the caption tokens from."""
    identifier, class_name = identifier.strip(), class_name.strip()
    for what, value in (("identifier", identifier), ("class_name", class_name)):
        if not value or "/" in value or "\\" in value:
            raise ConfigError(f"`{what}` must be a non-empty word without slashes, got {value!r}")
    if repeats < 1:
        raise ConfigError(f"`repeats` must be ≥ 1, got {repeats}")
    return f"{repeats}_{identifier} {class_name}"


@dataclass
class DreamBoothLayout:
    folder: Path  # the new `<repeats>_<identifier> <class>` folder
    train_data_dir: Path  # its parent: what `train_data_dir` should point at
    n_images: int
    repeats: int
    batch_size: int
    steps_per_epoch: int
    epochs_for_target: int

    def summary(self) -> str:
        return (f"{self.n_images} images → {self.folder}\n"
                f"repeats {self.repeats}, batch size {self.batch_size}: {self.steps_per_epoch} steps per epoch; "
                f"about {self.epochs_for_target} epochs for the target steps. "
                f"Train with train_data_dir = \"{self.train_data_dir}\".")

    def __str__(self) -> str:
        return self.summary()


def make_dreambooth_layout(src: str | os.PathLike, dst: str | os.PathLike, identifier: str, class_name: str,
                           repeats: int | None = None, target_steps: int = 1600, batch_size: int = 1, *,
                           epochs: int = 10, with_reg: bool = False, caption_extension: str = ".txt",
                           verbose: bool = True) -> DreamBoothLayout:
    """Copy the images (and their captions) of `src` into `dst/<repeats>_<identifier> <class_name>/`.

    repeats: None → `suggest_repeats(n, target_steps, epochs, batch_size, with_reg)`. Prints the steps per epoch
    when `verbose`. `dst` is the new `train_data_dir`; it must not be inside `src`.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DatasetError(f"`output_dir` ({dst}) must be outside the input folder {src}")
    with DatasetSource(src) as source:
        files = source.files()
        named = [rel for rel, size in files if rel.lower().endswith(IMAGE_EXTENSIONS) and size > 0]
        # the repeats are sized for the images that decode whole, as `prepare check` reads them
        images = [rel for rel in named if probe(source.read(rel), looks_like_image=True).kind is None]
        if not images:
            raise DatasetError(f"{src} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                               + (f": its {len(named)} file(s) with an image's name do not decode" if named else ""))
        decoded = set(images)
        unreadable = [rel for rel in named if rel not in decoded]
        if unreadable and verbose:
            print(f"left out {len(unreadable)} file(s) that do not decode as images (`prepare check` lists why): "
                  + ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""))
        captions = {stem_key(rel): rel for rel, _ in files if rel.lower().endswith(caption_extension)}
        if repeats is None:
            repeats = suggest_repeats(len(images), target_steps, epochs, batch_size, with_reg)
        folder = dst / folder_name(repeats, identifier, class_name)
        tokens = dreambooth_name_tokens(folder.name)
        same = [d for d in (dst.iterdir() if dst.is_dir() else []) if d.is_dir() and d != folder
                and dreambooth_name_tokens(d.name) == tokens]
        if same:  # another run with other repeats: the same images would be drawn twice over
            raise DatasetError(f"{dst} already has `{same[0].name}` for the same identifier and class; choose a new "
                               f"`output_dir` (or set `replace_output = true` to replace an earlier prepare run's "
                               f"output)")
        if folder.exists() and any(folder.iterdir()):
            raise DatasetError(f"{folder} already has files; choose a new `output_dir` (or set `replace_output = "
                               f"true` to replace an earlier prepare run's output)")
        taken: set[str] = set()
        for rel in images:
            p = PurePosixPath(rel)
            name = p.name
            if p.stem.casefold() in taken and p.parent.parts:  # flat output: a/x.png and b/x.png both kept
                name = f"{'_'.join(p.parent.parts)}_{p.name}"
            name = unique_name(name, taken)  # and no two images share a stem, so each keeps its own caption
            write_bytes(folder / name, source.read(rel))
            cap = captions.get(stem_key(rel))
            if cap is not None:
                write_bytes(folder / (PurePosixPath(name).stem + caption_extension), source.read(cap))
    per_epoch = steps_per_epoch(len(images), repeats, batch_size, with_reg)
    layout = DreamBoothLayout(folder, dst, len(images), repeats, batch_size, per_epoch,
                              max(1, round(target_steps / per_epoch)))
    if verbose:
        print(layout.summary())
    return layout
