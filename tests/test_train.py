"""End-to-end training on tiny models: both dataset methods, the saved file, history, samples, callbacks; a learning
test with a known outcome; NaN safety; optimizers and schedules."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

import lorakit
from lorakit.config import TrainConfig
from lorakit.errors import ConfigError, DatasetError, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def pattern(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3)
    arr = np.stack([(base[c] + 80 * np.sin(xx / (3 + c + seed) + yy / (5 + seed % 3))) % 256 for c in range(3)], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def one_image_data(tmp_path, folder: str = "1_x"):
    """`tmp_path/data/<folder>` holding one 64x64 pattern image (`a.png`); returns the folder."""
    d = tmp_path / "data" / folder
    d.mkdir(parents=True)
    pattern(64, 64).save(d / "a.png")
    return d


def read_lora(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class Recorder:
    def __init__(self):
        self.steps, self.samples, self.saves = [], [], []

    def on_step(self, info):
        self.steps.append(info)

    def on_sample(self, step, images, prompts, paths):
        self.samples.append((step, images, prompts, paths))

    def on_save(self, step, path):
        self.saves.append((step, path))


def test_dreambooth_with_reg_images(tmp_path, tiny_sd1_dir):
    from lorakit.network import lora_targets
    from lorakit.tiny import build_tiny

    train_dir, reg_dir = tmp_path / "train" / "2_sks dog", tmp_path / "reg" / "1_dog"
    train_dir.mkdir(parents=True)
    reg_dir.mkdir(parents=True)
    for i in range(2):
        pattern(64, 64, i).save(train_dir / f"{i}.png")
    for i in range(3):
        pattern(64, 64, 10 + i).save(reg_dir / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nsks dog on grass --n blurry --s 4 --l 5 --d 7\na dog --w 64 --h 64 --s 3\n")
    rec = Recorder()
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "train"),
                      reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.7, output_dir=str(tmp_path / "out"),
                      output_name="sks", max_train_steps=6, train_batch_size=2, learning_rate=1e-3,
                      save_every_n_steps=3, sample_prompts=str(prompts), sample_every_n_steps=3)
    result = lorakit.train(cfg, callbacks=rec)

    # the file: every kohya module of SD1 TE + U-Net, metadata, trained (non-zero) up weights
    out = tmp_path / "out"
    assert result.lora_path == out / "sks.safetensors" and result.steps == 6
    tensors, meta = read_lora(result.lora_path)
    targets = lora_targets(build_tiny("sd1"))
    assert set(tensors) == {f"{n}{s}" for n in targets for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_") for n in targets)
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert sum(bool(t.abs().sum() > 0) for t in ups) == len(ups)  # every module moved away from zero
    assert tensors[next(iter(tensors))].dtype == torch.float16  # save_precision default
    assert meta["ss_network_dim"] == "16" and float(meta["ss_network_alpha"]) == 8.0
    # sd-scripts' counts: images × repeats (2 × 2 training draws; 3 × 1 reg images), and the run's shape: 4 training
    # + 4 balanced reg draws = 4 batches of 2 an epoch, 6 steps = 2 epochs
    assert meta["ss_steps"] == "6" and meta["ss_num_reg_images"] == "3" and meta["ss_num_train_images"] == "4"
    assert (meta["ss_num_batches_per_epoch"], meta["ss_num_epochs"], meta["ss_total_batch_size"],
            meta["ss_max_train_steps"]) == ("4", "2", "2", "6")
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks dog": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 3}}
    assert float(meta["ss_prior_loss_weight"]) == 0.7
    import time

    # unix seconds, as sd-scripts writes them (A1111's metadata panel reads them with float())
    started, finished = (float(meta[f"ss_training_{k}_at"]) for k in ("started", "finished"))
    assert time.time() - 600 < started <= finished <= time.time()
    assert json.loads(meta["ss_tag_frequency"]) == {"2_sks dog": {"sks dog": 2}, "1_dog": {"dog": 3}}
    assert json.loads(meta["lorakit.training_config"])["train_data_dir"] == str(tmp_path / "train")
    # the config next to the LoRA reads back to the same config
    assert TrainConfig.from_toml(out / "sks.toml") == cfg

    # history: one row per step, in CSV and JSON
    rows = list(csv.DictReader(open(out / "loss_history.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert [r["loss"] for r in json.loads((out / "loss_history.json").read_text())] == [float(r["loss"]) for r in rows]

    # samples at step 3 and 6 (+ the end), with their parameters in the PNG; the grid
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["000003_00.png", "000003_01.png", "000006_00.png", "000006_01.png"]
    with Image.open(out / "samples" / "000003_00.png") as im:
        assert im.size == (64, 64)
        assert im.info["prompt"] == "sks dog on grass"
        assert "Negative prompt: blurry" in im.info["parameters"] and "Steps: 4" in im.info["parameters"]
        assert "Seed: 7" in im.info["parameters"] and "CFG scale: 5," in im.info["parameters"]
    assert result.samples_grid == out / "samples_grid.png" and result.samples_grid.is_file()

    # callbacks and intermediate saves
    assert [i.step for i in rec.steps] == [1, 2, 3, 4, 5, 6] and rec.steps[-1].total_steps == 6
    assert [s for s, *_ in rec.samples] == [3, 6] and rec.samples[0][2] == ["sks dog on grass", "a dog"]
    assert [(s, p.name) for s, p in rec.saves] == [(3, "sks-step00000003.safetensors"), (6, "sks.safetensors")]
    assert (out / "dataset_report.txt").read_text().startswith("dataset:")


@pytest.mark.slow
def test_captions_bucketing_uncached_v_prediction(tmp_path, tiny_sd2_dir, monkeypatch):
    data = tmp_path / "captions"
    data.mkdir()
    sizes = [(96, 48), (48, 96), (64, 64), (100, 60)]
    for i, size in enumerate(sizes):
        pattern(*size, seed=i).save(data / f"im{i}.png")
        (data / f"im{i}.txt").write_text(f"shape{i}, red, round, small")
    rec = Recorder()
    import lorakit.sampling

    encoded = []  # the samples are conditioned as the LoRA was trained (clip_skip), as the user's UI will
    real_encode = lorakit.sampling.prompt_embeddings
    monkeypatch.setattr(lorakit.sampling, "prompt_embeddings", lambda comps, ids, weights, k: encoded.extend(
        [k] * len(ids)) or real_encode(comps, ids, weights, k))
    result = lorakit.train(
        pretrained_model_name_or_path=str(tiny_sd2_dir), train_data_dir=str(data), output_dir=str(tmp_path / "out"),
        enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, cache_latents=False,
        flip_aug=True, color_aug=True, random_crop=True, shuffle_caption=True, keep_tokens=1,
        caption_dropout_rate=0.2, network_train_unet_only=True, gradient_accumulation_steps=2, min_snr_gamma=5.0,
        noise_offset=0.05, clip_skip=2, optimizer_type="Lion", learning_rate=1e-4, lr_scheduler="cosine",
        lr_warmup_steps=2, max_train_epochs=2, train_batch_size=1, save_precision="float",
        gradient_checkpointing=True, callbacks=rec)
    # 4 images in 3 buckets, batch 1: 4 batches per epoch, accumulation 2 -> 2 steps per epoch, 2 epochs
    assert result.steps == 4 and result.epochs == 2
    tensors, meta = read_lora(result.lora_path)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)  # unet only
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))
    assert tensors[next(iter(tensors))].dtype == torch.float32
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_enable_bucket"] == "True"
    # the steps the epochs came to, as sd-scripts records them
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"], meta["ss_num_batches_per_epoch"],
            meta["ss_total_batch_size"]) == ("4", "2", "4", "2")
    assert encoded and set(encoded) == {2}  # prompt and negative prompt of each sample, at layer -2
    with Image.open(result.sample_paths[0]) as im:
        assert "Clip skip: 2," in im.info["parameters"]
    lrs = [i.lr for i in rec.steps]
    assert lrs[0] == pytest.approx(0.5e-4) and lrs[1] == pytest.approx(1e-4) and lrs[-1] < lrs[1]  # warm-up, cosine
    # the samples default to the dataset's first captions when no prompt file is given
    assert len(result.sample_paths) == 2 and rec.samples[0][2][0].startswith("shape")


# ---------------------------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def crisp_tiny_dir(tmp_path_factory):
    """The tiny SD1 model with a VAE that behaves like a trained one: a near-deterministic posterior (log-variance
    -30) and latents of unit scale. (A random VAE's posterior noise would swamp the image.)"""
    from lorakit.tiny import build_tiny

    comps = build_tiny("sd1", seed=0)
    with torch.no_grad():
        q = comps.vae.quant_conv
        q.weight[:4] *= 25
        q.bias[:4] *= 25
        q.weight[4:] = 0
        q.bias[4:] = -30
    folder = tmp_path_factory.mktemp("tiny-crisp")
    comps.save_pretrained(folder)
    return folder


def denoising_loss(comps, image: Image.Image, caption: str) -> float:
    """MSE of the model's noise prediction on `image`, at fixed timesteps with fixed noise."""
    from lorakit.data.images import image_to_tensor

    with torch.no_grad():
        latent = comps.vae.encode(image_to_tensor(image)[None]).latent_dist.mean * comps.vae.config.scaling_factor
        ts = torch.tensor([100, 300, 500, 700])
        noise = torch.randn((len(ts), *latent.shape[1:]), generator=torch.Generator().manual_seed(123))
        noisy = comps.noise_scheduler.add_noise(latent.expand(len(ts), -1, -1, -1), noise, ts)
        ids = comps.tokenizer([caption] * len(ts), padding="max_length", max_length=77, return_tensors="pt").input_ids
        pred = comps.unet(noisy, ts, comps.text_encoder(ids)[0]).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


@pytest.mark.slow
def test_lora_learns_its_image(tmp_path, crisp_tiny_dir):
    """Train on one image: its denoising loss must fall to under half, and below that of another image."""
    from lorakit.models import load_models
    from lorakit.network import apply_lora_file

    image = pattern(64, 64, 1)
    other = ImageOps.invert(image).transpose(Image.Transpose.ROTATE_90)  # same statistics, different content
    (tmp_path / "data" / "1_zkz").mkdir(parents=True)
    image.save(tmp_path / "data" / "1_zkz" / "a.png")
    comps = load_models(str(crisp_tiny_dir))
    before, before_other = denoising_loss(comps, image, "zkz"), denoising_loss(comps, other, "zkz")
    result = lorakit.train(pretrained_model_name_or_path=str(crisp_tiny_dir), train_data_dir=str(tmp_path / "data"),
                           output_dir=str(tmp_path / "out"), max_train_steps=80, learning_rate=5e-3,
                           network_alpha=16, conv_dim=16, sample_at_end=False, save_precision="float")
    apply_lora_file(comps, result.lora_path)
    after, after_other = denoising_loss(comps, image, "zkz"), denoising_loss(comps, other, "zkz")
    assert after < 0.5 * before
    assert after < 0.85 * after_other
    assert before_other - after_other < before - after  # it learned *this* image, more than denoising in general


def test_network_dropout_with_locon_trains(tmp_path, tiny_sd1_dir):
    """`network_dropout` on every module kind (fused Linear and 1x1 conv, LoCon's 3x3 convs): the run trains, the
    file records the setting, and every module moved."""
    one_image_data(tmp_path, "1_sks toy")
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                           output_dir=str(tmp_path / "out"), max_train_steps=3, learning_rate=1e-3,
                           network_dropout=0.3, network_args=["conv_dim=4"], sample_at_end=False, device="cpu")
    tensors, meta = read_lora(result.lora_path)
    assert float(meta["ss_network_dropout"]) == 0.3
    assert any(".resnets." in k or "_resnets_" in k for k in tensors)  # LoCon modules
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in ups)


