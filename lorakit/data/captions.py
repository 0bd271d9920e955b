"""Captions: reading caption files and the per-step caption augmentations of sd-scripts.

- `shuffle_caption`: comma-separated tags are shuffled each time an image is drawn, except the first `keep_tokens`
  (the trigger word and class usually come first and must stay there);
- `caption_dropout_rate`: with this probability the image is trained with an empty caption (the model keeps a
  good unconditional prediction, which classifier-free guidance needs).
"""

from __future__ import annotations

import random
from pathlib import Path


def read_caption_file(path: Path) -> tuple[str, str | None]:
    """Return (caption, note). The caption is the first non-empty line, stripped (as sd-scripts reads it).

    `note` says what was unusual (not UTF-8, several lines), for the dataset report; None when nothing was.
    """
    data = Path(path).read_bytes()
    note = None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
        note = "caption file is not UTF-8; read as Windows-1252"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        note = (note + "; " if note else "") + f"caption file has {len(lines)} lines; only the first is used"
    return (lines[0] if lines else ""), note


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def process_caption(caption: str, *, shuffle: bool = False, keep_tokens: int = 0, dropout_rate: float = 0.0,
                    rng: random.Random | None = None) -> str:
    """Apply caption dropout and tag shuffling to one caption (pure given `rng`)."""
    if dropout_rate > 0.0 and rng is not None and rng.random() < dropout_rate:
        return ""
    if not shuffle or rng is None:
        return caption
    tags = split_tags(caption)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each tag appears (the `ss_tag_frequency` metadata sd-scripts tools display)."""
    freq: dict[str, int] = {}
    for cap in captions:
        for tag in split_tags(cap):
            freq[tag] = freq.get(tag, 0) + 1
    return freq
