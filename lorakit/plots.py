"""Loss curves and labelled image grids, saved as PNG (atomically, like every file lorakit writes).

Plots use matplotlib's object API (`Figure` + Agg canvas), never `pyplot`: no global state, no figure shown twice by
the notebook's inline backend, and it works headless. Grids are plain Pillow images so they can be saved, shown
in a notebook or pushed to the Hub alike.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path

BACKGROUND = (255, 255, 255)
EMPTY = (230, 230, 230)
INK = (20, 20, 20)


# ------------------------------------------------------------------------------------------------------ loss curve
def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first points are not
    pulled towards zero, so the smoothed curve starts where the raw one does."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"`weight` must be in [0, 1), got {weight}")
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1.0 - weight) * float(v)
        out.append(avg / (1.0 - weight**i))
    return out


def _history_rows(source) -> list:
    """The rows of a loss history: a CSV/JSON file written by training, a list of dicts/pairs, or a dict of lists
    (as rows of dicts)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                source = list(csv.DictReader(f))
        else:
            source = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(source, dict) and "loss" in source and isinstance(source["loss"], list):
        steps = source.get("step", range(1, len(source["loss"]) + 1))
        vals = source.get("val_loss") or [None] * len(source["loss"])
        return [{"step": s, "loss": v, "val_loss": vv} for s, v, vv in zip(steps, source["loss"], vals)]
    if isinstance(source, dict):
        source = source.get("history", source.get("steps", []))
    return list(source)


def read_loss_history(source) -> tuple[list[int], list[float]]:
    """(steps, losses) from a CSV/JSON file written by training, a list of dicts/pairs, or a dict of lists."""
    steps, losses = [], []
    for i, row in enumerate(_history_rows(source), start=1):
        if isinstance(row, dict):
            steps.append(int(float(row.get("step", i))))
            losses.append(float(row["loss"]))
        else:
            steps.append(int(row[0]))
            losses.append(float(row[1]))
    return steps, losses


def read_validation_history(source) -> tuple[list[int], list[float]]:
    """(steps, validation losses) of the rows where the validation loss was measured (`val_loss`)."""
    steps, losses = [], []
    for i, row in enumerate(_history_rows(source), start=1):
        if isinstance(row, dict) and row.get("val_loss") not in (None, ""):
            steps.append(int(float(row.get("step", i))))
            losses.append(float(row["val_loss"]))
    return steps, losses


