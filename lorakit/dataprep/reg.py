"""Regularisation (class) images: N pictures of the class from the base model, in the DreamBooth reg layout.

`reg_data_dir/<repeats>_<class>/reg_00000.png` ... with a caption file holding the class prompt. Image i is always
made from seed `seed + i`, and the files already there are counted first, so an interrupted run (Colab
disconnects) continues where it stopped. The folder records what its images were drawn with (`SETTINGS_FILE`):
a run with another prompt, seed or model does not add to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..fileio import atomic_path, write_text
from .sources import IMAGE_EXTENSIONS

REG_PATTERN = "reg_{:05d}.png"


@dataclass
class RegImages:
    folder: Path
    requested: int
    existing: int
    written: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.existing + len(self.written)}/{self.requested} class images in {self.folder} "
                f"({len(self.written)} new, {self.existing} already there). "
                f"Train with reg_data_dir = \"{self.folder.parent}\".")

    def __str__(self) -> str:
        return self.summary()


def reg_folder(dst: str | os.PathLike, class_prompt: str, class_name: str | None = None, repeats: int = 1) -> Path:
    """`dst/<repeats>_<class_name>`; without a class name the folder is named after the prompt."""
    name = (class_name or class_prompt).strip()
    if not name or "/" in name or "\\" in name:
        raise ConfigError(f"`class_name` must be a non-empty name without slashes, got {name!r}")
    if repeats < 1:
        raise ConfigError(f"`repeats` must be ≥ 1, got {repeats}")
    return Path(dst) / f"{repeats}_{name}"  # reg folders carry the class only, no identifier


def _missing_indices(folder: Path, n: int) -> tuple[int, list[int]]:
    """(images already in the folder, the first free `reg_i` indices needed to reach n)."""
    existing = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.stat().st_size > 0] \
        if folder.is_dir() else []
    need = max(0, n - len(existing))
    names = {p.name for p in existing}
    todo, i = [], 0
    while len(todo) < need:
        if REG_PATTERN.format(i) not in names:
            todo.append(i)
        i += 1
    return len(existing), todo


SETTINGS_FILE = ".lorakit-reg.json"  # in a reg folder: what its images were drawn with


def _check_settings(folder: Path, settings: dict, existing: int) -> None:
    """Record what the images are drawn with; a folder whose images were drawn otherwise (another prompt, seed,
    model, ...) is not continued: its images and the new ones would not be one set."""
    record = folder / SETTINGS_FILE
    if existing and record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        changed = [f"{k} {saved.get(k)!r} → {v!r}" for k, v in settings.items() if k in saved and saved[k] != v]
        if changed:
            raise ConfigError(f"{folder} holds {existing} class images drawn with other settings "
                              f"({'; '.join(changed)}): choose another `output_dir`, or delete them to redraw")
    folder.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps(settings, indent=1) + "\n")


def generate_reg_images(model, class_prompt: str, n: int, dst: str | os.PathLike, *, class_name: str | None = None,
                        repeats: int = 1, negative_prompt: str | None = None, num_inference_steps: int = 30,
                        guidance_scale: float = 7.5, width: int | None = None, height: int | None = None,
                        batch_size: int = 1, seed: int = 0, device: str | None = None, dtype=None,
                        caption_extension: str = ".txt", progress: bool = True,
                        on_image: Callable[[int, Path], None] | None = None) -> RegImages:
    """Generate class images until `dst/<repeats>_<class>` holds `n` of them (resumable).

    model: a model name/path for `lorakit.models.load_models`, or loaded `SDComponents`.
    width/height: default the model's native resolution. on_image(index, path) is called after each file.
    """
    if n < 0:
        raise ConfigError(f"`num_images` must be ≥ 0, got {n}")
    if not class_prompt or not class_prompt.strip():
        raise ConfigError("`class_prompt` must describe the class, e.g. 'a photo of a dog'")
    folder = reg_folder(dst, class_prompt.strip(), class_name, repeats)
    existing, todo = _missing_indices(folder, n)
    result = RegImages(folder, n, existing)
    if not todo:
        return result
    settings = {"model": str(getattr(model, "source", model)), "class_prompt": class_prompt,
                "negative_prompt": negative_prompt, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "width": width, "height": height, "seed": seed}
    _check_settings(folder, settings, existing)

    import torch
    from diffusers import DDIMScheduler

    from ..models import SDComponents, load_models

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    comps = model if isinstance(model, SDComponents) else load_models(str(model), device=device, dtype=dtype)
    comps.to(device=device, dtype=dtype)
    pipe = comps.pipeline(scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    size = comps.native_resolution
    width, height = width or size, height or size

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=existing, desc="class images", unit="img")
    try:
        for start in range(0, len(todo), max(1, batch_size)):
            batch = todo[start:start + max(1, batch_size)]
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in batch]
            with torch.no_grad():
                images = pipe(prompt=[class_prompt] * len(batch),
                              negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              width=width, height=height, generator=generators, output_type="pil").images
            for i, image in zip(batch, images):
                path = folder / REG_PATTERN.format(i)
                # the caption first: an image on disk (what a resumed run counts) always has its caption
                write_text(path.with_suffix(caption_extension), class_prompt + "\n")
                with atomic_path(path) as tmp:
                    image.save(tmp, "PNG")
                result.written.append(path)
                if bar is not None:
                    bar.update(1)
                if on_image is not None:
                    on_image(i, path)
    finally:
        if bar is not None:
            bar.close()
    return result