def test_rank_and_module_dropout_change_training_reproducibly(tmp_path, tiny_sd1_dir):
    """sd-scripts' `network_args` rank_dropout / module_dropout: a run with them ends elsewhere than one without,
    the same again with the same seed, and the file records them as sd-scripts does."""
    one_image_data(tmp_path, "1_sks toy")
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                max_train_steps=3, learning_rate=1e-3, save_precision="float", sample_at_end=False)
    args = ["conv_dim=4", "rank_dropout=0.3", "module_dropout=0.2"]
    plain = read_lora(lorakit.train(**base, output_dir=str(tmp_path / "a"), network_args=["conv_dim=4"]).lora_path)[0]
    first, meta = read_lora(lorakit.train(**base, output_dir=str(tmp_path / "b"), network_args=args).lora_path)
    again = read_lora(lorakit.train(**base, output_dir=str(tmp_path / "c"), network_args=args).lora_path)[0]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.allclose(first[k], plain[k]) for k in first)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4", "rank_dropout": "0.3",
                                                   "module_dropout": "0.2"}


# ---------------------------------------------------------------------------------------------- safety
def test_nan_loss_stops_and_keeps_the_good_file(tmp_path, tiny_sd1_dir):
    one_image_data(tmp_path)
    common = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), sample_at_end=False)
    good = lorakit.train(max_train_steps=1, **common)
    before = good.lora_path.read_bytes()
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*no NaN weights were written"):
        lorakit.train(max_train_steps=5, learning_rate=1e20, overwrite=True, **common)  # even when asked to
    assert good.lora_path.read_bytes() == before


def test_a_live_view_replaces_the_progress_bar(tmp_path, tiny_sd1_dir, monkeypatch):
    """In a notebook the live view draws progress: the loop's tqdm bar is left out (one bar, not two)."""
    from lorakit import training_setup
    from lorakit.live import LiveView

    asked, make_bar = [], training_setup.Run.progress_bar

    def spy(self, *args, disable=False, **kwargs):
        asked.append(disable)
        return make_bar(self, *args, disable=disable, **kwargs)

    monkeypatch.setattr(training_setup.Run, "progress_bar", spy)
    one_image_data(tmp_path)
    common = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                  sample_at_end=False, max_train_steps=2, cache_latents=False)
    lorakit.train(output_dir=str(tmp_path / "plain"), **common)
    view = LiveView(2, display=False)
    lorakit.train(output_dir=str(tmp_path / "live"), callbacks=[view], **common)
    assert asked == [False, True]  # a bar for the plain run; none beside the live view
    assert view.progress.value == 2


def test_cpu_steps_run_with_freed_memory_kept(tmp_path, tiny_sd1_dir, monkeypatch):
    """On a CPU the loop runs inside `keep_freed_memory` (on, for the whole loop, and off again afterwards)."""
    from lorakit import host_memory, training

    seen, real = [], host_memory.keep_freed_memory

    @contextlib.contextmanager
    def spy(enabled=True):
        with real(enabled) as active:
            seen.append(("on", enabled, active))
            yield active
        seen.append(("off",))

    steps = []
    monkeypatch.setattr(training, "keep_freed_memory", spy)
    one_image_data(tmp_path)
    lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), sample_at_end=False, max_train_steps=2, device="cpu",
                  callbacks=SimpleNamespace(on_step=lambda info: steps.append(list(seen))))
    assert seen == [("on", True, True), ("off",)]
    assert steps == [[("on", True, True)]] * 2  # every step ran with it on


def test_steps_skip_the_input_gradient_of_conv_in_s_skip(tmp_path, tiny_sd1_dir, monkeypatch):
    """Each step's backward pass computes the last up-block ResNet's input gradient for the channels that need one
    only (`lorakit.skip_gradients`): its first convolution and its shortcut, once each per step."""
    from lorakit import skip_gradients

    calls, backward = [], skip_gradients._InputGradOfFirst.backward
    monkeypatch.setattr(skip_gradients._InputGradOfFirst, "backward",
                        staticmethod(lambda ctx, grad: (calls.append(ctx.keep), backward(ctx, grad))[1]))
    one_image_data(tmp_path)
    lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), sample_at_end=False, max_train_steps=2, device="cpu")
    assert calls == [32, 32] * 2  # the tiny U-Net's last ResNet: cat([h, conv_in's output]), 32 + 32 channels


def test_bf16_mixed_precision_trains_on_a_cpu(tmp_path, tiny_sd1_dir):
    """The whole loop under bf16 autocast (fp32 weights and adapters): the same first loss as fp32 within bf16's
    precision, finite weights that trained, and the precision in the metadata."""
    one_image_data(tmp_path)
    runs = {}
    for mp in ("no", "bf16"):
        runs[mp] = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir),
                                 train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / mp),
                                 mixed_precision=mp, learning_rate=1e-3, max_train_steps=3, seed=5,
                                 sample_at_end=False, device="cpu")
    fp32, bf16 = (runs[mp].loss_history for mp in ("no", "bf16"))
    assert all(math.isfinite(r["loss"]) for r in bf16) and len(bf16) == 3
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05)  # before any update: the base model's loss
    assert bf16[0]["loss"] != fp32[0]["loss"]  # computed in bf16 indeed
    weights, meta = read_lora(runs["bf16"].lora_path)
    assert meta["ss_mixed_precision"] == "bf16"
    ups = [t for k, t in weights.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().max() > 0 for t in ups)  # trained: the up weights left zero


def test_the_gpu_fp16_loop_with_its_grad_scaler_runs_on_a_cpu(tmp_path, tiny_sd1_dir, monkeypatch):
    """Colab's set-up — fp16 base weights, fp16 autocast, fp32 adapters, torch's GradScaler (scale, unscale, clip,
    step, update) — run through the whole loop on a CPU, where `mixed_precision = fp16` is otherwise refused."""
    import lorakit.training
    import lorakit.training_setup

    real_precision, real_build = lorakit.training_setup.precision, lorakit.training.build_optimizer
    monkeypatch.setattr(lorakit.training_setup, "precision", lambda cfg, device: (
        (torch.float16, torch.float16) if cfg.mixed_precision == "fp16" else real_precision(cfg, device)))
    scalers = []

    def build_optimizer(cfg, run):  # records each run's grad scaler
        optimizer, scheduler, scaler = real_build(cfg, run)
        scalers.append(scaler)
        return optimizer, scheduler, scaler

    monkeypatch.setattr(lorakit.training, "build_optimizer", build_optimizer)
    one_image_data(tmp_path)
    runs = {mp: lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                              output_dir=str(tmp_path / mp), mixed_precision=mp, learning_rate=1e-3,
                              max_train_steps=3, seed=5, sample_at_end=False, device="cpu") for mp in ("no", "fp16")}
    assert scalers[0] is None and isinstance(scalers[1], torch.amp.GradScaler) and scalers[1].is_enabled()
    fp32, fp16 = (runs[mp].loss_history for mp in ("no", "fp16"))
    assert all(math.isfinite(r["loss"]) for r in fp16) and len(fp16) == 3
    assert fp16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.01) and fp16[0]["loss"] != fp32[0]["loss"]
    weights, meta = read_lora(runs["fp16"].lora_path)
    assert meta["ss_mixed_precision"] == "fp16" and all(torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().max() > 0 for k, t in weights.items() if k.endswith("lora_up.weight"))  # steps were taken


