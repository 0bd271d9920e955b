"""Prepare data: check, repair, captions, DreamBooth folders, regularisation images.

`prepare(cfg)` / `prepare(action="check", input_dir="photos")` runs one action from a `PrepareConfig` (the CLI's
`lorakit prepare <action> <input_dir>`); the functions below are the same actions for notebooks and scripts.
Nothing here ever writes into the input folder: every output goes to a new folder, every file atomically.
"""

from __future__ import annotations

from pathlib import Path

from ..config.prepare import PrepareConfig
from ..errors import ConfigError, ModelLoadError
from .autocaption import auto_caption, blip_captioner
from .captions import (
    CaptionEdit,
    add_trigger,
    dedupe_tags,
    edit_caption,
    edit_captions,
    parse_mapping,
    remove_tags,
    replace_tags,
    tag_frequencies,
)
from .check import check_dataset
from .contact_sheet import contact_sheet
from .layout import DreamBoothLayout, make_dreambooth_layout, steps_per_epoch, suggest_repeats
from .output import OUTPUT_MARKER, claim_output, has_files, mark_output, put_back, replaced
from .problems import KINDS
from .reg import RegImages, generate_reg_images
from .repair import RepairResult, repair_dataset
from .report import DatasetReport, ImageRecord, Problem

__all__ = ["KINDS", "CaptionEdit", "DatasetReport", "DreamBoothLayout", "ImageRecord", "Problem", "RegImages",
           "RepairResult", "add_trigger", "auto_caption", "blip_captioner", "check_dataset", "contact_sheet",
           "dedupe_tags", "edit_caption", "edit_captions", "generate_reg_images", "load_tokenizer",
           "make_dreambooth_layout", "prepare", "remove_tags", "repair_dataset", "replace_tags", "steps_per_epoch",
           "suggest_repeats", "tag_frequencies"]


def load_tokenizer(name_or_path: str):
    """The CLIP tokenizer of a diffusers model (folder or repo id), for exact caption token counts."""
    from transformers import CLIPTokenizer

    for kwargs in ({"subfolder": "tokenizer"}, {}):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError):
            continue
        if len(tokenizer) > 256:  # transformers 5 builds an empty tokenizer from a folder without vocab files
            return tokenizer
    raise ModelLoadError(f"no CLIP tokenizer found in `{name_or_path}` (looked in its tokenizer/ folder); "
                         f"unset `tokenizer_model` to estimate caption lengths instead")


def prepare(cfg: PrepareConfig | None = None, /, **kwargs):
    """Run one `prepare` action. Returns the action's result (a `DatasetReport`, `RepairResult`, `CaptionEdit`,
    `DreamBoothLayout` or `RegImages`) and prints its summary."""
    cfg = PrepareConfig.from_dict(kwargs) if cfg is None else (cfg.replace(**kwargs) if kwargs else cfg)
    cfg.required_for_action()
    action = cfg.action
    out = Path(cfg.output_dir) if cfg.output_dir and action != "check" and not cfg.in_place else None
    # an earlier output to replace is moved aside, and deleted only once this run's is done (back if it fails)
    moved = claim_output(out, replace=cfg.replace_output) if out is not None else []  # (input, output apart)
    ours = out is not None and (not has_files(out) or (out / OUTPUT_MARKER).is_file())
    try:
        result = _run(cfg, action)
    except BaseException:
        put_back(moved)
        raise
    if ours and out.is_dir():
        mark_output(out)  # a folder this run made: a later run with `replace_output` may replace it
    replaced(moved)
    return result


def _report_path(value: str, suffix: str, name: str, ours) -> Path:
    """Where `check` writes a report: the right extension, and never over a file `check` did not write."""
    path = Path(value)
    if path.suffix.lower() != suffix:
        raise ConfigError(f"`{name}` must end in {suffix}, got {value!r}")
    if path.exists() and not (path.is_file() and ours(path)):
        raise ConfigError(f"`{name}` {value} exists and is not a report of `prepare check`; choose a new file name")
    return path