def loss_figure(steps: Sequence[int], losses: Sequence[float], *, smoothing: float = 0.9,
                title: str = "training loss", size: tuple[float, float] = (6.0, 3.2),
                validation: tuple[Sequence[int], Sequence[float]] | None = None):
    """A matplotlib Figure: the raw loss (thin, faint) and its smoothed curve (bold); with `validation` (steps,
    losses), the validation loss as points joined by a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if len(losses):
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(steps, smooth(losses, smoothing), color="tab:blue", linewidth=2.0, label=f"smoothed ({smoothing})")
        if validation is not None and len(validation[1]):
            ax.plot(*validation, color="tab:orange", marker="o", markersize=4, linewidth=1.5,
                    label="validation loss")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "waiting for the first step…", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """Render a Figure to PNG bytes (Agg; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_loss_plot(history, dest: str | os.PathLike, *, smoothing: float = 0.9, title: str = "training loss") -> Path:
    """Save the loss curve of `history` (see `read_loss_history`), with its validation loss if measured, as a PNG
    at `dest`."""
    steps, losses = read_loss_history(history)
    return save_bytes(figure_png(loss_figure(steps, losses, smoothing=smoothing, title=title,
                                             validation=read_validation_history(history))), dest)


# ------------------------------------------------------------------------------------------------------ image grids
def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; the last line is cut with an ellipsis if the text is longer."""
    words, lines, line = str(text).split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 1)] + "…"
    return lines or [""]


def image_grid(images: Sequence, *, cols: int | None = None, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, title: str | None = None, min_cell: int = 128,
               font_size: int = 12) -> Image.Image:
    """Lay images out in a labelled grid.

    `images` is a list of rows (each a list of PIL images or None for a missing cell) or a flat list with `cols`.
    Small images (the toy model's 64px) are enlarged with nearest-neighbour to `min_cell` so they stay readable.
    """
    rows = [list(r) for r in images] if images and isinstance(images[0], (list, tuple)) else None
    if rows is None:
        flat = list(images)
        cols = cols or max(1, len(flat))
        rows = [flat[i:i + cols] for i in range(0, len(flat), cols)] or [[]]
    ncols = max(len(r) for r in rows) or 1
    present = [im for r in rows for im in r if im is not None]
    cw = max([im.width for im in present] + [1])
    ch = max([im.height for im in present] + [1])
    scale = max(1, math.ceil(min_cell / max(cw, ch)))
    cw, ch = cw * scale, ch * scale

    font, pad = _font(font_size), 4
    line_h = font_size + 3
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0
    row_lines = []
    if row_labels:
        label_w = min(220, max(int(probe.textlength(str(t), font=font)) for t in row_labels) + 2 * pad)
        label_w = max(label_w, 40)
        row_lines = [_wrap(probe, t, font, label_w - 2 * pad, max_lines=max(1, ch // line_h)) for t in row_labels]
    col_lines = [_wrap(probe, t, font, cw - 2 * pad) for t in col_labels] if col_labels else []
    top = (max(len(x) for x in col_lines) * line_h + 2 * pad) if col_lines else 0
    title_h = line_h + 2 * pad if title else 0

    grid = Image.new("RGB", (label_w + ncols * cw, title_h + top + len(rows) * ch), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), str(title), fill=INK, font=font)
    for c, lines in enumerate(col_lines):
        for i, text in enumerate(lines):
            draw.text((label_w + c * cw + pad, title_h + pad + i * line_h), text, fill=INK, font=font)
    for r, row in enumerate(rows):
        y = title_h + top + r * ch
        if r < len(row_lines):
            for i, text in enumerate(row_lines[r]):
                draw.text((pad, y + pad + i * line_h), text, fill=INK, font=font)
        for c in range(ncols):
            im = row[c] if c < len(row) else None
            x = label_w + c * cw
            if im is None:
                draw.rectangle([x + 1, y + 1, x + cw - 2, y + ch - 2], fill=EMPTY)
                continue
            im = im.convert("RGB")
            if scale > 1:
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            grid.paste(im, (x + (cw - im.width) // 2, y + (ch - im.height) // 2))
    return grid


def save_bytes(data: bytes, dest: str | os.PathLike) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def save_image(image: Image.Image, dest: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically."""
    with atomic_path(dest) as tmp:
        image.save(tmp, format="PNG")
    return Path(dest)


def open_image(path: str | os.PathLike) -> Image.Image:
    """A PNG/JPEG written by lorakit, loaded fully (so the file is closed); shown inline as a notebook's last line."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(2, "no such image (was anything sampled?)", str(path))
    with Image.open(path) as im:
        return im.copy()


def image_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------- X/Y grid
def _as_value(spec, value, current):
    """Broadcast a scalar to a list field (e.g. one multiplier for every LoRA)."""
    if spec.type is list and not isinstance(value, (list, tuple)):
        return [value] * max(1, len(current or []))
    return value


def xy_grid(cfg=None, /, x: str = "network_mul", x_values: Sequence = (0.0, 0.5, 1.0), y: str = "seed",
            y_values: Sequence = (1, 2, 3), *, save_to: str | os.PathLike | None = None,
            generate: Callable | None = None, **kwargs) -> Image.Image:
    """Generate one image per (x, y) pair of option values and lay them out: e.g. LoRA weight × seed.

    `cfg` is a `GenerateConfig` (or keyword arguments for one); `x`/`y` name any of its options. A list option
    given a scalar (e.g. `network_mul = 0.5`) applies it to every LoRA. The grid is saved to `save_to` if given.
    """
    from .config import GenerateConfig

    cfg = GenerateConfig.from_dict(kwargs) if cfg is None else (cfg.replace(**kwargs) if kwargs else cfg)
    spec_x, spec_y = GenerateConfig.spec(x), GenerateConfig.spec(y)
    if generate is None:
        from functools import partial

        from .generation import MODEL_OPTIONS, load_for
        from .generation import generate as generate_with

        # the model is loaded once for the whole grid (a Colab reload of SD1.5 per cell takes minutes), unless an
        # axis changes the model itself
        generate = (generate_with if x in MODEL_OPTIONS or y in MODEL_OPTIONS
                    else partial(generate_with, components=load_for(cfg)))
    rows = []
    for yv in y_values:
        row = []
        for xv in x_values:
            one = cfg.replace(**{x: _as_value(spec_x, xv, getattr(cfg, x)), y: _as_value(spec_y, yv, getattr(cfg, y)),
                                 "num_images": 1, "output_dir": ""})  # only the grid is saved
            row.append(_first_image(generate(one)))
        rows.append(row)
    grid = image_grid(rows, row_labels=[f"{y}={v}" for v in y_values], col_labels=[f"{x}={v}" for v in x_values],
                      title=cfg.prompt or None)
    if save_to is not None:
        save_image(grid, save_to)
    return grid


def _first_image(result) -> Image.Image:
    """The first PIL image of whatever `generate` returned (a list, or an object with `.images`)."""
    if isinstance(result, Image.Image):
        return result
    images = getattr(result, "images", result)
    if isinstance(images, dict):
        images = images.get("images", [])
    return list(images)[0]
