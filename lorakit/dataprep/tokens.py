"""Caption length in CLIP tokens, against the 75-token window (77 minus the start/end tokens).

With a real tokenizer (the model's `CLIPTokenizer`, or any callable returning token ids) the count is exact.
Without one it is estimated the way CLIP's pre-tokenizer splits text — letters runs, single digits, punctuation
runs — with long words counted as several BPE pieces; good to a few tokens for English tags.
"""

from __future__ import annotations

import re

CLIP_WINDOW = 75
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def estimate_tokens(text: str) -> int:
    n = 0
    for piece in _PIECES.findall(text):
        n += 1 + (len(piece) - 1) // 8 if piece[0].isalpha() else 1
    return n


def make_counter(tokenizer=None):
    """Return (count(text) -> int, name) where name is 'clip' for a real tokenizer, 'estimate' otherwise."""
    if tokenizer is None:
        return estimate_tokens, "estimate"
    if hasattr(tokenizer, "tokenize"):
        return (lambda text: len(tokenizer.tokenize(text))), "clip"
    if callable(tokenizer):
        return (lambda text: len(tokenizer(text))), "clip"
    raise TypeError(f"`tokenizer` must be a tokenizer with .tokenize() or a callable, got {type(tokenizer).__name__}")
