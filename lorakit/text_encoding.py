r"""Captions and prompts → text-encoder states, in 75-token windows for texts longer than CLIP's 77 positions.

CLIP reads 77 positions: a start token, 75 tokens of text, an end token (then padding). A longer text is split
into windows of 75 tokens; each window is encoded as its own sequence `<start> window <end> <pad>…`, and the states
are joined as sd-scripts joins them (`max_token_length` 150 / 225): the first window's start state, the 75 text
positions of every window, the last window's final state — 75·k + 2 positions for k windows (77, 152, 227). With
one window this is the usual 77-token encoding. Training captions (up to `max_token_length`) and prompts of
samples and `generate` (to their end) go through it.

`clip_skip` k takes the states of the k-th layer from the end, then the final layer norm (sd-scripts and A1111).

Emphasis, A1111's syntax (also sd-scripts' `weighted_captions` and its sample prompts): `(word)` weights its tokens
1.1×, `[word]` 1/1.1×, `(word:1.3)` 1.3×, nested brackets multiply, `\(` `\)` `\[` `\]` are literal brackets.
The weights scale each token's text-encoder state; prompts then get their overall mean back (A1111), captions are
trained as weighted (sd-scripts).

Prompts (`prompt_windows`) are read as A1111 reads them: to their end, with emphasis, and `BREAK` (the word in
capitals) ends the current window: the rest of it is padding and the text goes on in the next window.
"""

from __future__ import annotations

import math
import re

import torch

from .errors import ConfigError

WINDOW = 75  # text tokens per CLIP sequence (77 positions minus the start and end tokens)


def _windows_of(rows: list[list], max_tokens: int, start, end, pad) -> list[list]:
    """Each row (token ids or their weights) cut to `max_tokens`, as one `start, window, end, pad…` row per window."""
    if max_tokens < WINDOW or max_tokens % WINDOW:
        raise ConfigError(f"the text length must be a multiple of {WINDOW} tokens, got {max_tokens}")
    out = []
    for row in rows:
        for first in range(0, max_tokens, WINDOW):
            window = row[first:first + WINDOW]
            out.append([start, *window, end] + [pad] * (WINDOW - len(window)))
    return out