def _is_report(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"source", "records", "summary"} <= data.keys()


_SHEET_KEY = "lorakit"


def _sheet_info():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(_SHEET_KEY, "contact sheet of prepare check")
    return info


def _is_sheet(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.info.get(_SHEET_KEY) == "contact sheet of prepare check"
    except Exception:  # noqa: BLE001 - not an image at all: not ours
        return False


def _run(cfg: PrepareConfig, action: str):
    if action == "check":
        tokenizer = load_tokenizer(cfg.tokenizer_model) if cfg.tokenizer_model else None
        result = check_dataset(cfg.input_dir, cfg.resolution, caption_extension=cfg.caption_extension,
                               tokenizer=tokenizer, huge_side=cfg.huge_side,
                               near_duplicate_distance=cfg.near_duplicate_distance)
        if cfg.report_file:
            result.save(_report_path(cfg.report_file, ".json", "report_file", _is_report))
        if cfg.contact_sheet_file:
            from ..fileio import atomic_path

            with atomic_path(_report_path(cfg.contact_sheet_file, ".png", "contact_sheet_file", _is_sheet)) as tmp:
                contact_sheet(result).save(tmp, "PNG", pnginfo=_sheet_info())
    elif action == "repair":
        result = repair_dataset(cfg.input_dir, cfg.output_dir, resolution=cfg.resolution, background=cfg.background,
                                max_side=cfg.max_side, duplicates=cfg.duplicates,
                                near_duplicates=cfg.near_duplicates, too_small=cfg.too_small,
                                ascii_names=cfg.ascii_names, default_caption=cfg.default_caption,
                                keep_alpha=cfg.keep_alpha, caption_extension=cfg.caption_extension)
    elif action == "captions":
        result = _captions(cfg)
    elif action == "dreambooth":
        return make_dreambooth_layout(cfg.input_dir, cfg.output_dir, cfg.identifier, cfg.class_name,
                                      repeats=cfg.repeats, target_steps=cfg.target_steps,
                                      batch_size=cfg.train_batch_size, epochs=cfg.epochs, with_reg=cfg.with_reg,
                                      caption_extension=cfg.caption_extension, verbose=True)
    else:  # reg
        result = generate_reg_images(cfg.pretrained_model_name_or_path, cfg.class_prompt, cfg.num_images,
                                     cfg.output_dir, class_name=cfg.class_name,
                                     negative_prompt=cfg.negative_prompt,
                                     num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                     batch_size=cfg.generation_batch_size, seed=cfg.seed, device=cfg.device,
                                     caption_extension=cfg.caption_extension)
    print(result.summary())
    return result


def _captions(cfg: PrepareConfig) -> CaptionEdit:
    edits = dict(trigger=cfg.trigger, replace=parse_mapping(cfg.replace_tags) or None,
                 remove=cfg.remove_tags or None, dedupe=cfg.dedupe_tags)
    where = dict(output_dir=cfg.output_dir, in_place=cfg.in_place, caption_extension=cfg.caption_extension)
    if not cfg.auto_caption:
        result = edit_captions(cfg.input_dir, **edits, **where)
    else:
        result = auto_caption(cfg.input_dir, model=cfg.caption_model, trigger=cfg.trigger,
                              overwrite=cfg.overwrite_captions, device=cfg.device, **where)
        # then edit the captions: the trigger goes first in every one, kept ones too, and the tag edits
        if edits["trigger"] or edits["replace"] or edits["remove"] or edits["dedupe"]:
            more = edit_captions(result.output_dir, in_place=True, caption_extension=cfg.caption_extension, **edits)
            result.changed = sorted(set(result.changed) | set(more.changed))
    top = tag_frequencies(result.output_dir, caption_extension=cfg.caption_extension).most_common(15)
    if top:
        print("most common tags: " + ", ".join(f"{t} ({n})" for t, n in top))
    return result
