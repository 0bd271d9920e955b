"""Turn any readable image into what training wants: upright, 8-bit RGB, alpha composited (or kept, for `alpha_mask`
training), optionally shrunk.

Pure image functions (no files): `to_training_rgb(image, background, max_side, keep_alpha=)`.
"""

from __future__ import annotations

import io

from PIL import Image, ImageCms, ImageColor

from ..data.images import to_rgb, upright
from ..errors import ConfigError


def parse_background(background: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """'white', '#808080' or (r, g, b) → (r, g, b); the error names the option."""
    if isinstance(background, tuple):
        return tuple(int(v) for v in background[:3])
    try:
        return ImageColor.getrgb(background)[:3]
    except ValueError:
        raise ConfigError(f"`background` must be a colour name or #rrggbb, got {background!r}") from None


def cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one (print CMYK → sRGB); else Pillow's plain conversion."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass
    return img.convert("RGB")


def to_training_rgb(img: Image.Image, background=(255, 255, 255), max_side: int | None = None, *,
                    keep_alpha: bool = False) -> Image.Image:
    """Apply the EXIF rotation, convert to 8-bit RGB (alpha over `background`; with `keep_alpha`, 8-bit RGBA for an
    image with transparency), shrink so the long side ≤ max_side (Pillow resizes RGBA with premultiplied alpha, so
    transparent pixels' colours do not bleed into the edges)."""
    img = upright(img)
    if img.mode == "CMYK":
        img = cmyk_to_rgb(img)
    alpha = None
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if keep_alpha:
            alpha, img = rgba.getchannel("A"), rgba.convert("RGB")
        else:
            base = Image.new("RGBA", rgba.size, parse_background(background) + (255,))
            img = Image.alpha_composite(base, rgba)
    img = to_rgb(img)  # the trainer's conversion: 16-bit scaled (not clipped), palette, grey, 1-bit
    if alpha is not None:
        img = Image.merge("RGBA", (*img.split(), alpha))
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img
