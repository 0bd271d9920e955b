"""Named starting points for a job's options, as plain dicts of config values.

A preset is only a set of field values: it goes through the same schema as TOML files and CLI flags
(`TrainConfig.from_dict`), so a preset can never hold an option that does not exist. Forms offer them in a
drop-down; notebooks name one in their parameters cell.

Why these values:
- **T4 presets** (Colab free tier, 15 GB VRAM, fp16 only — no bf16 on Turing): fp16 mixed precision. SD1.5 at
  512 px then needs 3.7 GiB of GPU memory (benchmarks/RESULTS.md), so gradient checkpointing (3.0 GiB, but 1.7×
  slower per step) and 8-bit AdamW (~0.1 GB saved for a LoRA's few million weights, and an extra install) are
  left off; `save_state` with frequent saves so a disconnect loses at most a few hundred steps; aspect-ratio
  buckets, so portraits and landscapes are trained whole instead of cropped to a square.
- **character**: rank 16 / alpha 8 at 1e-4 (U-Net) and half that for the text encoder, ~1,600 steps — the settings
  the popular Colab kits converged on for 15–30 images of one subject; flips off (faces are asymmetric).
- **style**: a style spreads over the whole image, so a higher rank (32), a lower text-encoder rate (it should
  learn less of a single trigger), shuffled tags and flips.
- **workshop**: the built-in toy model on a CPU, small enough to watch a LoRA learn in about a minute.
"""

from __future__ import annotations

from .config import JobConfig, TrainConfig
from .errors import ConfigError
from .toy.examples import WORKSHOP

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_T4 = dict(pretrained_model_name_or_path=SD15, resolution="512", enable_bucket=True, mixed_precision="fp16",
           gradient_checkpointing=False, optimizer_type="AdamW", cache_latents=True, train_batch_size=1,
           save_state=True, save_every_n_steps=400, sample_every_n_steps=200, save_precision="fp16", seed=42)

PRESETS: dict[str, dict[str, dict]] = {
    "train": {
        "SD1.5 character, T4": dict(
            _T4, network_dim=16, network_alpha=8.0, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5,
            max_train_steps=1600, lr_scheduler="cosine", lr_warmup_steps=100, flip_aug=False,
            output_name="character_lora"),
        "SD1.5 style, T4": dict(
            _T4, network_dim=32, network_alpha=16.0, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=2e-5,
            max_train_steps=2400, lr_scheduler="cosine", lr_warmup_steps=100, flip_aug=True, shuffle_caption=True,
            keep_tokens=1, output_name="style_lora"),
        # the settings of the bundled toy lessons (lorakit.toy.examples), one source for both
        "workshop (CPU, toy model)": dict(
            WORKSHOP, resolution=None, gradient_checkpointing=False, unet_lr=None, save_state=False,
            save_every_n_steps=None, output_name="toy_lora"),
    },
}


def presets_for(cls: type[JobConfig] | str) -> dict[str, dict]:
    """The presets of one job (`TrainConfig` or its job name), name → values. Empty for jobs without presets."""
    job = cls if isinstance(cls, str) else cls.job
    return PRESETS.get(job, {})


def preset(name: str, cls: type[JobConfig] = TrainConfig) -> dict:
    """A copy of one preset's values; an unknown name is an error that lists the known ones."""
    known = presets_for(cls)
    if name not in known:
        names = ", ".join(repr(n) for n in known) or "none"
        raise ConfigError(f"unknown preset {name!r} for `{cls.job}`; known presets: {names}")
    return dict(known[name])


def apply_preset(name: str, cls: type[JobConfig] = TrainConfig, **overrides) -> JobConfig:
    """Build a validated config from a preset, with `overrides` on top (e.g. your `train_data_dir`)."""
    return cls.from_dict({**preset(name, cls), **overrides}, where=f" (preset {name!r})")
