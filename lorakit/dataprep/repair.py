"""`repair_dataset`: write a clean copy of a dataset into a new folder; the originals are only ever read.

Per image: fix the orientation, convert to 8-bit RGB (alpha composited on `background`; with `keep_alpha`, kept as
8-bit RGBA for `alpha_mask` training), optionally shrink the long side, fix the extension; files that need none of
that are copied byte for byte. Unreadable files are left out; duplicates (and, if asked, near-duplicates and
too-small images) are dropped or moved to `<output>_set_aside/`. Captions are carried along as UTF-8, one line.
Every file is written atomically.
"""

from __future__ import annotations

import io
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from ..errors import ConfigError, DatasetError
from ..fileio import atomic_path, write_bytes, write_text
from .check import check_dataset
from .convert import parse_background, to_training_rgb
from .output import has_files, mark_output
from .report import DatasetReport, ImageRecord
from .sources import DatasetSource, dreambooth_folder_tokens, unique_name

POLICIES = ("keep", "drop", "move")
UNREPAIRABLE = ("empty_file", "unreadable", "truncated")
# kinds that need the pixels rewritten (everything else is copied byte for byte)
REENCODE = ("cmyk", "high_bit_depth", "alpha", "palette", "exif_rotated")
# formats whose bytes are copied as they are (only the extension is corrected if it lies)
KEEP_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


@dataclass
class RepairAction:
    source: str
    action: str  # copied, converted, dropped, moved
    output: str | None = None
    reason: str = ""


@dataclass
class RepairResult:
    """What `repair_dataset` did; `before`/`after` are the checks of the input and of the output folder."""

    output_dir: str
    actions: list[RepairAction]
    before: DatasetReport
    after: DatasetReport | None = None
    set_aside_dir: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c = ", ".join(f"{n} {a}" for a, n in sorted(self.counts.items()))
        lines = [f"repaired {self.before.source} → {self.output_dir}: {c}"]
        for a in self.actions:
            if a.action in ("dropped", "moved"):
                lines.append(f"  {a.action:9s} {a.source}  ({a.reason})")
        if self.after is not None:
            lines.append("re-check: " + ("clean" if not self.after.problems else
                                         ", ".join(f"{k} {len(v)}" for k, v in self.after.problems.items())))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = ["| source | action | output | reason |", "|---|---|---|---|"]
        rows += [f"| {a.source} | {a.action} | {a.output or ''} | {a.reason} |" for a in self.actions]
        return f"### Repair → `{self.output_dir}`\n\n" + "\n".join(rows)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        return self.summary()


def ascii_name(name: str) -> str:
    """`café_日本.png` → `cafe_.png`: accents dropped, other non-ASCII characters become '_'."""
    out = []
    for ch in unicodedata.normalize("NFKD", name):
        if ch.isascii():
            out.append(ch)
        elif not unicodedata.combining(ch):
            out.append("_")
    text = re.sub(r"_{2,}", "_", "".join(out))
    return text if text.strip("._ ") else "image" + "".join(PurePosixPath(name).suffixes)


