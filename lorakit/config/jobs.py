"""Options of the file-level jobs: merge, extract, generate, inspect, push, and the tiny-model builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .schema import IMAGE_SIZE_MAX, JobConfig, option
from .train import SAMPLER_ALIASES, SAMPLERS, SAVE_PRECISIONS

COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`: how far back a full prompt window looks for a comma

MERGE_MODES = ("concat", "svd", "sum")
DYNAMIC_METHODS = ("sv_fro", "sv_cumulative", "sv_ratio")  # lorakit.lora_math.dynamic_rank


def check_dynamic(method: str | None, param: float | None) -> None:
    """`dynamic_method` and `dynamic_param` (merge, extract): both or neither, the target in its range."""
    if method is None:
        if param is not None:
            raise ConfigError("`dynamic_param` is set but `dynamic_method` is not: choose sv_fro, sv_cumulative or "
                              "sv_ratio")
        return
    if param is None:
        raise ConfigError(f"`dynamic_method = {method}` needs `dynamic_param` (e.g. "
                          f"{'10' if method == 'sv_ratio' else '0.9'})")
    if method == "sv_ratio" and not param >= 1:
        raise ConfigError(f"`dynamic_param` for sv_ratio is the largest singular value over the smallest kept one: a "
                          f"number ≥ 1, got {param}")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise ConfigError(f"`dynamic_param` for {method} is the share to keep: a number in (0, 1], got {param}")


@dataclass(repr=False)
class MergeConfig(JobConfig):
    """Merge LoRAs into a model (`sd_model` given) or into one LoRA (no `sd_model`)."""

    job = "merge"

    models: list[str] = option([], "LoRA files to merge, in order.", group="basic", basic=True)
    ratios: list[float] = option([], "Strength of each LoRA (one per model; default 1.0 each).", group="basic",
                                 basic=True)
    save_to: str = option("", "Output file (.safetensors or .ckpt, by extension) or folder (diffusers layout).",
                          group="basic", basic=True)
    sd_model: str | None = option(None, "Base model to merge into (single file or diffusers folder). Unset: merge "
                                  "the LoRAs into one LoRA.", group="basic", basic=True)
    merge_mode: str = option("concat", "LoRA+LoRA: `concat` (exact, rank = sum of ranks), `svd` (exact delta "
                             "re-factorised to new_rank), or `sum` (sd-scripts: same ranks, approximate).",
                             group="lora merge", choices=MERGE_MODES)
    new_rank: int | None = option(None, "Rank of the result for merge_mode = svd (also resizes a single LoRA).",
                                  group="lora merge", min=1)
    new_conv_rank: int | None = option(None, "Conv rank for merge_mode = svd. Unset: new_rank.",
                                       group="lora merge", min=1)
    dynamic_method: str | None = option(
        None, "merge_mode = svd: each module's rank from its own singular values (new_rank, new_conv_rank at most; "
        "unset: no cap): `sv_fro` keeps ≥ dynamic_param of its Frobenius norm, `sv_cumulative` of the sum of its "
        "singular values, `sv_ratio` the singular values ≥ the largest / dynamic_param (sd-scripts' resize_lora "
        "methods, which keep one rank more).", group="lora merge", choices=list(DYNAMIC_METHODS))
    dynamic_param: float | None = option(None, "The target of `dynamic_method`: a share in (0, 1] for sv_fro and "
                                         "sv_cumulative (e.g. 0.9), a ratio ≥ 1 for sv_ratio (e.g. 10).",
                                         group="lora merge")
    precision: str = option("float", "Precision of the arithmetic.", group="precision", choices=SAVE_PRECISIONS)
    save_precision: str | None = option(None, "Precision of the saved file. Unset: same as the input.",
                                        group="precision", choices=SAVE_PRECISIONS)
    v2: bool | None = option(None, "The model is SD 2.x. Unset: detected.", group="model")
    device: str = option("cpu", "Device for the arithmetic.", group="model", choices=["cpu", "cuda"])
    overwrite: bool = option(False, "Allow `save_to` to replace an existing file (never an input file).",
                             group="basic")

    def check(self) -> None:
        if self.ratios and self.models and len(self.ratios) != len(self.models):
            raise ConfigError(f"`ratios` has {len(self.ratios)} values but `models` has {len(self.models)} files: "
                              f"give one ratio per model")
        if self.merge_mode == "svd" and self.sd_model is None and self.new_rank is None and self.models \
                and self.dynamic_method is None:
            raise ConfigError("`merge_mode = svd` needs `new_rank` (or `dynamic_method`)")
        check_dynamic(self.dynamic_method, self.dynamic_param)
        for name in ("new_rank", "new_conv_rank"):
            if getattr(self, name) is not None and (self.merge_mode != "svd" or self.sd_model is not None):
                raise ConfigError(f"`{name}` is the rank of a LoRA re-factorised by `merge_mode = svd` (no `sd_model`; "
                                  f"one LoRA alone is resized so); this merge is "
                                  f"{'into a model' if self.sd_model else self.merge_mode}, which would ignore it")
        if self.dynamic_method is not None and (self.merge_mode != "svd" or self.sd_model is not None):
            raise ConfigError(f"`dynamic_method` chooses ranks of a LoRA re-factorised by `merge_mode = svd` (no "
                              f"`sd_model`); this merge is {'into a model' if self.sd_model else self.merge_mode}")

    @property
    def resolved_ratios(self) -> list[float]:
        return list(self.ratios) if self.ratios else [1.0] * len(self.models)


@dataclass(repr=False)
class ExtractConfig(JobConfig):
    """Extract a LoRA approximating `model_tuned - model_org`."""

    job = "extract"

    model_org: str = option("", "The base model (single file, diffusers folder or repo id).", group="basic",
                            basic=True)
    model_tuned: str = option("", "The fine-tuned model.", group="basic", basic=True)
    save_to: str = option("", "Output LoRA file (.safetensors, .ckpt or .pt).", group="basic", basic=True)
    dim: int = option(4, "Rank for Linear and 1x1 conv modules.", group="basic", min=1, max=1024, basic=True)
    conv_dim: int | None = option(None, "Rank for 3x3 convs (LoCon). Unset: no conv modules.", group="basic", min=1)
    svd: str = option("lowrank", "`lowrank` (randomized, fast) or `exact` (full SVD).", group="advanced",
                      choices=["lowrank", "exact"])
    dynamic_method: str | None = option(
        None, "Each module's rank from its own singular values (dim, conv_dim at most): `sv_fro` keeps ≥ "
        "dynamic_param of its delta's Frobenius norm, `sv_cumulative` of the sum of its singular values (a full SVD "
        "per module: slow), `sv_ratio` the singular values ≥ the largest / dynamic_param.", group="advanced",
        choices=list(DYNAMIC_METHODS))
    dynamic_param: float | None = option(None, "The target of `dynamic_method`: a share in (0, 1] for sv_fro and "
                                         "sv_cumulative (e.g. 0.9), a ratio ≥ 1 for sv_ratio (e.g. 10).",
                                         group="advanced")
    clamp_quantile: float = option(1.0, "Clamp factor values at this quantile (1.0 = no clamping; sd-scripts "
                                   "uses 0.99, which costs accuracy).", group="advanced", min=0.5, max=1.0)
    min_diff: float = option(0.01, "Text encoder is skipped when no weight differs by more than this.",
                             group="advanced", min=0.0)
    device: str = option("cpu", "Device for the SVDs.", group="advanced", choices=["cpu", "cuda"])
    save_precision: str = option("float", "Precision of the saved LoRA.", group="advanced",
                                 choices=SAVE_PRECISIONS)
    v2: bool | None = option(None, "The models are SD 2.x. Unset: detected.", group="advanced")
    overwrite: bool = option(False, "Allow `save_to` to replace an existing file.", group="advanced")

    def check(self) -> None:
        check_dynamic(self.dynamic_method, self.dynamic_param)


@dataclass(repr=False)
class GenerateConfig(JobConfig):
    """Text-to-image with a base model and any number of LoRAs."""

    job = "generate"
    # sd-scripts' gen_img.py spellings, so its command lines carry over
    aliases: ClassVar[dict[str, str]] = {
        "ckpt": "pretrained_model_name_or_path", "steps": "num_inference_steps", "scale": "guidance_scale",
        "sampler": "scheduler", "images_per_prompt": "num_images", "outdir": "output_dir", "W": "width",
        "H": "height"}
    ignored_options: ClassVar[dict[str, str]] = {
        "network_module": "lorakit reads kohya LoRA files (networks.lora, LoCon) and refuses other kinds by name",
        "xformers": "attention is PyTorch's SDPA", "sdpa": "attention is PyTorch's SDPA",
        **dict.fromkeys(("fp16", "bf16"), "the precision is `dtype` (unset: fp16 on a CUDA GPU, float elsewhere)"),
    }

    pretrained_model_name_or_path: str = option("lorakit-toy", "Base model (repo id, folder, single file or "
                                                "`lorakit-toy`).", group="basic", basic=True)
    prompt: str = option("", "What to draw; kohya prompt options may follow (`--n blurry --d 5 --s 30`).",
                         group="basic", basic=True)
    negative_prompt: str = option("", "What to avoid.", group="basic", basic=True)
    network_weights: list[str] = option([], "LoRA files to apply.", group="lora", basic=True)
    network_mul: list[float] = option([], "Multiplier per LoRA (default 1.0 each).", group="lora", basic=True)
    network_merge: bool = option(False, "Fuse the LoRAs into the weights (faster sampling).", group="lora")
    num_inference_steps: int = option(30, "Denoising steps.", group="sampling", min=1, max=1000)
    guidance_scale: float = option(7.5, "Classifier-free guidance scale (1: no guidance, the negative prompt "
                                   "unused; below 1 diffusers would sample as 1).", group="sampling", min=1.0)
    width: int | None = option(None, "Image width (multiple of 8). Unset: the model's native size.",
                               group="sampling", min=8, max=IMAGE_SIZE_MAX)
    height: int | None = option(None, "Image height (multiple of 8). Unset: the model's native size.",
                                group="sampling", min=8, max=IMAGE_SIZE_MAX)
    seed: int | None = option(42, "Random seed (same seed, same image; none: a random one, written into each PNG).",
                              group="sampling", min=0)
    num_images: int = option(1, "Images per prompt.", group="sampling", min=1)
    batch_size: int = option(4, "Images sampled at once (A1111's batch size): fewer need less GPU memory, the images "
                             "are the same.", group="sampling", min=1)
    scheduler: str = option("ddim", "Sampler.", group="sampling", choices=SAMPLERS, aliases=SAMPLER_ALIASES)
    from_file: str | None = option(None, "Prompt file, one per line, kohya syntax (--n --w --h --s --l --d --ss); "
                                   "or sd-scripts' .toml / .json prompt file.",
                                   group="sampling")
    output_dir: str = option("outputs", "Where PNGs are written.", group="basic")
    clip_skip: int = option(1, "Text encoder layer from the end.", group="model", min=1, max=12)
    comma_padding_backtrack: int = option(
        COMMA_BACKTRACK, "A prompt over 75 tokens: a window ends after a comma among its last N tokens, so that no "
        "tag is cut in two (A1111's setting; 0: cut every 75 tokens).", group="sampling", min=0, max=74)
    v2: bool | None = option(None, "SD 2.x model. Unset: detected.", group="model")
    v_parameterization: bool | None = option(None, "v-prediction model. Unset: detected.", group="model")
    device: str | None = option(None, "cuda, mps or cpu. Unset: the best available.", group="model")
    dtype: str | None = option(None, "Precision for sampling (unset: fp16 on a CUDA GPU, float elsewhere).",
                               group="model", choices=SAVE_PRECISIONS)

    def check(self) -> None:
        if self.network_mul and len(self.network_mul) != len(self.network_weights):
            raise ConfigError(f"`network_mul` has {len(self.network_mul)} values but `network_weights` has "
                              f"{len(self.network_weights)} files: give one multiplier per LoRA")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and v % 8:
                raise ConfigError(f"`{name}` must be a multiple of 8, got {v}")

    @property
    def resolved_mul(self) -> list[float]:
        return list(self.network_mul) if self.network_mul else [1.0] * len(self.network_weights)


@dataclass(repr=False)
class InspectConfig(JobConfig):
    """Print what a LoRA file holds."""

    job = "inspect"
    positional = ("path",)

    path: str = option("", "A LoRA file (.safetensors, .ckpt, .pt).", group="basic", basic=True)


@dataclass(repr=False)
class PushConfig(JobConfig):
    """Upload a trained LoRA, its samples and a model card to the Hugging Face Hub."""

    job = "push"

    repo_id: str = option("", "Hub model repo, `user/name` (created if missing).", group="basic", basic=True)
    output_dir: str = option("output", "The training output folder (LoRA files, samples, config).", group="basic",
                             basic=True)
    private: bool = option(True, "Create the repo as private.", group="basic")
    base_model: str | None = option(None, "Base model id for the card. Unset: from the LoRA's metadata.",
                                    group="card")
    instance_prompt: str | None = option(None, "Trigger words for the card. Unset: from the training data.",
                                         group="card")
    license: str = option("creativeml-openrail-m", "License in the card.", group="card")
    commit_message: str = option("Upload LoRA trained with lorakit", "Commit message.", group="card")
    token: str | None = option(None, "Hub token. Unset: HF_TOKEN or `hf auth login`. Never saved or "
                               "printed.", group="basic", secret=True)
    endpoint: str | None = option(None, "Hub endpoint (for a private hub).", group="advanced")


@dataclass(repr=False)
class TinyConfig(JobConfig):
    """Build a tiny random SD1- or SD2-style model for tests and offline experiments."""

    job = "tiny"

    output_dir: str = option("tiny-sd", "Where to write the diffusers folder and the single-file checkpoint.",
                             group="basic", basic=True)
    family: str = option("sd1", "Which architecture to imitate.", group="basic", choices=["sd1", "sd2"])
    seed: int = option(0, "Seed for the random weights.", group="basic", min=0)
