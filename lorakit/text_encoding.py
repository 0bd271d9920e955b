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
The weights scale each token's text-encoder state; prompts then get their overall mean back (over the whole prompt,
as sd-scripts' long-prompt pipeline does; A1111 restores it per 77-token window), captions are trained as weighted
(sd-scripts).

Prompts (`prompt_windows`) are read as A1111 reads them: to their end, with emphasis, and `BREAK` (the word in
capitals) ends the current window: the rest of it is padding and the text goes on in the next window. A window that
fills up with a comma among its last 20 tokens ends after that comma instead, and the tokens after it begin the
next window (A1111's `comma_padding_backtrack`, 20 by default), so that a tag is not cut in two at the border.
"""

from __future__ import annotations

import math
import re

import torch

from .config.jobs import COMMA_BACKTRACK
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
    # (verbose=False: no "longer than the maximum sequence length" warning, the windows are why)
    tokens = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens,
                       verbose=False).input_ids if texts else []
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
                       max_length=max_tokens, verbose=False).input_ids
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


class _Windows:
    """A prompt's token ids and weights laid out in windows of 75 as A1111 fills them: `add` a token, `pad` the
    current window to its end (`BREAK`) with the `pad` id given."""

    def __init__(self, pad: int, comma: int | None, backtrack: int):
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.pad_id, self.comma, self.backtrack = pad, comma, backtrack
        self.start = 0  # where the window that tokens go into now began
        self.last_comma = -1  # the position of the current window's last comma (-1: none)

    def _full(self) -> bool:
        return len(self.ids) - self.start == WINDOW

    def _close(self) -> None:
        """Tokens go on in the next window (the current one ends where the tokens do)."""
        self.start, self.last_comma = len(self.ids), -1

    def _next_window(self) -> None:
        """Pad the current window to its end; tokens go on in the next one."""
        fill = WINDOW - (len(self.ids) - self.start)
        self.ids += [self.pad_id] * fill
        self.weights += [1.0] * fill
        self._close()

    def add(self, token: int, weight: float) -> None:
        full = self._full()
        if token == self.comma:
            self.last_comma = len(self.ids)
        elif full and self.last_comma >= 0 and self.start + WINDOW - self.last_comma <= self.backtrack:
            # the window ends after its last comma; the tokens after that comma move on to the next window
            cut = self.last_comma + 1
            moved = self.ids[cut:], self.weights[cut:]
            del self.ids[cut:], self.weights[cut:]
            self._next_window()
            self.ids += moved[0]
            self.weights += moved[1]
            full = False
        if full:  # A1111 closes a full window when the next token comes (a comma that begins one is not counted)
            self._close()
        self.ids.append(token)
        self.weights.append(weight)

    def pad(self) -> None:
        """`BREAK`: as A1111, a window that is already full is not padded again; at the start or after another
        `BREAK` it makes a window of padding."""
        if self._full():
            self._close()
        else:
            self._next_window()


def _comma_id(tokenizer) -> int | None:
    """The id of CLIP's comma token (`,</w>`), if the vocabulary has one."""
    token = tokenizer.convert_tokens_to_ids(",</w>")
    return None if token is None or token == tokenizer.unk_token_id else token


def _prompt_tokens(tokenizer, text: str, emphasis: bool, pad: int, comma: int | None, backtrack: int
                   ) -> tuple[list[int], list[float]]:
    """A prompt's token ids and weights, read to the end, in windows of 75 (the last one not padded): each `BREAK`
    pads the current window to its end (one at the end adds nothing), and a window that fills up with a `comma`
    among its last `backtrack` tokens ends after that comma (0: never)."""
    windows = _Windows(pad, comma, backtrack)
    for piece, weight in parse_emphasis(text) if emphasis else [(text, 1.0)]:
        for i, part in enumerate(BREAK.split(piece)):
            if i:
                windows.pad()
            if part:
                for token, token_weight in zip(*_run_tokens(tokenizer, [(part, weight)])):
                    windows.add(token, token_weight)
    return windows.ids, windows.weights


def prompt_windows(tokenizer, texts: list[str], comma_backtrack: int = COMMA_BACKTRACK
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts as A1111 reads them (see the module docstring): token ids [len(texts), k, 77] with k the windows the
    longest needs, and each token's weight [len(texts), k, 77] when a text uses emphasis (else None).
    `comma_backtrack`: how far back a full window looks for a comma to end after (A1111's
    `comma_padding_backtrack`; 0 cuts every 75 tokens)."""
    emphasis = any(has_emphasis(t) for t in texts)
    start, end, pad = _special_ids(tokenizer)
    comma = _comma_id(tokenizer)
    # as A1111: a window ended early is filled with end tokens, then all after a row's first end become padding
    # (SD2's is `!`: `<start> text <end> ! ! …`; SD1 pads with the end token, so nothing changes there)
    rows = [_prompt_tokens(tokenizer, text, emphasis, end, comma, comma_backtrack) for text in texts]
    k = max([1] + [math.ceil(len(ids) / WINDOW) for ids, _ in rows])
    ids = [_padded_after_end(row, end, pad) for row in _windows_of([r[0] for r in rows], k * WINDOW, start, end, pad)]
    ids = torch.tensor(ids, dtype=torch.long)
    if not emphasis:
        return ids.view(len(texts), k, WINDOW + 2), None
    weights = torch.tensor(_windows_of([r[1] for r in rows], k * WINDOW, 1.0, 1.0, 1.0), dtype=torch.float32)
    return ids.view(len(texts), k, WINDOW + 2), weights.view(len(texts), k, WINDOW + 2)


def _padded_after_end(row: list[int], end: int, pad: int) -> list[int]:
    """A 77-token row with every position after its first `end` token set to `pad`."""
    first = row.index(end)
    return row[:first + 1] + [pad] * (len(row) - first - 1)


def apply_emphasis(states: torch.Tensor, weights: torch.Tensor, keep_mean: bool = False) -> torch.Tensor:
    """States [b, 75·k + 2, d] (`encode_windows`) × their tokens' weights [b, k, 77]; with `keep_mean`, each
    text's states are then scaled back to their mean before weighting, over all its positions (prompts)."""
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