def _check_folders(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or (src.is_dir() and s in d.parents) or d in s.parents:
        raise DatasetError(f"`output_dir` ({dst}) must be a new folder outside the input ({src}); lorakit never "
                           f"writes into your originals")
    if has_files(d) and not overwrite:
        raise DatasetError(f"`output_dir` {dst} is not empty; choose a new folder (or set `replace_output = true` "
                           f"to replace an earlier prepare run's output)")


def _check_aside(src: Path, aside: Path) -> None:
    """The folder that images set aside go to (`<output_dir>_set_aside`) must be a new one, apart from the input:
    it is marked as prepare's output, which a later `replace_output` deletes."""
    s, a = src.resolve(), aside.resolve()
    if s == a or s in a.parents or a in s.parents:
        raise DatasetError(f"images set aside would go to {aside}, which is or holds the input ({src}): choose "
                           f"another `output_dir`")
    if has_files(aside):
        raise DatasetError(f"images set aside go to {aside}, which already holds files (yours, or an earlier "
                           f"run's that `replace_output` did not replace): move them out or choose another "
                           f"`output_dir`")


def repair_dataset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    resolution: int = 512,
    background: str = "white",
    max_side: int | None = None,
    duplicates: str = "drop",
    near_duplicates: str = "keep",
    too_small: str = "keep",
    ascii_names: bool = False,
    default_caption: str | None = None,
    keep_alpha: bool = False,
    caption_extension: str = ".txt",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    recheck: bool = True,
    tokenizer=None,
    workers: int | None = None,
) -> RepairResult:
    """Write a repaired copy of `src` (folder or zip) into the new folder `dst` and re-check it.

    duplicates / near_duplicates / too_small: 'keep', 'drop', or 'move' (to `<dst>_set_aside/<kind>/`).
    max_side: shrink images whose long side is larger (Lanczos). default_caption: written for images with a missing
    or empty caption (e.g. your trigger word). ascii_names: rename files with non-ASCII names. keep_alpha: keep
    images' transparency (RGBA PNGs, for training with `alpha_mask`) instead of compositing it on `background`.
    """
    for name, value in (("duplicates", duplicates), ("near_duplicates", near_duplicates), ("too_small", too_small)):
        if value not in POLICIES:
            raise ConfigError(f"`{name}` must be one of {', '.join(POLICIES)}, got {value!r}")
    if max_side is not None and max_side < 8:
        raise ConfigError(f"`max_side` must be ≥ 8, got {max_side}")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    bg = parse_background(background)
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise DatasetError(f"dataset not found: {src}")
    _check_folders(src, dst, overwrite)
    aside = dst.parent / f"{dst.name}_set_aside"
    before = check_dataset(src, resolution, caption_extension=caption_extension, tokenizer=tokenizer,
                           workers=workers)
    if not before.records:
        raise DatasetError(f"{src} holds no image files to repair")
    policy = {"duplicate": duplicates, "near_duplicate": near_duplicates, "too_small": too_small}

    plans: list[tuple[ImageRecord, str, str]] = []  # (record, action, reason)
    for rec in before.records:
        kinds = rec.kinds()
        bad = [k for k in kinds if k in UNREPAIRABLE]
        if bad:
            plans.append((rec, "dropped", bad[0]))
            continue
        for kind in ("duplicate", "near_duplicate", "too_small"):
            if kind in kinds and policy[kind] != "keep":
                plans.append((rec, "dropped" if policy[kind] == "drop" else "moved", kind))
                break
        else:
            plans.append((rec, "write", ""))

    taken: set[str] = set()
    names: dict[str, str] = {}
    for rec, action, _ in plans:  # output names decided up front, in order, so they never collide
        if action == "write":
            names[rec.path] = unique_name(_output_name(rec, ascii_names, max_side, keep_alpha), taken)

    moving = any(action == "moved" for _, action, _ in plans)
    if moving:
        _check_aside(src, aside)
    dst.mkdir(parents=True, exist_ok=True)
    if moving:
        mark_output(aside)  # a re-run with `replace_output` replaces it with the output
    with DatasetSource(src) as source:
        def run(plan) -> RepairAction:
            rec, action, reason = plan
            if action == "dropped":
                return RepairAction(rec.path, "dropped", None, reason)
            if action == "moved":
                out = f"{reason}/{rec.path}"
                write_bytes(aside / out, source.read(rec.path))
                _write_caption(rec, aside / out, source, caption_extension, None)
                return RepairAction(rec.path, "moved", str(aside / out), reason)
            out = names[rec.path]
            converted = _write_image(rec, source.read(rec.path), dst / out, bg, max_side, jpeg_quality,
                                     keep_alpha)
            _write_caption(rec, dst / out, source, caption_extension, default_caption)
            reason = ", ".join(k for k in rec.kinds() if k in _reencode(keep_alpha) or k in ("huge", "wrong_extension"))
            return RepairAction(rec.path, "converted" if converted else "copied", out, reason)

        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            actions = list(pool.map(run, plans))
    if moving:
        mark_output(aside)  # again, now listing the files set aside
    counts: dict[str, int] = {}
    for a in actions:
        counts[a.action] = counts.get(a.action, 0) + 1
    left_out = len(before.other_problems)
    if left_out:
        counts["not copied (non-image / orphan caption)"] = left_out
    result = RepairResult(str(dst), actions, before, set_aside_dir=str(aside) if aside.exists() else None,
                          counts=counts)
    if recheck:
        result.after = check_dataset(dst, resolution, caption_extension=caption_extension, tokenizer=tokenizer,
                                     workers=workers)
    return result


def _reencode(keep_alpha: bool) -> tuple[str, ...]:
    """The kinds of problem that need the pixels rewritten (transparency not, when it is kept)."""
    return tuple(k for k in REENCODE if not (keep_alpha and k == "alpha"))


def _needs_pixels(rec: ImageRecord, max_side: int | None, keep_alpha: bool) -> bool:
    too_big = bool(max_side and max(rec.width or 0, rec.height or 0) > max_side)
    return too_big or rec.format not in KEEP_FORMATS or any(k in _reencode(keep_alpha) for k in rec.kinds())


def _output_name(rec: ImageRecord, ascii_names: bool, max_side: int | None, keep_alpha: bool) -> str:
    p = PurePosixPath(rec.path)
    if _needs_pixels(rec, max_side, keep_alpha):
        ext = ".jpg" if rec.format in ("JPEG", "MPO") and "alpha" not in rec.kinds() else ".png"
    elif "wrong_extension" in rec.kinds():
        ext = KEEP_FORMATS[rec.format]
    else:
        ext = p.suffix
    rel = str(p.with_suffix(ext))
    if ascii_names:
        rel = "/".join(ascii_name(part) for part in rel.split("/"))
    return rel


def _write_image(rec: ImageRecord, data: bytes, dest: Path, background, max_side, quality,
                 keep_alpha: bool) -> bool:
    """Write the image; return True if the pixels were re-encoded, False if the bytes were copied."""
    if not _needs_pixels(rec, max_side, keep_alpha):
        write_bytes(dest, data)
        return False
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG" and max_side:
            img.draft("RGB", (max_side, max_side))  # decode big JPEGs at a reduced scale, still ≥ max_side
        out = to_training_rgb(img, background, max_side, keep_alpha=keep_alpha)
    with atomic_path(dest) as tmp:
        if dest.suffix.lower() in (".jpg", ".jpeg"):
            out.save(tmp, "JPEG", quality=quality, subsampling=0)
        else:
            out.save(tmp, "PNG", compress_level=4)
    return True


def _write_caption(rec: ImageRecord, image_dest: Path, source: DatasetSource, ext: str,
                   default_caption: str | None) -> None:
    text = rec.caption if rec.caption_file else None
    if rec.caption_file and text is None:
        text = ""
    uses_folder_tokens = rec.caption_file is None and dreambooth_folder_tokens(rec.path) is not None
    if not text and default_caption and not uses_folder_tokens:
        text = default_caption
    if text is None or (not text and not rec.caption_file):
        return
    write_text(image_dest.with_suffix(ext), text + "\n")
