"""Aspect-ratio bucketing, as sd-scripts does it (pure functions: sizes in, sizes out).

Training every image at one square size crops away the sides of portraits and landscapes. Bucketing instead trains
each image at a size of roughly the same *area* (so the step costs about the same) whose aspect ratio is as close
as possible to the image's own. The algorithm matches sd-scripts (`make_bucket_resolutions` / `BucketManager`), so
users moving from it get the same buckets:

- the table: the square side `floor(sqrt(area) / steps) * steps`, plus for every width `w` from `min_reso` to
  `max_reso` in `steps`, the height `min(max_reso, floor(area / w / steps) * steps)` when it is ≥ `min_reso`, and
  both orientations `(w, h)` and `(h, w)`;
- an image goes to the bucket with the closest aspect ratio (an exact-size bucket wins), is scaled to *cover* it
  and cropped;
- with `no_upscale`, no table: an image larger than the area is scaled down (keeping its aspect), and the bucket is
  the image size rounded *down* to `steps`, so an image is never enlarged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def bucket_range(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """`min_bucket_reso` rounded down and `max_bucket_reso` rounded up to a multiple of `steps` (sd-scripts'
    `adjust_min_max_bucket_reso_by_steps`), so that every bucket side is one."""
    if steps < 1:
        raise ValueError(f"`bucket_reso_steps` must be ≥ 1, got {steps}")
    return min_reso - min_reso % steps, -(-max_reso // steps) * steps


def make_bucket_resolutions(resolution: tuple[int, int], min_reso: int = 256, max_reso: int = 1024,
                            steps: int = 64) -> list[tuple[int, int]]:
    """The sorted bucket table `[(width, height), ...]` for a training `resolution` (width, height), the range
    first rounded out to multiples of `steps` (`bucket_range`)."""
    min_reso, max_reso = bucket_range(min_reso, max_reso, steps)
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // steps) * steps)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: the bucket (width, height) and the size it is resized to before cropping."""

    bucket: tuple[int, int]
    resized: tuple[int, int]


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def select_bucket(image_size: tuple[int, int], table: list[tuple[int, int]] | None, *, max_area: int,
                  steps: int = 64, no_upscale: bool = False) -> BucketChoice:
    """Choose the bucket for an image of `image_size` (width, height).

    With a `table` (normal bucketing): the exact size if it is a bucket, else the bucket of closest aspect ratio;
    the image is scaled so that it covers the bucket (the bucket is then cropped out of it).
    With `no_upscale=True` (`table` unused): shrink only, bucket = resized size rounded down to `steps`.
    """
    w, h = image_size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    aspect = w / h
    if not no_upscale:
        if not table:
            raise ValueError("a bucket table is needed unless `bucket_no_upscale` is set")
        if (w, h) in table:
            bucket = (w, h)
        else:
            bucket = min(table, key=lambda r: abs(r[0] / r[1] - aspect))
        # scale so the image covers the bucket: match the side that is relatively shorter
        scale = bucket[1] / h if aspect > bucket[0] / bucket[1] else bucket[0] / w
        resized = (int(w * scale + 0.5), int(h * scale + 0.5))
        return BucketChoice(bucket, resized)

    if w * h > max_area:
        # too big: shrink keeping the aspect ratio, then pick whichever of "round the width" / "round the height"
        # to `steps` keeps the aspect ratio better (sd-scripts' rule)
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = _round_to_steps(rw, steps)
        bh_for_bw = _round_to_steps(bw / aspect, steps)
        bh = _round_to_steps(rh, steps)
        bw_for_bh = _round_to_steps(bh * aspect, steps)
        err_w = abs(bw / bh_for_bw - aspect) if bh_for_bw else math.inf
        err_h = abs(bw_for_bh / bh - aspect) if bh else math.inf
        if err_w < err_h:
            resized = (bw, int(bw / aspect + 0.5))
        else:
            resized = (int(bh * aspect + 0.5), bh)
    else:
        resized = (w, h)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if bucket[0] == 0 or bucket[1] == 0:
        raise ValueError(f"image of {w}x{h} is smaller than `bucket_reso_steps` ({steps}) on one side: it cannot "
                         f"fill a bucket without enlarging it (unset `bucket_no_upscale`, or remove the image)")
    return BucketChoice(bucket, resized)


def fixed_size_choice(image_size: tuple[int, int], resolution: tuple[int, int]) -> BucketChoice:
    """Without bucketing every image is scaled to cover `resolution` (width, height) and cropped to it."""
    w, h = image_size
    scale = max(resolution[0] / w, resolution[1] / h)
    resized = (max(resolution[0], int(w * scale + 0.5)), max(resolution[1], int(h * scale + 0.5)))
    return BucketChoice(tuple(resolution), resized)


def crop_box(resized: tuple[int, int], bucket: tuple[int, int], *, random_offset: tuple[float, float] | None = None
             ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the `bucket`-sized crop in an image of size `resized`: centred (an odd pixel
    left over goes to the right and bottom, as in sd-scripts), or for `random_crop` at `random_offset` (two uniform
    draws in [0, 1)): each of the 0…dx left edges equally likely, as sd-scripts' `randint(0, dx)`."""
    dx, dy = resized[0] - bucket[0], resized[1] - bucket[1]
    if dx < 0 or dy < 0:
        raise ValueError(f"resized image {resized} does not cover bucket {bucket}")
    if random_offset is None:
        left, top = dx // 2, dy // 2
    else:
        left, top = (min(int(f * (d + 1)), d) for f, d in zip(random_offset, (dx, dy)))
    return left, top, left + bucket[0], top + bucket[1]
