"""Sample images during training, from a prompt file in kohya's syntax (`--n --w --h --s --l --d --ss`, see
`lorakit.prompts`), so users can watch the LoRA learn and pick the best checkpoint.

Each sample is a PNG whose text chunks carry its parameters (A1111's `parameters` convention, read by most image
viewers and by `lorakit.hub`), named `<step>_<index>.png` in `<output_dir>/samples/`. Sampling never disturbs
training: the global RNG state is saved and restored around it, and every image uses its own seeded generator.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .errors import ConfigError
from .fileio import atomic_path
from .lora_metadata import SESSION_TEXT, STEP_TEXT
from .prompts import PromptSpec, read_prompt_file
from .text_encoding import COMMA_BACKTRACK, apply_emphasis, encode_windows, has_break, prompt_windows

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@dataclass
class SampleSettings:
    """Defaults for prompt lines that leave a setting unset."""

    width: int
    height: int
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 42
    negative_prompt: str = ""
    sampler: str = "ddim"
    clip_skip: int = 1  # as the LoRA was trained: samples show what users will see in their UI


def prompt_embeddings(comps, ids: torch.Tensor, weights: torch.Tensor | None, clip_skip: int) -> torch.Tensor:
    """Text-encoder states [n, 75·k + 2, d] of prompts' windowed token ids [n, k, 77] (`prompt_windows`); with
    `weights`, A1111's emphasis applied, each prompt's mean kept.

    Done here, not by diffusers, for long prompts (diffusers cuts them at 77 positions), for `clip_skip`
    (diffusers' own reaches for `text_encoder.text_model`, which transformers ≥ 5's `CLIPTextModel` no longer has),
    for emphasis (diffusers reads the brackets as text) and for `BREAK`.
    """
    device = comps.text_encoder.device
    with torch.no_grad():
        states = encode_windows(comps.text_encoder, ids.to(device), clip_skip)
        return states if weights is None else apply_emphasis(states, weights.to(device), keep_mean=True)


def prompt_inputs(comps, prompt: str, negative_prompt: str | None, clip_skip: int,
                  comma_backtrack: int = COMMA_BACKTRACK) -> dict:
    """The text arguments of a pipeline call: the prompts; or, for a prompt longer than 75 tokens, with emphasis
    (`(word:1.2)`), with `BREAK` or with `clip_skip` > 1, the embeddings of prompt and negative prompt (as many
    75-token windows as the longer needs: a prompt is read to the end; `comma_backtrack`: `prompt_windows`)."""
    texts = [prompt, negative_prompt or ""]
    ids, weights = prompt_windows(comps.tokenizer, texts, comma_backtrack)
    if clip_skip > 1 or ids.shape[1] > 1 or weights is not None or any(has_break(t) for t in texts):
        states = prompt_embeddings(comps, ids, weights, clip_skip)
        return dict(prompt_embeds=states[:1], negative_prompt_embeds=states[1:])
    return dict(prompt=prompt, negative_prompt=negative_prompt or None)


# samplers that step through noise levels (k-diffusion's, as A1111 and ComfyUI run them) and start at the largest:
# t = 999 spaced evenly down to 0 ("linspace"), where SD's scheduler config ("leading", offset 1) starts lower
# (t = 951 at 20 steps, σ 11.1 instead of 14.6); DDIM, PNDM and DDPM keep the model's spacing (A1111's DDIM/PLMS)
_FROM_THE_TOP = {"lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                 "dpmsolver++_karras", "dpmsingle", "unipc"}


def make_sampler(name: str, train_scheduler):
    """The diffusers scheduler of sampler `name` on the model's noise schedule (`SAMPLERS`)."""
    import diffusers

    cls_name, extra = SAMPLERS[name]
    if name in _FROM_THE_TOP:  # a zero-terminal-SNR schedule ends in pure noise: start at its last step
        zero_snr = train_scheduler.config.get("rescale_betas_zero_snr", False)
        extra = {"timestep_spacing": "trailing" if zero_snr else "linspace", **extra}
    try:
        return getattr(diffusers, cls_name).from_config(train_scheduler.config, **extra)
    except ImportError as e:  # diffusers' LMS scheduler needs scipy, which lorakit does not install
        raise ConfigError(f"sampler `{name}`: {' '.join(str(e).split())}; or choose another sampler (e.g. "
                          f"euler_a or dpmsolver++)") from None


def load_prompts(path: str | None, fallback: list[str]) -> list[PromptSpec]:
    """The prompt file's prompts, or one prompt per `fallback` caption (the dataset's own, when no file is set)."""
    if path:
        return read_prompt_file(path)
    return [PromptSpec(prompt=p) for p in fallback]


def save_png(image: Image.Image, dest: Path, info: PngImagePlugin.PngInfo | None = None) -> Path:
    """Write a PNG (with text chunks) atomically."""
    with atomic_path(dest) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(dest)


SAMPLER_LABELS = {"ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler",
                  "euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a",
                  "dpmsolver": "DPM-Solver", "dpmsolver++": "DPM++ 2M", "dpmsolver++_karras": "DPM++ 2M",
                  "dpmsingle": "DPM++ 2S", "unipc": "UniPC"}


