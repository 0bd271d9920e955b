"""Dataset layouts on disk → a list of images with captions, and a report of everything that was not perfect.

Layouts (all from sd-scripts, plus Hugging Face's imagefolder):
- **DreamBooth**: `train_data_dir/<repeats>_<identifier> <class>/` (e.g. `10_sks dog`): each image is drawn
  `repeats` times per epoch; its caption is its caption file if there is one, else the folder's tokens
  (`sks dog`). `reg_data_dir` uses the same layout for regularisation (class) images.
- **Captions**: images directly in the folder with `<stem><caption_extension>` files next to them.
- **imagefolder**: a `metadata.jsonl` with one `{"file_name": ..., "text": ...}` object per line.
- A subset of an sd-scripts dataset TOML may also name a `metadata_file` (sd-scripts' fine-tuning JSON:
  `{"<image key>": {"caption": ..., "tags": ...}}`).

Nothing here decodes more than it must, and nothing fails silently: unusable images are skipped and *listed* (or, if
nothing usable is left, refused with a message naming the folder and the expected layout).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from ..fileio import read_utf8
from .captions import caption_key, read_caption_file
from .images import (
    IMAGE_EXTENSIONS,
    MIN_SIDE,
    ImageProblem,
    has_transparency,
    is_image_file,
    load_rgb,
    problem_reason,
)

DREAMBOOTH_FOLDER = re.compile(r"^(\d+)(?:_(.*))?$")  # `10_sks dog`; `10` alone (sd-scripts): captions from files
CAPTION_COLUMNS = ("text", "caption", "prompt", "tags")
# files expected beside images (captions, metadata, notes, other tools' caches): not listed as "not an image"
CAPTION_EXTENSIONS = (".txt", ".caption")  # the usual caption-file extensions (lorakit's and sd-scripts' defaults)
QUIET_EXTENSIONS = (".txt", ".caption", ".json", ".jsonl", ".npz", ".safetensors", ".toml", ".md")


@dataclass
class Subset:
    """One folder of images and how to draw from it (sd-scripts' `[[datasets.subsets]]`)."""

    image_dir: Path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None  # DreamBooth folder tokens: the caption when an image has no caption file
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int | None = None
    caption_tag_dropout_rate: float = 0.0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str = ""
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    metadata_file: Path | None = None
    alpha_mask: bool = False  # the images' transparency weights their loss
    mask_dir: Path | None = None  # masked_loss: a mask image per image, of the same stem (`conditioning_data_dir`)
    validation_split: float = 0.0  # the fraction of its images held out for the validation loss (not reg images)
    validation_seed: int | None = None  # the split's seed (None: the training seed)
    resize_interpolation: str | None = None  # the resize filter (sd-scripts' name); None: Lanczos

    def caption_text_options(self) -> dict:
        """The `process_caption` arguments that shape this subset's captions as text (the marker, prefix and
        suffix, separators, wildcards): with them alone, a caption comes out as the text encoder reads it, less the
        random augmentations."""
        return dict(keep_tokens_separator=self.keep_tokens_separator, prefix=self.caption_prefix,
                    suffix=self.caption_suffix, separator=self.caption_separator,
                    secondary_separator=self.secondary_separator, wildcards=self.enable_wildcard)


@dataclass
class DatasetSpec:
    """A group of subsets sharing resolution, bucketing and batch size (sd-scripts' `[[datasets]]`)."""

    subsets: list[Subset]
    resolution: tuple[int, int] | None  # (width, height); None: the model's native size, once it is known
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    batch_size: int = 1


@dataclass
class ImageItem:
    path: Path
    caption: str
    subset: Subset
    size: tuple[int, int]  # (width, height), upright
    repeats: int = 1
    mask_path: Path | None = None  # its mask image (masked_loss)

    @property
    def masked(self) -> bool:
        """Whether its loss is weighted by a mask (its mask image, or its transparency with alpha_mask)."""
        return self.mask_path is not None or self.subset.alpha_mask


@dataclass
class LoadReport:
    """What was used, what was fixed, what was skipped (printed before training and saved next to the LoRA)."""

    used: dict[str, int] = field(default_factory=dict)  # folder -> images used
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, what was done about it)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was not used)

    def note(self, path, message: str) -> None:
        self.notes.append((str(path), message))

    def skip(self, path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def to_dict(self) -> dict:
        return {"used": self.used, "notes": [{"path": p, "note": n} for p, n in self.notes],
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}

    def format(self) -> str:
        lines = ["dataset:"] + [f"  {n:5d} images  {folder}" for folder, n in self.used.items()]
        if self.notes:
            lines.append(f"handled ({len(self.notes)}):")
            lines += [f"  {p}: {n}" for p, n in self.notes]
        if self.skipped:
            lines.append(f"skipped ({len(self.skipped)}):")
            lines += [f"  {p}: {r}" for p, r in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------ layout detection (train_data_dir / reg_data_dir)
def subsets_from_folder(folder: str | Path, *, is_reg: bool, caption_extension: str, report: LoadReport,
                        **subset_options) -> list[Subset]:
    """Detect the layout of `folder` and return its subsets (DreamBooth folders, imagefolder or captions)."""
    folder = Path(folder)
    what = "reg_data_dir" if is_reg else "train_data_dir"
    if not folder.exists():
        raise DatasetError(f"`{what}` does not exist: {folder}")
    if not folder.is_dir():
        raise DatasetError(f"`{what}` must be a folder, got a file: {folder}")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    images = [p for p in entries if p.is_file() and is_image_file(p)]
    dreambooth = [d for d in subdirs if DREAMBOOTH_FOLDER.match(d.name)]
    common = dict(caption_extension=caption_extension, is_reg=is_reg, **subset_options)

    if dreambooth:
        subsets = []
        for d in dreambooth:
            repeats, tokens = DREAMBOOTH_FOLDER.match(d.name).groups()
            if int(repeats) < 1:
                report.skip(d, "repeats is 0 in the folder name: the folder is never drawn")
                continue
            subsets.append(Subset(image_dir=d, num_repeats=int(repeats), class_tokens=(tokens or "").strip() or None,
                                  **common))
        for d in subdirs:
            if d not in dreambooth:
                report.skip(d, "folder name is not `<repeats>_<identifier> <class>` (e.g. `10_sks dog`): ignored")
        for p in images:
            report.skip(p, "image at the top of a DreamBooth folder: ignored (put it in a `<repeats>_<name>` folder)")
        return subsets
    if (folder / "metadata.jsonl").is_file():
        return [Subset(image_dir=folder, metadata_file=folder / "metadata.jsonl", **common)]
    if images:
        if not any(p.with_suffix(caption_extension).is_file() for p in images):
            # no captions at all: every image would train with an empty caption, which is never what was meant
            if DREAMBOOTH_FOLDER.match(folder.name):
                raise DatasetError(f"`{what}` {folder} is itself a `<repeats>_<identifier> <class>` folder: set "
                                   f"`{what}` to the folder that holds it ({folder.parent})")
            if is_reg:
                raise DatasetError(f"`reg_data_dir` {folder} has images but no {caption_extension} captions: put the "
                                   f"regularisation images in a `<repeats>_<class>` folder (e.g. `1_dog`), whose name "
                                   f"is their caption")
        for d in subdirs:
            report.skip(d, "sub-folder of a caption dataset: ignored (DreamBooth folders are named "
                           "`<repeats>_<identifier> <class>`)")
        return [Subset(image_dir=folder, **common)]
    hint = ""
    if subdirs:
        names = ", ".join(f"`{d.name}`" for d in subdirs[:5])
        hint = (f"; its sub-folders ({names}) are not named `<repeats>_<identifier> <class>` — rename them, "
                f"e.g. `10_sks dog`")
    raise DatasetError(f"`{what}` {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                       f"DreamBooth sub-folders or a metadata.jsonl){hint}")


# ------------------------------------------------------------------ scanning a subset
def _caption_files(folder: Path, extension: str) -> dict[str, Path]:
    """`caption_key` of its stem → caption file of `folder`, for keys that name one file only."""
    found: dict[str, list[Path]] = {}
    for p in folder.iterdir():
        if p.is_file() and p.suffix.lower() == extension.lower():
            found.setdefault(caption_key(p.stem), []).append(p)
    return {key: paths[0] for key, paths in found.items() if len(paths) == 1}


def _caption_for(image: Path, subset: Subset, report: LoadReport, others: dict[str, Path]) -> str | None:
    """The caption file's caption: `<stem><caption_extension>` beside the image, else the one file that differs
    from it only in case or Unicode normalisation (`others`: `_caption_files` of the folder)."""
    cap_file = image.with_suffix(subset.caption_extension)
    if not cap_file.is_file() and caption_key(image.stem) in others:
        cap_file = others[caption_key(image.stem)]
    if cap_file.is_file():
        caption, note = read_caption_file(cap_file, all_lines=subset.enable_wildcard)
        if note:
            report.note(cap_file, note)
        if caption:
            return caption
        report.note(cap_file, "empty caption file")
    return None


def _metadata_captions(subset: Subset, report: LoadReport) -> dict[Path, str]:
    """image path -> caption from an imagefolder metadata.jsonl, or an sd-scripts metadata JSON or JSONL (lines of
    `{"image_path": ..., "caption": ..., "tags": ...}`)."""
    meta = Path(subset.metadata_file)
    if not meta.is_file():
        raise DatasetError(f"metadata file not found: {meta}")
    out: dict[Path, str] = {}
    if meta.suffix == ".jsonl":
        data = {}
        for n, line in enumerate(read_utf8(meta, "metadata file", DatasetError).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("image_path"), str):  # sd-scripts' JSONL
                data[row["image_path"]] = {k: row[k] for k in ("caption", "tags") if k in row}
                continue
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise DatasetError(f"{meta.name} line {n}: expected a JSON object with `file_name` (a Hugging Face "
                                   f"imagefolder) or `image_path` (sd-scripts), got {line[:80]!r}")
            name = row["file_name"]
            caption = next((row[c] for c in CAPTION_COLUMNS if isinstance(row.get(c), str)), None)
            if caption is None:
                report.note(subset.image_dir / name, f"no {'/'.join(CAPTION_COLUMNS)} column in {meta.name}")
                caption = ""
            out[subset.image_dir / name] = caption.strip()
    else:
        try:
            data = json.loads(read_utf8(meta, "metadata file", DatasetError))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{meta}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{meta}: expected a JSON object {{\"<image key>\": {{\"caption\": ..., \"tags\": ...}}}}, "
                           f"got a {type(data).__name__}")
    for key, entry in data.items():
        fields = entry if isinstance(entry, dict) else {}
        caption, tags = fields.get("caption"), fields.get("tags")
        if not isinstance(entry, dict) or not all(v is None or isinstance(v, str) for v in (caption, tags)):
            raise DatasetError(f"{meta}: entry {key!r} must be an object whose `caption` and `tags` are strings, "
                               f"got {json.dumps(entry)[:80]}")
        # sd-scripts' rule: the caption, then `caption_separator` and the tags when both are there (with
        # `enable_wildcard`, after each of the caption's lines); the tags alone otherwise
        sep = subset.caption_separator
        if caption is None:
            caption = tags or ""
        elif tags and subset.enable_wildcard:
            tags = tags.replace("\n", sep)
            caption = "\n".join(f"{line}{sep} {tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = f"{caption}{sep} {tags}"
        out[_image_for_key(subset.image_dir, key)] = caption.strip()
    return out


def _image_for_key(image_dir: Path, key: str) -> Path:
    """The image a metadata JSON key names: the file itself, else the key plus an image extension (sd-scripts'
    keys are often stems, which may contain dots: `photo.001`)."""
    path = image_dir / key
    if path.is_file():
        return path
    return next((c for c in (image_dir / f"{key}{e}" for e in IMAGE_EXTENSIONS) if c.is_file()), path)


def scan_subset(subset: Subset, report: LoadReport) -> list[ImageItem]:
    """The usable images of one subset with their captions. Every image is decoded once here, so that corrupt or
    truncated files are found now and listed, not in the middle of training."""
    if not subset.image_dir.is_dir():
        raise DatasetError(f"image folder not found: {subset.image_dir}")
    if subset.metadata_file is not None:
        listed = _metadata_captions(subset, report)
        candidates = list(listed)
    else:
        listed = {}
        candidates = sorted(p for p in subset.image_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    items, transparent = [], 0
    masks = MaskFolder(subset.mask_dir) if subset.mask_dir is not None else None
    others = _caption_files(subset.image_dir, subset.caption_extension) if subset.metadata_file is None else {}
    for path in candidates:
        if subset.metadata_file is not None and not path.is_file():
            report.skip(path, f"listed in {subset.metadata_file.name} but missing")
            continue
        if not is_image_file(path):
            if path.suffix.lower() not in QUIET_EXTENSIONS + (subset.caption_extension,):
                report.skip(path, "not an image file (by extension): ignored")
            continue
        try:
            size, notes = _probe(path)
        except ImageProblem as e:
            report.skip(path, str(e))
            continue
        if subset.alpha_mask:
            transparent += has_transparency(path)
            notes = [n + "; its transparency is its loss mask" if n.startswith("transparent") else n for n in notes]
        for n in notes:
            report.note(path, n)
        caption = listed.get(path) if subset.metadata_file is not None else _caption_for(path, subset, report,
                                                                                          others)
        if not caption:
            if subset.class_tokens:
                caption = subset.class_tokens
            else:
                report.note(path, f"no caption (no {subset.caption_extension} file): trained with an empty caption")
                caption = ""
        items.append(ImageItem(path=path, caption=caption, subset=subset, size=size, repeats=subset.num_repeats,
                               mask_path=masks.find(path, size) if masks else None))
    report.used[str(subset.image_dir)] = len(items)
    if masks:
        masks.check(report)
    if subset.alpha_mask and items and not transparent:
        report.note(subset.image_dir, "alpha_mask is on, but no image here has transparency: their whole images "
                                      "are learned")
    if subset.metadata_file is None:
        _note_unread_captions(subset, candidates, report, captioned=sum(bool(it.caption) for it in items))
    if not items:
        report.note(subset.image_dir, "no usable images in this folder")
    return items


class MaskFolder:
    """The mask images of one subset (`masked_loss`): each training image's is the image of the same file stem in
    the folder (any image extension). A missing, unreadable or differently shaped mask refuses the dataset, naming
    the files: a run asked to learn only the masked parts must not learn whole images unnoticed."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise DatasetError(f"mask folder (`conditioning_data_dir`) not found: {folder}")
        self.folder = folder
        self.by_stem: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if p.is_file() and is_image_file(p):
                self.by_stem.setdefault(p.stem, p)
        self.missing: list[Path] = []
        self.used: set[Path] = set()

    def find(self, image: Path, size: tuple[int, int]) -> Path | None:
        """The mask of `image` (whose upright size is `size`), checked to be readable and of the image's shape."""
        mask = self.by_stem.get(image.stem)
        if mask is None:
            self.missing.append(image)
            return None
        try:
            mask_size = load_rgb(mask).size
        except ImageProblem as e:
            raise DatasetError(f"mask image {mask}: {e}") from None
        # the same size, or the same shape at another scale (resized with the image): within one pixel
        if abs(mask_size[0] * size[1] - mask_size[1] * size[0]) > max(mask_size[0], size[0]):
            raise DatasetError(f"mask image {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is "
                               f"{size[0]}x{size[1]}: a mask must have its image's size (or aspect ratio)")
        self.used.add(mask)
        return mask

    def check(self, report: LoadReport) -> None:
        if self.missing:
            names = ", ".join(p.name for p in self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
            raise DatasetError(f"masked_loss: {len(self.missing)} image(s) of {self.missing[0].parent} have no mask "
                               f"image in {self.folder} ({names}); a mask has its image's file name (any image "
                               f"extension)")
        unused = [p for p in self.by_stem.values() if p not in self.used]
        if unused:
            report.note(self.folder, f"{len(unused)} mask image(s) with no training image of that name: unused "
                                     f"({', '.join(p.name for p in unused[:5])})")


def _note_unread_captions(subset: Subset, files: list[Path], report: LoadReport, captioned: int) -> None:
    """Say so when caption files beside the images have another extension than `caption_extension` (sd-scripts'
    default is `.caption`, lorakit's `.txt`), so their captions are not read — and refuse the folder when none of
    its `captioned` images has a caption of its own: a run on empty captions is surely not what was meant."""
    images = {p.stem for p in files if is_image_file(p)}
    for ext in CAPTION_EXTENSIONS:
        if ext == subset.caption_extension.lower():
            continue
        unread = [p for p in files if p.suffix.lower() == ext and p.stem in images]
        if unread and not any(p.with_suffix(subset.caption_extension).is_file() for p in unread):
            fix = f"set `caption_extension = \"{ext}\"` to use them"
            if not captioned and not subset.class_tokens:
                raise DatasetError(f"{subset.image_dir}: no image has a {subset.caption_extension} caption, but "
                                   f"{len(unread)} have {ext} captions: {fix} (or move them out to train without "
                                   f"captions)")
            report.note(subset.image_dir, f"{len(unread)} {ext} caption file(s) not read: `caption_extension` is "
                                          f"{subset.caption_extension!r} ({fix})")


def _probe(path: Path) -> tuple[tuple[int, int], list[str]]:
    """Decode the image fully (finds truncation) and say what conversion it needs."""
    from PIL import Image

    if path.stat().st_size == 0:
        raise ImageProblem("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_rgb below says when it is too large
            im = Image.open(path)
        with im:
            mode, orientation = im.mode, im.getexif().get(0x0112, 1)
            transparent = "transparency" in im.info
    except Image.DecompressionBombError as e:
        raise ImageProblem(problem_reason(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is "not an image" for the report
        raise ImageProblem(f"not an image or unreadable ({type(e).__name__})") from None
    rgb = load_rgb(path)  # raises ImageProblem for truncated/corrupt files and decompression bombs
    notes = []
    if orientation not in (1, None):
        notes.append(f"EXIF orientation {orientation}: rotated upright")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and transparent):
        notes.append("transparent: composited on white")
    elif mode == "CMYK":
        notes.append("CMYK: converted to RGB")
    elif mode.startswith("I") or mode == "F":
        notes.append(f"{mode} (16/32-bit): scaled to 8-bit RGB")
    elif mode not in ("RGB", "L", "P"):
        notes.append(f"{mode}: converted to RGB")
    if min(rgb.size) < MIN_SIDE:
        raise ImageProblem(f"too small ({rgb.size[0]}x{rgb.size[1]})")
    return rgb.size, notes


def balance_reg_images(train_items: list[ImageItem], reg_items: list[ImageItem]) -> list[ImageItem]:
    """Repeat regularisation images so that they are drawn as often as the training images (sd-scripts' rule):
    the first pass takes each reg image with its folder repeats; further passes add one repeat at a time, until the
    count reaches the number of training draws. Extra reg images beyond that are not used."""
    target = sum(it.repeats for it in train_items)
    if not reg_items or target == 0:
        return []
    used: list[ImageItem] = []
    n, first = 0, True
    while n < target:
        for item in reg_items:
            if first:
                used.append(item)
                n += item.repeats
            else:
                item.repeats += 1
                n += 1
            if n >= target:
                break
        first = False
    return used
