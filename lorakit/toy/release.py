"""Write a pretrained toy model out: a diffusers folder (fp16) and, through lorakit's single-file writer, the
shipped `lorakit-toy.safetensors`, with its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..fileio import write_json

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "lorakit-toy.safetensors"
CLASSIFIER_FILE = WEIGHTS_DIR / "classifier.safetensors"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_release(comps, out: str | Path, dtype: torch.dtype = torch.float16) -> list[Path]:
    """Save `comps` into `out/diffusers` (in `dtype`) and `out/lorakit-toy.safetensors` when the single-file
    writer (`lorakit.models.save_single_file`) is available. Returns the written paths."""
    out = Path(out)
    comps.to(device="cpu", dtype=dtype)
    written = [comps.save_pretrained(out / "diffusers")]
    if "pretrain_settings" in comps.extra:
        written.append(write_json(out / "pretrain_settings.json", comps.extra["pretrain_settings"]))
    try:
        from ..models import save_single_file
    except ImportError:
        return written
    single = out / "lorakit-toy.safetensors"
    save_single_file(comps, single, save_precision="fp16")
    written += [single, write_json(out / "lorakit-toy.sha256.json", {"lorakit-toy.safetensors": sha256(single)})]
    return written