def test_setup_errors_are_clear(tmp_path, monkeypatch, capsys):
    from lorakit.optim import make_optimizer
    from lorakit.training_setup import _attention, precision

    cfg = TrainConfig(train_data_dir=str(tmp_path), mixed_precision="fp16")
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        precision(cfg, torch.device("cpu"))
    assert precision(cfg.replace(mixed_precision="bf16"), torch.device("cpu")) == (torch.float32, torch.bfloat16)
    p = [torch.nn.Parameter(torch.zeros(2))]
    # on Colab the way out is a GPU runtime, not fp32 on a CPU (hours for SD1.5)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    with pytest.raises(ConfigError, match="Runtime → Change runtime type → T4 GPU"):
        precision(cfg, torch.device("cpu"))
    # bf16 on a GPU before Ampere (Colab's T4) is emulated: said before training starts
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert precision(cfg.replace(mixed_precision="bf16"), torch.device("cuda")) == (torch.bfloat16, torch.bfloat16)
    assert "bf16` on Tesla T4: this GPU has no bf16 arithmetic" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    precision(cfg.replace(mixed_precision="bf16"), torch.device("cuda"))
    assert "bf16" not in capsys.readouterr().out
    with pytest.raises(TrainingError, match="AdamW8bit.*CUDA"):
        make_optimizer("AdamW8bit", [{"params": p}], 1e-3, device="cpu")

    class NoXformers:
        def enable_xformers_memory_efficient_attention(self):
            raise ModuleNotFoundError("No module named 'xformers'")

    with pytest.raises(TrainingError, match="xformers.*SDPA"):
        _attention(cfg.replace(xformers=True), NoXformers())
    with pytest.raises(ConfigError, match="min_timestep"):
        cfg.replace(min_timestep=500, max_timestep=400)


