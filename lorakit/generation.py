"""`lorakit generate`: text-to-image with a base model and any number of LoRAs, each at its own multiplier.

LoRAs are applied as peft adapters (`network.apply_lora_file`, the layers training uses) and taken off again
afterwards, so a model passed in by the caller is left as it was. `network_merge` instead adds each LoRA's delta
`multiplier · scale · up @ down` into the weights (`lora_math.merge_weight`) for faster sampling, and restores the
original weights when done. Each image has its own seeded generator (seed + image index), so the same seed gives
the same image whatever the batch. PNGs carry their settings in A1111's `parameters` text chunk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .config.jobs import GenerateConfig
from .devices import pick_device
from .errors import ConfigError, memory_advice
from .host_memory import keep_freed_memory
from .plots import image_grid
from .prompts import PromptSpec, parse_prompt_line, read_prompt_file

DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class GenerateResult:
    """The images (PIL), one grid of them, the PNG paths written and the settings of each image."""

    images: list[Image.Image]
    grid: Image.Image
    paths: list[Path] = field(default_factory=list)
    specs: list[PromptSpec] = field(default_factory=list)


def _prompts(cfg: GenerateConfig, width: int, height: int) -> list[PromptSpec]:
    if cfg.from_file:
        specs = read_prompt_file(cfg.from_file)
    elif cfg.prompt:
        specs = [parse_prompt_line(cfg.prompt, " (in `prompt`)")]  # `a dog --n blurry --d 5` as in a prompt file
    else:
        raise ConfigError("`prompt` is empty: give a prompt, or a prompt file in `from_file`")
    return [s.with_defaults(negative_prompt=cfg.negative_prompt, width=width, height=height,
                            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                            seed=cfg.seed, sampler=cfg.scheduler) for s in specs]


class _FusedLoras:
    """Add LoRA deltas into the weights for the duration of a `with` block; the originals are put back after."""

    def __init__(self, comps, paths, multipliers):
        from .merging import deltas_by_param, load_loras
        from .model_weights import StateDictWeights

        self.weights = StateDictWeights.from_components(comps)
        loras = load_loras(paths)
        self.plan = deltas_by_param(loras, multipliers, self.weights.shapes(), comps.family.name)
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        from .lora_math import merge_weight

        with torch.no_grad():
            for name, mods in self.plan.items():
                w = self.weights.get(name)
                self.saved[name] = w.detach().clone()
                w.copy_(merge_weight(w, [(type(f)(f.up.to(w.device), f.down.to(w.device), f.alpha), r)
                                         for f, r in mods]))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, original in self.saved.items():
                self.weights.get(name).copy_(original)
        return False


class _AdapterLoras:
    """Apply LoRA files as peft adapters (each at its multiplier) for a `with` block, removed after."""

    def __init__(self, comps, paths, multipliers):
        self.comps, self.paths, self.multipliers = comps, paths, multipliers
        self.names: list[str] = []

    def __enter__(self):
        from .network import apply_lora_file, remove_lora

        try:
            for i, (path, mul) in enumerate(zip(self.paths, self.multipliers)):
                net = apply_lora_file(self.comps, path, multiplier=mul, adapter_name=f"generate_{i}")
                self.names.append(net.adapter_name)
        except BaseException:
            for name in self.names:
                remove_lora(self.comps, name)
            raise
        return self

    def __exit__(self, *exc):
        from .network import remove_lora

        for name in self.names:
            remove_lora(self.comps, name)
        return False


MODEL_OPTIONS = ("pretrained_model_name_or_path", "v2", "v_parameterization", "device", "dtype")  # what load_for reads


def load_for(cfg: GenerateConfig):
    """The model `generate(cfg)` samples with, loaded once (a notebook's X/Y grid reuses it for every cell): on the
    chosen device, in `dtype` (unset: fp16 on a CUDA GPU, fp32 elsewhere)."""
    from .models import load_models_from_config

    device = pick_device(cfg)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    return load_models_from_config(cfg, dtype=dtype, device=str(device))


@torch.no_grad()
def generate(cfg: GenerateConfig | None = None, /, *, components=None, **kwargs) -> GenerateResult:
    """Generate images (see `GenerateConfig`); returns a `GenerateResult` with PIL images and a grid.

    `generate(prompt="a photo of sks dog", network_weights=["dog.safetensors"], network_mul=[0.8], seed=1)`.
    `components`: an already loaded `SDComponents` to use instead of loading `pretrained_model_name_or_path`
    (left unchanged afterwards). Set `output_dir=""` to write no files.
    """
    from .sampling import make_sampler, png_parameters, prompt_inputs, save_png

    cfg = GenerateConfig.from_dict(kwargs) if cfg is None else (cfg.replace(**kwargs) if kwargs else cfg)
    for p in cfg.network_weights:
        if not Path(p).is_file():
            raise ConfigError(f"`network_weights`: LoRA file not found: {p}")
    if cfg.output_dir and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"`output_dir` {cfg.output_dir} is a file, not a folder: choose a folder for the images")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    comps = load_for(cfg) if components is None else components
    device = comps.unet.device
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("`dtype = fp16` needs a GPU; use `float` (or `bf16`) on the CPU")
    size = comps.native_resolution
    # the PNGs name the model they were made with: the one loaded here, or the given components' own source
    model_name = cfg.pretrained_model_name_or_path if components is None else getattr(comps, "source", "") or None
    specs = _prompts(cfg, cfg.width or size, cfg.height or size)
    pipe = comps.pipeline(scheduler=make_sampler(cfg.scheduler, comps.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    loras = list(zip(cfg.network_weights, cfg.resolved_mul))
    apply = _FusedLoras if cfg.network_merge else _AdapterLoras
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    start = _next_index(out_dir) if out_dir and out_dir.is_dir() else 0
    images, paths, per_image = [], [], []
    # on a CPU, malloc keeps the memory each denoising step frees for the next one (no page faults per step)
    with memory_advice(f"lower `batch_size` ({cfg.batch_size}: the images stay the same) or the image size"), \
            apply(comps, cfg.network_weights, cfg.resolved_mul), keep_freed_memory(device.type == "cpu"):
        for spec in specs:
            seeds = [(spec.seed if spec.seed is not None else int(torch.randint(0, 2**31 - 1, ()))) + i
                     for i in range(cfg.num_images)]
            pipe.scheduler = make_sampler(spec.sampler, comps.noise_scheduler)  # this line's, with `--ss`
            text = prompt_inputs(comps, spec.prompt, spec.negative_prompt, cfg.clip_skip, cfg.comma_padding_backtrack)
            made = []
            for first in range(0, len(seeds), cfg.batch_size):  # each image has its own generator: batches of any
                batch = seeds[first:first + cfg.batch_size]     # size give the same images
                made += pipe(**text, width=spec.width, height=spec.height, num_inference_steps=spec.num_inference_steps,
                             guidance_scale=spec.guidance_scale, num_images_per_prompt=len(batch),
                             generator=[torch.Generator(device="cpu").manual_seed(s) for s in batch],
                             output_type="pil").images
            for image, seed in zip(made, seeds):
                image_spec = replace(spec, seed=seed)
                images.append(image)
                per_image.append(image_spec)
                if out_dir is not None:
                    info = PngImagePlugin.PngInfo()
                    info.add_text("parameters", png_parameters(image_spec, image_spec.sampler, loras=loras,
                                                               model=model_name, clip_skip=cfg.clip_skip))
                    paths.append(save_png(image, out_dir / f"{start + len(paths):05d}-{seed}.png", info))
    grid = image_grid(images, cols=math.ceil(math.sqrt(len(images))))  # small (toy) images enlarged to be seen
    if out_dir is not None and len(images) > 1:
        paths.append(save_png(grid, out_dir / f"grid-{start:05d}.png"))
    if out_dir is not None:
        print(f"{len(images)} image(s) written to {out_dir}")
    return GenerateResult(images=images, grid=grid, paths=paths, specs=per_image)


def _next_index(out_dir: Path) -> int:
    """The first image number after every `NNNNN-<seed>.png` / `grid-NNNNN.png` already in `out_dir`, so a new run
    never writes over an earlier image (also after some were deleted)."""
    numbers = [int(m[1]) for p in out_dir.glob("*.png") if (m := re.match(r"^(?:grid-)?(\d+)", p.name))]
    return max(numbers, default=-1) + 1
