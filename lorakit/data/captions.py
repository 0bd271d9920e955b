"""Captions: reading caption files and the per-step caption augmentations of sd-scripts.

- `shuffle_caption`: comma-separated tags are shuffled each time an image is drawn, except the first `keep_tokens`
  (the trigger word and class usually come first and must stay there);
- `caption_dropout_rate`: with this probability the image is trained with an empty caption (the model keeps a
  good unconditional prediction, which classifier-free guidance needs); `caption_dropout_every_n_epochs`: every
  Nth epoch with empty captions;
- `caption_tag_dropout_rate`: each tag after the fixed ones is left out with this probability;
- `keep_tokens_separator` (e.g. `|||`): the tags before it stay in place, instead of the first `keep_tokens`; with
  a second marker, the tags after that one stay at the end (`sks, dog ||| red, small ||| best quality`);
- `caption_prefix` / `caption_suffix`: text put around every caption;
- `enable_wildcard`: a caption file's lines are alternatives (one drawn each time) and `{a|b|c}` picks one;
- `caption_separator` (default `,`) splits the tags; `secondary_separator` (e.g. `;;;`) joins tags that move and
  drop as one, and becomes `caption_separator` in the caption trained on.
"""

from __future__ import annotations

import random
import re
import unicodedata
from pathlib import Path


def caption_key(stem: str) -> str:
    """A file stem as caption lookups compare it (the trainer's and `prepare`'s): Unicode-NFC-normalised and
    case-folded, so `IMG_1.PNG` finds `img_1.txt` and an `é` typed on macOS (NFD) finds its NFC twin."""
    return unicodedata.normalize("NFC", stem).casefold()


def decode_caption(data: bytes) -> tuple[str, bool]:
    """(text, whether it was UTF-8) of a caption file's bytes: UTF-8 (a BOM allowed), else Windows-1252, what
    Windows editors write (“smart quotes”, é)."""
    try:
        return data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), False


def read_caption_file(path: Path, all_lines: bool = False) -> tuple[str, str | None]:
    """Return (caption, note). The caption is the first non-empty line, stripped (as sd-scripts reads it); with
    `all_lines` (`enable_wildcard`), every non-empty line, joined by newlines: each draw picks one.

    `note` says what was unusual (not UTF-8, several lines), for the dataset report; None when nothing was.
    """
    text, utf8 = decode_caption(Path(path).read_bytes())
    note = None if utf8 else "caption file is not UTF-8; read as Windows-1252"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if all_lines:
        return "\n".join(lines), note
    if len(lines) > 1:
        note = (note + "; " if note else "") + f"caption file has {len(lines)} lines; only the first is used"
    return (lines[0] if lines else ""), note


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """sd-scripts' `enable_wildcard`: one of the caption's lines, at random, with each `{a|b|c}` replaced by one of
    its choices (`{{` and `}}` are literal braces)."""
    lines = caption.split("\n")
    line = lines[rng.randrange(len(lines))] if len(lines) > 1 else lines[0]
    opening, closing = "\x00", "\x01"  # stand-ins for the escaped braces while choices are made
    line = line.replace("{{", opening).replace("}}", closing)
    line = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), line)
    return line.replace(opening, "{").replace(closing, "}")


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator or ",") if t.strip()]


def process_caption(caption: str, *, shuffle: bool = False, keep_tokens: int = 0, dropout_rate: float = 0.0,
                    rng: random.Random | None = None, tag_dropout_rate: float = 0.0, keep_tokens_separator: str = "",
                    prefix: str | None = None, suffix: str | None = None, drop: bool = False,
                    separator: str = ",", secondary_separator: str = "", wildcards: bool = False) -> str:
    """One caption as sd-scripts trains it (pure given `rng`): prefix and suffix added; the whole caption dropped
    (`drop`, or with `dropout_rate`); else the tags (split at `separator`) after the fixed ones (the first
    `keep_tokens`, or those before `keep_tokens_separator`) shuffled and each dropped with `tag_dropout_rate`,
    joined with ", "; last, `secondary_separator` (tags joined by it move and drop as one) becomes `separator`.
    With `wildcards`, one line of the caption and one choice of each `{a|b}` are drawn first (`expand_wildcards`;
    without `rng`, the first line and the first choices)."""
    if drop or (dropout_rate > 0.0 and rng is not None and rng.random() < dropout_rate):
        return ""
    if wildcards:  # a line before the prefix and suffix, which every line gets; their `{a|b}` drawn too
        draw = rng or _FirstChoice()
        caption = expand_wildcards(caption, draw)
        prefix, suffix = (expand_wildcards(part, draw) if part else part for part in (prefix, suffix))
    caption = " ".join(part for part in (prefix, caption, suffix) if part)
    if rng is None or not (shuffle or tag_dropout_rate > 0.0):
        if keep_tokens_separator and keep_tokens_separator in caption:  # the marker is not for the text encoder
            caption = ", ".join(split_tags(caption.replace(keep_tokens_separator, separator), separator))
        return caption.replace(secondary_separator, separator) if secondary_separator else caption
    fixed_end: list[str] = []
    if keep_tokens_separator and keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(keep_tokens_separator, 1)
        if keep_tokens_separator in flex_part:  # a second marker: the tags after it stay at the end
            flex_part, end_part = flex_part.split(keep_tokens_separator, 1)
            fixed_end = split_tags(end_part.replace(keep_tokens_separator, separator), separator)
        fixed, rest = split_tags(fixed_part, separator), split_tags(flex_part, separator)
    else:
        tags = split_tags(caption, separator)
        fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(rest)
    if tag_dropout_rate > 0.0:
        rest = [t for t in rest if rng.random() >= tag_dropout_rate]
    caption = ", ".join(fixed + rest + fixed_end)
    return caption.replace(secondary_separator, separator) if secondary_separator else caption


class _FirstChoice(random.Random):
    """An `rng` stand-in that always draws the first option (a caption shown in full, e.g. in reports)."""

    def randrange(self, *args, **kwargs) -> int:
        return 0

    def choice(self, seq):
        return seq[0]


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each tag appears (the `ss_tag_frequency` metadata sd-scripts tools display)."""
    freq: dict[str, int] = {}
    for cap in captions:
        for tag in split_tags(cap):
            freq[tag] = freq.get(tag, 0) + 1
    return freq
