"""The kinds of dataset problem lorakit reports, as data: severity, what it means, and the fix.

Severities: `error` — the file cannot be trained on (the loader would skip it or crash); `warning` — it trains, but
badly or slowly, and `repair` can fix it; `note` — worth a look, a judgement call.
"""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("error", "warning", "note")


@dataclass(frozen=True)
class ProblemKind:
    name: str
    severity: str
    meaning: str
    fix: str


_KINDS = [
    ProblemKind("empty_file", "error", "0-byte file", "re-download or delete it; repair leaves it out"),
    ProblemKind("not_image", "note", "not an image and not a caption; training ignores it",
                "repair does not copy it"),
    ProblemKind("unreadable", "error", "corrupt or unsupported image data", "re-export it; repair leaves it out"),
    ProblemKind("truncated", "error", "the image data stops early (interrupted download or copy)",
                "re-download it; repair leaves it out"),
    ProblemKind("wrong_extension", "note", "the file extension does not match the image format",
                "repair writes it with the right extension"),
    ProblemKind("cmyk", "warning", "CMYK colours (print); naive conversion shifts colours",
                "repair converts it to RGB"),
    ProblemKind("high_bit_depth", "warning", "16-bit (or float) samples; many loaders clip them to white",
                "repair scales it to 8-bit RGB"),
    ProblemKind("alpha", "warning", "has an alpha channel; transparent pixels become black or noise when dropped",
                "repair composites it on `background`; fine if you train with `alpha_mask` (repair keep_alpha "
                "keeps it)"),
    ProblemKind("palette", "warning", "palette (indexed) colours", "repair converts it to RGB"),
    ProblemKind("grayscale", "note", "grayscale image; the LoRA may learn to desaturate", "fine if intended"),
    ProblemKind("exif_rotated", "warning", "stored sideways with an EXIF orientation tag that training code may ignore",
                "repair applies the rotation to the pixels"),
    ProblemKind("too_small", "warning", "would be upscaled a lot to reach the training resolution (blurry)",
                "use a larger original, or repair with too_small='move'"),
    ProblemKind("huge", "warning", "very large: slow to load every epoch and memory hungry",
                "repair with max_side (e.g. 2048) shrinks it once"),
    ProblemKind("extreme_aspect", "note", "aspect ratio beyond 1:3; heavy cropping or an extreme bucket",
                "crop it by hand"),
    ProblemKind("duplicate", "warning", "byte-identical to another image (trained twice as often)",
                "repair with duplicates='drop' (default) or 'move'"),
    ProblemKind("near_duplicate", "note", "looks almost the same as another image (perceptual hash)",
                "keep one unless the difference matters; repair near_duplicates='move'"),
    ProblemKind("non_ascii_name", "note", "file name has non-ASCII characters; some tools and zips mangle them",
                "repair with ascii_names=true renames image and caption together"),
    ProblemKind("missing_caption", "warning", "no caption file; training uses an empty caption (or folder tokens)",
                "write one: `lorakit prepare captions --trigger ...`, or repair default_caption"),
    ProblemKind("empty_caption", "warning", "caption file is empty", "fill it in, or repair default_caption"),
    ProblemKind("caption_encoding", "warning", "caption file is not UTF-8 text", "repair re-encodes it as UTF-8"),
    ProblemKind("caption_multiline", "warning", "caption file has several lines; training reads only the first",
                "repair joins the lines with commas"),
    ProblemKind("caption_too_long", "warning", "caption is longer than the 75-token CLIP window; the rest is cut off",
                "shorten it, or train with max_token_length"),
    ProblemKind("orphan_caption", "note", "caption file without an image", "rename it to match its image"),
]

KINDS: dict[str, ProblemKind] = {k.name: k for k in _KINDS}


def severity(kind: str) -> str:
    return KINDS[kind].severity
