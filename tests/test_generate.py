"""Generate: determinism, LoRA multipliers, fused vs adapters vs a merged model, PNG parameters, prompt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import make_lora
from PIL import Image

from lorakit.errors import ConfigError
from lorakit.generation import generate
from lorakit.merging import merge
from lorakit.model_weights import StateDictWeights
from lorakit.models import load_models, save_single_file
from lorakit.sampling import prompt_inputs
from lorakit.tiny import build_tiny

FAST = dict(num_inference_steps=3, guidance_scale=5.0, output_dir="", scheduler="ddim")


def px(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    comps = build_tiny("sd1", seed=0)
    save_single_file(comps, d / "base.safetensors")
    a = make_lora(comps, d / "a.safetensors", rank=2, seed=1, alpha=1.0, conv=True)
    b = make_lora(comps, d / "b.safetensors", rank=3, seed=2, alpha=3.0, conv=False)
    return d, comps, a, b


def test_same_seed_same_image_and_seed_matters(model):
    d, comps, a, b = model
    one = generate(components=comps, prompt="a photo", seed=7, **FAST).images[0]
    two = generate(components=comps, prompt="a photo", seed=7, **FAST).images[0]
    other = generate(components=comps, prompt="a photo", seed=8, **FAST).images[0]
    assert one.size == (64, 64)
    assert np.array_equal(px(one), px(two))
    assert not np.array_equal(px(one), px(other))


def test_images_are_sampled_in_batches_of_batch_size_and_come_out_the_same(model, monkeypatch):
    """`num_images = 5` with `batch_size = 2` samples 2 + 2 + 1 (a T4 need not hold them all at once); each image
    has its own seeded generator, so the images match one batch of 5 (within float noise of batched kernels)."""
    d, comps, a, b = model
    batches = []
    real = comps.pipeline

    def recording_pipeline(*args, **kwargs):
        pipe = real(*args, **kwargs)
        call = pipe.__class__.__call__
        pipe.__class__ = type("Recorded", (pipe.__class__,), {"__call__": lambda self, *a, **k: batches.append(
            k["num_images_per_prompt"]) or call(self, *a, **k)})
        return pipe

    monkeypatch.setattr(comps, "pipeline", recording_pipeline)
    small = generate(components=comps, prompt="a photo", seed=7, num_images=5, batch_size=2, **FAST)
    assert batches == [2, 2, 1] and [s.seed for s in small.specs] == [7, 8, 9, 10, 11]
    whole = generate(components=comps, prompt="a photo", seed=7, num_images=5, batch_size=5, **FAST)
    assert batches[3:] == [5]
    for x, y in zip(small.images, whole.images):
        assert np.abs(px(x).astype(int) - px(y).astype(int)).max() <= 1


def test_multiplier_zero_is_the_base_image_and_model_is_left_unchanged(model):
    d, comps, a, b = model
    before = {k: v.clone() for k, v in StateDictWeights.from_components(comps).tensors.items()}
    base = generate(components=comps, prompt="a photo", seed=3, **FAST).images[0]
    zero = generate(components=comps, prompt="a photo", seed=3, network_weights=[str(a)], network_mul=[0.0],
                    **FAST).images[0]
    full = generate(components=comps, prompt="a photo", seed=3, network_weights=[str(a)], network_mul=[1.0],
                    **FAST).images[0]
    assert np.abs(px(zero) - px(base)).max() <= 1
    assert np.abs(px(full) - px(base)).mean() > 2  # the LoRA does change the image
    fused = generate(components=comps, prompt="a photo", seed=3, network_weights=[str(a)], network_mul=[1.0],
                     network_merge=True, **FAST).images[0]
    assert np.abs(px(fused) - px(full)).max() <= 2
    after = StateDictWeights.from_components(comps).tensors
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in n for n, _ in comps.unet.named_modules())


def test_two_loras_equal_their_merge(model):
    """LoRAs a, b at (0.7, 0.4) as adapters == the model merged by `merge` at (0.7, 0.4)."""
    d, comps, a, b = model
    merged_path = d / "merged.safetensors"
    merge(sd_model=str(d / "base.safetensors"), models=[str(a), str(b)], ratios=[0.7, 0.4], save_to=str(merged_path),
          overwrite=True)
    merged = load_models(str(merged_path))
    kw = dict(prompt="a red cube", negative_prompt="blurry", seed=11, **FAST)
    with_loras = generate(components=comps, network_weights=[str(a), str(b)], network_mul=[0.7, 0.4], **kw)
    from_merge = generate(components=merged, **kw)
    base = generate(components=comps, **kw)
    assert np.abs(px(with_loras.images[0]) - px(base.images[0])).mean() > 2
    assert np.abs(px(with_loras.images[0]) - px(from_merge.images[0])).max() <= 2


def test_png_parameters_prompt_file_and_grid(model, tmp_path):
    d, comps, a, b = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na cat --n dog --w 64 --h 48 --d 5 --s 2\na dog --l 3\n")
    out = tmp_path / "out"
    result = generate(components=comps, from_file=str(prompts), num_images=2, network_weights=[str(a)],
                      network_mul=[0.5], num_inference_steps=2, output_dir=str(out), scheduler="euler_a",
                      pretrained_model_name_or_path=str(d / "base.safetensors"))
    assert len(result.images) == 4 and len(result.paths) == 5  # 4 images + the grid
    assert result.images[0].size == (64, 48) and result.images[2].size == (64, 64)
    assert [s.seed for s in result.specs[:2]] == [5, 6]
    text = Image.open(result.paths[0]).text["parameters"]
    assert text.startswith("a cat <lora:a:0.5>\nNegative prompt: dog\nSteps: 2, Sampler: Euler a, Schedule type: "
                           "Uniform, CFG scale: 7.5, Seed: 5, Size: 64x48")
    assert a1111_settings(text)["Model"] == Path(comps.source).stem  # the model it was made with
    assert "CFG scale: 3" in Image.open(result.paths[2]).text["parameters"]
    assert result.grid.size == (256, 256)  # 2×2, the 64-px images enlarged to 128-px cells to be seen
    assert Image.open(result.paths[4]).size == result.grid.size


def test_a_prompt_line_chooses_its_sampler(model, tmp_path):
    d, comps, a, b = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --d 4 --ss k_euler_a\na cat --d 4\n")  # sd-scripts' `--ss`, with its k_ name
    result = generate(components=comps, from_file=str(prompts), **{**FAST, "output_dir": str(tmp_path / "out")})
    assert [s.sampler for s in result.specs] == ["euler_a", "ddim"]
    texts = [Image.open(p).text["parameters"] for p in result.paths[:2]]
    assert "Sampler: Euler a" in texts[0] and "Sampler: DDIM" in texts[1]
    euler = generate(components=comps, prompt="a cat --d 4", **{**FAST, "scheduler": "euler_a"}).images[0]
    ddim = generate(components=comps, prompt="a cat --d 4", **FAST).images[0]
    assert np.array_equal(px(result.images[0]), px(euler)) and np.array_equal(px(result.images[1]), px(ddim))
    assert not np.array_equal(px(euler), px(ddim))


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "unipc", "pndm"])
def test_schedulers_by_name(model, scheduler):
    d, comps, a, b = model
    img = generate(components=comps, prompt="x", seed=1, num_inference_steps=2, output_dir="",
                   scheduler=scheduler).images[0]
    assert px(img).std() > 0


def test_bad_input(model, tmp_path):
    d, comps, a, b = model
    with pytest.raises(ConfigError, match="one multiplier per LoRA"):
        generate(components=comps, prompt="x", network_weights=[str(a)], network_mul=[0.5, 0.5], **FAST)
    with pytest.raises(ConfigError, match="not found"):
        generate(components=comps, prompt="x", network_weights=[str(tmp_path / "no.safetensors")], **FAST)
    with pytest.raises(ConfigError, match="prompt"):
        generate(components=comps, **FAST)
    with pytest.raises(ConfigError, match="multiple of 8"):
        generate(components=comps, prompt="x", width=60, **FAST)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="`output_dir` .*notes.txt is a file, not a folder"):
        generate(components=comps, prompt="x", **{**FAST, "output_dir": str(tmp_path / "notes.txt")})


def test_running_out_of_memory_names_the_batch_size(model, monkeypatch):
    from lorakit.errors import OutOfMemory

    d, comps, a, b = model

    class Pipe:
        scheduler = None

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, **kw):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(comps), "pipeline", lambda self, **kw: Pipe())
    with pytest.raises(OutOfMemory, match=r"on the GPU .*: lower `batch_size` \(4: the images stay the same\)"):
        generate(components=comps, prompt="x", **FAST)


def test_a_device_this_machine_lacks_is_a_clear_error(model, monkeypatch):
    d, comps, a, b = model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="`device` is cuda but this machine has no CUDA device"):
        generate(pretrained_model_name_or_path=str(d / "base.safetensors"), prompt="x", device="cuda", **FAST)
    with pytest.raises(ConfigError, match="`device` must be cpu, cuda"):
        generate(pretrained_model_name_or_path=str(d / "base.safetensors"), prompt="x", device="gpu", **FAST)


def test_prompts_longer_than_75_tokens_are_read_to_the_end(model):
    d, comps, a, b = model
    long = ", ".join(f"tag{i}" for i in range(16))  # over 75 tokens with the tiny tokenizer
    assert len(comps.tokenizer.tokenize(long)) > 75
    red = generate(components=comps, prompt=long + ", red", seed=3, **FAST).images[0]
    blue = generate(components=comps, prompt=long + ", blue", seed=3, **FAST).images[0]
    again = generate(components=comps, prompt=long + ", red", seed=3, **FAST).images[0]
    # cut at 77 positions (diffusers' own encoding) the two prompts would be the same: here the ends count
    assert not np.array_equal(px(red), px(blue)) and np.array_equal(px(red), px(again))
    text = prompt_inputs(comps, long, "", clip_skip=1)
    assert text["prompt_embeds"].shape[1] == text["negative_prompt_embeds"].shape[1] == 152  # two windows each
    assert prompt_inputs(comps, "a photo", None, clip_skip=1) == {"prompt": "a photo", "negative_prompt": None}
    # A1111's comma_padding_backtrack: the first window ends after a comma near its end (its tags move on whole);
    # 0 cuts at 75 tokens, and `generate` passes the option through
    cut = prompt_inputs(comps, long, "", clip_skip=1, comma_backtrack=0)["prompt_embeds"]
    assert cut.shape == text["prompt_embeds"].shape and not torch.equal(cut, text["prompt_embeds"])
    default = generate(components=comps, prompt=long, seed=3, **FAST).images[0]
    at_75 = generate(components=comps, prompt=long, seed=3, comma_padding_backtrack=0, **FAST).images[0]
    explicit = generate(components=comps, prompt=long, seed=3, comma_padding_backtrack=20, **FAST).images[0]
    assert not np.array_equal(px(default), px(at_75)) and np.array_equal(px(default), px(explicit))
    # A1111's emphasis is read, not fed to the text encoder as brackets: `(red:1.0)` is `red`, `(red:1.4)` is not
    plain = generate(components=comps, prompt="a photo, red", negative_prompt="blue", seed=3, **FAST).images[0]
    same = generate(components=comps, prompt="a photo, (red:1.0)", negative_prompt="(blue:1.0)", seed=3,
                    **FAST).images[0]
    strong = generate(components=comps, prompt="a photo, (red:1.4)", negative_prompt="blue", seed=3,
                      **FAST).images[0]
    assert np.abs(px(plain).astype(int) - px(same).astype(int)).max() <= 1
    assert not np.array_equal(px(plain), px(strong))
    text = prompt_inputs(comps, "a (photo)", "", clip_skip=1)
    assert text["prompt_embeds"].shape[1] == 77
    # a long negative prompt with a short prompt: both are read in the same number of windows
    neg = generate(components=comps, prompt="a photo", negative_prompt=long + ", red", seed=3, **FAST).images[0]
    neg2 = generate(components=comps, prompt="a photo", negative_prompt=long + ", blue", seed=3, **FAST).images[0]
    assert not np.array_equal(px(neg), px(neg2))


def test_break_starts_a_new_window_of_the_prompt(model):
    d, comps, a, b = model
    text = prompt_inputs(comps, "a photo BREAK red", None, clip_skip=1)
    assert text["prompt_embeds"].shape[1] == text["negative_prompt_embeds"].shape[1] == 152  # two windows each
    # the same words in one window, and in two: different conditioning, the same each time
    joined = generate(components=comps, prompt="a photo red", seed=3, **FAST).images[0]
    broken = generate(components=comps, prompt="a photo BREAK red", seed=3, **FAST).images[0]
    again = generate(components=comps, prompt="a photo BREAK red", seed=3, **FAST).images[0]
    assert not np.array_equal(px(joined), px(broken)) and np.array_equal(px(broken), px(again))
    # a BREAK at the end pads the window the prompt already fills: as the prompt without it
    plain = generate(components=comps, prompt="a photo", seed=3, **FAST).images[0]
    ended = generate(components=comps, prompt="a photo BREAK", seed=3, **FAST).images[0]
    assert np.abs(px(plain).astype(int) - px(ended).astype(int)).max() <= 1


def test_clip_skip_uses_an_earlier_text_encoder_layer(model):
    d, comps, a, b = model
    last = generate(components=comps, prompt="a photo", seed=2, **FAST).images[0]
    skip = generate(components=comps, prompt="a photo", seed=2, clip_skip=2, **FAST).images[0]
    assert np.abs(px(last) - px(skip)).mean() > 1
    with pytest.raises(ConfigError, match="clip_skip"):
        generate(components=comps, prompt="a photo", seed=2, clip_skip=4, **FAST)


def test_cpu_denoising_runs_with_freed_memory_kept(model, monkeypatch):
    """On a CPU every U-Net call of the sampler runs inside `keep_freed_memory` (no page faults per step)."""
    import contextlib

    from lorakit import generation

    d, comps, a, b = model
    state, calls = {"on": False}, []

    @contextlib.contextmanager
    def spy(enabled=True):
        state["on"] = enabled
        yield enabled
        state["on"] = False

    monkeypatch.setattr(generation, "keep_freed_memory", spy)
    hook = comps.unet.register_forward_pre_hook(lambda module, args: calls.append(state["on"]))
    try:
        generate(components=comps, prompt="a photo", seed=7, network_weights=[str(a)], **FAST)
    finally:
        hook.remove()
    assert len(calls) == 3  # one call per denoising step (guidance batches both halves)
    assert all(calls) and not state["on"]


def test_prompt_options_in_the_prompt_and_no_image_is_written_over(model, tmp_path):
    """`prompt` takes kohya's options as a prompt file does; a later run numbers its images after every image
    already there, also after some were deleted (nothing is lost)."""
    d, comps, a, b = model
    out = tmp_path / "out"
    first = generate(components=comps, prompt="a cat --n dog --d 5 --w 64 --h 48", num_images=2,
                     **{**FAST, "output_dir": str(out)})
    assert [s.seed for s in first.specs] == [5, 6] and first.images[0].size == (64, 48)
    assert first.specs[0].prompt == "a cat" and first.specs[0].negative_prompt == "dog"
    assert "Negative prompt: dog" in Image.open(first.paths[0]).text["parameters"]
    first.paths[0].unlink()  # the user deletes an image they did not like
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second = generate(components=comps, prompt="a cat --d 9", num_images=1, **{**FAST, "output_dir": str(out)})
    assert second.paths[0].name == "00002-9.png"
    assert all((out / name).read_bytes() == data for name, data in before.items())


def a1111_settings(parameters: str) -> dict[str, str]:
    """The settings line of a `parameters` text read as A1111's `parse_generation_parameters` reads it: `key: value`
    pairs split at commas, a value in double quotes read as JSON."""
    import json
    import re

    line = parameters.strip().splitlines()[-1]
    pairs = re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)
    return {k: json.loads(v) if v.startswith('"') and v.endswith('"') else v for k, v in pairs}


def test_png_parameters_read_like_a1111s():
    """No `Negative prompt:` line without one (A1111 writes none); `Clip skip` when it is not 1."""
    from lorakit.prompts import PromptSpec
    from lorakit.sampling import png_parameters

    spec = PromptSpec("a cat", None, 64, 48, 20, 7.5, 3)
    # k-diffusion samplers name their schedule (unnamed, A1111 picks its own: Karras for DPM++ 2M); RNG: CPU says
    # where the starting noise came from (A1111's default is the GPU's)
    assert png_parameters(spec, "euler_a") == ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: "
                                               "7.5, Seed: 3, Size: 64x48, RNG: CPU")
    assert "Sampler: DPM++ 2M, Schedule type: Uniform," in png_parameters(spec, "dpmsolver++")
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in png_parameters(spec, "dpmsolver++_karras")
    from lorakit.config import GenerateConfig

    # A1111's names are read: what its PNG info shows, what lorakit's PNGs write
    assert [GenerateConfig(scheduler=n).scheduler for n in ("Euler a", "DPM++ 2M Karras", "DPM++ 2M", "PLMS")] == [
        "euler_a", "dpmsolver++_karras", "dpmsolver++", "pndm"]
    text = png_parameters(PromptSpec("a cat", "dog", 64, 64, 20, 7.0, 3), "ddim", model="models/base.safetensors",
                          loras=[("out/a.safetensors", 0.8)], clip_skip=2)
    assert text == ("a cat <lora:a:0.8>\nNegative prompt: dog\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 3, "
                    "Size: 64x64, Model: base, Clip skip: 2, RNG: CPU")
    # a value with a comma is quoted as A1111 quotes it, and reads back whole
    text = png_parameters(spec, "ddim", model="models/my,model: v2.safetensors")
    assert a1111_settings(text) == {"Steps": "20", "Sampler": "DDIM", "CFG scale": "7.5", "Seed": "3",
                                    "Size": "64x48", "Model": "my,model: v2", "RNG": "CPU"}
    # diffusers' single-step DPM-Solver++ (order 2) is not A1111's stochastic "DPM++ SDE": not labelled as it
    assert "Sampler: DPM++ 2S," in png_parameters(spec, "dpmsingle")


def test_generate_samples_in_fp16_on_a_gpu_unless_told_otherwise(monkeypatch):
    """Unset, `dtype` is fp16 on a CUDA GPU (a T4 samples several times faster) and float on a CPU; set, it is kept."""
    import lorakit.models
    from lorakit import generation

    seen = []

    class Loaded(Exception):
        pass

    def record(cfg, dtype, device):
        seen.append((device, dtype))
        raise Loaded

    monkeypatch.setattr(lorakit.models, "load_models_from_config", record)
    for device, dtype, expected in [("cuda", None, torch.float16), ("cpu", None, torch.float32),
                                    ("cuda", "float", torch.float32)]:
        monkeypatch.setattr(generation, "pick_device", lambda cfg, d=device: torch.device(d))
        with pytest.raises(Loaded):
            generation.generate(prompt="a cat", dtype=dtype)
        assert seen[-1] == (device, expected)


def test_guidance_below_one_and_a1111s_random_seed_are_named(model):
    """diffusers samples any guidance below 1 as 1 (no guidance): refused rather than silently the same image."""
    from lorakit.errors import ConfigError

    d, comps, a, b = model
    with pytest.raises(ConfigError, match=r"`guidance_scale` must be ≥ 1.0, got 0.5"):
        generate(components=comps, prompt="a cat", **{**FAST, "guidance_scale": 0.5})
    with pytest.raises(ConfigError, match=r"`--l` \(guidance scale\) must be ≥ 1 \(1: no guidance, .*got 0.5"):
        generate(components=comps, prompt="a cat --l 0.5", **FAST)
    from lorakit.cli import parse_config

    with pytest.raises(ConfigError, match=r"`seed` must be ≥ 0, got -1 \(A1111's -1 for a random seed is `none`"):
        parse_config(["generate", "--seed", "-1"])
