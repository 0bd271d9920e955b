"""Open the images users really have, safely: every image becomes an 8-bit RGB `PIL.Image` the right way up, or a
clear reason why it cannot be used.

Handled: EXIF orientation (phone photos), RGBA/LA/transparent palette images (composited on white, not on black),
CMYK, 16-bit greyscale/RGB, 1-bit, palette. Refused with a reason: 0-byte, truncated or corrupt files, files that are
not images, images too small to train on, images so large they look like a decompression bomb.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_SIDE = 8  # smaller images cannot make even one latent pixel
# Pillow refuses images above Image.MAX_IMAGE_PIXELS (~89 MP) as possible decompression bombs; lorakit keeps that
# limit (such an image needs > 270 MB decoded) and says so, naming the file.


class ImageProblem(Exception):
    """An image that cannot be used; the message says why (the caller adds the path)."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def problem_reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image (or a format Pillow cannot read)"
    if isinstance(e, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return (f"too large (over {2 * Image.MAX_IMAGE_PIXELS} pixels, Pillow's decompression-bomb limit): "
                f"downscale it")
    return str(e)


def load_rgb(path: Path) -> Image.Image:
    """Decode fully to 8-bit RGB, upright. Raises ImageProblem for corrupt/truncated files."""
    return to_rgb(_open_upright(Path(path)))  # a truncated file fails here, not later in the middle of a batch


# EXIF orientation -> the transpose that makes the image upright (the EXIF standard's eight orientations)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# what Pillow raises on files (and EXIF blocks) it cannot parse: malformed ones raise more than OSError
DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError, struct.error)


def upright(im: Image.Image) -> Image.Image:
    """A copy of `im` turned as its EXIF orientation says (Pillow's `exif_transpose`). When Pillow cannot rewrite a
    malformed EXIF block, the orientation tag alone is read and applied; when even that fails, none is."""
    try:
        return ImageOps.exif_transpose(im)
    except DECODE_ERRORS:
        try:
            orientation = im.getexif().get(0x0112, 1)
        except DECODE_ERRORS:
            orientation = 1
        method = _UPRIGHT.get(orientation)
        return im.transpose(method) if method is not None else im.copy()


def _open_upright(path: Path) -> Image.Image:
    """The decoded image the right way up (its mode unchanged); ImageProblem when it cannot be read."""
    try:
        with warnings.catch_warnings():
            # up to twice Pillow's pixel limit it only warns (a large photo, listed as `huge` by `prepare check`);
            # beyond, it refuses the file as a decompression bomb
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return upright(im)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageProblem(problem_reason(e)) from None
    except DECODE_ERRORS as e:
        raise ImageProblem(f"corrupt or truncated ({e})") from None


def load_alpha(path: Path) -> Image.Image:
    """The image's transparency as an 8-bit "L" image, upright (255: opaque); all 255 for an image without any."""
    im = _open_upright(Path(path))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return im.getchannel("A")
    return Image.new("L", im.size, 255)


def load_mask(path: Path) -> Image.Image:
    """A mask image as an 8-bit "L" image, upright: its red channel (sd-scripts' rule; a grey mask's grey)."""
    return to_rgb(_open_upright(Path(path))).getchannel("R")


def has_transparency(path: Path) -> bool:
    """Whether the image has any pixel that is not fully opaque."""
    return load_alpha(path).getextrema()[0] < 255


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Transparency is composited on white (a black background would teach the LoRA
    black halos); 16-bit data is scaled down, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # CMYK (Pillow undoes Adobe's inverted JPEG CMYK itself), L, 1, P, YCbCr, ...


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (latent-cache invalidation)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def image_to_tensor(im: Image.Image):
    """8-bit RGB image → float tensor [3, H, W] in [-1, 1] (what the VAE expects)."""
    import torch

    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
