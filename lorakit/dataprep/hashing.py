"""Exact and perceptual image fingerprints for duplicate detection, with Pillow + numpy only.

The difference hash (dHash, N. Krawetz, "Kind of like that", hackerfactor.com 2013) compares each pixel of a 9x8
grey thumbnail with its right neighbour: 64 bits that survive resizing, recompression and small colour changes.
A flat image hashes to all zeros, so near-duplicates must also agree on a tiny colour signature.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def dhash(image: Image.Image) -> int:
    """64-bit difference hash of `image` (any mode)."""
    grey = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0)
    a = np.asarray(grey, dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def colour_signature(image: Image.Image) -> np.ndarray:
    """Mean colour of a 4x4 grid, 48 values in [0, 1]."""
    rgb = image.convert("RGB").resize((4, 4), Image.Resampling.BOX, reducing_gap=2.0)
    return np.asarray(rgb, dtype=np.float32).flatten() / 255.0


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1, dtype=np.uint8)


def hamming_rows(hashes: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Hamming distances of hashes[start:stop] to all hashes, shape (stop - start, n)."""
    return _popcount(hashes[start:stop, None] ^ hashes[None, :])


def near_duplicate_pairs(hashes: list[int], signatures: list[np.ndarray], max_distance: int = 6,
                         max_colour_diff: float = 0.06) -> list[tuple[int, int, int]]:
    """Pairs (i, j, distance), i < j, whose dHashes differ in ≤ `max_distance` bits and whose colour signatures
    differ by ≤ `max_colour_diff` on average. Works in row blocks, so memory stays ~32 MB for any n."""
    n = len(hashes)
    if n < 2:
        return []
    h = np.array(hashes, dtype=np.uint64)
    sig = np.stack(signatures)
    step = max(1, 4_000_000 // n)
    pairs = []
    for start in range(0, n, step):
        dist = hamming_rows(h, start, min(n, start + step))
        ii, jj = np.nonzero(dist <= max_distance)
        for i, j in zip((ii + start).tolist(), jj.tolist()):
            if j > i and float(np.abs(sig[i] - sig[j]).mean()) <= max_colour_diff:
                pairs.append((i, j, int(dist[i - start, j])))
    return pairs