def _special_ids(tokenizer) -> tuple[int, int, int]:
    eos = tokenizer.eos_token_id
    return tokenizer.bos_token_id, eos, eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def token_windows(tokenizer, texts: list[str], max_tokens: int = WINDOW) -> torch.Tensor:
    """Token ids [len(texts), k, 77] of each text cut to `max_tokens` (a multiple of 75; k = max_tokens / 75), one
    row per window: `<start>`, the window's tokens, `<end>`, padding."""
    tokens = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens).input_ids \
        if texts else []
    rows = _windows_of(tokens, max_tokens, *_special_ids(tokenizer))
    return torch.tensor(rows, dtype=torch.long).view(len(tokens), max_tokens // WINDOW, WINDOW + 2)


# ------------------------------------------------------------------------------------------------- emphasis
_EMPHASIS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:")
UP, DOWN = 1.1, 1 / 1.1  # the weights of (…) and […]


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """A1111's emphasis: the text as (piece, weight) runs, e.g. `a (red:1.2) [hat]` → [("a ", 1.0), ("red", 1.2),
    (" ", 1.0), ("hat", 1/1.1)]. Unclosed brackets weight to the end; runs of equal weight are joined."""
    runs: list[list] = []
    rounds, squares = [], []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _EMPHASIS.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            runs.append([piece[1], 1.0])
        elif piece == "(":
            rounds.append(len(runs))
        elif piece == "[":
            squares.append(len(runs))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), UP)
        elif piece == "]" and squares:
            scale(squares.pop(), DOWN)
        else:
            runs.append([piece, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    joined: list[tuple[str, float]] = []
    for piece, weight in runs:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + piece, weight)
        else:
            joined.append((piece, weight))
    return joined or [("", 1.0)]


def without_emphasis(text: str) -> str:
    """The text the tokens are made from: `a (red:1.2) hat` → `a red hat`."""
    return "".join(piece for piece, _ in parse_emphasis(text))


def has_emphasis(text: str) -> bool:
    """Whether `text` uses the emphasis syntax (brackets, weights or escapes): what it says differs from its
    letters."""
    return any(c in text for c in "()[]\\")


def _run_tokens(tokenizer, runs: list[tuple[str, float]], max_tokens: int | None = None
                ) -> tuple[list[int], list[float]]:
    """The token ids of (piece, weight) runs, joined, and each token's weight (each piece cut to `max_tokens`)."""
    pieces = tokenizer([piece for piece, _ in runs], add_special_tokens=False, truncation=max_tokens is not None,
                       max_length=max_tokens).input_ids
    return ([t for piece in pieces for t in piece], [w for piece, (_, w) in zip(pieces, runs) for _ in piece])


def weighted_token_windows(tokenizer, texts: list[str], max_tokens: int = WINDOW
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(`token_windows` of the texts with their emphasis removed, each token's weight [len(texts), k, 77]; 1 at
    the start, end and padding positions)."""
    ids, weights = [], []
    for text in texts:
        row_ids, row_weights = _run_tokens(tokenizer, parse_emphasis(text), max_tokens)
        ids.append(row_ids)
        weights.append(row_weights)
    k = max_tokens // WINDOW
    id_rows = _windows_of(ids, max_tokens, *_special_ids(tokenizer))
    weight_rows = _windows_of(weights, max_tokens, 1.0, 1.0, 1.0)
    return (torch.tensor(id_rows, dtype=torch.long).view(len(texts), k, WINDOW + 2),
            torch.tensor(weight_rows, dtype=torch.float32).view(len(texts), k, WINDOW + 2))


BREAK = re.compile(r"\s*\bBREAK\b\s*")  # A1111's window break in prompts


def has_break(text: str) -> bool:
    return BREAK.search(text) is not None


def _prompt_tokens(tokenizer, text: str, emphasis: bool, pad: int) -> tuple[list[int], list[float]]:
    """A prompt's token ids and weights, read to the end; each `BREAK` pads the current window to its end (as A1111:
    a window that is already full is not padded again; a `BREAK` at the start or after another one makes a window
    of padding; one at the end adds nothing)."""
    ids: list[int] = []
    weights: list[float] = []
    window_start = 0  # where the window that tokens go into now began
    for piece, weight in parse_emphasis(text) if emphasis else [(text, 1.0)]:
        for i, part in enumerate(BREAK.split(piece)):
            if i:
                fill = WINDOW if len(ids) == window_start else -(len(ids) - window_start) % WINDOW
                ids += [pad] * fill
                weights += [1.0] * fill
                window_start = len(ids)
            if part:
                part_ids, part_weights = _run_tokens(tokenizer, [(part, weight)])
                ids += part_ids
                weights += part_weights
    return ids, weights


def prompt_windows(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts as A1111 reads them (see the module docstring): token ids [len(texts), k, 77] with k the windows the
    longest needs, and each token's weight [len(texts), k, 77] when a text uses emphasis (else None)."""
    emphasis = any(has_emphasis(t) for t in texts)
    start, end, pad = _special_ids(tokenizer)
    rows = [_prompt_tokens(tokenizer, text, emphasis, pad) for text in texts]
    k = max([1] + [math.ceil(len(ids) / WINDOW) for ids, _ in rows])
    ids = torch.tensor(_windows_of([r[0] for r in rows], k * WINDOW, start, end, pad), dtype=torch.long)
    if not emphasis:
        return ids.view(len(texts), k, WINDOW + 2), None
    weights = torch.tensor(_windows_of([r[1] for r in rows], k * WINDOW, 1.0, 1.0, 1.0), dtype=torch.float32)
    return ids.view(len(texts), k, WINDOW + 2), weights.view(len(texts), k, WINDOW + 2)


def apply_emphasis(states: torch.Tensor, weights: torch.Tensor, keep_mean: bool = False) -> torch.Tensor:
    """States [b, 75·k + 2, d] (`encode_windows`) × their tokens' weights [b, k, 77]; with `keep_mean`, each
    text's states are then scaled back to their mean before weighting (A1111's prompts)."""
    b, k, _ = weights.shape
    ones = weights.new_ones(b, 1)
    joined = weights[:, 0] if k == 1 else torch.cat([ones, weights[:, :, 1:-1].reshape(b, -1), ones], dim=1)
    weighted = states * joined.to(states)[..., None]
    if keep_mean:
        before, after = states.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
        weighted = weighted * (before / after)
    return weighted


def layer_states(text_encoder, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """States [n, 77, d] of the text encoder for ids [n, 77]: the last layer's, or with `clip_skip` k layer -k's
    followed by the final layer norm."""
    if clip_skip <= 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states
    if clip_skip > len(hidden) - 1:
        raise ConfigError(f"`clip_skip` = {clip_skip} but the text encoder has {len(hidden) - 1} layers")
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden[-clip_skip])


def encode_windows(text_encoder, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """States [b, 75·k + 2, d] for windowed ids [b, k, 77] (`token_windows`): each window encoded alone, joined as
    the first start state, every window's text positions, the last window's final state."""
    b, k, n = ids.shape
    states = layer_states(text_encoder, ids.reshape(b * k, n), clip_skip)
    if k == 1:
        return states
    states = states.view(b, k, n, -1)
    return torch.cat([states[:, 0, :1], states[:, :, 1:-1].reshape(b, k * (n - 2), -1), states[:, -1, -1:]], dim=1)
