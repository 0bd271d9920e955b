"""The toy world: coloured shapes on plain backgrounds, drawn procedurally, with captions.

Every image is one shape (circle, square, triangle, cross, crescent) of one colour and one fill (solid, outlined,
striped) on a plain background, at a random position and size, 32×32 pixels. Captions read like
"a red striped circle on a white background". Everything is a pure function of a seed, vectorised in torch, so the
pretraining script can draw millions of images on a GPU or a CPU and get the same pictures on both.

Some concepts are HELD OUT of the text-to-image pretraining (`HELD_OUT_SHAPES`, `HELD_OUT_FILLS`): the toy model
has never been told about crescents or stripes, so a LoRA that teaches them has visibly learned something. (The VAE,
an image codec, does see them: like SD's VAE it can represent pictures the U-Net was never asked to draw.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross", "crescent")
FILLS = ("solid", "outlined", "striped")
COLOURS = {
    "red": (0.86, 0.12, 0.12), "green": (0.13, 0.66, 0.20), "blue": (0.15, 0.30, 0.90),
    "yellow": (0.96, 0.84, 0.10), "purple": (0.58, 0.20, 0.75), "orange": (0.98, 0.52, 0.08),
}
BACKGROUNDS = {"white": (0.97, 0.97, 0.97), "black": (0.06, 0.06, 0.06), "gray": (0.55, 0.55, 0.55)}
HELD_OUT_SHAPES = ("crescent",)
HELD_OUT_FILLS = ("striped",)
HELD_IN_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
HELD_IN_FILLS = tuple(f for f in FILLS if f not in HELD_OUT_FILLS)
CLASS_WORD = "shape"  # the generic word captions sometimes use instead of the shape's name (DreamBooth's class)
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
STRIPE_PERIOD = 4  # pixels; diagonal stripes, half shape colour, half a dark shade of it


@dataclass
class Scenes:
    """A batch of scene parameters (index tensors into SHAPES/COLOURS/FILLS/BACKGROUNDS; centre and radius in px)."""

    shape: torch.Tensor
    colour: torch.Tensor
    fill: torch.Tensor
    background: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)

    def describe(self, i: int) -> dict[str, str]:
        return {"shape": SHAPES[int(self.shape[i])], "colour": COLOUR_NAMES[int(self.colour[i])],
                "fill": FILLS[int(self.fill[i])], "background": BACKGROUND_NAMES[int(self.background[i])]}


def _pick(names: tuple[str, ...], allowed, n: int, g: torch.Generator) -> torch.Tensor:
    allowed = names if allowed is None else tuple(allowed)
    for a in allowed:
        if a not in names:
            raise ValueError(f"unknown world concept {a!r}; known: {', '.join(names)}")
    idx = torch.tensor([names.index(a) for a in allowed])
    return idx[torch.randint(len(idx), (n,), generator=g)]


def sample_scenes(n: int, seed: int | torch.Generator = 0, *, shapes=HELD_IN_SHAPES, colours=None,
                  fills=HELD_IN_FILLS, backgrounds=None, size: int = SIZE) -> Scenes:
    """Draw `n` random scenes from the given concept subsets (default: the pretraining world, held-out excluded).

    Deterministic: the same seed (or generator state) gives the same scenes on every machine.
    """
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    shape = _pick(SHAPES, shapes, n, g)
    colour = _pick(COLOUR_NAMES, colours, n, g)
    fill = _pick(FILLS, fills, n, g)
    background = _pick(BACKGROUND_NAMES, backgrounds, n, g)
    radius = size * (0.22 + 0.14 * torch.rand(n, generator=g))  # 7..11.5 px at 32
    margin = radius + 1.0
    cx = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    cy = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    return Scenes(shape, colour, fill, background, cx, cy, radius)


def _box(px, py, hx, hy):
    """Signed distance to an axis-aligned box with half sizes (hx, hy)."""
    dx, dy = px.abs() - hx, py.abs() - hy
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _shape_sdf(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distances (px, negative inside) of every shape, stacked along a new leading dim (SHAPES order)."""
    circle = torch.sqrt(px ** 2 + py ** 2) - r
    square = _box(px, py, 0.82 * r, 0.82 * r)
    # equilateral triangle pointing up, centred on its centroid: max of three half-plane distances
    s3 = math.sqrt(3) / 2
    tri_r = 1.15 * r
    d1 = py - 0.5 * tri_r  # bottom edge (y grows downwards)
    d2 = -s3 * px - 0.5 * py - 0.5 * tri_r
    d3 = s3 * px - 0.5 * py - 0.5 * tri_r
    triangle = torch.maximum(torch.maximum(d1, d2), d3)
    cross = torch.minimum(_box(px, py, r, 0.36 * r), _box(px, py, 0.36 * r, r))
    # crescent: a disc minus a disc shifted to the right, opening to the right
    bite = torch.sqrt((px - 0.55 * r) ** 2 + (py + 0.1 * r) ** 2) - 0.82 * r
    crescent = torch.maximum(circle, -bite)
    return torch.stack([circle, square, triangle, cross, crescent])


