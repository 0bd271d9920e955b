"""Latents: encode training images with the VAE once (`cache_latents`), keep them in memory and, with
`cache_latents_to_disk`, in files reused by later runs.

A cached latent is only reused when everything that shaped it is unchanged: the image bytes (sha256), the bucket,
the resize and crop, the flip, and the VAE (a fingerprint of its config and weights). Anything else re-encodes, so a
user who edits an image or switches VAE never trains on stale latents. Files go to a hidden `.lorakit_latents/`
folder next to the images (never mistaken for images or captions) and are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..fileio import save_safetensors
from .images import file_hash

CACHE_DIR = ".lorakit_latents"


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's config and encoder weights (identifies "the same VAE" across runs)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, p in vae.named_parameters():
        if name.startswith(("encoder.", "quant_conv.")):
            flat = p.detach().float().flatten()
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_file(image: Path, bucket: tuple[int, int]) -> Path:
    return image.parent / CACHE_DIR / f"{image.name}.{bucket[0]}x{bucket[1]}.safetensors"


def cache_key(image_sha: str, bucket, resized, crop, vae_id: str, resize_filter: str = "lanczos") -> dict[str, str]:
    key = {"image_sha256": image_sha, "bucket": f"{bucket[0]}x{bucket[1]}", "resized": f"{resized[0]}x{resized[1]}",
           "crop": ",".join(map(str, crop)), "vae": vae_id, "format": "lorakit-latent-1"}
    if resize_filter != "lanczos":  # (the files written before the choice existed were all resized with Lanczos)
        key["resize"] = resize_filter
    return key


def read_cached(path: Path, key: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The cached tensors if `path` exists and was made from exactly `key`; None otherwise (or if unreadable)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a damaged cache file is simply re-encoded
        return None


def write_cached(path: Path, tensors: dict[str, torch.Tensor], key: dict[str, str]) -> bool:
    """Write a cache file; False (and no exception) when the folder is read-only — the cache is an optimisation."""
    try:
        save_safetensors({k: v.to("cpu", torch.float32) for k, v in tensors.items()}, path, metadata=key)
        return True
    except OSError:
        return False


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, scale: float, seeds: list[int] | None = None) -> torch.Tensor:
    """Images in [-1, 1] → scaled latents: `vae.encode(x).latent_dist.sample() * scale` (SD: 0.18215).

    `seeds` (one per image) make the sample independent of how images are batched."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    shape = dist.mean.shape[1:]
    if seeds is None:
        noise = torch.randn(dist.mean.shape)
    else:
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return (dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)) * scale


def image_sha(path: Path, memo: dict[Path, str]) -> str:
    if path not in memo:
        memo[path] = file_hash(path)
    return memo[path]