def test_bad_device_optimizer_and_network_args_fail_before_the_model_loads(tmp_path, monkeypatch):
    """Each is one line naming the option, raised before any download or latent caching (not a torch traceback
    from inside the optimizer or the device layer)."""
    import lorakit.models

    def no_loading(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(lorakit.models, "load_models", no_loading)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = dict(train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"), max_train_steps=1)
    from lorakit.toy.examples import MARKER

    toy = tmp_path / "lessons"
    (toy / "dreambooth" / "reg").mkdir(parents=True)
    (toy / MARKER).write_text("toy")
    cases = [
        (dict(device="gpu"), ConfigError, "`device` must be cpu, cuda, cuda:N or mps"),
        (dict(device="cuda"), ConfigError, "`device` is cuda but this machine has no CUDA device"),
        (dict(device="cpu", optimizer_args=["weight_decay=abc"]), ConfigError,
         "`optimizer_args` \\['weight_decay=abc'\\] are not accepted by AdamW"),
        (dict(device="cpu", optimizer_type="AdamW8bit"), TrainingError, "AdamW8bit.*CUDA"),
        (dict(device="cpu", optimizer_type="Adafactor", lr_warmup_steps=10), ConfigError,
         "Adafactor with its relative step size .* warms up by itself"),
        # the toy lessons' data, left as a notebook default after switching to a real model
        (dict(device="cpu", pretrained_model_name_or_path="some/model", reg_data_dir=str(toy / "dreambooth" / "reg")),
         ConfigError, r"`reg_data_dir` .* is the toy model's lesson data \(lessons/\), made for `lorakit-toy`, not "
                      r"for some/model: set your own \(or none\)"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            lorakit.train(**base, **options)
    for arg, message in [("conv_dim=abc", "conv_dim='abc': must be an integer"),
                         ("conv_alpha=x", "conv_alpha='x': must be a number"),
                         ("conv_dim=0", "must be an integer ≥ 1")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**base, network_args=[arg])


@pytest.mark.parametrize("name,lr,args", [("AdamW", 0.1, ["weight_decay=0.0"]), ("Lion", 0.05, []),
                                          ("Prodigy", 1.0, []), ("Adafactor", 0.1, ["relative_step=False"]),
                                          ("SGD", 0.1, ["momentum=0.9"]),
                                          ("SGDNesterov", 0.05, [])])
def test_optimizers_minimise_a_quadratic(name, lr, args):
    from lorakit.optim import make_optimizer, make_scheduler

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = make_optimizer(name, [{"params": [w], "lr": lr}], lr, args)
    sched = make_scheduler("constant", opt, warmup_steps=0, total_steps=100)
    start = (w.detach() ** 2).sum().item()
    for _ in range(60):
        loss = (w**2).sum()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert (w.detach() ** 2).sum().item() < 0.5 * start


def test_adafactor_takes_its_relative_step_size_by_default_as_in_sd_scripts():
    """sd-scripts' Adafactor without `relative_step=False` sets its own rate, min(1e-2, 1/√step) × RMS(weights):
    the updates are transformers' Adafactor(lr=None), and the schedule reports that rate whatever the configured
    one. `warmup_init` implies it; with `relative_step=False` the configured rate and schedule drive it."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    from lorakit.optim import make_optimizer, make_scheduler, relative_step_size

    torch.manual_seed(0)
    start, grads = torch.randn(8, 8), [torch.randn(8, 8) for _ in range(3)]
    w, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = make_optimizer("Adafactor", [{"params": [w], "lr": 5e-4}], 5e-4, [])
    sched = make_scheduler("cosine", opt, warmup_steps=0, total_steps=10)
    ref_opt = Adafactor([ref], lr=None)
    assert relative_step_size(opt) and isinstance(sched, AdafactorSchedule)
    for g in grads:
        rms = w.detach().pow(2).mean().sqrt().item()  # of the weights the step starts from
        for p, o in ((w, opt), (ref, ref_opt)):
            p.grad = g.clone()
            o.step()
        sched.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=0, atol=0)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(min(1e-2, 1 / math.sqrt(3)) * rms, rel=1e-6)
    assert relative_step_size(make_optimizer("Adafactor", [{"params": [w]}], 1e-3,
                                             ["relative_step=False", "warmup_init=True"]))
    fixed = make_optimizer("Adafactor", [{"params": [w], "lr": 1e-3}], 1e-3, ["relative_step=False"])
    sched = make_scheduler("linear", fixed, warmup_steps=2, total_steps=10)
    assert not relative_step_size(fixed) and fixed.param_groups[0]["lr"] == 0
    with pytest.raises(ConfigError, match="warms up by itself"):
        make_scheduler("constant", opt, warmup_steps=5, total_steps=10)


def test_a_run_stopped_early_leaves_saves_that_a_new_run_does_not_replace_unasked(tmp_path, tiny_sd1_dir):
    """Killed before its end (no final LoRA, no saved state), a run leaves its intermediate saves: a new run of the
    same name is refused by name, and replaces them with `overwrite`."""
    one_image_data(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora-step00000002.safetensors").write_bytes(b"an earlier run's save")
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                output_dir=str(out), max_train_steps=2, save_every_n_steps=2, sample_at_end=False)
    with pytest.raises(ConfigError, match=r"already holds an earlier run \(lora-step00000002.safetensors\)"):
        lorakit.train(**base)
    assert (out / "lora-step00000002.safetensors").read_bytes() == b"an earlier run's save"
    lorakit.train(**base, overwrite=True)


def test_an_epoch_end_on_a_sampled_step_samples_once(tmp_path, tiny_sd1_dir):
    """With both `sample_every_n_epochs` and `sample_every_n_steps`, a step that ends an epoch and is a multiple of
    the steps is sampled once: one file per prompt, one row of the grid."""
    one_image_data(tmp_path)
    (tmp_path / "p.txt").write_text("a red circle --s 2 --w 32 --h 32\n")
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                           output_dir=str(tmp_path / "out"), max_train_steps=5, sample_prompts=str(tmp_path / "p.txt"),
                           sample_every_n_steps=2, sample_every_n_epochs=2, sample_at_end=False)
    names = [p.name for p in result.sample_paths]  # one image, one step an epoch: steps 2 and 4 by both rules
    assert len(names) == len(set(names)) == 2


def test_the_last_step_is_sampled_when_its_schedule_says_so_without_sample_at_end(tmp_path, tiny_sd1_dir):
    """As in sd-scripts, `sample_every_n_steps` samples the last step when it is a multiple, and
    `sample_every_n_epochs` the end of the last epoch, with `sample_at_end` off."""
    one_image_data(tmp_path)
    (tmp_path / "p.txt").write_text("a red circle --s 2 --w 32 --h 32\n")
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                sample_prompts=str(tmp_path / "p.txt"), sample_at_end=False)
    by_steps = lorakit.train(**base, output_dir=str(tmp_path / "a"), max_train_steps=4, sample_every_n_steps=2)
    assert [p.name for p in by_steps.sample_paths] == ["000002_00.png", "000004_00.png"]
    # one image, one step an epoch
    by_epochs = lorakit.train(**base, output_dir=str(tmp_path / "b"), max_train_epochs=2, sample_every_n_epochs=1)
    assert [p.name for p in by_epochs.sample_paths] == ["000001_00.png", "000002_00.png"]
    off_schedule = lorakit.train(**base, output_dir=str(tmp_path / "c"), max_train_steps=3, sample_every_n_steps=2)
    assert [p.name for p in off_schedule.sample_paths] == ["000002_00.png"]


def test_a_second_run_in_a_held_folder_is_refused_and_touches_nothing(tmp_path, tiny_sd1_dir):
    """Another run writing to `output_dir` (its temporary files in the making) makes a new run stop at once; when
    the first has ended, the folder is free again and no lock file stays behind."""
    from lorakit.fileio import LOCK_NAME, FolderLock

    one_image_data(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    writing = out / ".lora.safetensors.abcd1234.tmp"  # the other run's save, half written
    writing.write_bytes(b"half")
    other = FolderLock.take(out)
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                output_dir=str(out), max_train_steps=1, sample_at_end=False)
    with pytest.raises(ConfigError, match="another lorakit run .* is writing to"):
        lorakit.train(**base)
    assert writing.read_bytes() == b"half"
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, writing.name])
    other.release()
    lorakit.train(**base)
    assert not writing.exists() and not (out / LOCK_NAME).exists() and (out / "lora.safetensors").is_file()


def test_a_run_with_adafactor_records_the_rate_it_took(tmp_path, tiny_sd1_dir, capsys):
    """With the relative step, `learning_rate` is not used (1.0 here would wreck the LoRA): the history's `lr` is
    Adafactor's own rate, and the run says which options it leaves unused."""
    one_image_data(tmp_path)
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                           output_dir=str(tmp_path / "out"), max_train_steps=2, optimizer_type="Adafactor",
                           learning_rate=1.0, sample_at_end=False)
    lrs = [row["lr"] for row in result.loss_history]
    assert all(0 < lr <= 1e-2 for lr in lrs)
    assert all(torch.isfinite(t).all() for t in read_lora(result.lora_path)[0].values())
    assert "learning_rate, unet_lr, text_encoder_lr and lr_scheduler are not used" in capsys.readouterr().out


def test_sgd_nesterov_is_sd_scripts_nesterov_momentum():
    from lorakit.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_optimizer("SGDNesterov", [{"params": params}], 0.1, [])
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert make_optimizer("SGDNesterov", [{"params": params}], 0.1, ["momentum=0.5"]).defaults["momentum"] == 0.5


def test_bitsandbytes_optimizers_by_their_sd_scripts_names(monkeypatch):
    """Each 8-bit / paged name builds its bitsandbytes class (a stand-in module here: bitsandbytes needs CUDA), with
    the groups, rate and `optimizer_args`; without a CUDA device each is one clear line."""
    import sys
    import types

    from lorakit.optim import BNB_OPTIMIZERS, make_optimizer

    made = []

    def stand_in(cls_name):
        def build(groups, lr, **kwargs):
            made.append((cls_name, lr, kwargs))
            return SimpleNamespace(param_groups=groups)
        return build

    fake = types.ModuleType("bitsandbytes")
    fake.optim = SimpleNamespace(**{c: stand_in(c) for c in set(BNB_OPTIMIZERS.values())})
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    for name in BNB_OPTIMIZERS:
        assert name in TrainConfig.spec("optimizer_type").choices
        make_optimizer(name, params, 1e-4, ["weight_decay=0.1"], device="cuda")
        with pytest.raises(TrainingError, match=f"`optimizer_type = {name}` needs a CUDA GPU"):
            make_optimizer(name, params, 1e-4, [], device="cpu")
    assert [m[0] for m in made] == list(BNB_OPTIMIZERS.values())
    assert all(lr == 1e-4 and kwargs["weight_decay"] == 0.1 for _, lr, kwargs in made)
    assert made[-1] == ("SGD8bit", 1e-4, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(TrainingError, match="`optimizer_type = PagedAdamW8bit` needs bitsandbytes"):
        make_optimizer("PagedAdamW8bit", params, 1e-4, [], device="cuda")


def test_adamw_is_fused_and_updates_as_torch_adamw():
    from lorakit.optim import make_optimizer

    torch.manual_seed(0)
    start = [torch.randn(16, 320), torch.randn(320, 16), torch.randn(7)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]

    def run(opt_of):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = opt_of(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return opt, [p.detach() for p in params]

    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 1e-3}]  # noqa: E731
    fused, got = run(lambda ps: make_optimizer("AdamW", groups(ps), 1e-4, ["weight_decay=0.01"], device="cpu"))
    _, want = run(lambda ps: torch.optim.AdamW(groups(ps), lr=1e-4, weight_decay=0.01, foreach=False))
    assert fused.defaults["fused"] is True
    for g, w, s in zip(got, want, start):
        assert not torch.equal(g, s)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    unfused = make_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, ["fused=False"])
    assert not unfused.defaults["fused"]
    assert not make_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3,
                              ["foreach=True"]).defaults.get("fused")


def test_schedules_warm_up():
    from lorakit.optim import make_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler("constant", opt, warmup_steps=4, total_steps=10)  # constant + warm-up = with warm-up
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def schedule(name: str, steps: int, **kwargs) -> list[float]:
    """The learning rates (base 1.0) of `steps` optimizer steps under `make_scheduler(name, ...)`."""
    from lorakit.optim import make_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(name, opt, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_sd_scripts_newer_schedules():
    """cosine_with_min_lr ends at min_lr_ratio × the rate; warmup_stable_decay warms up (from that floor), holds,
    then decays over lr_decay_steps to the floor; inverse_sqrt falls as 1/√(step/timescale) after the warm-up."""
    import math

    lrs = schedule("cosine_with_min_lr", 11, warmup_steps=0, total_steps=10, min_lr_ratio=0.2)
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(0.2 + 0.8 * 0.5) and lrs[10] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    lrs = schedule("warmup_stable_decay", 11, warmup_steps=2, total_steps=10, decay_steps=4, min_lr_ratio=0.1)
    assert lrs[:2] == pytest.approx([0.1, 0.55]) and lrs[2:6] == pytest.approx([1.0] * 4)  # warm-up from the floor
    assert 0.1 < lrs[7] < 1.0 and lrs[10] == pytest.approx(0.1)
    lrs = schedule("inverse_sqrt", 20, warmup_steps=4, total_steps=20, timescale=4)
    assert lrs[4] == pytest.approx(1.0) and lrs[16] == pytest.approx(1 / math.sqrt((16 + 4 - 4) / 4))
    with pytest.raises(ConfigError, match="warmup_stable_decay.*within the 10 training steps"):
        schedule("warmup_stable_decay", 1, warmup_steps=5, total_steps=10, decay_steps=6)
    with pytest.raises(ConfigError, match="needs `lr_decay_steps`"):
        TrainConfig(lr_scheduler="warmup_stable_decay")
    with pytest.raises(ConfigError, match="`lr_decay_steps` must be a whole number"):
        TrainConfig(lr_decay_steps=2.5)


def test_a_schedule_s_options_reach_the_run(tmp_path, tiny_sd1_dir):
    """`lr_decay_steps` as a fraction and `lr_scheduler_min_lr_ratio` from the config shape the run's rates."""
    one_image_data(tmp_path)
    lrs = []
    lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), max_train_steps=4, learning_rate=1e-3, sample_at_end=False,
                  lr_scheduler="warmup_stable_decay", lr_decay_steps=0.5, lr_scheduler_min_lr_ratio=0.25,
                  callbacks=SimpleNamespace(on_step=lambda info: lrs.append(info.lr)))
    assert lrs == pytest.approx([1e-3, 1e-3, 0.625e-3, 0.25e-3])  # rates after steps 1-4: hold, then half a cosine


def test_cli_trains_from_a_toml_and_reports_bad_data(tmp_path, tiny_sd1_dir, capsys):
    from lorakit.cli import main

    d = one_image_data(tmp_path, "1_sks toy")
    (d / "b.png").write_bytes(b"")  # listed in the report, not fatal
    toml = tmp_path / "run.toml"
    toml.write_text(f'pretrained_model_name_or_path = "{tiny_sd1_dir}"\ntrain_data_dir = "{tmp_path / "data"}"\n'
                    f'output_dir = "{tmp_path / "out"}"\nmax_train_steps = 2\nsample_at_end = false\n')
    assert main(["train", "--config", str(toml), "--network_dim", "4"]) == 0
    _, meta = read_lora(tmp_path / "out" / "lora.safetensors")
    assert meta["ss_network_dim"] == "4"
    with Image.open(tmp_path / "out" / "lora_loss.png") as plot:  # the curve a notebook's live view would draw
        assert plot.format == "PNG" and plot.width > 200
    assert "b.png: empty file (0 bytes)" in (tmp_path / "out" / "dataset_report.txt").read_text()
    (d / "a.png").unlink()
    assert main(["train", "--config", str(toml), "--overwrite"]) == 2
    assert "no usable training images" in capsys.readouterr().err


