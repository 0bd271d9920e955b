"""The validation loss (`validation_split`): which images are held out, when the loss is measured, that measuring
it changes nothing in training, and that it is sd-scripts' measurement (fixed timesteps, no augmentations)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import lorakit
import lorakit.training as loop
from lorakit import plots
from lorakit.config import TrainConfig
from lorakit.data.dataset import TrainDataset
from lorakit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = rng.uniform(0, 255, size=3)
    return Image.fromarray(np.stack([(base[c] + 80 * np.sin(xx / (3 + c + seed % 4) + yy / 5)) % 256
                                     for c in range(3)], -1).astype(np.uint8))


def folder(root, name: str, n: int, first_seed: int = 0):
    d = root / name
    d.mkdir(parents=True)
    for i in range(n):
        image(first_seed + i).save(d / f"{i:02d}.png")
    return d


def dataset(tmp_path, **kw) -> TrainDataset:
    cfg = TrainConfig.from_dict(dict(output_dir=str(tmp_path / "out"), max_train_steps=1, resolution="64", **kw))
    return TrainDataset.from_config(cfg, native_resolution=64)


def names(ds) -> set[str]:
    return {ex.item.path.name for ex in ds.examples}


def test_the_split_holds_out_training_images_only_seeded_and_once(tmp_path):
    train = folder(tmp_path / "data", "5_sks toy", 10)
    folder(tmp_path / "reg", "1_toy", 4, first_seed=50)
    ds = dataset(tmp_path, train_data_dir=str(train.parent), reg_data_dir=str(tmp_path / "reg"),
                 validation_split=0.2)
    held = names(ds.validation)
    assert len(held) == 2 and not held & {ex.item.path.name for ex in ds.examples if not ex.item.subset.is_reg}
    assert all(not ex.item.subset.is_reg and ex.item.repeats == 1 for ex in ds.validation.examples)
    assert ds.num_images == 8 and sum(ex.item.repeats for ex in ds.examples if not ex.item.subset.is_reg) == 40
    assert sum(1 for ex in ds.examples if ex.item.subset.is_reg) == 4  # reg images are all kept
    assert any("validation: 2 of 10 images held out" in n for _, n in ds.report.notes)
    assert names(dataset(tmp_path, train_data_dir=str(train.parent), validation_split=0.2).validation) == held
    others = [names(dataset(tmp_path, train_data_dir=str(train.parent), validation_split=0.2,
                            validation_seed=s).validation) for s in range(1, 6)]
    assert any(o != held for o in others)  # the validation seed draws another split
    # at least one image stays for training; a split too small to hold one out is noted
    one = folder(tmp_path / "one", "1_x", 3)
    assert len(dataset(tmp_path, train_data_dir=str(one.parent), validation_split=0.9).validation.examples) == 2
    tiny = dataset(tmp_path, train_data_dir=str(one.parent), validation_split=0.1)
    assert tiny.validation is None and any("too few images here to hold one out" in n for _, n in tiny.report.notes)


def test_validation_batches_have_no_augmentations(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(4):
        image(i).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text("sks, toy, red, blue, green")
    ds = dataset(tmp_path, train_data_dir=str(d), validation_split=0.5, cache_latents=False, flip_aug=True,
                 shuffle_caption=True, caption_dropout_rate=0.5, caption_tag_dropout_rate=0.5, random_crop=True)
    val = ds.validation
    for position in range(6):
        batch = val.load([0], epoch=0, position=position, augment=False)
        assert batch.captions == ["sks, toy, red, blue, green"]
        torch.testing.assert_close(batch.pixels, val.load([0], 0, 0, augment=False).pixels)
    assert len({tuple(ds.load([0], 0, p).captions) for p in range(12)}) > 1  # training batches are augmented


def test_validation_options_need_a_split():
    with pytest.raises(ConfigError, match="set `validation_split`"):
        TrainConfig(train_data_dir="x", validate_every_n_steps=10)
    with pytest.raises(ConfigError, match="validation_split"):
        TrainConfig(train_data_dir="x", validation_split=0.95)
    TrainConfig(train_data_dir="x", validate_every_n_steps=0, validate_every_n_epochs=0)  # off is fine
    TrainConfig(train_data_dir="x", validation_split=0.1, validate_every_n_steps=10, max_validation_steps=2)


def run(tmp_path, tiny_sd1_dir, name, **opts):
    data = tmp_path / "data"
    if not data.exists():
        folder(data, "1_sks toy", 5)
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data),
                           output_dir=str(tmp_path / name), max_train_steps=6, sample_at_end=False,
                           learning_rate=1e-3, validation_split=0.4, network_dropout=0.3, **opts)
    with safe_open(str(result.lora_path), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    return result, weights


def test_validation_is_measured_when_asked_and_changes_nothing_in_training(tmp_path, tiny_sd1_dir, monkeypatch):
    """3 training images (2 held out) make 3 batches an epoch: validated every 2 steps, at each epoch's end and at
    the last step. A run validated only at its end trains exactly the same weights and losses (validation runs
    without dropout and leaves the training's random numbers alone), and its last validation loss is the same (the
    same fixed inputs)."""
    calls = []
    real = loop.denoising_loss

    def spy(batch, run_, diffusion, gen, timestep=None):
        if timestep is not None:
            calls.append((timestep, tuple(batch.captions)))
        return real(batch, run_, diffusion, gen, timestep=timestep)

    monkeypatch.setattr(loop, "denoising_loss", spy)
    often, often_w = run(tmp_path, tiny_sd1_dir, "often", validate_every_n_steps=2)
    rows = {r["step"]: r for r in often.loss_history}
    assert [s for s, r in rows.items() if "val_loss" in r] == [2, 3, 4, 6]
    assert [t for t, _ in calls[:8]] == [200, 400, 600, 800] * 2  # each of the 2 held-out images, 4 timesteps
    assert len(calls) == 4 * 8
    with open(often.history_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert table[1]["val_loss"] and not table[0]["val_loss"]

    calls.clear()
    once, once_w = run(tmp_path, tiny_sd1_dir, "once", validate_every_n_epochs=0, max_validation_steps=1)
    assert [r["step"] for r in once.loss_history if "val_loss" in r] == [6]
    assert len(calls) == 4  # one batch
    assert [r["loss"] for r in once.loss_history] == [r["loss"] for r in often.loss_history]
    assert all(torch.equal(once_w[k], often_w[k]) for k in often_w)
    full, _ = run(tmp_path, tiny_sd1_dir, "full", validate_every_n_epochs=0)
    assert full.loss_history[-1]["val_loss"] == often.loss_history[-1]["val_loss"]
    assert often.loss_history[-1]["val_loss"] != often.loss_history[1]["val_loss"]  # the LoRA learned meanwhile


def test_the_loss_plot_shows_the_validation_loss(tmp_path):
    history = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4, "val_loss": 0.45}, {"step": 3, "loss": 0.3}]
    assert plots.read_validation_history(history) == ([2], [0.45])
    csv_path = tmp_path / "h.csv"
    csv_path.write_text("step,epoch,loss,lr,val_loss\n1,1,0.5,0.001,\n2,1,0.4,0.001,0.45\n")
    assert plots.read_validation_history(csv_path) == ([2], [0.45])
    assert plots.read_loss_history(csv_path) == ([1, 2], [0.5, 0.4])
    fig = plots.loss_figure(*plots.read_loss_history(history), validation=plots.read_validation_history(history))
    assert "validation loss" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert plots.save_loss_plot(history, tmp_path / "loss.png").stat().st_size > 0
