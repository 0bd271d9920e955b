"""The bundled `data_examples/`: two small datasets drawn from the toy world, with ready-to-run training configs.

- `dreambooth/img/<repeats>_a sks shape/`: crescents — a shape the toy model never saw — to be learned under the
  trigger word "sks"; `dreambooth/reg/1_a shape/`: class images (the shapes it knows), same layout. The two folder
  names are the DreamBooth paper's prompt pair, "a [V] shape" and "a shape": the same words but the identifier.
- `captions/`: images of known shapes with a striped fill (a fill it never saw) and `.txt` captions such as
  "a red striped circle on a white background", and half as many solid ones (`solid_*.png`) captioned without the
  word: they tie the stripes to "striped" (without them the LoRA stripes every prompt).
- `dreambooth.toml`, `captions.toml`: `lorakit train --config ...` settings that learn on a CPU in one to two minutes
  on the built-in `lorakit-toy` model; `sample_prompts.txt`: kohya-syntax prompts for samples during training.

Everything is a pure function of the seed, so `scripts/make_data_examples.py` rewrites identical files.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..fileio import write_bytes, write_text
from . import world

TRIGGER = "sks"
DREAMBOOTH_REPEATS = 10
DREAMBOOTH_PROMPT = f"a {TRIGGER} {world.CLASS_WORD}"
CLASS_PROMPT = f"a {world.CLASS_WORD}"  # the instance prompt without the identifier: the class images' caption
STYLE_WORD = "striped"

# Workshop settings shared by both examples: rank 8 on the toy model, AdamW at 2e-3 (text encoder 1e-3), batch 8,
# 500 steps, CPU, fp32 — measured by benchmarks/toy_lesson.py at ~110 s on 2 cores with the concept learned.
WORKSHOP = dict(
    pretrained_model_name_or_path="lorakit-toy", network_dim=8, network_alpha=8.0, learning_rate=2e-3,
    text_encoder_lr=1e-3, train_batch_size=8, max_train_steps=500, lr_scheduler="constant", optimizer_type="AdamW",
    mixed_precision="no", save_precision="float", seed=42, device="cpu", cache_latents=True,
    sample_every_n_steps=250, sample_at_first=True, sample_sampler="ddim",  # the grid's first row: before training
)


def _png(image) -> bytes:
    buf = io.BytesIO()
    world.to_pil(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _write_images(folder: Path, scenes, captions: list[str] | None = None, prefix: str = "") -> list[Path]:
    images = world.render(scenes)
    paths = []
    for i in range(len(scenes)):
        path = folder / f"{prefix}{i:03d}.png"
        write_bytes(path, _png(images[i]))
        if captions is not None:
            write_text(path.with_suffix(".txt"), captions[i] + "\n")
        paths.append(path)
    return paths


def _toml(title: str, values: dict) -> str:
    """Only the settings that differ from lorakit's defaults, validated through `TrainConfig` first."""
    import tomli_w

    from ..config import TrainConfig

    TrainConfig.from_dict(values)
    return f"# {title}\n# Run from the repository root:  lorakit train --config data_examples/<this file>\n" + \
        tomli_w.dumps(values)


# Folders of earlier versions of the examples (same images, other names): a copy of data_examples/ kept from one
# of them (e.g. on Google Drive) would otherwise train on both names at once
_FORMER_FOLDERS = {"img": f"{DREAMBOOTH_REPEATS}_{TRIGGER} {world.CLASS_WORD}", "reg": f"1_{world.CLASS_WORD}"}


def _remove_former_folders(dreambooth: Path, written: dict[str, list[Path]]) -> None:
    """Delete `dreambooth/img|reg/<former name>/` when it holds nothing but byte-identical copies of files just
    written (nothing is lost); a folder with anything else in it is left alone."""
    for kind, name in _FORMER_FOLDERS.items():
        old = dreambooth / kind / name
        if not old.is_dir():
            continue
        new = {p.name: p for p in written[kind]}
        files = list(old.iterdir())
        if all(f.is_file() and f.name in new and f.read_bytes() == new[f.name].read_bytes() for f in files):
            for f in files:
                f.unlink()
            old.rmdir()


MARKER = "TOY_EXAMPLES.md"  # in `data_examples/`: marks the lessons' data, made for the toy model only