def test_gradient_checkpointing_of_the_text_encoder_is_switched_on_without_a_deprecation_warning(tmp_path,
                                                                                                  tiny_sd1_dir):
    import warnings

    from lorakit.models import load_models

    one_image_data(tmp_path)
    comps = load_models(str(tiny_sd1_dir))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                      output_dir=str(tmp_path / "out"), max_train_steps=1, sample_at_end=False,
                      gradient_checkpointing=True, components=comps)
    assert comps.text_encoder.is_gradient_checkpointing and comps.unet.is_gradient_checkpointing
    assert not [w for w in seen if "checkpointing" in str(w.message)]


def test_a_dataset_with_no_usable_image_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """The error names the folder and why (skipped files listed first), before the model is loaded (on Colab a
    download), and leaves no output folder behind; an output_dir that is a file is named as such."""
    import lorakit.models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lorakit.models, "load_models", no_model)
    empty = tmp_path / "data" / "10_sks dog"
    empty.mkdir(parents=True)
    kw = dict(train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"))
    with pytest.raises(DatasetError, match=r"no usable training images in .*10_sks dog: no image files there \(.png"):
        lorakit.train(**kw)
    (empty / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"10_sks dog: 1 file\(s\) or folder\(s\) skipped, listed above "
                                           r"\(first: .*a.png: "):
        lorakit.train(**kw)
    assert "skipped (1):" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="`output_dir` .*afile is a file, not a folder"):
        lorakit.train(**{**kw, "output_dir": str(tmp_path / "afile")})


def test_an_fp16_step_skipped_for_overflow_leaves_the_lr_schedule():
    """The grad scaler skips a step whose fp16 gradients overflowed (and lowers its scale): the LR schedule must not
    advance then (a warm-up would end early after a run of overflows), as accelerate does. torch's own GradScaler."""
    from lorakit.optim import make_scheduler
    from lorakit.training import optimizer_step

    for overflow in (True, False):
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = make_scheduler("linear", opt, warmup_steps=0, total_steps=10)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale((p * torch.tensor([float("inf") if overflow else 1.0, 1.0])).sum()).backward()
        stepped = optimizer_step(opt, sched, scaler, [p], 1.0)
        assert stepped is not overflow and sched.last_epoch == (0 if overflow else 1)
        assert scaler.get_scale() == (512.0 if overflow else 1024.0)
        assert torch.equal(p.detach(), torch.ones(2)) is overflow and p.grad is None


def test_text_encoder_lr_zero_trains_the_unet_only(tmp_path, tiny_sd1_dir):
    """sd-scripts users switch the text encoder off with `text_encoder_lr = 0`: no text-encoder modules are made
    (a zero-LR group would only cost time and add all-zero modules to the file)."""
    d = tmp_path / "data" / "1_sks dog"
    d.mkdir(parents=True)
    pattern(64, 64).save(d / "0.png")
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                           output_dir=str(tmp_path / "out"), max_train_steps=1, text_encoder_lr=0.0,
                           sample_at_end=False)
    tensors, meta = read_lora(result.lora_path)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_network_train_unet_only"] == "True"
    with pytest.raises(ConfigError, match="nothing to train"):
        TrainConfig(train_data_dir="x", unet_lr=0.0, text_encoder_lr=0.0)


def test_max_token_length_reads_long_captions_in_windows(tmp_path, tiny_sd1_dir):
    """sd-scripts' `max_token_length = 150 / 225`: the U-Net is conditioned on 152 / 227 text positions; without it
    a longer caption is cut at 75 tokens, and the dataset report says so."""
    from lorakit.models import load_models

    d = tmp_path / "captions"
    d.mkdir()
    pattern(64, 64).save(d / "a.png")
    (d / "a.txt").write_text(", ".join(f"tag{i}" for i in range(16)) + ", red")  # ~90 tokens
    comps = load_models(str(tiny_sd1_dir))
    widths = []
    comps.unet.register_forward_pre_hook(lambda module, args: widths.append(args[2].shape[1]))
    common = dict(components=comps, train_data_dir=str(d), max_train_steps=2, sample_at_end=False)
    result = lorakit.train(output_dir=str(tmp_path / "long"), max_token_length=150, **common)
    assert widths == [152, 152]
    tensors, meta = read_lora(result.lora_path)
    assert meta["ss_max_token_length"] == "150" and any(k.startswith("lora_te_") for k in tensors)
    assert "tokens" not in result.report_path.read_text()
    widths.clear()
    result = lorakit.train(output_dir=str(tmp_path / "cut"), **common)
    assert widths == [77, 77]
    report = result.report_path.read_text()
    assert "a.png: caption is" in report and "reads the first 75; max_token_length = 150 or 225" in report
    assert "ss_max_token_length" not in read_lora(result.lora_path)[1]
    with pytest.raises(ConfigError, match="max_token_length"):
        TrainConfig(train_data_dir="x", max_token_length=100)


def test_sd_scripts_noise_options_change_training_and_stay_reproducible(tmp_path, tiny_sd1_dir, monkeypatch):
    import lorakit.training as loop

    data = one_image_data(tmp_path, "1_sks dog").parent
    calls = {}  # what the loop passes to lorakit.noise: each option reaches its function

    def spy(name):
        real = getattr(loop, name)
        return lambda *a, **kw: calls.setdefault(name, (a[2:], kw)) and real(*a, **kw)

    for name in ("training_noise", "input_noise", "snr_weights"):
        monkeypatch.setattr(loop, name, spy(name))
    options = dict(noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01,
                   multires_noise_iterations=6, multires_noise_discount=0.3, ip_noise_gamma=0.1,
                   ip_noise_gamma_random_strength=True, debiased_estimation_loss=True)

    def run(name, **opts):
        rec = Recorder()
        result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data),
                               output_dir=str(tmp_path / name), max_train_steps=3, sample_at_end=False,
                               learning_rate=1e-3, callbacks=rec, **opts)
        return read_lora(result.lora_path), [i.loss for i in rec.steps]

    (a, meta), losses = run("a", **options)
    assert calls["training_noise"][1] == dict(offset=0.05, offset_random_strength=True, adaptive_scale=0.01,
                                              multires_iterations=6, multires_discount=0.3)
    assert calls["input_noise"][0] == (0.1, True)
    assert calls["snr_weights"][1] == dict(v_prediction=False, min_snr_gamma=None, debiased=True,
                                           scale_v_like_noise=False, v_pred_like=None)
    (b, _), again = run("b", **options)
    (plain, _), plain_losses = run("plain")
    assert losses == again and all(torch.equal(a[k], b[k]) for k in a)  # reproducible with the seed
    assert losses != plain_losses and any(not torch.equal(a[k], plain[k]) for k in a)
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"], meta["ss_ip_noise_gamma"],
            meta["ss_debiased_estimation"], meta["ss_adaptive_noise_scale"],
            meta["ss_noise_offset_random_strength"]) == ("6", "0.3", "0.1", "True", "0.01", "True")
    with pytest.raises(ConfigError, match="adaptive_noise_scale"):
        TrainConfig(train_data_dir="x", adaptive_noise_scale=0.01)


def test_sample_at_first_draws_the_starting_point(tmp_path, tiny_sd1_dir):
    data = one_image_data(tmp_path, "1_sks dog").parent
    rec = Recorder()
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data),
                           output_dir=str(tmp_path / "out"), max_train_steps=2, sample_at_first=True,
                           sample_at_end=False, callbacks=rec)
    assert [step for step, *_ in rec.samples] == [0]
    assert [p.name for p in result.sample_paths] == ["000000_00.png"] and result.samples_grid is not None


def test_an_earlier_run_is_never_replaced_without_overwrite(tmp_path, tiny_sd1_dir):
    """Re-running a command must not lose a trained LoRA: refused (before the model loads) unless the run resumes
    or sets `overwrite`."""
    import hashlib

    d = tmp_path / "data" / "1_sks dog"
    d.mkdir(parents=True)
    pattern(64, 64).save(d / "0.png")
    kw = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
              output_dir=str(tmp_path / "out"), output_name="mine", max_train_steps=1, sample_at_end=False)
    first = lorakit.train(**kw, seed=1)
    digest = hashlib.sha256(first.lora_path.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match=r"already holds an earlier run \(mine.safetensors\): set `overwrite = true`"):
        lorakit.train(**kw, seed=2)
    assert hashlib.sha256(first.lora_path.read_bytes()).hexdigest() == digest
    lorakit.train(**{**kw, "output_name": "other"}, seed=2)  # another name in the same folder is fine
    second = lorakit.train(**kw, seed=2, overwrite=True)
    assert hashlib.sha256(second.lora_path.read_bytes()).hexdigest() != digest