# the samplers A1111 runs through k-diffusion, whose noise levels A1111 spaces by its "Schedule type": lorakit's are
# spaced evenly in timesteps from the top (A1111's "Uniform"); unnamed, A1111 would pick e.g. Karras for DPM++ 2M
UNIFORM_SCHEDULE = ("lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver++")


def png_parameters(spec: PromptSpec, sampler: str, *, model: str | None = None,
                   loras: list[tuple[str, float]] = (), clip_skip: int = 1) -> str:
    """A1111's `parameters` text, which A1111, ComfyUI and civitai read back: the prompt (with `<lora:name:weight>`
    tags), `Negative prompt:` when there is one, then the settings on one line — with what A1111 needs to make the
    same image: the schedule type, and `RNG: CPU` (the starting noise comes from a CPU generator per image, as with
    A1111's CPU setting)."""
    tags = "".join(f" <lora:{Path(p).stem}:{m:g}>" for p, m in loras)
    lines = [spec.prompt + tags] + ([f"Negative prompt: {spec.negative_prompt}"] if spec.negative_prompt else [])
    settings = {"Steps": spec.num_inference_steps, "Sampler": SAMPLER_LABELS.get(sampler, sampler),
                "Schedule type": "Uniform" if sampler in UNIFORM_SCHEDULE else "Karras" if sampler.endswith("_karras")
                else None,
                "CFG scale": f"{spec.guidance_scale:g}", "Seed": spec.seed, "Size": f"{spec.width}x{spec.height}",
                "Model": Path(model).stem if model else None, "Clip skip": clip_skip if clip_skip > 1 else None,
                "RNG": "CPU"}
    return "\n".join(lines + [", ".join(f"{k}: {_quoted(v)}" for k, v in settings.items() if v is not None)])


def _quoted(value) -> str:
    """A value as A1111 writes it into the settings line: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def saved_rounds(folder: Path, session_id, up_to_step: int, prompts: list[str]) -> list[tuple[int, list[Path]]]:
    """The sampling rounds run `session_id` already wrote to `folder` (`<step>_<index>.png`) up to `up_to_step`, as
    (step, PNG paths in prompt order): what a resumed run's grid starts from. A round drawn from other `prompts`
    (the prompt file was edited before resuming) or missing an image is left out, as is every other run's."""
    found: dict[int, dict[int, tuple[Path, str]]] = {}
    for path in folder.glob("*.png") if folder.is_dir() else ():
        step_part, _, index_part = path.stem.partition("_")
        if not (step_part.isdigit() and index_part.isdigit()):
            continue
        try:
            with Image.open(path) as im:
                info = dict(im.info)
        except OSError:
            continue
        if str(info.get(SESSION_TEXT)) != str(session_id) or str(info.get(STEP_TEXT)) != str(int(step_part)):
            continue
        if int(step_part) <= up_to_step:
            found.setdefault(int(step_part), {})[int(index_part)] = path, str(info.get("prompt", ""))
    rounds = []
    for step, images in sorted(found.items()):
        if sorted(images) == list(range(len(prompts))) and [images[i][1] for i in sorted(images)] == list(prompts):
            rounds.append((step, [images[i][0] for i in sorted(images)]))
    return rounds


@contextlib.contextmanager
def eval_mode(*modules):
    """The modules in eval mode (no dropout) until the block ends, then each back in the mode it was in."""
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


@torch.no_grad()
def generate_samples(components, prompts: list[PromptSpec], settings: SampleSettings, folder: Path, tag: str,
                     *, autocast_dtype: torch.dtype | None = None, extra_text: dict | None = None,
                     ) -> tuple[list[Image.Image], list[Path]]:
    """Generate one image per prompt with the current (LoRA-applied) modules and save them as PNGs."""
    pipe = components.pipeline(scheduler=make_sampler(settings.sampler, components.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    device = components.unet.device
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    images, paths = [], []
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with eval_mode(components.unet, components.text_encoder, components.vae):
            for i, spec in enumerate(prompts):
                spec = spec.with_defaults(width=settings.width, height=settings.height,
                                          num_inference_steps=settings.num_inference_steps,
                                          guidance_scale=settings.guidance_scale, seed=settings.seed,
                                          negative_prompt=settings.negative_prompt, sampler=settings.sampler)
                pipe.scheduler = make_sampler(spec.sampler, components.noise_scheduler)  # this line's, with `--ss`
                generator = torch.Generator(device="cpu").manual_seed(spec.seed)
                with autocast:
                    text = prompt_inputs(components, spec.prompt, spec.negative_prompt, settings.clip_skip)
                    out = pipe(**text, width=spec.width, height=spec.height,
                               num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                               generator=generator, output_type="pil")
                image = out.images[0]
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", png_parameters(spec, spec.sampler, clip_skip=settings.clip_skip))
                info.add_text("prompt", spec.prompt)
                for k, v in (extra_text or {}).items():
                    info.add_text(k, str(v))
                path = save_png(image, folder / f"{tag}_{i:02d}.png", info)
                images.append(image)
                paths.append(path)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return images, paths
