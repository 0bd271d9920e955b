"""`check_dataset`: scan a folder or zip and report, per image, everything that makes a LoRA worse or a run fail."""

from __future__ import annotations

import hashlib
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from ..data.buckets import make_bucket_resolutions, select_bucket
from ..data.captions import decode_caption
from ..errors import ConfigError
from .hashing import colour_signature, dhash, near_duplicate_pairs
from .probe import FORMAT_EXTENSIONS, HIGH_BIT_MODES, Probe, probe
from .report import DatasetReport, ImageRecord, Problem
from .sources import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, DatasetSource, dreambooth_folder_tokens, stem_key
from .tokens import CLIP_WINDOW, make_counter

MAX_UPSCALE = 1.5  # an image needing more than this to reach resolution² pixels is reported as too small
MAX_ASPECT = 3.0
UNSUPPORTED_PHOTO_FORMATS = (".heic", ".heif", ".avif", ".jxl", ".raw", ".cr2", ".nef", ".arw", ".dng")


def check_dataset(
    folder_or_zip: str | os.PathLike,
    resolution: int = 512,
    *,
    caption_extension: str = ".txt",
    tokenizer=None,
    huge_side: int | None = None,
    near_duplicate_distance: int = 6,
    enable_bucket: bool = True,
    bucket_reso_steps: int = 64,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    workers: int | None = None,
) -> DatasetReport:
    """Check every file under `folder_or_zip` and return a `DatasetReport` (nothing is written).

    resolution: the training size; decides `too_small` (would need > 1.5x upscaling) and the buckets.
    tokenizer: the model's CLIP tokenizer for exact caption lengths; without it lengths are estimated.
    huge_side: a long side above this is `huge` (default: max(4 x resolution, 2048)).
    near_duplicate_distance: dHash bits (of 64) within which two images count as near-duplicates.
    workers: decoding threads (Pillow decodes without holding the GIL); default min(8, CPUs).
    """
    if resolution < 8:
        raise ConfigError(f"`resolution` must be ≥ 8, got {resolution}")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    start = time.perf_counter()
    huge_side = huge_side or max(4 * resolution, 2048)
    count_tokens, counter_name = make_counter(tokenizer)
    # below `min_bucket_reso` (a small model such as the toy's) there are no buckets: images are cropped square
    bucketed = enable_bucket and resolution >= min_bucket_reso
    buckets = make_bucket_resolutions((resolution, resolution), min_bucket_reso, max_bucket_reso, bucket_reso_steps) \
        if bucketed else [(resolution, resolution)]
    workers = workers or min(8, os.cpu_count() or 1)

    with DatasetSource(folder_or_zip) as src:
        files = src.files()
        captions = {stem_key(rel): rel for rel, _ in files if rel.lower().endswith(caption_extension)}
        other_captions = {stem_key(rel): rel for rel, _ in files
                          if rel.lower().endswith(CAPTION_EXTENSIONS) and not rel.lower().endswith(caption_extension)}
        candidates = [(rel, size) for rel, size in files
                      if not rel.lower().endswith(CAPTION_EXTENSIONS + (caption_extension, ".json", ".toml", ".npz"))]

        def one(item):
            rel, size = item
            data = src.read(rel)
            result = probe(data, looks_like_image=rel.lower().endswith(IMAGE_EXTENSIONS))
            sha = hashlib.sha256(data).hexdigest() if data else ""
            sig = None
            if result.image is not None:
                sig = (dhash(result.image), colour_signature(result.image))
                result.image = None
            return rel, size, sha, result, sig

        with ThreadPoolExecutor(workers) as pool:
            probed = list(pool.map(one, candidates))

        records: list[ImageRecord] = []
        other: list[Problem] = []
        used_captions = set()
        hashes, sigs, hashed = [], [], []
        for rel, size, sha, pr, sig in probed:
            if pr.kind == "not_image":
                ext = PurePosixPath(rel).suffix.lower()
                hint = "a photo format Pillow cannot read here: export it as JPEG or PNG" \
                    if ext in UNSUPPORTED_PHOTO_FORMATS else ""
                other.append(Problem("not_image", rel, hint))
                continue
            rec = _record(rel, size, sha, pr, resolution, huge_side, buckets)
            records.append(rec)
            key = stem_key(rel)
            if key in captions:
                used_captions.add(captions[key])
                _caption_facts(rec, captions[key], src.read(captions[key]), count_tokens)
            elif dreambooth_folder_tokens(rel) is None:
                hint = f"found {PurePosixPath(other_captions[key]).name}, but caption_extension is " \
                       f"{caption_extension}" if key in other_captions else ""
                rec.problems.append(Problem("missing_caption", rel, hint))
            if sig is not None:
                hashes.append(sig[0])
                sigs.append(sig[1])
                hashed.append(rec)
                rec.dhash = f"{sig[0]:016x}"
        for rel in sorted(set(captions.values()) - used_captions):
            other.append(Problem("orphan_caption", rel))

    _mark_duplicates(records)
    exact = {id(r) for r in records if r.duplicate_of}
    for i, j, d in near_duplicate_pairs(hashes, sigs, near_duplicate_distance):
        a, b = hashed[i], hashed[j]
        if id(b) in exact or (a.sha256 == b.sha256) or any(p.kind == "near_duplicate" for p in b.problems):
            continue
        b.problems.append(Problem("near_duplicate", b.path, f"looks like {a.path} (dHash distance {d}/64)"))

    bucketing = ("sd-scripts buckets (lorakit.data.buckets)" if bucketed else
                 f"off (square crops; resolution below min_bucket_reso {min_bucket_reso})" if enable_bucket
                 else "off (square crops)")
    return DatasetReport(source=str(folder_or_zip), resolution=resolution, caption_extension=caption_extension,
                         token_counter=counter_name, bucketing=bucketing, records=records, other_problems=other,
                         seconds=time.perf_counter() - start)


