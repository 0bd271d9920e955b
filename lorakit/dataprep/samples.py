"""Procedurally drawn datasets: a clean one (benchmarks, demos) and one with every problem `check` knows.

Nothing is downloaded. Each image is distinct under the perceptual hash (random shapes on a random gradient), so
only the planted duplicates are found as duplicates.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import write_bytes, write_text


def drawn_image(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A random gradient with a few random rectangles and ellipses (RGB)."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0.3, 1) + np.linspace(0, 1, h)[:, None, None] * 0.3
    arr = (c0 * (1 - t.clip(0, 1)) + c1 * t.clip(0, 1)).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(arr, (h, w, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, w * 3 // 4), rng.integers(0, h * 3 // 4)
        box = (int(x0), int(y0), int(x0 + rng.integers(w // 8, w // 2)), int(y0 + rng.integers(h // 8, h // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_16bit_rgb(img: Image.Image) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    a = np.asarray(img.convert("RGB"), dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(a.shape[0]))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", img.width, img.height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def write_clean_dataset(folder: str | Path, n: int, size: tuple[int, int] = (96, 96), caption: str = "a drawing",
                        seed: int = 0) -> Path:
    """`n` distinct captioned images (PNG and JPEG alternating)."""
    folder = Path(folder)
    for i in range(n):
        img = drawn_image(seed + i, size)
        fmt, ext = ("PNG", ".png") if i % 2 else ("JPEG", ".jpg")
        write_bytes(folder / f"img_{i:05d}{ext}", encode(img, fmt))
        write_text(folder / f"img_{i:05d}.txt", f"{caption}, shape {i}")
    return folder


def write_problem_dataset(folder: str | Path, size: int = 96) -> dict[str, list[str]]:
    """Write a dataset with every problem kind; return {kind: [relative paths that must be reported]}.

    Sizes suit a check at resolution 64 (the tiny model); `huge` is 2200 px on its long side.
    """
    folder = Path(folder)
    s = (size, size)
    expected: dict[str, list[str]] = {}

    def put(name: str, data: bytes, caption: str | bytes | None = "a drawing", kinds: tuple[str, ...] = ()):
        write_bytes(folder / name, data)
        if caption is not None:
            cap = folder / Path(name).with_suffix(".txt")
            write_bytes(cap, caption if isinstance(caption, bytes) else caption.encode())
        for k in kinds:
            expected.setdefault(k, []).append(name)

    for i in range(4):
        put(f"good_{i}.png", encode(drawn_image(i, s), "PNG"), f"a drawing, good {i}")
    put("good_4.jpg", encode(drawn_image(4, s), "JPEG", quality=92), "a drawing, good 4")
    put("corrupt.jpg", np.random.default_rng(1).bytes(3000), kinds=("unreadable",))
    put("empty.png", b"", kinds=("empty_file",))
    whole = encode(drawn_image(10, (256, 256)), "JPEG", quality=95)
    put("truncated.jpg", whole[: len(whole) * 3 // 5], kinds=("truncated",))
    put("cmyk.jpg", encode(drawn_image(11, s).convert("CMYK"), "JPEG"), kinds=("cmyk",))
    grey16 = (np.asarray(drawn_image(12, s).convert("L"), dtype=np.uint16) * 257)
    put("deep_grey16.png", encode(Image.fromarray(grey16), "PNG"), kinds=("high_bit_depth", "grayscale"))
    put("deep_rgb48.png", png_16bit_rgb(drawn_image(13, s)), kinds=("high_bit_depth",))
    rgba = drawn_image(14, s).convert("RGBA")
    alpha = Image.new("L", s, 0)
    ImageDraw.Draw(alpha).ellipse((8, 8, size - 8, size - 8), fill=255)
    rgba.putalpha(alpha)
    put("transparent.png", encode(rgba, "PNG"), kinds=("alpha",))
    put("palette.png", encode(drawn_image(15, s).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        kinds=("palette",))
    put("grey.png", encode(drawn_image(16, s).convert("L"), "PNG"), kinds=("grayscale",))
    sideways = drawn_image(17, (size, size * 3 // 4)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    put("rotated.jpg", encode(sideways, "JPEG", exif=exif.tobytes()), kinds=("exif_rotated",))
    put("tiny.png", encode(drawn_image(18, (24, 24)), "PNG"), kinds=("too_small",))
    put("huge.jpg", encode(drawn_image(19, (2200, 1400)), "JPEG", quality=80), kinds=("huge",))
    put("long_strip.png", encode(drawn_image(20, (size * 4, size // 2)), "PNG"), kinds=("extreme_aspect",))
    put("good_0_copy.png", (folder / "good_0.png").read_bytes(), kinds=("duplicate",))
    near = drawn_image(1, s).resize((size * 9 // 10, size * 9 // 10), Image.Resampling.LANCZOS)
    put("similar_to_good_1.jpg", encode(near, "JPEG", quality=85), kinds=("near_duplicate",))
    put("notes.pdf", b"%PDF-1.4\n% not an image\n", caption=None, kinds=("not_image",))
    put("café_日本.png", encode(drawn_image(21, s), "PNG"), "a drawing, unicode", kinds=("non_ascii_name",))
    put("no_caption.png", encode(drawn_image(22, s), "PNG"), caption=None, kinds=("missing_caption",))
    put("blank_caption.png", encode(drawn_image(23, s), "PNG"), caption="  \n", kinds=("empty_caption",))
    put("latin1_caption.png", encode(drawn_image(24, s), "PNG"), caption="caf\xe9 au lait".encode("latin-1"),
        kinds=("caption_encoding",))
    put("long_caption.png", encode(drawn_image(25, s), "PNG"),
        ", ".join(f"tag{i} word" for i in range(60)), kinds=("caption_too_long",))
    put("two_lines.png", encode(drawn_image(27, s), "PNG"), "a drawing,\nsecond line", kinds=("caption_multiline",))
    put("png_named.jpg", encode(drawn_image(26, s), "PNG"), kinds=("wrong_extension",))
    write_text(folder / "ghost.txt", "a caption without an image")
    expected["orphan_caption"] = ["ghost.txt"]
    return expected
