"""The training dataset: images assigned to buckets, drawn in batches that share one size.

Every random choice (batch order, flips, crops, caption shuffles, dropout, colour jitter) comes from a generator
seeded by `(seed, epoch, batch position)`. So the batches of any epoch can be rebuilt exactly without replaying the
previous ones — which is what makes `resume` give the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config.schema import parse_resolution
from ..errors import ConfigError, DatasetError
from .buckets import (
    BucketChoice,
    bucket_range,
    crop_box,
    fixed_size_choice,
    make_bucket_resolutions,
    select_bucket,
)
from .captions import process_caption
from .color import ColorJitter, apply_color_jitter, draw_color_jitter
from .dataset_toml import SUBSET_OPTIONS, load_dataset_config
from .folders import (
    DatasetSpec,
    ImageItem,
    LoadReport,
    Subset,
    balance_reg_images,
    scan_subset,
    subsets_from_folder,
)
from .images import IMAGE_EXTENSIONS, image_to_tensor, load_alpha, load_mask, load_rgb
from .latents import cache_file, cache_key, encode, image_sha, read_cached, vae_fingerprint, write_cached


@dataclass
class Example:
    """One image at its bucket: what the loader needs to produce its pixels or latents."""

    item: ImageItem
    choice: BucketChoice
    batch_size: int
    group: int  # batches never mix datasets with different batch sizes


@dataclass
class Batch:
    captions: list[str]
    weights: torch.Tensor  # per-sample loss weight: 1, or prior_loss_weight for regularisation images
    latents: torch.Tensor | None = None  # [B, 4, h, w], scaled, when cached
    pixels: torch.Tensor | None = None  # [B, 3, H, W] in [-1, 1], when encoded every step
    is_reg: list[bool] | None = None
    masks: torch.Tensor | None = None  # [B, 1, h, w] loss weights per latent pixel (masked_loss, alpha_mask)


def dataset_specs(cfg, native_resolution: int | None) -> list[DatasetSpec]:
    """The datasets to train on, from `dataset_config` or from `train_data_dir`/`reg_data_dir` (a resolution that
    neither sets is the model's `native_resolution`; None: left unset until the model is known)."""
    default = None if native_resolution is None else (native_resolution, native_resolution)
    if cfg.dataset_config:
        if cfg.train_data_dir or cfg.reg_data_dir:
            raise ConfigError("set either `dataset_config` or `train_data_dir`/`reg_data_dir`, not both: in a dataset "
                              "TOML, regularisation images are a subset with `is_reg = true`")
        return load_dataset_config(cfg.dataset_config, cfg, default)
    if not cfg.train_data_dir:
        raise ConfigError("set `train_data_dir` (a folder of images) or `dataset_config` (an sd-scripts dataset TOML)")
    return [DatasetSpec(subsets=[], resolution=parse_resolution(cfg.resolution) or default,
                        enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso,
                        max_bucket_reso=cfg.max_bucket_reso, bucket_reso_steps=cfg.bucket_reso_steps,
                        bucket_no_upscale=cfg.bucket_no_upscale, batch_size=cfg.train_batch_size)]


def _subset_options(cfg) -> dict:
    return {name: getattr(cfg, name) for name in SUBSET_OPTIONS - {"caption_extension"}}  # passed apart


@dataclass
class ScannedDataset:
    """A config's images, read and checked — nothing here depends on the model, so a training run does it before
    loading one: the report, each dataset's spec (resolution None: the model's native size) and its items, as
    (training images with the balanced regularisation images, held-out validation images)."""

    report: LoadReport
    specs: list[DatasetSpec]
    items: list[tuple[list[ImageItem], list[ImageItem]]]


def dataset_layout(cfg, report: LoadReport) -> list[DatasetSpec]:
    """`cfg`'s datasets with their subsets (a dataset TOML's, or the folders' layout detected), no image read yet:
    missing or misnamed folders and a bad dataset TOML are refused here."""
    specs = dataset_specs(cfg, None)
    if not cfg.dataset_config:
        opts = _subset_options(cfg)
        specs[0].subsets = subsets_from_folder(cfg.train_data_dir, is_reg=False, report=report,
                                               caption_extension=cfg.caption_extension, **opts)
        if cfg.conditioning_data_dir:
            _assign_mask_folders(specs[0].subsets, Path(cfg.train_data_dir), Path(cfg.conditioning_data_dir))
        if cfg.reg_data_dir:
            specs[0].subsets += subsets_from_folder(cfg.reg_data_dir, is_reg=True, report=report,
                                                    caption_extension=cfg.caption_extension, **opts)
    elif cfg.masked_loss and not any(sub.mask_dir or sub.alpha_mask for spec in specs for sub in spec.subsets):
        raise ConfigError(f"`masked_loss` is on, but no subset of {Path(cfg.dataset_config).name} has a "
                          f"`conditioning_data_dir` of mask images (or `alpha_mask = true`)")
    return specs


def scan_dataset(cfg) -> ScannedDataset:
    """Find, read and check the images of `cfg`'s datasets (folders, captions, masks, validation split, regularisation
    balance); bad inputs are listed in the report or refused with an error naming them."""
    report = LoadReport()
    specs = dataset_layout(cfg, report)
    items = []
    for spec in specs:
        _round_bucket_range(spec, report)
        if spec.resolution is not None:  # set by the config (else the model's size, known once it is loaded)
            _check_bucket_range(spec)
        train_items, reg_items, val_items = [], [], []
        for subset in spec.subsets:
            if subset.num_repeats < 1:
                report.skip(subset.image_dir, "num_repeats is 0: the folder is never drawn")
                continue
            found = scan_subset(subset, report)
            if subset.is_reg:
                reg_items.extend(found)
                continue
            kept, held = split_validation(found, subset, cfg.seed or 0, report)
            train_items.extend(kept)
            val_items.extend(held)
        if reg_items and not train_items:
            raise DatasetError("only regularisation images were found; add training images")
        if spec.subsets and any(s.is_reg for s in spec.subsets) and not reg_items:
            report.note("reg_data_dir", "no usable regularisation images: training without prior preservation")
        balanced = balance_reg_images(train_items, reg_items)
        if len(balanced) < len(reg_items):
            report.note("reg_data_dir", f"{len(reg_items) - len(balanced)} of {len(reg_items)} regularisation images "
                                        f"are never drawn: they outnumber the training images' draws an epoch "
                                        f"({sum(it.repeats for it in train_items)}), as sd-scripts counts them")
        items.append((train_items + balanced, val_items))
    if not any(examples for examples, _ in items):  # refused here, before the model is loaded (a download)
        folders = [str(sub.image_dir) for spec in specs for sub in spec.subsets if not sub.is_reg]
        where = ", ".join(folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
        if report.skipped:
            print(report.format(), flush=True)
            why = f"{len(report.skipped)} file(s) or folder(s) skipped, listed above (first: " \
                  f"{report.skipped[0][0]}: {report.skipped[0][1]})"
        else:
            why = f"no image files there ({', '.join(IMAGE_EXTENSIONS)})"
        raise DatasetError(f"no usable training images in {where or cfg.train_data_dir}: {why}")
    _note_uncaptioned(cfg, items, report)
    return ScannedDataset(report, specs, items)


def _note_uncaptioned(cfg, items, report: LoadReport) -> None:
    """Say it loudly when no training image has a caption: the usual cause is a plain folder of photos given as
    `train_data_dir` (no `10_sks dog` folder, no caption files). It trains (a caption-free style LoRA is a choice
    some make), but the LoRA then has no trigger word."""
    train = [it for examples, _ in items for it in examples if not it.subset.is_reg]
    if not train or any(it.caption.strip() or it.subset.caption_prefix or it.subset.caption_suffix for it in train):
        return
    extension = train[0].subset.caption_extension
    message = (f"none of the {len(train)} training images has a caption, so the LoRA learns them with an empty prompt "
               f"and has no trigger word: for DreamBooth, put them in a folder named `<repeats>_<identifier> "
               f"<class>` (e.g. `{cfg.train_data_dir or 'train'}/10_sks dog/`); for captions, give each image a "
               f"`<name>{extension}` file")
    report.note(cfg.train_data_dir or "dataset", message)
    print(f"⚠ {message}", flush=True)


class TrainDataset:
    """Examples grouped into buckets; `batches(epoch)` gives the epoch's batches, `load(batch, ...)` their data."""

    def __init__(self, examples: list[Example], *, seed: int, prior_loss_weight: float, report: LoadReport,
                 resolution: tuple[int, int] = (512, 512), subsets: list | None = None, vae_scale_factor: int = 8):
        if not examples:
            raise DatasetError("no usable training images (see the dataset report above for what was skipped)")
        self.examples = examples
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.report = report
        self.resolution = resolution  # (width, height) of the (first) dataset: sample size, metadata
        self.cached: dict[int, dict[str, torch.Tensor]] | None = None
        self.vae_scale_factor = vae_scale_factor  # pixels per latent pixel (the loss masks' downsampling)
        self._masks: dict[tuple[int, bool], torch.Tensor] = {}  # (example, flipped) -> mask, without random crops
        self.validation: TrainDataset | None = None  # the images held out by `validation_split`
        # every folder scanned (for the metadata), also one none of whose images was drawn; default: those drawn
        self.subsets = subsets if subsets is not None else list({id(ex.item.subset): ex.item.subset
                                                                 for ex in examples}.values())
        self.groups: dict[tuple, list[int]] = {}
        for i, ex in enumerate(examples):
            self.groups.setdefault((ex.group, ex.choice.bucket), []).extend([i] * ex.item.repeats)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg, *, native_resolution: int, vae_scale_factor: int = 8,
                    scanned: ScannedDataset | None = None) -> TrainDataset:
        """The dataset of `cfg` for a model of `native_resolution` and `vae_scale_factor`: the images `scanned`
        (`scan_dataset(cfg)`, done here unless given), laid out in buckets or at the fixed size."""
        scanned = scanned or scan_dataset(cfg)
        report, examples, held_out = scanned.report, [], []
        specs = [dataclasses.replace(spec, resolution=spec.resolution or (native_resolution, native_resolution))
                 for spec in scanned.specs]
        for group, (spec, (items, val_items)) in enumerate(zip(specs, scanned.items)):
            _check_sizes(spec, vae_scale_factor)
            table = (make_bucket_resolutions(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso,
                                             spec.bucket_reso_steps)
                     if spec.enable_bucket and not spec.bucket_no_upscale else None)
            max_area = spec.resolution[0] * spec.resolution[1]
            for item, into in [(it, examples) for it in items] + [(it, held_out) for it in val_items]:
                try:
                    if spec.enable_bucket:
                        choice = select_bucket(item.size, table, max_area=max_area, steps=spec.bucket_reso_steps,
                                               no_upscale=spec.bucket_no_upscale)
                    else:
                        choice = fixed_size_choice(item.size, spec.resolution)
                except ValueError as e:
                    report.skip(item.path, str(e))
                    continue
                into.append(Example(item, choice, spec.batch_size, group))
        common = dict(seed=cfg.seed or 0, prior_loss_weight=cfg.prior_loss_weight, report=report,
                      resolution=specs[0].resolution, vae_scale_factor=vae_scale_factor)
        dataset = cls(examples, subsets=[sub for spec in specs for sub in spec.subsets if sub.num_repeats >= 1],
                      **common)
        dataset.validation = cls(held_out, **common) if held_out else None
        return dataset

    # ---------------------------------------------------------------- epochs and batches
    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (lists of example indices). Images are shuffled within their bucket, cut into
        batches, and the batches shuffled; deterministic in (seed, epoch)."""
        rng = random.Random(f"{self.seed}/{epoch}/order")
        out = []
        for (_, _), members in sorted(self.groups.items()):
            members = members[:]
            rng.shuffle(members)
            bs = self.examples[members[0]].batch_size
            out += [members[i:i + bs] for i in range(0, len(members), bs)]
        rng.shuffle(out)
        return out

    def __len__(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return sum(math.ceil(len(m) / self.examples[m[0]].batch_size) for m in self.groups.values())

    @property
    def num_images(self) -> int:
        return len({ex.item.path for ex in self.examples if not ex.item.subset.is_reg})

    def bucket_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ex in self.examples:
            key = f"{ex.choice.bucket[0]}x{ex.choice.bucket[1]}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    # ---------------------------------------------------------------- loading
    def _rng(self, epoch: int, position: int, slot: int) -> random.Random:
        return random.Random(f"{self.seed}/{epoch}/{position}/{slot}")  # str seeds hash stably (sha512)

    def load(self, indices: list[int], epoch: int, position: int, augment: bool = True) -> Batch:
        """The data of one batch. `position` is the batch's index within the epoch (seeds its augmentations).
        `augment = False` (validation): no flips, crops, colour jitter or caption shuffles and dropout."""
        captions, weights, latents, pixels, is_reg, masks = [], [], [], [], [], []
        for slot, i in enumerate(indices):
            ex = self.examples[i]
            sub = ex.item.subset
            rng = self._rng(epoch, position, slot)
            flip = augment and sub.flip_aug and rng.random() < 0.5
            offset = None
            if self.cached is not None:
                entry = self.cached[i]
                latents.append(entry["flipped"] if flip else entry["latent"])
            else:
                offset = (rng.random(), rng.random()) if augment and sub.random_crop else None
                color = draw_color_jitter(rng) if augment and sub.color_aug else None
                pixels.append(prepare_pixels(ex, flip=flip, crop_offset=offset, color=color))
            masks.append(self.mask(i, flip=flip, crop_offset=offset) if ex.item.masked else None)
            every = sub.caption_dropout_every_n_epochs
            captions.append(process_caption(
                ex.item.caption, shuffle=augment and sub.shuffle_caption, keep_tokens=sub.keep_tokens,
                dropout_rate=sub.caption_dropout_rate if augment else 0.0, rng=rng,
                tag_dropout_rate=sub.caption_tag_dropout_rate if augment else 0.0,
                drop=augment and bool(every) and (epoch + 1) % every == 0, **sub.caption_text_options()))
            weights.append(self.prior_loss_weight if sub.is_reg else 1.0)
            is_reg.append(sub.is_reg)
        shape = next((m.shape for m in masks if m is not None), None)
        return Batch(captions=captions, weights=torch.tensor(weights),
                     latents=torch.stack(latents) if latents else None,
                     pixels=torch.stack(pixels) if pixels else None, is_reg=is_reg,
                     # an image without a mask (e.g. a reg image) beside masked ones counts whole
                     masks=None if shape is None else torch.stack([torch.ones(shape) if m is None else m
                                                                   for m in masks]))

    def mask(self, i: int, *, flip: bool = False, crop_offset: tuple[float, float] | None = None) -> torch.Tensor:
        """Example i's loss mask [1, h, w] at latent resolution (`prepare_mask`); kept once made, unless cropped at
        random."""
        if crop_offset is not None:
            return prepare_mask(self.examples[i], self.vae_scale_factor, flip=flip, crop_offset=crop_offset)
        if (i, flip) not in self._masks:
            self._masks[i, flip] = prepare_mask(self.examples[i], self.vae_scale_factor, flip=flip)
        return self._masks[i, flip]

    # ---------------------------------------------------------------- latent cache
    def cache_latents(self, vae, scale: float, *, to_disk: bool = False, batch_size: int = 4, progress=None) -> dict:
        """Encode every example once (and its mirror image when `flip_aug` is on). Returns counts
        {"encoded", "from_disk"} for the log."""
        vae_id = vae_fingerprint(vae)
        shas: dict[Path, str] = {}
        self.cached, todo, stats = {}, [], {"encoded": 0, "from_disk": 0}
        for i, ex in enumerate(self.examples):
            key = None
            if to_disk:
                crop = crop_box(ex.choice.resized, ex.choice.bucket)
                key = cache_key(image_sha(ex.item.path, shas), ex.choice.bucket, ex.choice.resized, crop, vae_id,
                                resize_filter(ex.item.subset.resize_interpolation, ex.item.size, ex.choice.resized)[0])
                hit = read_cached(cache_file(ex.item.path, ex.choice.bucket), key)
                if hit is not None and (not ex.item.subset.flip_aug or "flipped" in hit):
                    self.cached[i] = hit
                    stats["from_disk"] += 1
                    continue
            todo.append((i, key))
        by_bucket: dict[tuple, list] = {}
        for i, key in todo:
            by_bucket.setdefault(self.examples[i].choice.bucket, []).append((i, key))
        for chunk in (c[j:j + batch_size] for c in by_bucket.values() for j in range(0, len(c), batch_size)):
            pixels = torch.stack([prepare_pixels(self.examples[i]) for i, _ in chunk])
            seeds = [self.seed * 1_000_003 + i for i, _ in chunk]
            lat = encode(vae, pixels, scale, seeds).float().cpu()
            flipped = encode(vae, pixels.flip(-1), scale, seeds).float().cpu() if any(
                self.examples[i].item.subset.flip_aug for i, _ in chunk) else None
            for n, (i, key) in enumerate(chunk):
                entry = {"latent": lat[n].clone()}
                if flipped is not None and self.examples[i].item.subset.flip_aug:
                    entry["flipped"] = flipped[n].clone()
                self.cached[i] = entry
                if key is not None:
                    write_cached(cache_file(self.examples[i].item.path, self.examples[i].choice.bucket), entry, key)
            stats["encoded"] += len(chunk)
            if progress is not None:
                progress(len(chunk))
        return stats


def prepare_pixels(ex: Example, *, flip: bool = False, crop_offset: tuple[float, float] | None = None,
                   color: ColorJitter | None = None) -> torch.Tensor:
    """Load, resize to cover the bucket, crop, flip, change colour (`color_aug`) → [3, H, W] in [-1, 1]."""
    im = load_rgb(ex.item.path)
    if im.size != ex.choice.resized:
        im = im.resize(ex.choice.resized, resize_filter(ex.item.subset.resize_interpolation, im.size,
                                                        ex.choice.resized)[1])
    im = im.crop(crop_box(ex.choice.resized, ex.choice.bucket, random_offset=crop_offset))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if color is not None:
        im = apply_color_jitter(im, color)
    return image_to_tensor(im)


def split_validation(items: list[ImageItem], subset: Subset, seed: int,
                     report: LoadReport) -> tuple[list[ImageItem], list[ImageItem]]:
    """(kept for training, held out) with the subset's `validation_split` (sd-scripts' rule): the images in an
    order shuffled by the validation seed, the last round(n × split) held out, at least one kept; each held-out
    image is drawn once per validation (no repeats)."""
    if not subset.validation_split or not items:
        return items, []
    order = sorted(items, key=lambda it: it.path.name)
    split_seed = seed if subset.validation_seed is None else subset.validation_seed
    random.Random(f"{split_seed}/validation/{subset.image_dir.name}").shuffle(order)
    n = min(round(len(order) * subset.validation_split), len(order) - 1)
    if n < 1:
        report.note(subset.image_dir, f"validation_split {subset.validation_split:g}: too few images here to hold "
                                      f"one out ({len(order)})")
        return items, []
    held = order[-n:]
    names = ", ".join(it.path.name for it in held[:5]) + (" ..." if n > 5 else "")
    report.note(subset.image_dir, f"validation: {n} of {len(order)} images held out, not trained on ({names})")
    held_ids = {id(it) for it in held}
    return [it for it in items if id(it) not in held_ids], [dataclasses.replace(it, repeats=1) for it in held]


_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
            "bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}


def resize_filter(name: str | None, size: tuple[int, int], resized: tuple[int, int]) -> tuple[str, int]:
    """(name, Pillow filter) of `resize_interpolation` for a resize from `size` to `resized`: Lanczos unless
    chosen (sd-scripts, unset: area when shrinking, Lanczos when enlarging); `area` (averaging, Pillow's box
    filter) when enlarging is Lanczos."""
    name = name or "lanczos"
    if name == "area" and (resized[0] > size[0] or resized[1] > size[1]):
        name = "lanczos"
    return name, _FILTERS[name]


def prepare_mask(ex: Example, scale_factor: int, *, flip: bool = False,
                 crop_offset: tuple[float, float] | None = None) -> torch.Tensor:
    """The loss mask of an example [1, H/f, W/f] in [0, 1]: its mask image (masked_loss) or its transparency
    (alpha_mask), resized, cropped and flipped as its pixels are (`prepare_pixels`), then averaged over each latent
    pixel's f×f patch (sd-scripts' area interpolation to the latent size)."""
    item = ex.item
    im = load_mask(item.mask_path) if item.mask_path is not None else load_alpha(item.path)
    if im.size != ex.choice.resized:
        im = im.resize(ex.choice.resized, Image.Resampling.BILINEAR)
    im = im.crop(crop_box(ex.choice.resized, ex.choice.bucket, random_offset=crop_offset))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None, None]
    return F.avg_pool2d(mask, scale_factor)[0]


def _assign_mask_folders(subsets: list[Subset], train_dir: Path, mask_dir: Path) -> None:
    """`conditioning_data_dir` for `train_data_dir`: a DreamBooth folder's masks are in the mask folder's
    sub-folder of the same name, or else in the mask folder itself."""
    if not mask_dir.is_dir():
        raise ConfigError(f"`conditioning_data_dir` (the mask images) is not a folder: {mask_dir}")
    for sub in subsets:
        own = mask_dir / sub.image_dir.name
        sub.mask_dir = own if sub.image_dir != train_dir and own.is_dir() else mask_dir


def _round_bucket_range(spec: DatasetSpec, report: LoadReport) -> None:
    """Bucket limits that are not multiples of `bucket_reso_steps` are rounded out to them, with a note."""
    if not spec.enable_bucket:
        return
    lo, hi = bucket_range(spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
    if (lo, hi) != (spec.min_bucket_reso, spec.max_bucket_reso):
        report.note("bucket_reso_steps", f"bucket limits rounded to multiples of bucket_reso_steps "
                                         f"({spec.bucket_reso_steps}), as sd-scripts does: min_bucket_reso "
                                         f"{spec.min_bucket_reso} → {lo}, max_bucket_reso "
                                         f"{spec.max_bucket_reso} → {hi}")
        spec.min_bucket_reso, spec.max_bucket_reso = lo, hi


def _check_bucket_range(spec: DatasetSpec) -> None:
    """The resolution lies in the bucket range (needs no model: checked when the dataset is scanned)."""
    w, h = spec.resolution
    if spec.enable_bucket and not spec.bucket_no_upscale and not (
            spec.min_bucket_reso <= min(w, h) and max(w, h) <= spec.max_bucket_reso):
        raise ConfigError(f"`resolution` {w},{h} must lie between `min_bucket_reso` ({spec.min_bucket_reso}) and "
                          f"`max_bucket_reso` ({spec.max_bucket_reso}) for bucketing: lower min_bucket_reso "
                          f"(e.g. to {max(8, min(w, h) // 2)}) or raise max_bucket_reso")


def _check_sizes(spec: DatasetSpec, vae_scale_factor: int) -> None:
    w, h = spec.resolution
    if w % vae_scale_factor or h % vae_scale_factor:
        raise ConfigError(f"`resolution` {w},{h} must be a multiple of {vae_scale_factor} (the VAE's downsampling)")
    _check_bucket_range(spec)
    if spec.enable_bucket and spec.bucket_reso_steps % vae_scale_factor:
        raise ConfigError(f"`bucket_reso_steps` ({spec.bucket_reso_steps}) must be a multiple of {vae_scale_factor}")