def test_a_fractional_lr_warmup_is_that_share_of_the_training_steps(tmp_path, tiny_sd1_dir):
    """`lr_warmup_steps = 0.5` of 4 steps warms up over 2 steps, as `lr_warmup_steps = 2` does."""
    one_image_data(tmp_path)
    runs = {}
    for warmup in (0.5, 2):
        lrs = runs[warmup] = []
        record = SimpleNamespace(on_step=lambda info, lrs=lrs: lrs.append(info.lr))
        lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                      output_dir=str(tmp_path / f"out{warmup}"), max_train_steps=4, learning_rate=1e-3,
                      lr_warmup_steps=warmup, sample_at_end=False, callbacks=record)
    assert runs[0.5] == runs[2]
    assert runs[2][0] < runs[2][1] == runs[2][3] == pytest.approx(1e-3)


def test_loraplus_up_projections_learn_at_the_ratio_of_the_rate(tmp_path, tiny_sd1_dir):
    """LoRA+ (sd-scripts' `network_args` loraplus_*_lr_ratio): after one AdamW step from B = 0 (where A's gradient
    is zero), each up-projection has moved by exactly ratio × as much as without LoRA+, per component; the
    down-projections are the same, and the saved file records the ratios."""
    one_image_data(tmp_path)
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                max_train_steps=1, learning_rate=1e-4, save_precision="float", sample_at_end=False)
    plain = read_lora(lorakit.train(**base, output_dir=str(tmp_path / "plain")).lora_path)[0]
    plus_result = lorakit.train(**base, output_dir=str(tmp_path / "plus"), network_args=[
        "loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=2"])
    plus, meta = read_lora(plus_result.lora_path)
    assert plain.keys() == plus.keys()
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert ups and any(plain[k].abs().max() > 0 for k in ups)
    for key in plain:
        if key.endswith("lora_up.weight"):
            ratio = 2.0 if key.startswith("lora_te_") else 16.0
            torch.testing.assert_close(plus[key], ratio * plain[key], rtol=1e-5, atol=1e-9)
        else:
            torch.testing.assert_close(plus[key], plain[key])
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "2"}
    assert plus_result.loss_history[0]["lr"] == pytest.approx(1e-4)  # the history shows the U-Net's own rate


def test_resuming_with_other_optimizer_groups_is_a_clear_error(tmp_path, tiny_sd1_dir):
    one_image_data(tmp_path)
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                output_dir=str(tmp_path / "out"), sample_at_end=False, save_state=True, save_every_n_steps=1)
    lorakit.train(**base, max_train_steps=1)
    with pytest.raises(TrainingError, match=r"other training options \(network_args \[\] → "
                                            r"\['loraplus_lr_ratio=16'\]\)"):
        lorakit.train(**base, max_train_steps=2, resume="latest", network_args=["loraplus_lr_ratio=16"])
    (tmp_path / "out" / "state-00000001" / "config.toml").unlink()  # a state without its options: the groups tell
    with pytest.raises(TrainingError, match="saved optimizer state does not fit this run.*network_args"):
        lorakit.train(**base, max_train_steps=2, resume="latest", network_args=["loraplus_lr_ratio=16"])


def test_samples_from_an_sd_scripts_toml_prompt_file(tmp_path, tiny_sd1_dir):
    one_image_data(tmp_path)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('[prompt]\nsample_steps = 2\nwidth = 48\nheight = 32\n\n[[prompt.subset]]\nprompt = "a red '
                       'circle"\n\n[[prompt.subset]]\nprompt = "a blue square"\nwidth = 32\nseed = 5\n')
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                           output_dir=str(tmp_path / "out"), max_train_steps=1, sample_prompts=str(prompts))
    sizes = []
    for path in result.sample_paths:
        with Image.open(path) as im:
            sizes.append(im.size)
            assert "a red circle" in im.info["parameters"] or "a blue square" in im.info["parameters"]
    assert sizes == [(48, 32), (32, 32)]


def test_zero_terminal_snr_trains_on_the_rescaled_schedule(tmp_path, tiny_sd2_dir, tiny_sd1_dir, monkeypatch):
    """`zero_terminal_snr` (sd-scripts' option, for v-prediction models): the loop draws x_t from the rescaled
    schedule, which changes the trained weights; the model's scheduler (samples) is left as it was; the file
    records the option."""
    import lorakit.noise

    one_image_data(tmp_path)
    schedules = []
    real = lorakit.noise.training_schedule
    monkeypatch.setattr("lorakit.training.training_schedule",
                        lambda sched, zts=False: schedules.append(real(sched, zts)) or schedules[-1])
    base = dict(pretrained_model_name_or_path=str(tiny_sd2_dir), train_data_dir=str(tmp_path / "data"),
                max_train_steps=2, learning_rate=1e-3, save_precision="float", sample_at_end=False,
                min_snr_gamma=5.0, max_timestep=1000, min_timestep=990)  # the last timesteps, where it differs most
    plain = read_lora(lorakit.train(**base, output_dir=str(tmp_path / "a")).lora_path)[0]
    result = lorakit.train(**base, output_dir=str(tmp_path / "b"), zero_terminal_snr=True)
    zts, meta = read_lora(result.lora_path)
    assert schedules[0].alphas_cumprod[-1] > 0 and schedules[1].alphas_cumprod[-1] == 0
    assert any(not torch.allclose(zts[k], plain[k]) for k in zts)
    assert all(torch.isfinite(t).all() for t in zts.values())
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_min_snr_gamma"] == "5.0"


@pytest.mark.parametrize("model, options, weights", [
    ("sd1", dict(debiased_estimation_loss=True), dict(debiased=True)),
    ("sd2", dict(v_pred_like_loss=0.05), dict(v_pred_like=0.05))])
def test_zero_terminal_snr_loss_weights_read_the_models_own_snr(tmp_path, tiny_sd1_dir, tiny_sd2_dir, model,
                                                                options, weights):
    """As in sd-scripts, the SNR loss weights read the model's own SNR, not the rescaled schedule's, whose last SNR
    is 0 (there 1/√SNR for ε and 1 + λ/s for v are infinite): at t = 999 the loss is the plain loss times the
    weight at the model's SNR, finite."""
    from lorakit.models import load_models
    from lorakit.noise import snr_weights

    one_image_data(tmp_path)
    folder = str(tiny_sd1_dir if model == "sd1" else tiny_sd2_dir)
    base = dict(pretrained_model_name_or_path=folder, train_data_dir=str(tmp_path / "data"), max_train_steps=1,
                learning_rate=1e-3, sample_at_end=False, zero_terminal_snr=True, min_timestep=999, max_timestep=1000)
    plain = lorakit.train(**base, output_dir=str(tmp_path / "a"))
    weighted = lorakit.train(**base, output_dir=str(tmp_path / "b"), **options)
    comps = load_models(folder)
    a = comps.noise_scheduler.alphas_cumprod[999:]
    weight = snr_weights(a / (1 - a), v_prediction=comps.prediction_type == "v_prediction", **weights).item()
    assert 1.1 < weight < 100
    assert weighted.loss_history[0]["loss"] == pytest.approx(plain.loss_history[0]["loss"] * weight, rel=1e-5)
    assert all(torch.isfinite(t).all() for t in read_lora(weighted.lora_path)[0].values())


def test_v_prediction_loss_options_reach_the_loss(tmp_path, tiny_sd2_dir):
    """sd-scripts' scale_v_pred_loss_like_noise_pred and v_pred_like_loss weight each step's loss: the same draws
    (seed) give the loss of a plain run times the weight of its timestep; the file records them."""
    from lorakit.noise import training_schedule

    one_image_data(tmp_path)
    base = dict(pretrained_model_name_or_path=str(tiny_sd2_dir), train_data_dir=str(tmp_path / "data"),
                max_train_steps=1, learning_rate=1e-3, sample_at_end=False, min_timestep=400, max_timestep=401)
    plain = lorakit.train(**base, output_dir=str(tmp_path / "a"))
    scaled = lorakit.train(**base, output_dir=str(tmp_path / "b"), scale_v_pred_loss_like_noise_pred=True,
                           v_pred_like_loss=0.5)
    from lorakit.models import load_models

    a = training_schedule(load_models(str(tiny_sd2_dir)).noise_scheduler).alphas_cumprod[400].item()
    snr = a / (1 - a)
    scale = snr / (snr + 1)
    assert scaled.loss_history[0]["loss"] == pytest.approx(plain.loss_history[0]["loss"] * scale * (1 + 0.5 / scale),
                                                          rel=1e-5)
    meta = read_lora(scaled.lora_path)[1]
    assert meta["ss_scale_v_pred_loss_like_noise_pred"] == "True" and meta["ss_v_pred_like_loss"] == "0.5"
    # min_timestep = max_timestep: every step at that timestep (sd-scripts), here the same 400 as above
    fixed = lorakit.train(**{**base, "max_timestep": 400}, output_dir=str(tmp_path / "c"))
    assert fixed.loss_history[0]["loss"] == pytest.approx(plain.loss_history[0]["loss"], rel=1e-6)