def toy_example_path(path: str | Path | None) -> Path | None:
    """The `data_examples/` folder holding `path`, when `path` is one of the toy lessons' (its `MARKER` beside it, a
    few levels up), else None."""
    if not path:
        return None
    here = Path(path).expanduser().resolve()
    for folder in [here, *here.parents][:4]:
        if (folder / MARKER).is_file():
            return folder
    return None


def make_data_examples(dest: str | Path, seed: int = 0, n_train: int = 16, n_reg: int = 32,
                       n_captions: int = 32) -> dict[str, Path]:
    """Write the examples into `dest` (normally the repository's `data_examples/`); returns the main paths.

    Paths inside the TOMLs are relative to `dest`'s parent folder (the repository root: run `lorakit train` there).
    """
    dest = Path(dest)
    rel = Path(dest.name)
    # DreamBooth: the held-out shape under the trigger word, known shapes as class (regularisation) images, captioned
    # "a sks shape" / "a shape" so that the class prompt is a trained caption. (With "sks shape" / "shape", the
    # prompt "a shape" drew crescents in 15 of 16 samples: benchmarks/RESULTS.md, "Control prompts".)
    db_train = dest / "dreambooth" / "img" / f"{DREAMBOOTH_REPEATS}_{DREAMBOOTH_PROMPT}"
    db_reg = dest / "dreambooth" / "reg" / f"1_{CLASS_PROMPT}"
    written = {"img": _write_images(db_train, world.sample_scenes(n_train, seed, shapes=world.HELD_OUT_SHAPES,
                                                                fills=("solid",))),
               "reg": _write_images(db_reg, world.sample_scenes(n_reg, seed + 1, fills=("solid",)))}
    _remove_former_folders(dest / "dreambooth", written)
    # Captions: known shapes with the held-out striped fill, each captioned in full, and solid ones as contrast
    cap_dir = dest / "captions"
    for fill, n, offset, prefix in ((STYLE_WORD, n_captions, 2, ""), ("solid", n_captions // 2, 3, "solid_")):
        scenes = world.sample_scenes(n, seed + offset, fills=(fill,))
        _write_images(cap_dir, scenes, [world.caption(scenes, i) for i in range(len(scenes))], prefix=prefix)
    prompts = write_text(dest / "sample_prompts.txt", "\n".join([
        f"{DREAMBOOTH_PROMPT} --s 20 --l 5 --d 1",
        f"{CLASS_PROMPT} --s 20 --l 5 --d 5",
        f"a blue {TRIGGER} {world.CLASS_WORD} on a white background --s 20 --l 5 --d 2",
        f"a red {STYLE_WORD} circle on a white background --s 20 --l 5 --d 3",
        f"a yellow {STYLE_WORD} square on a black background --s 20 --l 5 --d 4",
    ]) + "\n")
    write_text(dest / MARKER, f"# The toy model's lessons\n\nWritten by `lorakit.toy.examples.make_data_examples`: "
               f"{world.SIZE}x{world.SIZE} pictures of shapes\nfor the built-in `lorakit-toy` model. lorakit refuses "
               f"to train another model on them (copy an\nimage folder out of here if that is really meant).\n")
    db_toml = write_text(dest / "dreambooth.toml", _toml(
        f"DreamBooth lesson: teach the toy model a shape it never saw, as '{DREAMBOOTH_PROMPT}'.", dict(
        WORKSHOP, train_data_dir=str(rel / "dreambooth" / "img"), reg_data_dir=str(rel / "dreambooth" / "reg"),
        prior_loss_weight=1.0, sample_prompts=str(rel / "sample_prompts.txt"), output_dir="output/dreambooth",
        output_name="sks_shape", overwrite=True)))
    cap_toml = write_text(dest / "captions.toml", _toml(
        f"Caption lesson: teach the toy model a fill it never saw, '{STYLE_WORD}'.", dict(
        WORKSHOP, train_data_dir=str(rel / "captions"), sample_prompts=str(rel / "sample_prompts.txt"),
        output_dir="output/captions", output_name="striped", overwrite=True)))
    return {"dreambooth": dest / "dreambooth", "captions": cap_dir, "dreambooth_toml": db_toml,
            "captions_toml": cap_toml, "sample_prompts": prompts}
