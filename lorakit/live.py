"""The live training view for notebooks: a progress bar, a loss curve redrawn in place and a growing sample grid.

`LiveView` is a set of training callbacks (`on_step`, `on_sample`, `on_save`, `on_resume`) that owns one ipywidgets
box, in place of the training's tqdm bar (`shows_progress`: the loop then draws none, so a notebook shows one
progress bar):
- a progress bar (the one place to look, also inside a form's output) and a status line (step, loss, speed, ETA,
  last file saved),
- the loss curve, raw and smoothed, re-rendered at most every `redraw_s` seconds (drawing costs ~50 ms, a toy
  training step about as much, so drawing every step would halve the speed),
- the sample grid: one row per prompt, one column per sampling step (the last `max_columns`).
A resumed run (`on_resume`) shows its earlier losses and samples too.
After training, `finish()` writes the loss plot and the final sample grid as PNG next to the LoRA.

`train_live(cfg)` is what a notebook's train cell (and the form's train button) calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PIL import Image

from . import plots
from .config import TrainConfig
from .errors import ConfigError


def _get(info: Any, name: str, default=None):
    """Read a field of a callback payload given as an object, a dict or None."""
    if info is None:
        return default
    if isinstance(info, dict):
        return info.get(name, default)
    return getattr(info, name, default)


def _as_images(value) -> list[Image.Image]:
    if value is None:
        return []
    if isinstance(value, Image.Image):
        return [value]
    if isinstance(value, (str, Path)):
        with Image.open(value) as im:
            return [im.convert("RGB")]
    return [im for v in value for im in _as_images(v)]


class LiveView:
    """Training callbacks that draw the progress bar, the live loss curve and the sample grid in a notebook."""

    def __init__(self, total_steps: int | None = None, *, title: str = "training", redraw_s: float = 1.5,
                 max_columns: int = 6, display: bool = True):
        self.total, self.title, self.redraw_s, self.max_columns = total_steps, title, redraw_s, max_columns
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.validation: tuple[list[int], list[float]] = ([], [])  # (steps, validation losses) where measured
        self.samples: dict[int, dict[str, Image.Image]] = {}  # step -> prompt -> image
        self.prompts: list[str] = []
        self.saved: list[Path] = []
        self.files: dict[str, Path] = {}
        self._last_draw = 0.0
        self.widget = None
        self._build(display)

    @property
    def shows_progress(self) -> bool:
        """True when the view is drawn (ipywidgets available): training then leaves out its own tqdm bar."""
        return self.widget is not None

    # ---------------------------------------------------------------- display
    def _build(self, display: bool) -> None:
        try:
            import ipywidgets as w
        except ImportError:
            return
        self.progress = w.IntProgress(value=0, min=0, max=self.total or 1, description="step 0",
                                      style={"description_width": "120px"}, layout=w.Layout(width="600px"))
        self.progress.add_class("lorakit-progress")
        self.status = w.HTML("")
        self.status.add_class("lorakit-status")
        self.loss_image = w.Image(format="png", layout=w.Layout(width="600px", max_width="100%"))
        self.loss_image.add_class("lorakit-loss-plot")
        self.grid_image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.grid_image.add_class("lorakit-sample-grid")
        self.loss_box = w.VBox([])
        self.grid_box = w.VBox([])
        self.widget = w.VBox([self.progress, self.status, self.loss_box, self.grid_box])
        self.widget.add_class("lorakit-live")
        if display:
            from IPython.display import display as show

            show(self.widget)

    def _draw_loss(self, force: bool = False) -> bool:
        """Redraw the loss plot if `redraw_s` has passed (or `force`); True when it was redrawn."""
        if self.widget is None or not self.losses:
            return False
        now = time.monotonic()
        if not force and now - self._last_draw < self.redraw_s:
            return False
        self._last_draw = now
        fig = plots.loss_figure(self.steps, self.losses, title=self.title, validation=self.validation)
        self.loss_image.value = plots.figure_png(fig)
        if not self.loss_box.children:
            self.loss_box.children = (self.loss_image,)
        return True

    def grid(self) -> Image.Image | None:
        """The sample grid so far: prompts × the last `max_columns` sampling steps."""
        if not self.samples:
            return None
        steps = sorted(self.samples)[-self.max_columns:]
        rows = [[self.samples[s].get(p) for s in steps] for p in self.prompts]
        return plots.image_grid(rows, row_labels=self.prompts, col_labels=[f"step {s}" for s in steps])

    # ---------------------------------------------------------------- callbacks
    def on_step(self, info=None, **kw) -> None:
        """After each optimizer step: `info` carries `step`, `loss` (and optionally `total_steps`, `lr`)."""
        info = info if info is not None else kw
        step, loss = _get(info, "step"), _get(info, "loss")
        self.total = _get(info, "total_steps") or self.total
        if step is None:
            step = (self.steps[-1] + 1) if self.steps else 1
        if loss is not None:
            self.steps.append(int(step))
            self.losses.append(float(loss))
        if _get(info, "val_loss") is not None:
            self.validation[0].append(int(step))
            self.validation[1].append(float(_get(info, "val_loss")))
        if self.widget is not None:
            self.progress.max = max(int(self.total or step), int(step))
            self.progress.value = int(step)
            self.progress.description = f"step {step}/{self.progress.max}"
        if self._draw_loss() and self.widget is not None:
            rate = _get(info, "it_per_s")
            left = (self.total - int(step)) / rate if rate and self.total and self.total > int(step) else None
            self.status.value = (f"step {step}/{self.total or '?'} · loss {float(loss or 0):.4f}"
                                 + (f" · validation {self.validation[1][-1]:.4f}" if self.validation[1] else "")
                                 + (f" · {rate:.2f} steps/s" if rate else "")
                                 + (f" · ETA {int(left) // 60}:{int(left) % 60:02d}" if left is not None else ""))

    def on_sample(self, info=None, **kw) -> None:
        """When samples are made: `info` carries `step`, `images` (PIL or paths) and `prompts` (one per image)."""
        info = info if info is not None else kw
        step = int(_get(info, "step", self.steps[-1] if self.steps else 0) or 0)
        images = _as_images(_get(info, "images") or _get(info, "paths") or _get(info, "image"))
        prompts = _get(info, "prompts") or ([_get(info, "prompt")] if _get(info, "prompt") else None)
        prompts = list(prompts) if prompts else [f"sample {i + 1}" for i in range(len(images))]
        row = self.samples.setdefault(step, {})
        for prompt, image in zip(prompts, images):
            if prompt not in self.prompts:
                self.prompts.append(prompt)
            row[prompt] = image
        if self.widget is not None and self.samples:
            grid = self.grid()
            self.grid_image.value = plots.image_png(grid)
            self.grid_image.layout.width = f"{grid.width}px"
            if not self.grid_box.children:
                self.grid_box.children = (self.grid_image,)
        self._draw_loss(force=True)

    def on_resume(self, info=None, **kw) -> None:
        """When a run resumes: `info` carries its `loss_history` (records with `step`, `loss`, `val_loss`) and
        `samples` (earlier `on_sample` payloads), so the curve and the grid show the whole run, not only its rest."""
        info = info if info is not None else kw
        history = _get(info, "loss_history") or []
        self.steps = [int(r["step"]) for r in history] + self.steps
        self.losses = [float(r["loss"]) for r in history] + self.losses
        measured = [(int(r["step"]), float(r["val_loss"])) for r in history if r.get("val_loss") is not None]
        self.validation = ([s for s, _ in measured] + self.validation[0], [v for _, v in measured] + self.validation[1])
        for payload in _get(info, "samples") or []:
            self.on_sample(payload)
        if self.widget is not None and _get(info, "step") is not None:
            self.progress.max = max(int(self.total or 0), int(_get(info, "step")))
            self.progress.value = int(_get(info, "step"))
        self._draw_loss(force=True)

    def on_save(self, info=None, **kw) -> None:
        """When a LoRA file is written: `info` carries `path` (and `step`)."""
        info = info if info is not None else kw
        path = _get(info, "path")
        if path is not None:
            self.saved.append(Path(path))
            if self.widget is not None:
                self.status.value = f"saved <code>{Path(path).name}</code> at step {_get(info, 'step', '?')}"

    # ---------------------------------------------------------------- end
    def finish(self, output_dir: str | Path | None = None, output_name: str = "lora",
               history: list[dict] | None = None) -> dict[str, Path]:
        """Draw the final plot and, with `output_dir`, save `<name>_loss.png` next to the LoRA — of the run's whole
        `history` when given (a resumed run's too), else of the steps seen here — and `<name>_samples.png` unless
        training already wrote its `samples_grid.png` there."""
        self._draw_loss(force=True)
        if output_dir is not None:
            out = Path(output_dir)
            val = dict(zip(*self.validation))
            rows = ([{"step": r["step"], "loss": r["loss"], "val_loss": r.get("val_loss")} for r in history]
                    if history else
                    [{"step": s, "loss": v, "val_loss": val.get(s)} for s, v in zip(self.steps, self.losses)])
            if rows:
                self.files["loss_plot"] = plots.save_loss_plot(rows, out / f"{output_name}_loss.png",
                                                               title=self.title)
            grid = None if (out / "samples_grid.png").is_file() else self.grid()
            if grid is not None:
                self.files["sample_grid"] = plots.save_image(grid, out / f"{output_name}_samples.png")
        return self.files


def train_live(cfg: TrainConfig | None = None, /, **kwargs):
    """`lorakit.train` with the live view; saves the loss plot and sample grid PNGs next to the LoRA."""
    from .training import train

    cfg = TrainConfig.from_dict(kwargs) if cfg is None else (cfg.replace(**kwargs) if kwargs else cfg)
    view = LiveView(cfg.max_train_steps if cfg.max_train_epochs is None else None,
                    title=f"training {cfg.output_name}")
    result = None
    try:
        result = train(cfg, callbacks=view)
    finally:
        view.finish(cfg.output_dir, cfg.output_name, history=result.loss_history if result is not None else None)
    return result


def ensure_trained(path: str | Path, /, config: str | Path | None = None, base_model: str | None = None,
                   **overrides) -> Path:
    """`path` if that LoRA exists; otherwise train it first (from the TOML `config` + `overrides`, with the live
    view) so notebooks that use a LoRA also run on their own, e.g. before notebook 02 was run. With `base_model`
    (the model the notebook uses it with), a missing LoRA is trained only when the config trains that model: a
    mistyped path for another model is an error, not a lesson trained into that folder."""
    path = Path(path)
    if path.is_file():
        return path
    values = {**overrides, "output_dir": str(path.parent), "output_name": path.stem}
    cfg = TrainConfig.from_toml(config, overrides=values) if config else TrainConfig.from_dict(values)
    if base_model is not None and cfg.pretrained_model_name_or_path != base_model:
        raise ConfigError(f"LoRA not found: {path} (for {base_model}: check the path; only a lesson's LoRA for "
                          f"{cfg.pretrained_model_name_or_path} is trained here when it is missing)")
    print(f"{path} not found: training it first")
    return Path(train_live(cfg).lora_path)