def test_scale_weight_norms_keeps_every_module_within_the_norm(tmp_path, tiny_sd1_dir):
    """Trained fast, modules outgrow a small norm; with `scale_weight_norms` every module of the saved file is within
    it, the history counts the modules scaled back each step (CSV too), and the file records the option."""
    from lorakit.formats import parse_kohya
    from lorakit.lora_math import lora_delta

    one_image_data(tmp_path)
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                max_train_steps=3, learning_rate=1e-2, save_precision="float", sample_at_end=False)

    def norms(result):
        weights = parse_kohya(read_lora(result.lora_path)[0])
        return [lora_delta(w.up, w.down, w.alpha).norm().item() for w in weights.values()]

    free = max(norms(lorakit.train(**base, output_dir=str(tmp_path / "a"))))
    limit = free / 4
    result = lorakit.train(**base, output_dir=str(tmp_path / "b"), scale_weight_norms=limit)
    assert max(norms(result)) <= limit * (1 + 1e-5)
    assert all(r["keys_scaled"] > 0 and r["max_key_norm"] == pytest.approx(limit) for r in result.loss_history[1:])
    with open(tmp_path / "b" / "loss_history.csv") as f:
        assert next(csv.reader(f)) == ["step", "epoch", "loss", "lr", "keys_scaled", "max_key_norm"]
    assert float(read_lora(result.lora_path)[1]["ss_scale_weight_norms"]) == pytest.approx(limit)


def test_dim_from_weights_continues_a_lora_with_its_own_ranks(tmp_path, tiny_sd1_dir):
    """sd-scripts' dim_from_weights: training goes on from `network_weights` with its modules, ranks and alphas
    (here rank 4 / alpha 2 and LoCon rank 2, not the config's 16 / 8), and the file and config say so."""
    one_image_data(tmp_path)
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                max_train_steps=2, learning_rate=1e-3, save_precision="float", sample_at_end=False)
    first = lorakit.train(**base, output_dir=str(tmp_path / "a"), network_dim=4, network_alpha=2,
                          network_args=["conv_dim=2", "conv_alpha=1"])
    start, _ = read_lora(first.lora_path)
    result = lorakit.train(**base, output_dir=str(tmp_path / "b"), network_weights=str(first.lora_path),
                           dim_from_weights=True)
    tensors, meta = read_lora(result.lora_path)
    assert tensors.keys() == start.keys()
    assert all(tensors[k].shape == start[k].shape for k in start)
    assert any(not torch.equal(tensors[k], start[k]) for k in start if k.endswith("lora_up.weight"))
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    saved = TrainConfig.from_toml(tmp_path / "b" / "lora.toml")
    assert (saved.network_dim, saved.conv_dim, saved.dim_from_weights) == (4, 2, True)
    unet_only = lorakit.train(**base, output_dir=str(tmp_path / "c"), network_dim=4, network_train_unet_only=True)
    again = lorakit.train(**base, output_dir=str(tmp_path / "d"), network_weights=str(unet_only.lora_path),
                          dim_from_weights=True)  # a file without text-encoder modules trains none
    tensors, meta = read_lora(again.lora_path)
    assert meta["ss_network_train_unet_only"] == "True" and all(k.startswith("lora_unet_") for k in tensors)
    with pytest.raises(ConfigError, match="set `network_weights` too"):
        TrainConfig(dim_from_weights=True)


def test_network_weights_starts_from_a_lora_and_drops_nothing_unsaid(tmp_path, tiny_sd1_dir, capsys):
    """sd-scripts' network_weights without dim_from_weights: the new LoRA starts from the file's weights. A file that
    does not fit is refused by name rather than partly loaded: another family's, a module matching no layer, LoCon
    modules this run's LoRA lacks; a part the run does not train is named."""
    from lorakit.errors import LoraFormatError
    from lorakit.fileio import save_safetensors

    one_image_data(tmp_path)
    base = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                max_train_steps=1, save_precision="float", sample_at_end=False, network_dim=4, network_alpha=2)
    first = lorakit.train(**base, output_dir=str(tmp_path / "a"), learning_rate=1e-2, network_args=["conv_dim=2"])
    start, _ = read_lora(first.lora_path)
    same = lorakit.train(**base, output_dir=str(tmp_path / "b"), learning_rate=1e-12, network_args=["conv_dim=2"],
                         network_weights=str(first.lora_path))  # a step too small to move: the file's weights
    tensors, _ = read_lora(same.lora_path)
    assert tensors.keys() == start.keys() and all(torch.allclose(tensors[k], start[k], atol=1e-9) for k in start)
    assert any(start[k].abs().max() > 1e-4 for k in start if k.endswith("lora_up.weight"))  # not a fresh LoRA's 0
    with pytest.raises(ConfigError, match=r"modules are not in the LoRA this run trains .* 3x3 convolutions "
                                          r"\(LoCon\): set `network_args = \[\"conv_dim=R\"\]`"):
        lorakit.train(**base, output_dir=str(tmp_path / "c"), network_weights=str(first.lora_path))
    capsys.readouterr()
    unet_only = lorakit.train(**base, output_dir=str(tmp_path / "d"), network_args=["conv_dim=2"],
                              network_train_unet_only=True, network_weights=str(first.lora_path))
    assert "the file's 12 text encoder modules are left out" in capsys.readouterr().out
    assert all(k.startswith("lora_unet_") for k in read_lora(unet_only.lora_path)[0])
    for key, words in [("lora_te1_text_model_encoder_layers_0_mlp_fc1", "SDXL"),
                       ("lora_unet_mid_block_attentions_0_no_such_layer", "match no layer of this model")]:
        odd = {**start, f"{key}.lora_down.weight": torch.ones(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4),
               f"{key}.alpha": torch.tensor(2.0)}
        save_safetensors(odd, tmp_path / "odd.safetensors")
        with pytest.raises(LoraFormatError, match=words):
            lorakit.train(**base, output_dir=str(tmp_path / "e"), network_args=["conv_dim=2"],
                          network_weights=str(tmp_path / "odd.safetensors"))


def test_base_weights_are_merged_before_training_and_a_given_model_comes_back(tmp_path, tiny_sd1_dir):
    """sd-scripts' base_weights: the model trains with those LoRAs merged in (at their multipliers), so the new
    LoRA's first loss is that of the merged model; a model passed in is given back with its own weights, also
    when the set-up fails."""
    from lorakit.merging import merge
    from lorakit.models import load_models

    one_image_data(tmp_path)
    base = dict(train_data_dir=str(tmp_path / "data"), max_train_steps=1, learning_rate=1e-3, sample_at_end=False,
                save_precision="float", network_dim=4, network_alpha=4)
    style = lorakit.train(**{**base, "learning_rate": 0.05, "max_train_steps": 3},
                          pretrained_model_name_or_path=str(tiny_sd1_dir), output_dir=str(tmp_path / "s")).lora_path
    merged = tmp_path / "merged"
    merge(sd_model=str(tiny_sd1_dir), models=[str(style)], ratios=[0.7], save_to=str(merged))
    on_merged = lorakit.train(**base, pretrained_model_name_or_path=str(merged), output_dir=str(tmp_path / "a"))
    comps = load_models(str(tiny_sd1_dir))
    own = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    stacked = lorakit.train(**base, pretrained_model_name_or_path=str(tiny_sd1_dir), output_dir=str(tmp_path / "b"),
                            base_weights=[str(style)], base_weights_multiplier=[0.7], components=comps)
    assert stacked.loss_history[0]["loss"] == pytest.approx(on_merged.loss_history[0]["loss"], rel=1e-4)
    plain = lorakit.train(**base, pretrained_model_name_or_path=str(tiny_sd1_dir), output_dir=str(tmp_path / "c"))
    assert plain.loss_history[0]["loss"] != pytest.approx(stacked.loss_history[0]["loss"], rel=1e-3)
    assert all(torch.equal(v, own[k]) for k, v in comps.unet.state_dict().items())  # given back as it was
    with pytest.raises(ConfigError):  # the set-up fails after the merge: the model still comes back
        lorakit.train(**base, pretrained_model_name_or_path=str(tiny_sd1_dir), output_dir=str(tmp_path / "d"),
                      base_weights=[str(style)], components=comps, sample_prompts=str(tmp_path / "missing.txt"))
    assert all(torch.equal(v, own[k]) for k, v in comps.unet.state_dict().items())
    assert not any("lora" in k for k in comps.unet.state_dict())
    with pytest.raises(ConfigError, match="2 values for 1 `base_weights`"):
        TrainConfig(base_weights=["a.safetensors"], base_weights_multiplier=[0.5, 0.5])


def test_samples_without_a_prompt_file_use_the_captions_as_trained(tmp_path, tiny_sd1_dir):
    """The fallback sample prompts are the first captions as the text encoder saw them: with the caption prefix,
    without the keep_tokens_separator marker."""
    d = one_image_data(tmp_path)
    (d / "a.txt").write_text("red ||| round, small")
    result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                           output_dir=str(tmp_path / "out"), max_train_steps=1, caption_prefix="sks",
                           keep_tokens_separator="|||")
    with Image.open(result.sample_paths[0]) as im:
        assert im.info["parameters"].startswith("sks red, round, small\n")


