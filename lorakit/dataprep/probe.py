"""Facts about one image file from its bytes: readable?, format, mode, bit depth, EXIF orientation, displayed size.

Decoding the whole file is the only reliable way to find truncated or corrupt data, so `probe` does decode — at a
reduced JPEG scale (`draft`), which keeps a 1,000-image check well under 30 s. Pillow's own truncation check is
backed by a structural one (JPEG end marker, PNG IEND chunk) so a global `LOAD_TRUNCATED_IMAGES = True` set by some
other library cannot hide a broken file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..data.images import DECODE_ERRORS, to_rgb, upright

EXIF_ORIENTATION = 0x0112
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
FORMAT_EXTENSIONS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "BMP": (".bmp",),
                     "GIF": (".gif",), "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg")}


@dataclass
class Probe:
    """What reading one file found. `image` is a small decoded copy (for hashing/thumbnails), or None."""

    kind: str | None  # None when fine, else one of: empty_file, not_image, unreadable, truncated
    detail: str = ""
    format: str | None = None
    mode: str | None = None
    bit_depth: int | None = None
    width: int | None = None  # as displayed (EXIF rotation applied)
    height: int | None = None
    orientation: int = 1
    has_transparency: bool = False
    grey: bool = False  # the pixels have no colour (whatever the mode)
    image: Image.Image | None = None


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (Pillow silently reads 16-bit RGB PNGs as 8-bit)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def _structurally_truncated(fmt: str, data: bytes) -> bool:
    if fmt in ("JPEG", "MPO"):
        return data.rfind(b"\xff\xd9") == -1
    if fmt == "PNG":  # (anywhere: some tools append bytes after the end chunk, which decoders ignore)
        return data.rfind(b"IEND") == -1
    return False


def probe(data: bytes, *, looks_like_image: bool, thumb: int = 128) -> Probe:
    """Read `data`; `looks_like_image` (an image extension) decides between `unreadable` and `not_image`."""
    if not data:
        return Probe("empty_file")
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        if looks_like_image or isinstance(e, Image.DecompressionBombError):
            return Probe("unreadable", _short(e))
        return Probe("not_image")
    fmt, mode = img.format, img.mode
    width, height = img.size
    try:
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block should not hide the image itself
        orientation = 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    bit_depth = png_bit_depth(data) or (16 if mode.startswith("I;16") else 32 if mode in ("I", "F") else 8)
    has_transparency = mode in ALPHA_MODES or "transparency" in img.info
    found = Probe(None, format=fmt, mode=mode, bit_depth=bit_depth, width=width, height=height,
                  orientation=orientation, has_transparency=has_transparency)
    if Image.MAX_IMAGE_PIXELS and img.size[0] * img.size[1] > Image.MAX_IMAGE_PIXELS:
        return found  # not decoded here (slow): reported as `huge`
    try:
        if fmt in ("JPEG", "MPO"):
            img.draft(None, (thumb, thumb))  # decode at 1/2..1/8 scale: the whole stream is still read
        img.load()
    except DECODE_ERRORS as e:
        found.kind = "truncated" if ("truncated" in str(e) or isinstance(e, EOFError)) else "unreadable"
        found.detail = _short(e)
        return found
    if _structurally_truncated(fmt, data):
        found.kind, found.detail = "truncated", f"no {fmt} end marker"
        return found
    if orientation != 1:
        img = upright(img)
    img = to_rgb(img)  # the trainer's own conversion (lorakit.data.images)
    img.thumbnail((thumb, thumb), Image.Resampling.BILINEAR, reducing_gap=2.0)
    found.image = img
    found.grey = mode in ("L", "1", "LA") or mode in HIGH_BIT_MODES or is_grey(img)
    return found


def is_grey(img: Image.Image, tolerance: int = 3) -> bool:
    """True when every pixel's R, G and B agree within `tolerance` (checked on the small copy)."""
    import numpy as np

    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return int((a.max(axis=-1) - a.min(axis=-1)).max()) <= tolerance


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]
