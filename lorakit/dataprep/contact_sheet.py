"""A thumbnail contact sheet of a checked dataset, problems marked: a red frame for errors, orange for warnings,
blue for notes, and the problem names under each picture. For notebooks: `display(contact_sheet(report))`."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..data.images import to_rgb
from .report import DatasetReport, ImageRecord
from .sources import DatasetSource

FRAME = {"error": (220, 40, 40), "warning": (240, 150, 0), "note": (60, 120, 220)}
RANK = {"error": 0, "warning": 1, "note": 2}


def _worst(rec: ImageRecord) -> str | None:
    sev = sorted((p.severity for p in rec.problems), key=RANK.get)
    return sev[0] if sev else None


def _thumbnail(src: DatasetSource, rec: ImageRecord, size: int) -> Image.Image | None:
    if not rec.readable:
        return None
    try:
        with Image.open(io.BytesIO(src.read(rec.path))) as im:
            im.draft("RGB", (size, size))
            im = to_rgb(ImageOps.exif_transpose(im))
            im.thumbnail((size, size))
            return im
    except (OSError, SyntaxError, ValueError):
        return None


def contact_sheet(report: DatasetReport, *, columns: int = 8, thumb: int = 128, only_problems: bool = False,
                  max_images: int = 200) -> Image.Image:
    """Thumbnails of the first `max_images` images of `report` in a grid, problems marked (PIL image)."""
    records = [r for r in report.records if r.problems or not only_problems][:max_images]
    columns = max(1, min(columns, len(records) or 1))
    label_h, pad = 30, 6
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + label_h
    rows = max(1, -(-len(records) // columns))
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    with DatasetSource(report.source) as src:
        for n, rec in enumerate(records):
            x, y = (n % columns) * cell_w, (n // columns) * cell_h
            worst = _worst(rec)
            if worst:
                draw.rectangle((x + 1, y + 1, x + cell_w - 2, y + thumb + 2 * pad - 2), outline=FRAME[worst], width=4)
            im = _thumbnail(src, rec, thumb)
            if im is None:  # unreadable: a grey tile with a cross
                box = (x + pad, y + pad, x + pad + thumb, y + pad + thumb)
                draw.rectangle(box, fill=(200, 200, 200))
                draw.line(box, fill=FRAME["error"], width=3)
                draw.line((box[0], box[3], box[2], box[1]), fill=FRAME["error"], width=3)
            else:
                sheet.paste(im, (x + pad + (thumb - im.width) // 2, y + pad + (thumb - im.height) // 2))
            name = rec.path if len(rec.path) <= 22 else "…" + rec.path[-21:]
            draw.text((x + pad, y + thumb + 2 * pad), name, fill=(0, 0, 0), font=font)
            kinds = ", ".join(dict.fromkeys(rec.kinds()))
            if kinds:
                draw.text((x + pad, y + thumb + 2 * pad + 13), kinds[:30], fill=FRAME[worst], font=font)
    return sheet
