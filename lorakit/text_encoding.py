"""Captions and prompts → text-encoder states, in 75-token windows for texts longer than CLIP's 77 positions.

CLIP reads 77 positions: a start token, 75 tokens of text, an end token (then padding). A longer text is split
into windows of 75 tokens; each window is encoded as its own sequence `<start> window <end> <pad>…`, and the states
are joined as sd-scripts joins them (`max_token_length` 150 / 225): the first window's start state, the 75 text
positions of every window, the last window's final state — 75·k + 2 positions for k windows (77, 152, 227). With
one window this is the usual 77-token encoding. Training captions (up to `max_token_length`) and prompts of
samples and `generate` (to their end) go through it.

`clip_skip` k takes the states of the k-th layer from the end, then the final layer norm (sd-scripts and A1111).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

WINDOW = 75  # text tokens per CLIP sequence (77 positions minus the start and end tokens)


def window_count(tokenizer, text: str) -> int:
    """How many 75-token windows `text` fills (at least one)."""
    return max(1, math.ceil(len(tokenizer.tokenize(text)) / WINDOW))


def token_windows(tokenizer, texts: list[str], max_tokens: int = WINDOW) -> torch.Tensor:
    """Token ids [len(texts), k, 77] of each text cut to `max_tokens` (a multiple of 75; k = max_tokens / 75), one
    row per window: `<start>`, the window's tokens, `<end>`, padding."""
    if max_tokens < WINDOW or max_tokens % WINDOW:
        raise ConfigError(f"the text length must be a multiple of {WINDOW} tokens, got {max_tokens}")
    k = max_tokens // WINDOW
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    tokens = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens).input_ids
    rows = []
    for ids in tokens:
        for start in range(0, max_tokens, WINDOW):
            window = ids[start:start + WINDOW]
            rows.append([bos, *window, eos] + [pad] * (WINDOW - len(window)))
    return torch.tensor(rows, dtype=torch.long).view(len(tokens), k, WINDOW + 2)


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
