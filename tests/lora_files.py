"""kohya LoRA files written by hand for the tests (format facts only, not lorakit's writer)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lorakit.model_weights import StateDictWeights


def make_lora(comps, path, *, rank=2, seed=0, alpha=1.0, conv=True, text_encoder=True, every=1, metadata=None):
    """A kohya LoRA file written by hand (format facts only): non-zero up and down for the model's targets."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = StateDictWeights.from_components(comps).targets(conv=conv)
    for i, t in enumerate(targets):
        if (t.component == "text_encoder" and not text_encoder) or i % every:
            continue
        out, rest = t.shape[0], t.shape[1:]
        down = torch.randn(rank, *rest, generator=g) * 0.3
        up = torch.randn(out, rank, *([1, 1] if len(rest) == 3 else []), generator=g) * 0.3
        tensors[f"{t.kohya}.lora_down.weight"] = down
        tensors[f"{t.kohya}.lora_up.weight"] = up
        tensors[f"{t.kohya}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata=metadata)
    return path