def _record(rel: str, size: int, sha: str, pr: Probe, resolution: int, huge_side: int,
            buckets: list[tuple[int, int]]) -> ImageRecord:
    rec = ImageRecord(path=rel, size_bytes=size, readable=pr.kind is None, format=pr.format, mode=pr.mode,
                      bit_depth=pr.bit_depth, width=pr.width, height=pr.height, orientation=pr.orientation,
                      sha256=sha)
    add = rec.problems.append
    if pr.kind is not None:
        add(Problem(pr.kind, rel, pr.detail))
    if pr.format is None:
        return rec
    ext = PurePosixPath(rel).suffix.lower()
    if pr.format in FORMAT_EXTENSIONS and ext not in FORMAT_EXTENSIONS[pr.format]:
        add(Problem("wrong_extension", rel, f"{pr.format} data in a {ext or 'nameless'} file"))
    elif pr.format not in FORMAT_EXTENSIONS or ext not in IMAGE_EXTENSIONS:
        add(Problem("wrong_extension", rel, f"{pr.format} is not a training format ({', '.join(IMAGE_EXTENSIONS)})"))
    if pr.mode == "CMYK":
        add(Problem("cmyk", rel))
    if pr.mode in HIGH_BIT_MODES or (pr.bit_depth or 8) > 8:
        add(Problem("high_bit_depth", rel, f"{pr.bit_depth}-bit {pr.mode}"))
    if pr.has_transparency:
        add(Problem("alpha", rel, pr.mode))
    if pr.mode == "P":
        add(Problem("palette", rel))
    if pr.grey:
        add(Problem("grayscale", rel, "" if pr.mode in ("L", "1", "LA") else f"{pr.mode} image with grey pixels"))
    if pr.orientation != 1:
        add(Problem("exif_rotated", rel, f"orientation {pr.orientation}"))
    w, h = pr.width, pr.height
    upscale = math.sqrt(resolution * resolution / (w * h))
    if upscale > MAX_UPSCALE:
        add(Problem("too_small", rel, f"{w}x{h} needs {upscale:.1f}x upscaling for {resolution}px"))
    if max(w, h) > huge_side:
        add(Problem("huge", rel, f"{w}x{h} (long side > {huge_side})"))
    if max(w, h) / min(w, h) > MAX_ASPECT:
        add(Problem("extreme_aspect", rel, f"{w}x{h}"))
    if not rel.isascii():
        add(Problem("non_ascii_name", rel))
    rec.bucket = select_bucket((w, h), buckets, max_area=resolution * resolution).bucket
    return rec


def _caption_facts(rec: ImageRecord, caption_rel: str, data: bytes, count_tokens) -> None:
    rec.caption_file = caption_rel
    text, utf8 = decode_caption(data)  # as the trainer reads it
    if not utf8:
        rec.problems.append(Problem("caption_encoding", rec.path, f"{caption_rel} is not UTF-8 (read as "
                                                                  f"Windows-1252)"))
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        rec.problems.append(Problem("caption_multiline", rec.path, f"{len(lines)} lines"))
    text = ", ".join(line.rstrip(", ") for line in lines)
    rec.caption = text
    if not text:
        rec.problems.append(Problem("empty_caption", rec.path))
        return
    rec.caption_tokens = count_tokens(text)
    if rec.caption_tokens > CLIP_WINDOW:
        rec.problems.append(Problem("caption_too_long", rec.path, f"{rec.caption_tokens} tokens > {CLIP_WINDOW}"))


def _mark_duplicates(records: list[ImageRecord]) -> None:
    """Byte-identical files: one is kept — the first (sorted) with a caption file, else the first — and the others
    point at it (so dropping duplicates never drops the only caption)."""
    groups: dict[str, list[ImageRecord]] = {}
    for r in records:
        if r.sha256 and r.readable:
            groups.setdefault(r.sha256, []).append(r)
    for same in groups.values():
        kept = next((r for r in same if r.caption_file), same[0])
        for r in same:
            if r is not kept:
                r.duplicate_of = kept.path
                r.problems.append(Problem("duplicate", r.path, f"same bytes as {kept.path}"))
