"""sd-scripts' `color_aug`: a third of the images drawn get a colour change, half of them a hue shift of up to ±16°
and half a gamma of 0.95-1.05 (albumentations' `OneOf([HueSaturationValue(8, 0, 0), RandomGamma((95, 105))],
p=0.33)`, which sd-scripts re-implements). The gamma applies to values in [0, 1], as in albumentations; sd-scripts'
re-implementation raises 0-255 values to it, which darkens (γ < 1) or clips (γ > 1) the whole image."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

HUE_LIMIT = 8 / 180  # a turn: OpenCV's ±8 of 180 hue steps
GAMMA_RANGE = (0.95, 1.05)
PROBABILITY = 0.33


@dataclass(frozen=True)
class ColorJitter:
    hue: float = 0.0  # shift, in turns
    gamma: float = 1.0


def draw_color_jitter(rng: random.Random) -> ColorJitter | None:
    """The colour change of one drawn image, or None (two times in three)."""
    if rng.random() > PROBABILITY:
        return None
    if rng.random() > 0.5:
        return ColorJitter(hue=rng.uniform(-HUE_LIMIT, HUE_LIMIT))
    return ColorJitter(gamma=rng.uniform(*GAMMA_RANGE))


def apply_color_jitter(im: Image.Image, jitter: ColorJitter) -> Image.Image:
    """`im` (RGB) with its hue turned by `jitter.hue` and its [0, 1] values raised to `jitter.gamma`."""
    if jitter.hue:
        h, s, v = im.convert("HSV").split()
        shift = round(jitter.hue * 255)  # PIL's hue: 255 steps a turn
        im = Image.merge("HSV", (h.point(lambda x: (x + shift) % 255), s, v)).convert("RGB")
    if jitter.gamma != 1.0:
        im = im.point([round(255 * (x / 255) ** jitter.gamma) for x in range(256)] * 3)
    return im