def render(scenes: Scenes, size: int = SIZE, device: str | torch.device = "cpu") -> torch.Tensor:
    """Draw scenes as float images in [0, 1], shape (N, 3, size, size). Edges are anti-aliased from the SDF."""
    n = len(scenes)
    dev = torch.device(device)
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    ys, xs = coords.view(1, size, 1), coords.view(1, 1, size)
    cx, cy, r = (t.to(dev, torch.float32).view(n, 1, 1) for t in (scenes.cx, scenes.cy, scenes.radius))
    px, py = xs - cx, ys - cy
    sdf_all = _shape_sdf(px.expand(n, size, size), py.expand(n, size, size), r)  # (S, N, H, W)
    sdf = sdf_all.gather(0, scenes.shape.to(dev).view(1, n, 1, 1).expand(1, n, size, size))[0]
    inside = (0.5 - sdf).clamp(0, 1)
    fill = scenes.fill.to(dev).view(n, 1, 1)
    ring = inside * (sdf + 2.5).clamp(0, 1)  # a band ~2 px wide inside the edge
    alpha = torch.where(fill == FILLS.index("outlined"), ring, inside)
    colour = torch.tensor(list(COLOURS.values()), device=dev)[scenes.colour.to(dev)].view(n, 3, 1, 1)
    background = torch.tensor(list(BACKGROUNDS.values()), device=dev)[scenes.background.to(dev)].view(n, 3, 1, 1)
    # stripes: alternate the colour with a dark shade of it, diagonally
    ix = torch.arange(size, device=dev)
    dark_band = ((ix.view(size, 1) + ix.view(1, size)) % STRIPE_PERIOD) >= STRIPE_PERIOD // 2
    striped = (fill == FILLS.index("striped")) & dark_band.view(1, size, size)
    shade = torch.where(striped.unsqueeze(1), 0.35, 1.0)
    fg = colour * shade
    a = alpha.unsqueeze(1)
    return (a * fg + (1 - a) * background).clamp(0, 1)


def caption(scenes: Scenes, i: int, *, style: str = "full") -> str:
    """Caption of scene `i`. `style`: "full" ("a red striped circle on a white background"), "short" (no
    background), "class" (the shape named by the class word "shape"), "nocolour"."""
    d = scenes.describe(i)
    fill = "" if d["fill"] == "solid" else d["fill"] + " "
    shape = CLASS_WORD if style == "class" else d["shape"]
    colour = "" if style == "nocolour" else d["colour"] + " "
    words = f"{colour}{fill}{shape}"
    text = ("an " if words[0] in "aeiou" else "a ") + words
    if style != "short":
        text += f" on a {d['background']} background"
    return text


CAPTION_STYLES = ("full", "short", "class", "nocolour")
CAPTION_STYLE_WEIGHTS = (0.55, 0.2, 0.15, 0.1)


def random_captions(scenes: Scenes, seed: int | torch.Generator = 0) -> list[str]:
    """Captions with varied phrasing (full / short / class word / no colour), so prompts can leave things out."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    styles = torch.multinomial(torch.tensor(CAPTION_STYLE_WEIGHTS), len(scenes), replacement=True, generator=g)
    return [caption(scenes, i, style=CAPTION_STYLES[int(s)]) for i, s in enumerate(styles)]


def vocabulary() -> list[str]:
    """Every word a caption can contain (held-out words included, so the tokenizer spells them as one token each
    — the text encoder has simply never seen them used), plus the DreamBooth trigger `sks`."""
    words = ["a", "an", "on", "background", CLASS_WORD, "sks", *SHAPES, *FILLS, *COLOURS, *BACKGROUNDS]
    return list(dict.fromkeys(words))


def to_pil(image: torch.Tensor):
    """A (3, H, W) float tensor in [0, 1] as a PIL image."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def from_pil(image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