def test_weighted_captions_weight_the_emphasised_tokens(tmp_path, tiny_sd1_dir):
    """Known outcomes: `(sks:1.0) toy` read with weighted_captions trains exactly as `sks toy` without it (the same
    tokens, weights 1); `(sks:1.5) toy` trains otherwise; without weighted_captions the brackets are text."""
    def run(name, caption, **opts):
        data = tmp_path / name / "data"
        data.mkdir(parents=True)
        pattern(64, 64).save(data / "a.png")
        (data / "a.txt").write_text(caption)
        result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data),
                               output_dir=str(tmp_path / name / "out"), max_train_steps=2, sample_at_end=False,
                               learning_rate=1e-3, **opts)
        return read_lora(result.lora_path)[0]

    plain = run("plain", "sks toy")
    same = run("same", "(sks:1.0) toy", weighted_captions=True)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    for name, caption, opts in [("up", "(sks:1.5) toy", dict(weighted_captions=True)),
                                ("text", "(sks:1.0) toy", {})]:
        other = run(name, caption, **opts)
        assert any(not torch.equal(plain[k], other[k]) for k in plain), name


def test_loss_types_measure_the_same_prediction_as_their_formulas_say(tmp_path, tiny_sd1_dir):
    """The first step's prediction is the same in every run (same seed): there, Huber with a huge constant threshold
    is the squared error, smooth L1 with a tiny one twice the L1 loss; each loss then trains its own LoRA."""
    data = one_image_data(tmp_path, "1_sks toy").parent

    def run(name, **opts):
        result = lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data),
                               output_dir=str(tmp_path / name), max_train_steps=2, sample_at_end=False,
                               learning_rate=1e-3, **opts)
        return [r["loss"] for r in result.loss_history], read_lora(result.lora_path)

    l2, (l2_w, _) = run("l2")
    l1, _ = run("l1", loss_type="l1")
    huber, (huber_w, meta) = run("huber", loss_type="huber", huber_schedule="constant", huber_c=100.0)
    smooth, _ = run("smooth", loss_type="smooth_l1", huber_schedule="constant", huber_c=1e-4)
    assert huber[0] == pytest.approx(l2[0], rel=1e-3) and smooth[0] == pytest.approx(2 * l1[0], rel=1e-3)
    assert l1[0] != pytest.approx(l2[0], rel=1e-2)
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "constant", "100.0")
    snr, (snr_w, _) = run("snr", loss_type="huber")  # sd-scripts' default schedule
    assert all(math.isfinite(v) for v in snr) and any(not torch.equal(snr_w[k], l2_w[k]) for k in l2_w)
    with pytest.raises(ConfigError, match="huber_c` > 0"):
        TrainConfig(train_data_dir="x", loss_type="huber", huber_c=0.0)
    with pytest.raises(ConfigError, match="must be < 1"):
        TrainConfig(train_data_dir="x", loss_type="huber", huber_schedule="exponential", huber_c=2.0)


def test_a_full_size_unet_on_the_cpu_is_told_how_long_the_run_may_take(tmp_path, tiny_sd1_dir, monkeypatch, capsys):
    from lorakit import training_setup
    from lorakit.training_setup import cpu_training_note

    assert cpu_training_note(3_000_000, 1000, 1, 512 * 512) is None  # the toy and test models: nothing to say
    note = cpu_training_note(859_520_964, 1000, 1, 512 * 512)
    assert "860M parameters" in note and "10–40 s a step" in note and "2.8 h–11.1 h" in note
    assert "10–40 s" not in cpu_training_note(859_520_964, 60, 2, 768 * 768)  # 2 images of 2.25× the pixels
    assert "45–180 s a step, so 60 steps take about 45 min–3.0 h" in cpu_training_note(859_520_964, 60, 2, 768 * 768)

    data = one_image_data(tmp_path, "1_sks dog").parent
    lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data),
                  output_dir=str(tmp_path / "a"), max_train_steps=1, sample_at_end=False)
    assert "full-size" not in capsys.readouterr().out
    monkeypatch.setattr(training_setup, "FULL_SIZE_UNET", 1)  # the tiny U-Net counts as full size
    lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(data),
                  output_dir=str(tmp_path / "b"), max_train_steps=1, sample_at_end=False, resolution="64")
    out = capsys.readouterr().out
    assert "⚠ a full-size Stable Diffusion U-Net" in out and "0.2–0.6 s a step" in out, out


def test_overwrite_removes_the_replaced_run_s_leftovers_once_the_new_run_has_finished(tmp_path, tiny_sd1_dir, capsys):
    """`overwrite` replaces the earlier run of its name: its intermediate saves, states, samples and grid do not
    linger to be mistaken for the new run's (or pushed with it). Another name's run in the folder keeps its files,
    and a replacing run that fails removes nothing."""
    one_image_data(tmp_path, "1_sks dog")
    out = tmp_path / "out"
    kw = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
              output_dir=str(out), sample_at_end=False)
    lorakit.train(**{**kw, "sample_at_end": True}, output_name="other", max_train_steps=1)
    keep = {"other.safetensors", "samples/000001_00.png"}
    lorakit.train(**kw, output_name="mine", max_train_steps=4, save_every_n_steps=2, save_state=True,
                  sample_every_n_steps=2)
    earlier = {"mine-step00000002.safetensors", "state-00000002", "state-00000004", "samples/000002_00.png",
               "samples/000004_00.png", "samples_grid.png"}  # the grid: now mine's
    assert all((out / name).exists() for name in earlier | keep)
    (out / "mine_loss.png").write_bytes(b"the earlier run's plot")

    def fail(info):
        raise RuntimeError("stopped by a callback")

    with pytest.raises(RuntimeError, match="stopped by a callback"):
        lorakit.train(**kw, output_name="mine", max_train_steps=2, overwrite=True, callbacks={"on_step": fail})
    assert all((out / name).exists() for name in earlier | keep)  # a failed run replaced nothing
    capsys.readouterr()
    lorakit.train(**kw, output_name="mine", max_train_steps=3, overwrite=True, save_every_n_steps=2)
    assert "removed 6 file(s) of the earlier run that this one replaced" in capsys.readouterr().out
    rewritten = {"mine-step00000002.safetensors", "mine.safetensors"}  # by the new run, at the same paths
    assert not any((out / name).exists() for name in (earlier - rewritten) | {"mine_loss.png"})
    assert all((out / name).exists() for name in keep | rewritten)


def test_a_replacing_run_stopped_and_resumed_still_removes_the_earlier_run(tmp_path, tiny_sd1_dir, capsys):
    """The earlier run's files that an `overwrite` run replaces are kept with its saved states: stopped and resumed,
    it removes them when it ends, and keeps what it wrote itself at the same paths."""
    one_image_data(tmp_path)
    out = tmp_path / "out"
    kw = dict(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
              output_dir=str(out), sample_at_end=False, save_state=True)
    lorakit.train(**kw, max_train_steps=4, save_every_n_steps=2)  # the earlier run: states at steps 2 and 4

    def stop_at_2(info):
        if info.step == 2:
            raise RuntimeError("disconnected")

    with pytest.raises(RuntimeError, match="disconnected"):
        lorakit.train(**kw, max_train_steps=3, save_every_n_steps=1, overwrite=True, callbacks={"on_step": stop_at_2})
    assert (out / "state-00000004").is_dir()  # not removed by a run that did not finish
    capsys.readouterr()
    lorakit.train(**kw, max_train_steps=3, save_every_n_steps=1, resume="latest")
    assert "removed 1 file(s) of the earlier run that this one replaced" in capsys.readouterr().out
    assert not (out / "state-00000004").exists()
    assert sorted(p.name for p in out.glob("state-0*")) == ["state-00000001", "state-00000002", "state-00000003"]
    assert TrainConfig.from_toml(out / "state-00000002" / "config.toml").max_train_steps == 3  # the new run's


def test_an_output_dir_inside_the_training_images_is_refused(tmp_path, tiny_sd1_dir):
    """The next run would train on the samples grid and loss plot written there."""
    folder = one_image_data(tmp_path, "10_sks dog")
    for out in (folder / "out", tmp_path / "data"):
        with pytest.raises(ConfigError, match=r"`output_dir` .* is inside `train_data_dir`"):
            lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                          output_dir=str(out), max_train_steps=1)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]


def test_running_out_of_memory_says_what_needs_less(tmp_path, tiny_sd1_dir):
    """Colab's T4 runs out of memory before anything else: the error names the settings that need less, with
    torch's own message kept as its cause."""
    from lorakit.errors import OutOfMemory, memory_advice

    one_image_data(tmp_path)

    def oom(info):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 14.75 GiB total)")

    with pytest.raises(OutOfMemory, match=r"out of memory on the GPU \(CUDA out of memory\. Tried.*\): set "
                                          r"`gradient_checkpointing = true`, a lower `train_batch_size`") as e:
        lorakit.train(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(tmp_path / "data"),
                      output_dir=str(tmp_path / "out"), max_train_steps=2, callbacks={"on_step": oom})
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(OutOfMemory, match=r"on this machine \(\[enforce fail .*can't allocate memory.*\): lower"):
        with memory_advice("lower it"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(RuntimeError, match="^something else$"):  # other errors pass through as they are
        with memory_advice("lower it"):
            raise RuntimeError("something else")
