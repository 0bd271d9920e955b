"""Loss curves, labelled grids, X/Y grids and the Colab/Drive helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lorakit import colab, plots
from lorakit.config import GenerateConfig, TrainConfig
from lorakit.errors import ConfigError


def test_smoothing_is_a_debiased_moving_average():
    assert plots.smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards zero
    out = plots.smooth([1.0, 0.0], 0.5)
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx((0.5 * 0.5) / (1 - 0.25))
    assert plots.smooth([3.0, 1.0], 0.0) == [3.0, 1.0]
    with pytest.raises(ValueError, match="weight"):
        plots.smooth([1.0], 1.0)


@pytest.mark.parametrize("fmt", ["csv", "json", "rows"])
def test_loss_plot_from_every_history_form(tmp_path, fmt):
    steps, losses = list(range(1, 41)), [1.0 / s for s in range(1, 41)]
    if fmt == "csv":
        src = tmp_path / "loss.csv"
        src.write_text("step,loss,lr\n" + "".join(f"{s},{v},0.001\n" for s, v in zip(steps, losses)))
    elif fmt == "json":
        src = tmp_path / "loss.json"
        src.write_text(json.dumps([{"step": s, "loss": v} for s, v in zip(steps, losses)]))
    else:
        src = list(zip(steps, losses))
    assert plots.read_loss_history(src) == (steps, pytest.approx(losses))
    dest = plots.save_loss_plot(src, tmp_path / "out" / "loss.png")
    with Image.open(dest) as im:
        assert im.format == "PNG" and im.size == (600, 320)
        assert len(set(im.convert("L").getdata())) > 10  # something was drawn
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_image_grid_layout_and_labels():
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    grid = plots.image_grid([[red, blue, None], [blue, red, red]], row_labels=["a red circle", "two"],
                            col_labels=["step 100", "step 200", "step 300"], min_cell=128)
    plain = plots.image_grid([[red, blue, None], [blue, red, red]], min_cell=128)
    assert plain.size == (3 * 128, 2 * 128)  # 64px images enlarged 2x, cells sized by the largest image
    assert grid.width > plain.width and grid.height > plain.height  # room for the labels
    assert plain.getpixel((64, 64)) == (255, 0, 0) and plain.getpixel((128 + 64, 64)) == (0, 0, 255)
    assert plain.getpixel((2 * 128 + 64, 64)) == plots.EMPTY  # a missing sample is a grey cell
    label_strip = grid.crop((0, grid.height - 128, grid.width - 3 * 128, grid.height)).convert("L")
    assert min(label_strip.getdata()) < 128  # the row label is drawn
    flat = plots.image_grid([red] * 5, cols=2, min_cell=64)
    assert flat.size == (2 * 64, 3 * 64)


def test_xy_grid_generates_each_pair(tmp_path):
    calls = []

    def fake_generate(cfg):
        calls.append((cfg.network_mul, cfg.seed))
        assert cfg.output_dir == "" and cfg.num_images == 1
        shade = int(255 * cfg.network_mul[0])
        return [Image.new("RGB", (64, 64), (shade, cfg.seed, 0))]

    cfg = GenerateConfig(prompt="a sks shape", network_weights=["a.safetensors"], network_mul=[1.0])
    grid = plots.xy_grid(cfg, "network_mul", [0.0, 1.0], "seed", [1, 2], generate=fake_generate,
                         save_to=tmp_path / "xy.png")
    assert calls == [([0.0], 1), ([1.0], 1), ([0.0], 2), ([1.0], 2)]
    with Image.open(tmp_path / "xy.png") as im:
        assert im.size == grid.size and im.width > 2 * 128 and im.height > 2 * 128
    with pytest.raises(KeyError):
        plots.xy_grid(cfg, "no_such_option", [1], generate=fake_generate)


def test_xy_grid_loads_the_model_once(monkeypatch):
    """Every cell samples the one model loaded for the grid (reloading SD1.5 per cell takes minutes on Colab), unless
    an axis changes the model."""
    from lorakit import generation
    from lorakit.tiny import build_tiny

    loads = []
    tiny = build_tiny("sd1", seed=0)
    monkeypatch.setattr(generation, "load_for", lambda cfg: loads.append(cfg.pretrained_model_name_or_path) or tiny)
    cfg = GenerateConfig(prompt="a shape", num_inference_steps=1, width=32, height=32, output_dir="")
    grid = plots.xy_grid(cfg, "guidance_scale", [1.0, 4.0], "seed", [1, 2])
    assert loads == ["lorakit-toy"] and grid.width > 2 * 128
    plots.xy_grid(cfg, "pretrained_model_name_or_path", ["lorakit-toy"], "seed", [1, 2])
    assert loads == ["lorakit-toy", "lorakit-toy", "lorakit-toy"]  # once per cell: the axis is the model


def test_drive_paths_off_colab_are_clear_errors(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not colab.in_colab()
    with pytest.raises(ConfigError, match="only available on Colab"):
        colab.drive_path("/content/drive/MyDrive/data")
    cfg = TrainConfig(output_dir="/content/drive/MyDrive/out")
    with pytest.raises(ConfigError, match="`output_dir` is a Google Drive path"):
        colab.check_drive_paths(cfg)
    colab.check_drive_paths(TrainConfig(output_dir="out"))
    ws = colab.setup(use_drive=True, quiet=True)
    assert not ws.on_drive and not ws.on_colab


def test_install_keeps_the_installed_torch():
    import torch

    cmd = colab.install_command("lorakit")
    assert cmd[-2] == "lorakit" and cmd[-1] == f"torch=={torch.__version__.split('+')[0]}"
    assert "--upgrade" not in cmd and "-U" not in cmd


def test_live_view_follows_the_training_callbacks(tmp_path):
    from lorakit.live import LiveView

    view = LiveView(4, display=False, redraw_s=0.0)
    for step in range(1, 5):
        view.on_step({"step": step, "loss": 1.0 / step, "total_steps": 4, "it_per_s": 2.0})
        if step % 2 == 0:
            view.on_sample(step=step, images=[Image.new("RGB", (32, 32), (60 * step, 0, 0))] * 2,
                           prompts=["a sks shape", "a red circle"], paths=[])
    view.on_save(step=4, path=tmp_path / "lora.safetensors")
    assert view.progress.value == 4 and view.progress.max == 4 and "step 4/4" in view.progress.description
    assert view.loss_image.value[:4] == b"\x89PNG" and view.grid_image.value[:4] == b"\x89PNG"
    assert "lora.safetensors" in view.status.value
    grid = view.grid()
    assert grid.width > 2 * 128 and grid.height > 2 * 128  # 2 prompts × 2 sampling steps, labelled
    files = view.finish(tmp_path, "lora")
    with Image.open(files["loss_plot"]) as im:
        assert im.size == (600, 320)
    with Image.open(files["sample_grid"]) as im:  # no samples_grid.png from training here, so the view writes one
        assert im.size == grid.size
    assert view.steps == [1, 2, 3, 4] and view.losses[-1] == pytest.approx(0.25)


def test_live_view_status_shows_speed_and_eta():
    from lorakit.live import LiveView
    from lorakit.training_setup import Callbacks

    view = LiveView(10, display=False, redraw_s=0.0)
    view.on_step({"step": 4, "loss": 0.5, "total_steps": 10, "it_per_s": 0.05})
    assert "step 4/10" in view.status.value and "0.05 steps/s" in view.status.value
    assert "ETA 2:00" in view.status.value  # 6 steps left at 0.05 steps/s
    assert view.shows_progress and Callbacks([view]).shows_progress
    assert not Callbacks([{"on_step": print}]).shows_progress and not Callbacks(None).shows_progress


def test_live_view_shows_the_validation_loss(tmp_path):
    from lorakit.live import LiveView

    view = LiveView(4, display=False, redraw_s=0.0)
    for step in range(1, 5):
        view.on_step({"step": step, "loss": 1.0 / step, "total_steps": 4,
                      **({"val_loss": 0.9 / step} if step % 2 == 0 else {})})
    assert view.validation == ([2, 4], [0.45, 0.225]) and "validation 0.2250" in view.status.value
    files = view.finish(tmp_path, "lora")
    assert files["loss_plot"].stat().st_size > 0


def test_colab_says_when_files_would_be_lost_or_the_runtime_has_no_gpu():
    """On Colab without Drive a disconnect wipes /content (datasets, LoRAs, the state a resume needs); a CPU
    runtime trains SD for hours. Setup says both, with what to do."""
    notes = colab.colab_notes(on_drive=False, cuda=False)
    assert len(notes) == 2 and "USE_DRIVE = True" in notes[0] and "Change runtime type → T4 GPU" in notes[1]
    assert colab.colab_notes(on_drive=True, cuda=True) == []


def test_a_kernel_started_in_a_checkouts_notebooks_folder_works_in_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    (tmp_path / "lorakit").mkdir()
    (tmp_path / "lorakit" / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    ws = colab.setup(quiet=True)
    assert ws.root == tmp_path and Path.cwd() == tmp_path
    (tmp_path / "elsewhere" / "notebooks").mkdir(parents=True)  # not a checkout: the folder stays
    monkeypatch.chdir(tmp_path / "elsewhere" / "notebooks")
    assert colab.setup(quiet=True).root == tmp_path / "elsewhere" / "notebooks"


def test_ensure_trained_trains_a_missing_lesson_lora_only_for_the_lessons_model(tmp_path):
    """A notebook's LoRA path mistyped for a real model is an error; nothing is trained into its folder."""
    from lorakit.errors import ConfigError
    from lorakit.live import ensure_trained
    from lorakit.toy.examples import make_data_examples

    examples = make_data_examples(tmp_path / "data_examples")
    missing = tmp_path / "output" / "mine" / "typo.safetensors"
    with pytest.raises(ConfigError, match=r"LoRA not found: .*typo.safetensors \(for some/model: check the path"):
        ensure_trained(missing, config=examples["dreambooth_toml"], base_model="some/model")
    assert not missing.parent.exists()
    existing = tmp_path / "have.safetensors"
    existing.write_bytes(b"x")
    assert ensure_trained(existing, config=examples["dreambooth_toml"], base_model="some/model") == existing


def test_the_saved_loss_plot_of_a_resumed_run_shows_the_whole_run(tmp_path, tiny_sd1_dir, monkeypatch):
    """Continued after a disconnect, the notebook's `<name>_loss.png` plots every step of the run, not only the
    steps since the resume."""
    from lorakit import plots
    from lorakit.live import train_live

    plotted = []
    real = plots.save_loss_plot
    monkeypatch.setattr(plots, "save_loss_plot", lambda rows, *a, **k: plotted.append(rows) or real(rows, *a, **k))
    data = tmp_path / "data" / "1_x"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    kw = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
              output_dir=str(tmp_path / "out"), save_state=True, sample_at_end=False)
    train_live(max_train_steps=2, **kw)
    train_live(max_train_steps=4, resume="latest", **kw)
    assert [r["step"] for r in plotted[-1]] == [1, 2, 3, 4]
