"""The `train` job's options, spelled as sd-scripts spells them so its users feel at home.

lorakit's defaults differ from sd-scripts' in a few deliberate places, each for the user:
- `network_dim = 16`, `network_alpha = 8` (scale 0.5): sd-scripts' alpha 1 trains weakly, the most common
  complaint; 16/8 is what the popular Colab kits settled on.
- `cache_latents = true`: ~40% less work per step; turn it off for `color_aug`/`random_crop`.
- `resolution` unset means the model's native size (512 for SD1, 768 for SD2-v, 32 for the toy model).
- `seed = 42`: runs are reproducible unless asked otherwise.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .schema import JobConfig, check_extension, option, parse_resolution

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGD", "SGDNesterov", "PagedAdamW8bit",
              "PagedAdamW", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit", "SGDNesterov8bit")  # the last six: CUDA
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay")
PRECISIONS = ("no", "fp16", "bf16")
RESIZE_FILTERS = ("lanczos", "area", "box", "bicubic", "bilinear", "nearest")
RESIZE_ALIASES = {"cubic": "bicubic", "linear": "bilinear"}  # sd-scripts' (OpenCV's) other names
HUBER_LOSSES = ("huber", "smooth_l1")  # the losses with a threshold (huber_c)
LOSS_TYPES = ("l2", "l1", *HUBER_LOSSES)
HUBER_SCHEDULES = ("snr", "exponential", "constant")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
SAMPLERS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsolver++_karras", "dpmsingle", "unipc")
SAMPLER_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                   "k_dpm_2_a": "dpm_2_a",  # sd-scripts' other names; A1111's (as lorakit's PNGs write them):
                   "Euler a": "euler_a", "DPM2": "dpm_2", "DPM2 a": "dpm_2_a", "DPM++ 2M": "dpmsolver++",
                   "PLMS": "pndm", "DPM++ 2M Karras": "dpmsolver++_karras"}


# train_network.py's defaults where lorakit's differ on purpose (README: "Defaults that differ from sd-scripts"),
# in words: {option: sd-scripts' default}
SD_SCRIPTS_DEFAULTS = {
    "learning_rate": "2e-06, a full fine-tune's rate, which the text encoder's LoRA gets when only unet_lr is set",
    "network_dim": "4",
    "network_alpha": "1",
    "caption_extension": '".caption"',
    "seed": "a random one",
    "cache_latents": "false",
    "save_precision": "fp32",
    "output_name": '"last"',
}

# sd-scripts' `network_args` for networks.lora that lorakit reads: {key: (type, valid, what it must be)}
NETWORK_ARGS = {
    "conv_dim": (int, lambda v: v >= 1, "an integer ≥ 1"),
    "conv_alpha": (float, lambda v: v >= 0, "a number ≥ 0"),
    **dict.fromkeys(("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"),
                    (float, lambda v: v > 0, "a number > 0")),
    **dict.fromkeys(("rank_dropout", "module_dropout"), (float, lambda v: 0 <= v < 1, "a number in [0, 1)")),
}
# those it does not have: refused by name unless off (0, false, none), as GUI-made configs write them
UNSUPPORTED_NETWORK_ARGS = {
    **dict.fromkeys(("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"), "per-block ranks"),
    **dict.fromkeys(("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"),
                    "per-block learning rates"),
    **dict.fromkeys(("algo", "preset", "use_tucker", "use_cp", "use_scalar", "rank_dropout_scale", "train_norm",
                     "factor", "decompose_both", "dora_wd", "bypass_mode", "constraint", "block_size"),
                    "LyCORIS networks (lorakit trains LoRA, and LoCon with conv_dim)"),
}
_OFF_WORDS = ("", "0", "0.0", "false", "none")


def parse_network_args(args: list[str], where: str = "") -> dict:
    """`["conv_dim=8", "loraplus_lr_ratio=16"]` as `{"conv_dim": 8, "loraplus_lr_ratio": 16.0}`, each value
    checked; an sd-scripts key lorakit lacks is refused by name (unless off), an unknown key with the closest one."""
    out = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"`network_args` entries must be key=value, got {arg!r}{where}")
        key, text = (part.strip() for part in arg.split("=", 1))
        if key in UNSUPPORTED_NETWORK_ARGS:
            if text.lower() in _OFF_WORDS:
                continue
            raise ConfigError(f"`network_args` {key}={text}{where}: lorakit does not have "
                              f"{UNSUPPORTED_NETWORK_ARGS[key]} (an sd-scripts option); remove it")
        if key not in NETWORK_ARGS:
            close = difflib.get_close_matches(key, list(NETWORK_ARGS), n=1)
            raise ConfigError(f"`network_args` has an unknown key {key!r}{where}"
                              + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (lorakit reads {', '.join(NETWORK_ARGS)})")
        kind, valid, what = NETWORK_ARGS[key]
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise ConfigError(f"`network_args` {key}={text!r}{where}: must be {what}")
        out[key] = value
    return out


def check_augmentations_uncached(cache_latents: bool, color_aug: bool, random_crop: bool, *, file: str = "",
                                 where: str = "") -> None:
    """`color_aug` and `random_crop` change the image every step: they need the VAE each step, not cached latents.
    `file` and `where` name a dataset TOML and its table."""
    if cache_latents and (color_aug or random_crop):
        what = "color_aug" if color_aug else "random_crop"
        raise ConfigError(f"{file + ': ' if file else ''}`{what}`{' in ' + where if where else ''} changes the image "
                          f"every step, so latents cannot be cached: set `cache_latents = false`")


@dataclass(repr=False)
class TrainConfig(JobConfig):
    """Train a DreamBooth- or caption-LoRA; save it as kohya-format .safetensors with samples and loss history."""

    job = "train"
    # sd-scripts options a config file brought from there may hold, which change nothing in lorakit's training: read
    # with a note instead of refused (options that would change the result are refused by name)
    ignored_options: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("max_data_loader_n_workers", "persistent_data_loader_workers"),
                        "batches are loaded in the training process (latents are cached)"),
        **dict.fromkeys(("logging_dir", "log_with", "log_prefix", "wandb_api_key", "wandb_run_name",
                         "log_tracker_name", "log_tracker_config"),
                        "the loss history is written to output_dir (loss_history.csv/.json)"),
        **dict.fromkeys(("console_log_level", "console_log_file", "console_log_simple"),
                        "lorakit prints its own progress"),
        **dict.fromkeys(("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph", "deepspeed", "zero_stage",
                         "offload_optimizer_device", "offload_param_device", "zero3_init_flag",
                         "zero3_save_16bit_model", "fp16_master_weights_and_gradients"),
                        "lorakit trains on one device"),
        **dict.fromkeys(("metadata_author", "metadata_license", "metadata_tags"),
                        "lorakit writes its own modelspec metadata"),
        "metadata_title": "the LoRA's modelspec title is its output_name",
        "metadata_description": "lorakit writes its own modelspec metadata (see training_comment)",
        "mem_eff_attn": "attention is PyTorch's memory-efficient SDPA by default",
        "sdpa": "attention is PyTorch's SDPA by default",
        "lowram": "lorakit streams and frees model weights itself",
        "highvram": "lorakit places the models itself",
        "no_half_vae": "the VAE always encodes in fp32",
        "vae_batch_size": "lorakit encodes the latents itself",
        "log_config": "the config is saved as <output_name>.toml next to the LoRA",
        "tokenizer_cache_dir": "the tokenizer comes with the model",
        "skip_cache_check": "lorakit checks its cache", "cache_info": "lorakit checks its latent cache itself",
        "dynamo_backend": "lorakit does not compile the model",
        "cache_text_encoder_outputs_to_disk": "lorakit keeps a frozen text encoder's outputs in memory (they are "
                                              "small)",
        "text_encoder_batch_size": "lorakit encodes the captions itself",
        "disable_mmap_load_safetensors": "lorakit reads safetensors files itself",
        **dict.fromkeys(("metadata_trigger_phrase", "metadata_usage_hint", "metadata_thumbnail", "metadata_merged_from",
                         "metadata_preprocessor", "metadata_is_negative_embedding"),
                        "lorakit writes its own modelspec metadata"),
        **dict.fromkeys(("offload_optimizer_nvme_path", "offload_param_nvme_path"), "lorakit trains on one device"),
        "use_safetensors": "a LoRA's file format is `save_model_as`",
    }
    # sd-scripts' other spellings of an option
    aliases: ClassVar[dict[str, str]] = {"caption_extention": "caption_extension"}
    # sd-scripts options that would change training and that lorakit does not have: read when set to an "off" value
    # (GUI-made configs list them all), refused by name otherwise — {option: (off values, what it does)}
    unsupported_options: ClassVar[dict[str, tuple[tuple, str]]] = {
        "full_fp16": ((False,), "fp16 LoRA weights (lorakit trains them in fp32 under mixed precision)"),
        "full_bf16": ((False,), "bf16 LoRA weights (lorakit trains them in fp32 under mixed precision)"),
        "fp8_base": ((False,), "fp8 base weights"),
        "stop_text_encoder_training": ((None, 0), "a step at which the text encoder stops training"),
        "token_warmup_min": ((None, 1), "token warm-up"),
        "token_warmup_step": ((None, 0), "token warm-up"),
        "face_crop_aug_range": ((None, ""), "face-crop augmentation"),
        "lr_scheduler_type": ((None, ""), "a custom learning-rate scheduler class"),
        "lr_scheduler_args": ((None, "", []), "learning-rate scheduler arguments"),
        "in_json": ((None, ""), "a fine-tuning metadata JSON (use a dataset TOML with `metadata_file`)"),
        "dataset_repeats": ((None, 1), "fine-tuning dataset repeats (use `num_repeats` in a dataset TOML)"),
        "debug_dataset": ((False,), "sd-scripts' dataset viewer (see `lorakit prepare check`)"),
        **dict.fromkeys(("huggingface_repo_id", "huggingface_token", "huggingface_path_in_repo",
                         "huggingface_repo_type", "huggingface_repo_visibility"),
                        ((None, ""), "sd-scripts' own Hub upload (use `lorakit push`)")),
        **dict.fromkeys(("save_state_to_huggingface", "async_upload"),
                        ((False,), "sd-scripts' own Hub upload (use `lorakit push`)")),
        "resume_from_huggingface": ((False,), "resuming from the Hub"),
        "torch_compile": ((False,), "a compiled model (torch.compile)"),
        "initial_epoch": ((None, 0), "a starting epoch (use `resume`)"),
        "initial_step": ((None, 0), "a starting step (use `resume`)"),
        "skip_until_initial_step": ((False,), "skipping to a starting step (use `resume`)"),
        "fp8_base_unet": ((False,), "fp8 base weights"),
        "fused_backward_pass": ((False,), "a fused backward pass (Adafactor)"),
        "dataset_class": ((None, ""), "a custom dataset class"),
        "use_lion_optimizer": ((False,), "sd-scripts' old Lion switch (set `optimizer_type = \"Lion\"`)"),
        "output_config": ((False,), "writing the config without training (lorakit saves each run's config as "
                                    "<output_name>.toml)"),
        "config_file": ((None, ""), "a config file named inside a config (give it as `lorakit train --config`)"),
        # SD3 / FLUX options of sd-scripts (lorakit trains SD1.x / SD2.x): accepted at their defaults
        "weighting_scheme": ((None, "", "uniform", "none"), "SD3/FLUX timestep weighting"),
        "logit_mean": ((None, 0.0), "SD3/FLUX timestep sampling"),
        "logit_std": ((None, 1.0), "SD3/FLUX timestep sampling"),
        "mode_scale": ((None, 1.29), "SD3/FLUX timestep sampling"),
        "blocks_to_swap": ((None, 0), "swapping model blocks to the CPU (SD3/FLUX)"),
        "cpu_offload_checkpointing": ((False,), "offloading checkpointed activations to the CPU (SD3/FLUX)"),
    }

    @classmethod
    def resolve_foreign(cls, data: dict, where: str = "") -> dict:
        """sd-scripts' tables (`JobConfig.resolve_foreign`), and its `text_encoder_lr` list (one rate a text
        encoder; SD1/SD2 have one, as `--output_config` writes it: `[5e-05]`)."""
        out = super().resolve_foreign(data, where)
        rates = out.get("text_encoder_lr")
        if isinstance(rates, (list, tuple)):
            if len(rates) > 1:
                raise ConfigError(f"`text_encoder_lr` {list(rates)}{where}: one rate a text encoder, and SD1/SD2 "
                                  f"have one (two are SDXL's); give one number")
            out["text_encoder_lr"] = rates[0] if rates else None
        return out

    # ---- model
    pretrained_model_name_or_path: str = option(
        "lorakit-toy", "Base model: a Hub repo id (diffusers layout), a local diffusers folder, a single-file "
        ".safetensors/.ckpt, or the built-in `lorakit-toy`.", group="model", basic=True)
    v2: bool | None = option(None, "The base model is SD 2.x. Unset: detected from the weights.", group="model")
    v_parameterization: bool | None = option(
        None, "Train with v-prediction (SD 2.x 768 models). Unset: detected from the model.", group="model")
    vae: str | None = option(None, "Use this VAE instead of the model's own (folder, file or repo id).", group="model")
    clip_skip: int = option(1, "Use the text encoder's k-th layer from the end (2 for many anime models).",
                            group="model", min=1, max=12)

    # ---- data
    train_data_dir: str | None = option(
        None, "Training images: DreamBooth folders `<repeats>_<identifier> <class>` or images with caption files.",
        group="data", basic=True)
    reg_data_dir: str | None = option(None, "Regularisation (class) images in the DreamBooth layout.", group="data")
    dataset_config: str | None = option(None, "An sd-scripts dataset TOML ([general], [[datasets]], "
                                        "[[datasets.subsets]]).", group="data")
    caption_extension: str = option(".txt", "Extension of caption files next to the images.", group="data")
    shuffle_caption: bool = option(False, "Shuffle comma-separated tags each step (after `keep_tokens`).",
                                   group="data")
    keep_tokens: int = option(0, "Keep the first N tags in place when shuffling.", group="data", min=0)
    caption_dropout_rate: float = option(0.0, "Probability of training a step with an empty caption.",
                                         group="data", min=0.0, max=1.0)
    caption_dropout_every_n_epochs: int | None = option(None, "Train every Nth epoch with empty captions (0: "
                                                        "never, as unset).", group="data", min=0)
    caption_tag_dropout_rate: float = option(0.0, "Probability of leaving out each tag (after `keep_tokens`) when "
                                             "an image is drawn.", group="data", min=0.0, max=1.0)
    keep_tokens_separator: str = option("", "Tags before this marker in a caption (e.g. `|||`) stay in place; "
                                        "those after it are shuffled and dropped (instead of `keep_tokens`), up to a "
                                        "second marker, after which tags stay at the end.", group="data")
    caption_separator: str = option(",", "What separates the tags of a caption (for shuffling, keep_tokens and tag "
                                    "dropout).", group="data")
    secondary_separator: str = option("", "Tags joined by this marker (e.g. `;;;`) move and drop as one tag; it "
                                      "becomes caption_separator in the caption trained on.", group="data")
    enable_wildcard: bool = option(False, "Caption wildcards: `{red|blue}` picks one each time, and each line of a "
                                   "caption file is an alternative (else only the first line is read).", group="data")
    caption_prefix: str | None = option(None, "Text put before every caption (e.g. the trigger word).",
                                        group="data")
    caption_suffix: str | None = option(None, "Text put after every caption.", group="data")
    weighted_captions: bool = option(False, "Read A1111's emphasis in captions: `(word:1.2)`, `(word)` ×1.1, "
                                     "`[word]` ÷1.1 weight those tokens (don't put the caption separator inside "
                                     "brackets).", group="data")
    max_token_length: int | None = option(
        None, "Caption length the text encoder reads, in tokens: 150 or 225 read longer captions in 75-token "
        "windows (sd-scripts). Unset: 75, the rest of a longer caption is cut off.", group="data",
        choices=(75, 150, 225))
    color_aug: bool = option(False, "Colour jitter as in sd-scripts: a third of the images get a hue shift (±16°) or "
                             "a gamma of 0.95-1.05 (needs cache_latents = false).", group="data")
    flip_aug: bool = option(False, "Random horizontal flips (don't use for asymmetric subjects).", group="data")
    random_crop: bool = option(False, "Random instead of centre crop (needs cache_latents = false).", group="data")
    alpha_mask: bool = option(False, "Learn only where the images are opaque: each image's transparency weights its "
                              "loss (transparent parts are ignored; images without transparency count whole).",
                              group="data")
    masked_loss: bool = option(False, "Weight each image's loss by its mask image from `conditioning_data_dir` "
                               "(white: learned, black: ignored, grey in between).", group="data")
    conditioning_data_dir: str | None = option(
        None, "Mask images for masked_loss, named as the training images (any image extension); for DreamBooth "
        "folders, in sub-folders of the same names (or all in this folder).", group="data")
    resize_interpolation: str | None = option(
        None, "How images are resized to their bucket: lanczos (unset: the default), area, box, bicubic, bilinear, "
        "nearest (sd-scripts' names; cubic and linear too).", group="data", choices=RESIZE_FILTERS,
        aliases=RESIZE_ALIASES)
    resolution: str | None = option(None, "Training size \"N\" or \"W,H\". Unset: the model's native size.",
                                    group="data", basic=True)
    enable_bucket: bool = option(False, "Aspect-ratio bucketing: train each image near its own aspect ratio.",
                                 group="data")
    min_bucket_reso: int = option(256, "Smallest bucket side.", group="data", min=8)
    max_bucket_reso: int = option(1024, "Largest bucket side.", group="data", min=8)
    bucket_reso_steps: int = option(64, "Bucket sides are multiples of this.", group="data", min=8)
    bucket_no_upscale: bool = option(False, "Never enlarge small images to fill a bucket.", group="data")
    cache_latents: bool = option(True, "Encode images once, before training (faster, less VRAM).", group="data")
    cache_latents_to_disk: bool = option(False, "Keep cached latents on disk next to the images, reused across "
                                         "runs (invalidated when the image or settings change).", group="data")
    prior_loss_weight: float = option(1.0, "Loss weight of regularisation images.", group="data", min=0.0)
    validation_split: float = option(
        0.0, "Hold out this fraction of each training folder's images (not of the regularisation images) to measure "
        "a validation loss: the loss on images the LoRA does not learn from, which rises again when it overfits.",
        group="data", min=0.0, max=0.9)
    validation_seed: int | None = option(None, "Seed of the validation split and of the validation noise. Unset: "
                                         "`seed`.", group="data", min=0)
    validate_every_n_steps: int | None = option(None, "Also measure the validation loss every N steps (0 or unset: "
                                                "only by epoch).", group="data", min=0)
    validate_every_n_epochs: int | None = option(None, "Measure the validation loss every N epochs. Unset: every "
                                                 "epoch (and at the end); 0: only by steps and at the end.",
                                                 group="data", min=0)
    max_validation_steps: int | None = option(None, "Measure on at most this many validation batches (0 or unset: "
                                              "all).", group="data", min=0)
    train_batch_size: int = option(1, "Images per step.", group="training", min=1, basic=True)

    # ---- network
    network_module: str = option("networks.lora", "Network type (sd-scripts name; LoRA and LoCon via conv_dim).",
                                 group="network", choices=["networks.lora"])
    network_dim: int = option(16, "LoRA rank: capacity of the adapter.", group="network", min=1, max=1024,
                              basic=True)
    network_alpha: float = option(8.0, "LoRA alpha: the adapter's output is scaled by alpha / dim.",
                                  group="network", min=0.0, basic=True)
    network_dropout: float = option(0.0, "Dropout on each LoRA module's down-projection output (as sd-scripts).",
                                    group="network", min=0.0, max=0.99)
    network_args: list[str] = option([], "Extra `key=value` network options (sd-scripts style): conv_dim, "
                                     "conv_alpha, rank_dropout, module_dropout, and LoRA+ loraplus_lr_ratio (e.g. 16; "
                                     "also loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio).",
                                     group="network")
    conv_dim: int | None = option(None, "Rank for 3x3 convolutions (LoCon). Unset: no conv LoRA.", group="network",
                                  min=1, max=1024)
    conv_alpha: float | None = option(None, "Alpha for conv LoRA. Unset: same as conv_dim.", group="network",
                                      min=0.0)
    network_weights: str | None = option(None, "Start from an existing LoRA file.", group="network")
    base_weights: list[str] = option([], "LoRA files merged into the model before training: the new LoRA learns on "
                                     "top of them (and does not contain them).", group="network")
    base_weights_multiplier: list[float] = option([], "The strength of each of base_weights (default 1).",
                                                  group="network")
    dim_from_weights: bool = option(False, "Take the modules, ranks and alphas from `network_weights` instead of "
                                    "network_dim / network_alpha / conv_dim.", group="network")
    network_train_unet_only: bool = option(False, "Train only the U-Net LoRA.", group="network")
    cache_text_encoder_outputs: bool = option(
        False, "Encode each caption once (sd-scripts). lorakit does so whenever the text encoder is not trained, so "
        "this only checks that it is not (it needs network_train_unet_only).", group="network")
    network_train_text_encoder_only: bool = option(False, "Train only the text-encoder LoRA.", group="network")
    learning_rate: float = option(1e-4, "Learning rate (fallback for unet_lr and text_encoder_lr).",
                                  group="training", min=0.0, basic=True)
    unet_lr: float | None = option(None, "Learning rate of the U-Net LoRA.", group="training", min=0.0)
    text_encoder_lr: float | None = option(None, "Learning rate of the text-encoder LoRA.", group="training",
                                           min=0.0)

    # ---- training
    output_dir: str = option("output", "Folder for the LoRA, samples, loss history and state.", group="training",
                             basic=True)
    output_name: str = option("lora", "File name (without extension) of the saved LoRA.", group="training",
                              basic=True)
    max_train_steps: int | None = option(1600, "Total optimizer steps (ignored when max_train_epochs is set).",
                                         group="training", min=1, basic=True)
    max_train_epochs: int | None = option(None, "Train for this many epochs instead of max_train_steps.",
                                          group="training", min=1)
    gradient_accumulation_steps: int = option(1, "Accumulate gradients over N batches per optimizer step.",
                                              group="training", min=1)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward: much less VRAM, ~30% slower.",
                                          group="training")
    mixed_precision: str = option("no", "Compute precision: fp16 (T4), bf16 (Ampere+), or no (fp32, CPU).",
                                  group="training", choices=PRECISIONS)
    optimizer_type: str = option("AdamW", "Optimizer.", group="training", choices=OPTIMIZERS)
    optimizer_args: list[str] = option([], "Extra optimizer `key=value` options, e.g. weight_decay=0.01.",
                                       group="training")
    use_8bit_adam: bool = option(False, "Alias of optimizer_type = AdamW8bit (sd-scripts).", group="training")
    lr_scheduler: str = option("constant", "Learning-rate schedule.", group="training", choices=SCHEDULERS)
    lr_warmup_steps: int | float = option(0, "Linear warm-up: a number of steps, or a fraction (< 1) of the "
                                          "training steps, e.g. 0.05 or \"5%\".", group="training", min=0)
    lr_scheduler_num_cycles: int = option(1, "Restarts for cosine_with_restarts; half-waves for cosine_with_min_lr "
                                          "and warmup_stable_decay's decay.", group="training", min=1)
    lr_scheduler_power: float = option(1.0, "Power for the polynomial schedule.", group="training", min=0.0)
    lr_scheduler_min_lr_ratio: float | None = option(
        None, "Lowest learning rate of cosine_with_min_lr / warmup_stable_decay, as a fraction of the rate (unset: 0).",
        group="training", min=0.0, max=1.0)
    lr_decay_steps: int | float = option(0, "warmup_stable_decay's decay: a number of steps, or a fraction (< 1) of "
                                         "the training steps.", group="training", min=0)
    lr_scheduler_timescale: int | None = option(None, "inverse_sqrt's timescale in steps (unset: the warm-up steps, "
                                                "or 10,000).", group="training", min=1)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", group="training", min=0.0)
    scale_weight_norms: float | None = option(
        None, "Max-norm regularisation: after each step, scale down each LoRA module whose ‖ΔW‖ exceeds this "
        "(sd-scripts; 1 is typical). Unset or 0: off.", group="training", min=0.0)
    noise_offset: float = option(0.0, "Offset noise (crosslabs.org/blog/diffusion-with-offset-noise); ~0.05–0.1 "
                                 "helps very dark/bright images.", group="training", min=0.0, max=1.0)
    noise_offset_random_strength: bool = option(False, "Draw the offset's strength from U(0, noise_offset) each "
                                                "step.", group="training")
    adaptive_noise_scale: float | None = option(None, "Add this many times |mean latent| of each channel to the "
                                                "offset (needs noise_offset).", group="training")
    multires_noise_iterations: int | None = option(None, "Multires (pyramid) noise levels; 6–10 is typical. Unset: "
                                                   "off.", group="training", min=0)
    multires_noise_discount: float = option(0.3, "Weight ratio between multires noise levels (0.1–0.3).",
                                            group="training", min=0.0, max=1.0)
    ip_noise_gamma: float | None = option(None, "Input perturbation noise (arxiv.org/abs/2301.11706); ~0.1.",
                                          group="training", min=0.0)
    ip_noise_gamma_random_strength: bool = option(False, "Draw the perturbation's strength from U(0, "
                                                  "ip_noise_gamma) each step.", group="training")
    debiased_estimation_loss: bool = option(False, "Weight the loss by 1/√SNR (debiased estimation).",
                                            group="training")
    scale_v_pred_loss_like_noise_pred: bool = option(
        False, "Scale the v-prediction loss by SNR/(SNR + 1), like an ε-prediction loss (v-prediction models).",
        group="training")
    v_pred_like_loss: float | None = option(None, "Add this much of a v-prediction-like loss (sd-scripts; e.g. 0.1).",
                                            group="training", min=0.0)
    zero_terminal_snr: bool = option(False, "Train on the noise schedule rescaled to zero SNR at the last timestep "
                                     "(arxiv.org/abs/2305.08891; for v-prediction models). The SNR loss weights keep "
                                     "the model's own SNR, as in sd-scripts.", group="training")
    min_timestep: int = option(0, "Train on timesteps ≥ this (sd-scripts option; 0 = all).", group="training",
                               min=0, max=999)
    max_timestep: int = option(1000, "Train on timesteps < this (sd-scripts option; 1000 = all).",
                               group="training", min=1, max=1000)
    loss_type: str = option("l2", "The loss: l2 (squared error), l1, or the robust huber / smooth_l1 (sd-scripts' "
                            "pseudo-Huber, less swayed by outliers), with the threshold huber_c.", group="training",
                            choices=LOSS_TYPES)
    huber_schedule: str = option("snr", "How huber_c changes with the timestep (sd-scripts): snr (the default), "
                                 "exponential, or constant.", group="training", choices=HUBER_SCHEDULES)
    huber_c: float = option(0.1, "The Huber threshold (with loss_type huber / smooth_l1).", group="training",
                            min=0.0)
    huber_scale: float = option(1.0, "A factor on the Huber threshold of the exponential and constant schedules.",
                                group="training", min=0.0)
    min_snr_gamma: float | None = option(None, "Min-SNR loss weighting (Hang et al. 2023); 5 is typical.",
                                         group="training", min=0.0)
    seed: int | None = option(42, "Random seed; a run with the same seed is reproducible on CPU (none: a random "
                                  "seed, printed and saved with the run).",
                              group="training", min=0)
    xformers: bool = option(False, "Use xformers attention (optional package) instead of PyTorch SDPA.",
                            group="training")
    sdpa: bool = option(True, "Use PyTorch scaled-dot-product attention (the default).", group="training")
    device: str | None = option(None, "cuda, mps or cpu. Unset: the best available.", group="training")

    # ---- saving
    save_model_as: str = option("safetensors", "LoRA file format.", group="saving",
                                choices=["safetensors", "ckpt", "pt"])
    save_precision: str = option("fp16", "Precision of the saved LoRA.", group="saving", choices=SAVE_PRECISIONS)
    save_every_n_epochs: int | None = option(None, "Also save a LoRA every N epochs.", group="saving", min=1)
    save_every_n_steps: int | None = option(None, "Also save a LoRA every N steps.", group="saving", min=1)
    save_n_epoch_ratio: int | None = option(None, "Save about this many LoRAs over the run, at even epochs (instead "
                                            "of save_every_n_epochs).", group="saving", min=1)
    save_last_n_epochs: int | None = option(None, "Keep only the LoRAs of the last N epoch saves (older ones are "
                                            "deleted; 0: keep all).", group="saving", min=0)
    save_last_n_steps: int | None = option(None, "Keep only the step saves of the last N steps (older ones are "
                                           "deleted).", group="saving", min=0)
    save_last_n_epochs_state: int | None = option(None, "Keep only the saved states of the last N epoch saves. "
                                                  "Unset: as save_last_n_epochs.", group="saving", min=0)
    save_last_n_steps_state: int | None = option(None, "Keep only the saved states of the last N steps. Unset: as "
                                                 "save_last_n_steps.", group="saving", min=0)
    save_state: bool = option(False, "Save optimizer/scheduler/RNG state with each save, so `resume` can continue "
                              "exactly (use on Colab).", group="saving")
    save_state_on_train_end: bool = option(False, "Save the state once, when training ends (so a later run can "
                                           "resume to train on), without a state at each save.", group="saving")
    overwrite: bool = option(False, "Replace an earlier run of this output_name in output_dir: its LoRA, and "
                             "once this run has finished, its intermediate saves, saved states and samples. "
                             "Without it, such a run is refused unless it resumes.",
                             group="saving")
    resume: str | None = option(None, "Resume from a state folder written by save_state, `latest` (the newest in "
                                      "output_dir), or `auto` (the newest if there is one, else a new run: for "
                                      "notebooks run again after a disconnect).",
                                group="saving")
    no_metadata: bool = option(False, "Write no training metadata into the LoRA file (only what readers need to "
                               "identify it, and the modelspec block, as sd-scripts).", group="saving")
    training_comment: str | None = option(None, "A comment stored in the metadata.", group="saving")

    # ---- samples
    sample_prompts: str | None = option(None, "Prompt file, one per line, kohya syntax (--n --w --h --s --l --d --ss); "
                                        "or sd-scripts' .toml / .json prompt file.", group="samples")
    sample_every_n_steps: int | None = option(None, "Generate samples every N steps (prompts from "
                                              "sample_prompts, else the dataset's first captions).",
                                              group="samples", min=1)
    sample_every_n_epochs: int | None = option(None, "Generate samples every N epochs.", group="samples", min=1)
    sample_sampler: str = option("ddim", "Sampler for the samples.", group="samples", choices=SAMPLERS,
                                 aliases=SAMPLER_ALIASES)
    sample_at_end: bool = option(True, "Generate samples and samples_grid.png when training ends (prompts from "
                                 "sample_prompts, else the dataset's first captions).", group="samples")
    sample_at_first: bool = option(False, "Also generate samples before the first step: the starting point to "
                                   "compare the LoRA's samples with.", group="samples")

    def check(self) -> None:
        for field_name, what in (("pretrained_model_name_or_path", "a Hub id, a folder or file, or `lorakit-toy`"),
                                 ("output_dir", "the folder for the LoRA")):
            if not str(getattr(self, field_name)).strip():
                raise ConfigError(f"`{field_name}` is empty: set it ({what})")
        name = self.output_name
        if not name.strip() or name.strip() != name or "/" in name or "\\" in name or name.startswith("."):
            raise ConfigError(f"`output_name` must be a plain file name (no folders, not empty, no leading dot or "
                              f"space), got {name!r}: the LoRA is `output_dir/<output_name>.{self.save_model_as}`")
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ConfigError("`network_train_unet_only` and `network_train_text_encoder_only` cannot both be set: "
                              "choose one, or neither to train both")
        if not (self.trains_unet or self.trains_text_encoder):
            raise ConfigError("nothing to train: the U-Net and the text encoder are both off (`unet_lr`/"
                              "`text_encoder_lr` 0, or `network_train_*_only`)")
        if self.cache_text_encoder_outputs and self.trains_text_encoder:
            raise ConfigError("`cache_text_encoder_outputs` cannot cache a text encoder that trains (its outputs "
                              "change every step): set `network_train_unet_only = true` with it")
        check_extension("caption_extension", self.caption_extension)
        if not self.caption_separator.strip():
            raise ConfigError("`caption_separator` must be a visible separator such as \",\" or \";\"")
        check_augmentations_uncached(self.cache_latents, self.color_aug, self.random_crop)
        if self.conditioning_data_dir and not self.masked_loss:
            raise ConfigError("`conditioning_data_dir` holds the mask images of `masked_loss`: set "
                              "`masked_loss = true` to train with them")
        if self.conditioning_data_dir and self.dataset_config:
            raise ConfigError("with `dataset_config`, set `conditioning_data_dir` in each [[datasets.subsets]] that "
                              "has mask images")
        if self.masked_loss and not (self.conditioning_data_dir or self.alpha_mask or self.dataset_config):
            raise ConfigError("`masked_loss` reads a mask image per training image: set `conditioning_data_dir` to "
                              "their folder (or `alpha_mask = true` to use the images' transparency)")
        if len(self.base_weights_multiplier) > len(self.base_weights):
            raise ConfigError(f"`base_weights_multiplier` has {len(self.base_weights_multiplier)} values for "
                              f"{len(self.base_weights)} `base_weights` files")
        if self.dim_from_weights and not self.network_weights:
            raise ConfigError("`dim_from_weights` takes the ranks from `network_weights`: set `network_weights` too")
        if not (self.validation_split or self.dataset_config) and (
                self.validate_every_n_steps or self.validate_every_n_epochs or self.max_validation_steps):
            raise ConfigError("the validation options measure the loss on held-out images: set `validation_split` "
                              "(e.g. 0.1) to hold some out")
        if self.cache_latents_to_disk and not self.cache_latents:
            raise ConfigError("`cache_latents_to_disk` needs `cache_latents = true`")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ConfigError(f"`min_bucket_reso` ({self.min_bucket_reso}) must be ≤ `max_bucket_reso` "
                              f"({self.max_bucket_reso})")
        if self.max_train_steps is None and self.max_train_epochs is None:
            raise ConfigError("set `max_train_steps` or `max_train_epochs`")
        if self.min_timestep > self.max_timestep:
            raise ConfigError(f"`min_timestep` ({self.min_timestep}) must be ≤ `max_timestep` ({self.max_timestep}; "
                              f"equal: every step at that timestep)")
        if self.loss_type in HUBER_LOSSES and not self.huber_c:
            raise ConfigError(f"`loss_type = {self.loss_type}` needs `huber_c` > 0 (its threshold; 0.1 is usual)")
        if self.loss_type in HUBER_LOSSES and self.huber_schedule == "exponential" and self.huber_c >= 1:
            raise ConfigError(f"`huber_schedule = exponential` decays the threshold from 1 to `huber_c`: it must "
                              f"be < 1, got {self.huber_c}")
        if self.adaptive_noise_scale and not self.noise_offset:
            raise ConfigError("`adaptive_noise_scale` adds to the offset noise: it needs `noise_offset` > 0")
        for name in ("lr_warmup_steps", "lr_decay_steps"):
            if isinstance(getattr(self, name), float) and getattr(self, name) >= 1:
                raise ConfigError(f"`{name}` must be a whole number of steps or a fraction < 1 of the training "
                                  f"steps, got {getattr(self, name)}")
        if self.lr_scheduler == "warmup_stable_decay" and not self.lr_decay_steps:
            raise ConfigError("`lr_scheduler = warmup_stable_decay` needs `lr_decay_steps` (steps, or a fraction of "
                              "the training steps, e.g. 0.2)")
        parse_resolution(self.resolution)
        parse_network_args(self.network_args)
        for arg in self.optimizer_args:
            if "=" not in arg:
                raise ConfigError(f"`optimizer_args` entries must be key=value, got {arg!r}")

    # ---- derived values (one place, used by train, metadata and the forms' summary)
    @property
    def resolved_optimizer(self) -> str:
        return "AdamW8bit" if self.use_8bit_adam else self.optimizer_type

    @property
    def network_options(self) -> dict:
        """`network_args` as typed values: `{"conv_dim": 8, "loraplus_lr_ratio": 16.0, ...}` (only those given)."""
        return parse_network_args(self.network_args)

    def sd_scripts_default_differences(self, given: set[str]) -> list[str]:
        """The options not in `given` whose lorakit default differs from sd-scripts' (`SD_SCRIPTS_DEFAULTS`), as
        `name = value (sd-scripts: …)`: what a config brought from sd-scripts trains differently unless it sets
        them."""
        out = []
        for name, theirs in SD_SCRIPTS_DEFAULTS.items():
            if name in given or (name in ("network_dim", "network_alpha") and self.dim_from_weights):
                continue
            if name == "learning_rate" and ("unet_lr" in given or not self.trains_unet) and (
                    "text_encoder_lr" in given or not self.trains_text_encoder):
                continue  # both parts have their own rate: learning_rate is not used
            value = getattr(self, name)
            shown = f"{value:g}" if isinstance(value, float) else json.dumps(value)
            out.append(f"{name} = {shown} (sd-scripts: {theirs})")
        conv_dim, conv_alpha = self.resolved_conv
        if conv_dim is not None and "conv_alpha" not in given and "conv_alpha" not in self.network_options:
            out.append(f"conv_alpha = {conv_alpha:g}, conv_dim's (sd-scripts: 1)")
        return out

    @property
    def resolved_conv(self) -> tuple[int | None, float | None]:
        """(conv_dim, conv_alpha), also read from sd-scripts-style `network_args`."""
        args = self.network_options
        conv_dim = self.conv_dim if self.conv_dim is not None else args.get("conv_dim")
        conv_alpha = self.conv_alpha if self.conv_alpha is not None else args.get("conv_alpha")
        if conv_dim is not None and conv_alpha is None:
            conv_alpha = float(conv_dim)
        return conv_dim, conv_alpha

    def loraplus_ratio(self, component: str) -> float | None:
        """LoRA+ (`network_args` loraplus_*_lr_ratio): the up-projections of `component` ("unet" or "text_encoder")
        learn at this multiple of its learning rate; None: as fast as the down-projections."""
        args = self.network_options
        return args.get(f"loraplus_{component}_lr_ratio") or args.get("loraplus_lr_ratio")

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder gets a LoRA: not with `network_train_unet_only`, nor with `text_encoder_lr = 0`
        (sd-scripts users switch it off that way; a zero-LR group would only cost time)."""
        return not self.network_train_unet_only and self.resolved_text_encoder_lr != 0

    @property
    def trains_unet(self) -> bool:
        """Whether the U-Net gets a LoRA: not with `network_train_text_encoder_only`, nor with `unet_lr = 0`."""
        return not self.network_train_text_encoder_only and self.resolved_unet_lr != 0

    @property
    def resolved_unet_lr(self) -> float:
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    @property
    def resolved_text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr
