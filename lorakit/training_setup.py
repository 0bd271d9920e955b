"""Everything `train` needs around its loop: device and precision, models, dataset, latent cache, the LoRA,
optimizer, text encoding, samples, saving. Kept apart so that `training.train` reads as the loop and nothing else.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import TrainDataset, scan_dataset
from .data.captions import process_caption, tag_frequency
from .data.latents import encode
from .devices import pick_device
from .errors import ConfigError, TrainingError
from .fileio import FolderLock, remove_stale_temporaries, write_json, write_text
from .host_memory import keep_freed_memory
from .lora_metadata import SESSION_TEXT, STEP_TEXT, unix_time
from .optim import check_optimizer, make_optimizer, make_scheduler, relative_step_size, resolve_warmup_steps
from .text_encoding import (
    WINDOW,
    apply_emphasis,
    encode_windows,
    token_windows,
    weighted_token_windows,
    without_emphasis,
)

TEXT_CACHE_LIMIT = 4096  # captions whose frozen-text-encoder output is kept (unet-only training)
GRID_ROUNDS = 8  # sampling rounds shown in samples_grid.png (the latest ones)


# ---------------------------------------------------------------------------------------------- callbacks
@dataclass
class StepInfo:
    """Passed to `on_step` after every optimizer step."""

    step: int
    epoch: int
    loss: float
    lr: float
    total_steps: int
    it_per_s: float
    keys_scaled: int | None = None  # with `scale_weight_norms`: modules scaled back this step, and the largest norm
    max_key_norm: float | None = None
    val_loss: float | None = None  # with `validation_split`: the loss on the held-out images, when measured

    def record(self) -> dict:
        out = {"step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr}
        if self.keys_scaled is not None:
            out.update(keys_scaled=self.keys_scaled, max_key_norm=self.max_key_norm)
        if self.val_loss is not None:
            out["val_loss"] = self.val_loss
        return out


class Callbacks:
    """Calls `on_step` / `on_sample` / `on_save` (and `on_resume`, when a run resumes) on each given object (or dict
    of functions) that has them."""

    def __init__(self, callbacks):
        if callbacks is None:
            self.targets = []
        elif isinstance(callbacks, (list, tuple)):
            self.targets = list(callbacks)
        else:
            self.targets = [callbacks]

    @staticmethod
    def _lookup(target, name: str):
        """`name` of a callback target: a dict's item or an object's attribute (None when absent)."""
        return target.get(name) if isinstance(target, dict) else getattr(target, name, None)

    def _call(self, name, *args, **kwargs):
        for t in self.targets:
            fn = self._lookup(t, name)
            if fn is not None:
                fn(*args, **kwargs)

    @property
    def shows_progress(self) -> bool:
        """True when a callback draws its own progress display (a notebook's live view): the loop's tqdm bar is
        then left out, so a notebook shows one progress bar, not two."""
        return any(bool(self._lookup(t, "shows_progress")) for t in self.targets)

    def on_step(self, info: StepInfo) -> None:
        self._call("on_step", info)

    def on_sample(self, **kwargs) -> None:
        self._call("on_sample", **kwargs)

    def on_save(self, **kwargs) -> None:
        self._call("on_save", **kwargs)

    def on_resume(self, **kwargs) -> None:
        """Optional: a resumed run's past (`step`, `loss_history`, `samples`: earlier `on_sample` payloads)."""
        self._call("on_resume", **kwargs)


# ---------------------------------------------------------------------------------------------- device, precision
def precision(cfg, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the frozen base weights, autocast dtype or None). LoRA weights always stay fp32."""
    if cfg.mixed_precision == "fp16":
        if device.type != "cuda":
            from .colab import GPU_RUNTIME_HINT, in_colab

            raise ConfigError(f"`mixed_precision = fp16` needs a CUDA GPU (this run is on {device.type}): "
                              + (f"{GPU_RUNTIME_HINT}; or " if in_colab() else "")
                              + "use `mixed_precision = no` (or bf16 on recent CPUs)")
        return torch.float16, torch.float16
    if cfg.mixed_precision == "bf16":
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            print(f"⚠ `mixed_precision = bf16` on {torch.cuda.get_device_name(device)}: this GPU has no bf16 "
                  f"arithmetic (it came with Ampere), so it is emulated and slow; fp16 is this GPU's fast "
                  f"precision", flush=True)
        return (torch.bfloat16 if device.type == "cuda" else torch.float32), torch.bfloat16
    return torch.float32, None


# ---------------------------------------------------------------------------------------------- the run
class Run:
    """The prepared run: components, dataset, network, schedule and output helpers (see `prepare_run`)."""

    def __init__(self, cfg, device, weight_dtype, autocast_dtype, components, dataset, network, output_dir):
        self.cfg, self.device, self.weight_dtype, self.autocast_dtype = cfg, device, weight_dtype, autocast_dtype
        self.components, self.dataset, self.network = components, dataset, network
        self.output_dir = Path(output_dir)
        self.te_trained = cfg.trains_text_encoder
        self.latent_scale = float(components.vae.config.scaling_factor)
        self.named_params = {f"{comp}.{n}": p for comp, m in network.modules.items() for n, p in m.named_parameters()
                             if p.requires_grad}
        self.final_path = final_lora_path(cfg)
        self.saved: list[Path] = []
        self.sample_paths: list[Path] = []
        self.sample_rounds: list[tuple[int, list]] = []
        self.state_dir: Path | None = None
        self.config_path: Path | None = None
        self.report_path: Path | None = None
        self.base_originals: dict[str, torch.Tensor] = {}  # weights base_weights changed in a caller's model
        self.lock = None  # the hold on output_dir (`FolderLock`), released when `train` ends
        self.started_at = unix_time()  # as sd-scripts writes it
        # sd-scripts' ss_session_id: one number for all the saves and samples of a run (a resumed run keeps its)
        self.session_id = random.SystemRandom().randint(0, 2**32)
        self._ids: dict[str, torch.Tensor] = {}
        self._hidden: dict[str, torch.Tensor] = {}
        spe = math.ceil(len(dataset) / cfg.gradient_accumulation_steps)
        self.steps_per_epoch = spe
        self.max_steps = cfg.max_train_epochs * spe if cfg.max_train_epochs else cfg.max_train_steps
        self.num_epochs = math.ceil(self.max_steps / spe)
        # epoch saves: every N epochs, or (sd-scripts' save_n_epoch_ratio, which wins as there) about that many in all
        self.save_every_n_epochs = (max(1, self.num_epochs // cfg.save_n_epoch_ratio) if cfg.save_n_epoch_ratio
                                    else cfg.save_every_n_epochs)
        self.prompts = []
        self.sample_settings = None

    def log(self, message: str) -> None:
        print(message, flush=True)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def progress_bar(self, initial: int = 0, disable: bool = False):
        from tqdm.auto import tqdm

        quiet = {"disable": True} if disable else {}  # otherwise tqdm's default (TQDM_DISABLE still applies)
        return tqdm(total=self.max_steps, initial=initial, desc="training", unit="step", dynamic_ncols=True, **quiet)

    def lrs(self, optimizer) -> float:
        """The current learning rate of the U-Net LoRA (of the text encoder's when only it trains; of the
        down-projections with LoRA+)."""
        main = [g for g in optimizer.param_groups if g.get("name") in ("unet", "text_encoder")]
        return float((main or optimizer.param_groups)[-1]["lr"])

    def intermediate_name(self, tag: str) -> Path:
        return self.output_dir / f"{self.cfg.output_name}-{tag}.{self.cfg.save_model_as}"

    def save_lora(self, path: Path, *, step: int, epoch: int) -> Path:
        """Write the LoRA (kohya format, metadata with the config) — never with NaN/inf weights."""
        from .formats import save_lora
        from .lora_metadata import build_metadata

        bad = [n for n, p in self.named_params.items() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"{len(bad)} LoRA weights are NaN/inf (e.g. {bad[0]}); {path.name} was not written "
                                f"and earlier files are intact. Lower the learning rate or use mixed_precision = no")
        # sd-scripts' dataset keys: image counts include the repeats; reg folders are listed apart; every folder's
        # tags are counted (lower-cased)
        dirs: dict[str, dict] = {}
        reg_dirs: dict[str, dict] = {}
        for sub in self.dataset.subsets:
            count = self.dataset.report.used.get(str(sub.image_dir), 0)
            (reg_dirs if sub.is_reg else dirs)[sub.image_dir.name] = {"n_repeats": sub.num_repeats, "img_count": count}
        freq: dict[str, list[str]] = {}
        for it in {ex.item.path: ex.item for ex in self.dataset.examples}.values():
            freq.setdefault(it.subset.image_dir.name, []).append(it.caption.lower())
        metadata = build_metadata(
            self.cfg, self.components, steps=step, epoch=epoch, training_started_at=self.started_at,
            resolution=self.dataset.resolution,
            num_train_images=sum(d["n_repeats"] * d["img_count"] for d in dirs.values()),
            num_reg_images=sum(d["n_repeats"] * d["img_count"] for d in reg_dirs.values()),
            tag_frequency={k: tag_frequency(v) for k, v in freq.items()}, dataset_dirs=dirs,
            reg_dataset_dirs=reg_dirs, max_train_steps=self.max_steps, num_epochs=self.num_epochs,
            num_batches_per_epoch=len(self.dataset), session_id=self.session_id)
        out = save_lora(path, self.network.state_dict(), metadata, save_precision=self.cfg.save_precision)
        self.saved.append(out)
        return out

    def sample(self, step: int, callbacks) -> None:
        """Generate the sample prompts with the current LoRA (PNG files in samples/, callbacks told) — once a step,
        when an epoch's end falls on a step that `sample_every_n_steps` samples too."""
        from .sampling import generate_samples

        if not self.prompts or (self.sample_rounds and self.sample_rounds[-1][0] == step):
            return
        images, paths = generate_samples(self.components, self.prompts, self.sample_settings,
                                         self.output_dir / "samples", f"{step:06d}",
                                         autocast_dtype=self.autocast_dtype,
                                         extra_text={STEP_TEXT: step, SESSION_TEXT: self.session_id})
        self.sample_paths += paths
        self.sample_rounds.append((step, images))
        callbacks.on_sample(step=step, images=images, prompts=[p.prompt for p in self.prompts], paths=paths)

    def restore_samples(self, step: int) -> list[dict]:
        """A resumed run's sampling rounds up to `step`, read back from samples/ (this run's only, and only those
        drawn from the current prompts), so that its grid and `sample_paths` cover the whole run. Returns them as
        `on_sample` payloads (the images of the last `GRID_ROUNDS` rounds, which the grid shows)."""
        from PIL import Image

        from .sampling import saved_rounds

        rounds = saved_rounds(self.output_dir / "samples", self.session_id, step, [p.prompt for p in self.prompts])
        payloads = []
        for i, (at, paths) in enumerate(rounds):
            self.sample_paths += paths
            if i >= len(rounds) - GRID_ROUNDS:
                images = []
                for path in paths:
                    with Image.open(path) as im:
                        images.append(im.convert("RGB"))
                self.sample_rounds.append((at, images))
                payloads.append({"step": at, "images": images, "paths": paths,
                                 "prompts": [p.prompt for p in self.prompts]})
        return payloads

    def save_grid(self) -> Path | None:
        """samples_grid.png: one row per sampling round (the latest ones), one column per prompt."""
        if not self.sample_rounds:
            return None
        from PIL import PngImagePlugin

        from .plots import image_grid
        from .sampling import save_png

        rounds = self.sample_rounds[-GRID_ROUNDS:]
        grid = image_grid([images for _, images in rounds], row_labels=[f"step {s}" for s, _ in rounds],
                          col_labels=[p.prompt for p in self.prompts])
        info = PngImagePlugin.PngInfo()
        info.add_text(SESSION_TEXT, str(self.session_id))  # whose grid it is (`overwrite` replaces only its run's)
        return save_png(grid, self.output_dir / "samples_grid.png", info)


def final_lora_path(cfg) -> Path:
    """`<output_dir>/<output_name>.<save_model_as>`: the LoRA a run writes when it ends."""
    return Path(cfg.output_dir) / f"{cfg.output_name}.{cfg.save_model_as}"


def check_earlier_run(cfg) -> None:
    """Refuse to write over an earlier run in `output_dir` (its final LoRA of this name, or a saved state) unless
    this run continues it (`resume`) or replaces it (`overwrite`): nothing trained is lost by re-running a command."""
    from .save_rotation import intermediate_saves, state_names
    from .train_state import find_state, saved_state_in

    if cfg.save_state or cfg.save_state_on_train_end:  # states are named by step: another run's would be replaced
        others = {f.name: n for f, n in state_names(cfg.output_dir).items() if n is not None and n != cfg.output_name}
        if others:
            folder, name = next(iter(others.items()))
            raise ConfigError(f"{cfg.output_dir} holds the saved states of another run ({folder}: output_name "
                              f"{name!r}), which this run's states would replace: choose another `output_dir` for "
                              f"this run, or remove those states")
    if cfg.overwrite or (cfg.resume and find_state(cfg.resume, cfg.output_dir) is not None):
        return
    final = final_lora_path(cfg)
    state = saved_state_in(cfg.output_dir)
    # a run stopped before its end leaves only its intermediate saves (`<name>-step00000400`, `-000002`, ...)
    saves = sorted(p.name for p in intermediate_saves(cfg.output_dir, cfg.output_name, cfg.save_model_as).values())
    if final.is_file() or state is not None or saves:
        what = final.name if final.is_file() else f"the saved state {state.name}" if state is not None else saves[0]
        hint = "`resume = latest` to continue it, " if state is not None else ""
        raise ConfigError(f"{cfg.output_dir} already holds an earlier run ({what}): set {hint}`overwrite = true` to "
                          f"replace it, or choose another `output_dir` or `output_name`")


def build_network(cfg, components):
    """The LoRA to train and the config that describes it: a fresh one (`network_dim`/`network_alpha`, LoCon's
    `conv_dim`), optionally starting from `network_weights`; with `dim_from_weights`, that file's own modules, ranks
    and alphas (the returned config then names its most common rank and alpha, for the metadata and the saved
    config)."""
    from collections import Counter

    from .network import add_lora, apply_lora_file

    args = cfg.network_options
    dropouts = dict(dropout=cfg.network_dropout, rank_dropout=args.get("rank_dropout", 0.0),
                    module_dropout=args.get("module_dropout", 0.0))
    if cfg.dim_from_weights:
        network = apply_lora_file(components, cfg.network_weights, adapter_name="default", trainable=True,
                                  unet=cfg.trains_unet, text_encoder=cfg.trains_text_encoder, dtype=torch.float32,
                                  **dropouts)
        kinds = {"conv": Counter(), "linear": Counter()}
        for layer in network.layers.values():
            down = layer.lora_A["default"].weight
            kind = "conv" if down.dim() == 4 and down.shape[-1] > 1 else "linear"
            kinds[kind][(layer.r["default"], float(layer.lora_alpha["default"]))] += 1
        (dim, alpha), _ = (kinds["linear"] or Counter({(cfg.network_dim, cfg.network_alpha): 1})).most_common(1)[0]
        conv = kinds["conv"].most_common(1)[0][0] if kinds["conv"] else (None, None)
        print(f"dim_from_weights: {len(network.layers)} modules from {Path(cfg.network_weights).name}, rank {dim}, "
              f"alpha {alpha:g}" + (f", conv rank {conv[0]}, alpha {conv[1]:g}" if conv[0] else ""), flush=True)
        network_args = [a for a in cfg.network_args if a.split("=", 1)[0].strip() not in ("conv_dim", "conv_alpha")]
        parts = {t.component for t in network.targets.values()}  # a file without text-encoder modules trains none
        return network, cfg.replace(network_dim=dim, network_alpha=alpha, conv_dim=conv[0], conv_alpha=conv[1],
                                    network_args=network_args,
                                    network_train_unet_only=cfg.network_train_unet_only or parts == {"unet"},
                                    network_train_text_encoder_only=cfg.network_train_text_encoder_only
                                    or parts == {"text_encoder"})
    conv_dim, conv_alpha = cfg.resolved_conv
    torch.manual_seed(cfg.seed or 0)
    network = add_lora(components, dim=cfg.network_dim, alpha=cfg.network_alpha, conv_dim=conv_dim,
                       conv_alpha=conv_alpha, unet=cfg.trains_unet, text_encoder=cfg.trains_text_encoder,
                       dtype=torch.float32, **dropouts)
    if cfg.network_weights:
        _start_from(network, components, cfg)
    return network, cfg


def _start_from(network, components, cfg) -> None:
    """Load `network_weights` into the fresh network, as sd-scripts does, but nothing of the file is dropped
    unsaid: a file for another model is refused (as `apply`/`merge` refuse it), and so is one with modules this run's
    LoRA lacks (3x3 convolutions without `conv_dim`); a part this run does not train is named."""
    from .formats import component_of, load_lora_file, parse_kohya
    from .network import check_lora_fits

    name = Path(cfg.network_weights).name
    tensors, metadata = load_lora_file(cfg.network_weights)
    weights = parse_kohya(tensors)
    check_lora_fits(components, weights, metadata, where=f"`network_weights` {name}")
    untrained_parts = {part for part, trained in (("unet", cfg.trains_unet), ("text_encoder", cfg.trains_text_encoder))
                       if not trained}
    untrained = {n for n in weights if n not in network.layers and component_of(n) in untrained_parts}
    lacking = sorted(n for n in weights if n not in network.layers and n not in untrained)
    if lacking:
        convs = [n for n in lacking if weights[n].down.dim() == 4 and weights[n].down.shape[-1] > 1]
        hint = (f"{len(convs)} are 3x3 convolutions (LoCon): set `network_args = [\"conv_dim=R\"]`, or "
                if convs else "")
        raise ConfigError(f"`network_weights` {name}: {len(lacking)} of its modules are not in the LoRA this run "
                          f"trains (e.g. {', '.join(lacking[:2])}); {hint}set `dim_from_weights = true` to train "
                          f"the file's own modules, ranks and alphas")
    if untrained:
        part = "text encoder" if not cfg.trains_text_encoder else "U-Net"
        print(f"network_weights: the file's {len(untrained)} {part} modules are left out (this run does not train "
              f"the {part}), so the new LoRA has none", flush=True)
    network.load_state_dict(weights, strict=False)


def prepare_run(cfg, components=None) -> Run:
    """Read and check the dataset, load the model (unless `components` are given), lay the dataset out for it (and
    print/save its report), cache latents, add the LoRA. The run holds its output folder (`run.lock`) until released."""
    device = pick_device(cfg)
    weight_dtype, autocast_dtype = precision(cfg, device)
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"`output_dir` {output_dir} is a file, not a folder: choose a folder for the LoRA")
    for option in ("train_data_dir", "reg_data_dir"):
        data = getattr(cfg, option)
        if data and output_dir.resolve().is_relative_to(Path(data).resolve()):
            raise ConfigError(f"`output_dir` {output_dir} is inside `{option}` {data}: the next run would train on "
                              f"its samples and plots. Choose a folder outside the images")
    check_earlier_run(cfg)
    torch.manual_seed(cfg.seed or 0)
    check_optimizer(cfg.resolved_optimizer, cfg.learning_rate, cfg.optimizer_args, device,
                    warmup=bool(cfg.lr_warmup_steps))
    _check_not_toy_data(cfg)
    # ---- data, read and checked before the model is loaded (a download): bad inputs are refused at once
    scanned = scan_dataset(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)  # only for a run that can start: a refused one leaves no folder
    lock = FolderLock.take(output_dir)  # held until `train` ends: one run at a time in a folder
    try:
        run = _load_and_build(cfg, components, device, weight_dtype, autocast_dtype, scanned, output_dir)
    except BaseException:
        lock.release()
        raise
    run.lock = lock
    return run


def _load_and_build(cfg, components, device, weight_dtype, autocast_dtype, scanned, output_dir: Path) -> Run:
    """`prepare_run` from the checked data on, its output folder held."""
    from .models import load_models

    given = components is not None
    stale = remove_stale_temporaries(output_dir) + remove_stale_temporaries(output_dir / "samples")
    if stale:
        print(f"removed {len(stale)} unfinished file(s) an interrupted run left in {output_dir} (e.g. {stale[0]})",
              flush=True)
    if components is None:
        components = load_models(cfg.pretrained_model_name_or_path, v2=cfg.v2,
                                 v_parameterization=cfg.v_parameterization, vae=cfg.vae, dtype=weight_dtype,
                                 device=str(device))
    else:
        components.to(device=device, dtype=weight_dtype)
    if components.vae.dtype != torch.float32:
        components.vae.to(dtype=torch.float32)  # encoding in fp32 avoids NaN latents; it runs once with cache_latents

    # ---- data: buckets (or the fixed size) for this model; bad files listed in the report
    dataset = TrainDataset.from_config(cfg, native_resolution=components.native_resolution,
                                       vae_scale_factor=components.vae_scale_factor, scanned=scanned)
    report = dataset.report
    note_long_captions(dataset, components.tokenizer, cfg.max_token_length or WINDOW, cfg.weighted_captions)
    print(report.format(), flush=True)

    # ---- the base model is frozen; choose attention and checkpointing
    for m in (components.unet, components.text_encoder, components.vae):
        m.requires_grad_(False)
    components.vae.eval()
    _attention(cfg, components.unet)
    if cfg.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if cfg.trains_text_encoder:
            te = components.text_encoder
            if hasattr(te, "activation_checkpointing_enable"):  # newer transformers (the old name warns)
                te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- LoRAs merged into the model first (sd-scripts' base_weights), then the LoRA to train (fp32 even on an
    #      fp16 model; seeded init of the down weights). A model the caller passed in is given back as it was if
    #      the set-up fails from here on (when training ends, `train` gives it back).
    originals = merge_base_weights(cfg, components, keep_original=given)
    network = None
    try:
        network, cfg = build_network(cfg, components)
        run = _finish_setup(cfg, device, weight_dtype, autocast_dtype, components, dataset, report, network,
                            output_dir)
    except BaseException:
        if given:
            if network is not None:
                network.remove()
            restore_weights(components, originals)
        raise
    run.base_originals = originals
    return run


def merge_base_weights(cfg, components, *, keep_original: bool) -> dict[str, torch.Tensor]:
    """sd-scripts' `base_weights`: merge these LoRA files (each at its `base_weights_multiplier`, default 1) into the
    model before the LoRA to train is added; that LoRA learns on top of them and does not contain them. Returns the
    original values of the weights changed when `keep_original` (for `restore_weights`), else {}."""
    if not cfg.base_weights:
        return {}
    from .merging import deltas_by_param, load_loras, merge_into_components
    from .model_weights import StateDictWeights

    loras = load_loras(cfg.base_weights)
    ratios = [*cfg.base_weights_multiplier, *[1.0] * (len(loras) - len(cfg.base_weights_multiplier))]
    weights = StateDictWeights.from_components(components)
    plan = deltas_by_param(loras, ratios, weights.shapes(), components.family.name)
    originals = {name: weights.get(name).detach().clone() for name in plan} if keep_original else {}
    merge_into_components(components, plan)
    print(f"base_weights: merged {', '.join(f'{Path(p).name} × {r:g}' for p, r in zip(cfg.base_weights, ratios))} "
          f"into the model ({len(plan)} weights)", flush=True)
    return originals


def restore_weights(components, originals: dict[str, torch.Tensor]) -> None:
    """Put back the weights `merge_base_weights` changed."""
    if not originals:
        return
    from .model_weights import StateDictWeights

    weights = StateDictWeights.from_components(components)
    with torch.no_grad():
        for name, value in originals.items():
            weights.get(name).copy_(value)


def _finish_setup(cfg, device, weight_dtype, autocast_dtype, components, dataset, report, network,
                  output_dir) -> Run:
    """The run around the network: outputs, sample prompts, latents."""
    network.trainable_parameters()
    components.unet.train()
    components.text_encoder.train(cfg.trains_text_encoder)

    run = Run(cfg, device, weight_dtype, autocast_dtype, components, dataset, network, output_dir)
    run.config_path = cfg.save_toml(output_dir / f"{cfg.output_name}.toml")
    run.report_path = write_text(output_dir / "dataset_report.txt", report.format() + "\n")
    write_json(output_dir / "dataset_report.json", report.to_dict())
    _prepare_samples(cfg, run)

    # ---- latents: encode each image once (memory, and disk with cache_latents_to_disk)
    held_out = dataset.validation.examples if dataset.validation is not None else []
    if cfg.cache_latents:
        from tqdm.auto import tqdm

        with (tqdm(total=len(dataset.examples) + len(held_out), desc="caching latents", unit="img") as bar,
              keep_freed_memory(device.type == "cpu")):
            stats = dataset.cache_latents(components.vae, run.latent_scale, to_disk=cfg.cache_latents_to_disk,
                                          progress=bar.update)
            if held_out:
                val_stats = dataset.validation.cache_latents(components.vae, run.latent_scale,
                                                             to_disk=cfg.cache_latents_to_disk, progress=bar.update)
                stats = {k: stats[k] + val_stats[k] for k in stats}
        if stats["from_disk"]:
            run.log(f"latents: {stats['from_disk']} read from the disk cache, {stats['encoded']} encoded")
    n_reg = sum(1 for ex in dataset.examples if ex.item.subset.is_reg)
    run.log(f"{len(dataset.examples) - n_reg} training images" + (f" + {n_reg} regularisation" if n_reg else "")
            + (f" ({len(held_out)} more held out for the validation loss)" if held_out else "")
            + f", {len(dataset)} batches per epoch, {run.num_epochs} epochs, {run.max_steps} steps on {device}"
            + f"; buckets {dataset.bucket_counts()}")
    if device.type == "cpu":
        sizes = [ex.choice.bucket for ex in dataset.examples]
        pixels = sum(w * h for w, h in sizes) / len(sizes)
        note = cpu_training_note(sum(p.numel() for p in components.unet.parameters()), run.max_steps,
                                 cfg.train_batch_size * cfg.gradient_accumulation_steps, pixels)
        if note:
            from .colab import GPU_RUNTIME_HINT, in_colab

            run.log(note + (f"\n  {GPU_RUNTIME_HINT}" if in_colab() else ""))
    return run


FULL_SIZE_UNET = 300_000_000  # parameters: SD1/SD2 U-Nets have ~865M; the toy and test models a few million
CPU_SECONDS_PER_IMAGE = (10, 40)  # a 512-px SD1.5 step on CPU, batch 1: 12 s on 2 quiet cores, 40 s on busy ones


def cpu_training_note(unet_params: int, steps: int, images_per_step: int, pixels: float) -> str | None:
    """A warning when a full-size Stable Diffusion U-Net is about to train on the CPU: how long the run may take
    (scaled from the measured 512-px step by images and pixels per step) and the RAM it needs; None otherwise."""
    if unet_params < FULL_SIZE_UNET:
        return None
    work = images_per_step * pixels / (512 * 512)
    low, high = (s * work for s in CPU_SECONDS_PER_IMAGE)
    return (f"⚠ a full-size Stable Diffusion U-Net ({unet_params / 1e6:.0f}M parameters) is training on the CPU: "
            f"about {_seconds(low)}–{_seconds(high)} s a step, so {steps} steps take about "
            f"{_duration(steps * low)}–{_duration(steps * high)}, with about 8 GB of RAM; a CUDA GPU (Colab's free "
            f"T4 included) is many times faster (`device = cuda`, `mixed_precision = fp16`)")


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _attention(cfg, unet) -> None:
    if cfg.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # noqa: BLE001 - ImportError/ValueError/RuntimeError all mean "not usable here"
            raise TrainingError(f"`xformers = true` but xformers cannot be used here ({str(e).splitlines()[0]}): "
                                f"install an xformers build matching your torch and CUDA, or leave it off — "
                                f"PyTorch's SDPA attention is the default and as fast on current GPUs") from None
    elif not cfg.sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


def _prepare_samples(cfg, run: Run) -> None:
    """Read the prompt file and make its samplers now (a bad line, or a sampler missing a package, fails before
    training, not after an hour)."""
    from .sampling import SampleSettings, load_prompts, make_sampler

    if not (cfg.sample_prompts or cfg.sample_at_end or cfg.sample_at_first or cfg.sample_every_n_steps
            or cfg.sample_every_n_epochs):
        return
    run.prompts = load_prompts(cfg.sample_prompts, [] if cfg.sample_prompts else _first_captions(run.dataset, 2))
    w, h = run.dataset.resolution
    run.sample_settings = SampleSettings(width=w, height=h, seed=cfg.seed or 0, sampler=cfg.sample_sampler,
                                         clip_skip=cfg.clip_skip)
    for name in dict.fromkeys([cfg.sample_sampler] + [p.sampler for p in run.prompts if p.sampler]):
        make_sampler(name, run.components.noise_scheduler)


def _first_captions(dataset, n: int) -> list[str]:
    """The first `n` different captions of the training (not regularisation) images, as trained: prefix, suffix, no
    marker, the first wildcard choices."""
    captions = []
    for ex in dataset.examples:
        caption = process_caption(ex.item.caption, **ex.item.subset.caption_text_options())
        if not ex.item.subset.is_reg and caption and caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                break
    return captions


def _check_not_toy_data(cfg) -> None:
    """The toy lessons' data (`data_examples/`, tiny pictures of shapes) are for the toy model: with another model
    they are a leftover default (e.g. a notebook's regularisation folder after switching presets), refused by name."""
    from .models import TOY_NAME
    from .toy.examples import toy_example_path

    if cfg.pretrained_model_name_or_path == TOY_NAME:
        return
    for key in ("train_data_dir", "reg_data_dir", "dataset_config", "sample_prompts"):
        if (folder := toy_example_path(getattr(cfg, key))) is not None:
            raise ConfigError(f"`{key}` {getattr(cfg, key)} is the toy model's lesson data ({folder.name}/), made for "
                              f"`{TOY_NAME}`, not for {cfg.pretrained_model_name_or_path}: set your own"
                              + (" (or none)" if key in ("reg_data_dir", "sample_prompts") else ""))


def build_optimizer(cfg, run: Run):
    """Optimizer with one param group per component (text encoder first, U-Net last) — with LoRA+, two: the
    up-projections learn at `loraplus_*_lr_ratio` times the component's rate —, LR schedule, grad scaler."""
    lrs = {"text_encoder": cfg.resolved_text_encoder_lr, "unet": cfg.resolved_unet_lr}
    param_groups = []
    for comp in ("text_encoder", "unet"):
        params = {n: p for n, p in run.named_params.items() if n.startswith(comp + ".")}
        ratio = cfg.loraplus_ratio(comp)
        up = [p for n, p in params.items() if ratio and ".lora_B." in n]  # peft's name of the up-projection
        rest = [p for n, p in params.items() if not (ratio and ".lora_B." in n)]
        param_groups += [{"params": ps, "lr": lr, "name": name} for ps, lr, name in (
            (rest, lrs[comp], comp), (up, lrs[comp] * (ratio or 1), f"{comp} up (LoRA+)")) if ps]
    optimizer = make_optimizer(cfg.resolved_optimizer, param_groups, cfg.learning_rate, cfg.optimizer_args,
                               device=run.device)
    scheduler = make_scheduler(cfg.lr_scheduler, optimizer,
                               warmup_steps=resolve_warmup_steps(cfg.lr_warmup_steps, run.max_steps),
                               total_steps=run.max_steps, num_cycles=cfg.lr_scheduler_num_cycles,
                               power=cfg.lr_scheduler_power,
                               decay_steps=resolve_warmup_steps(cfg.lr_decay_steps, run.max_steps),
                               timescale=cfg.lr_scheduler_timescale, min_lr_ratio=cfg.lr_scheduler_min_lr_ratio)
    if relative_step_size(optimizer):
        run.log("Adafactor sets its own step size (relative_step, sd-scripts' default): learning_rate, unet_lr, "
                "text_encoder_lr and lr_scheduler are not used (`optimizer_args = [\"relative_step=False\"]` "
                "uses them)")
    scaler = torch.amp.GradScaler(run.device.type) if cfg.mixed_precision == "fp16" else None
    return optimizer, scheduler, scaler


def note_long_captions(dataset, tokenizer, max_tokens: int, emphasis: bool = False) -> None:
    """List in the dataset report each image whose caption (with prefix and suffix; with `emphasis`, without its
    brackets and weights) is longer than the text encoder reads (`max_tokens`), so a cut-off caption is never a
    surprise."""
    seen = set()
    for ex in dataset.examples:
        item = ex.item
        if item.path in seen:
            continue
        seen.add(item.path)
        caption = process_caption(item.caption, **item.subset.caption_text_options())  # as trained, first choices
        caption = without_emphasis(caption) if emphasis else caption
        n = len(tokenizer.tokenize(caption))
        if n > max_tokens:
            more = "; max_token_length = 150 or 225 reads longer captions" if max_tokens < 225 else ""
            dataset.report.note(item.path, f"caption is {n} tokens: the text encoder reads the first {max_tokens}"
                                           + more)


# ---------------------------------------------------------------------------------------------- per-step helpers
def latents_of(batch, run: Run, gen: torch.Generator) -> torch.Tensor:
    """The batch's scaled latents (fp32): from the cache, or encoded by the VAE now (`cache_latents = false`)."""
    if batch.latents is not None:
        return batch.latents.to(run.device, non_blocking=True)
    seeds = torch.randint(0, 2**31 - 1, (batch.pixels.shape[0],), generator=gen).tolist()
    return encode(run.components.vae, batch.pixels, run.latent_scale, seeds).float()


def _text_states(captions: list[str], run: Run) -> torch.Tensor:
    """The text encoder's states of the captions, k windows of 75 tokens (`max_token_length`); with
    `weighted_captions`, their tokens' emphasis applied (sd-scripts: the states × the weights). The token ids (and
    weights) are cached per caption."""
    missing = [c for c in dict.fromkeys(captions) if c not in run._ids]
    if missing:
        tokenizer, max_tokens = run.components.tokenizer, run.cfg.max_token_length or WINDOW
        if run.cfg.weighted_captions:
            entries = zip(*weighted_token_windows(tokenizer, missing, max_tokens))
        else:
            entries = ((ids, None) for ids in token_windows(tokenizer, missing, max_tokens))
        if len(run._ids) > TEXT_CACHE_LIMIT:
            run._ids.clear()
        run._ids.update(zip(missing, entries))
    ids = torch.stack([run._ids[c][0] for c in captions]).to(run.device)
    states = encode_windows(run.components.text_encoder, ids, run.cfg.clip_skip)
    if run.cfg.weighted_captions:
        states = apply_emphasis(states, torch.stack([run._ids[c][1] for c in captions]).to(run.device))
    return states


def encode_text(captions: list[str], run: Run) -> torch.Tensor:
    """Captions → encoder hidden states. Tokens are cached per caption; with a frozen text encoder (unet-only
    training) its outputs are cached too, so repeated captions cost nothing."""
    if run.te_trained:
        return _text_states(captions, run)
    missing = [c for c in dict.fromkeys(captions) if c not in run._hidden]
    if missing:
        with torch.no_grad():
            hidden = _text_states(missing, run)
        if len(run._hidden) > TEXT_CACHE_LIMIT // ((run.cfg.max_token_length or WINDOW) // WINDOW):  # same memory
            run._hidden.clear()
        run._hidden.update(zip(missing, hidden))
    return torch.stack([run._hidden[c] for c in captions])


def write_history(output_dir: Path, history: list[dict]) -> Path:
    """loss_history.csv and loss_history.json (atomic); returns the CSV path."""
    buf = io.StringIO()
    extra = [k for k in ("val_loss", "keys_scaled", "max_key_norm") if any(k in r for r in history)]
    writer = csv.DictWriter(buf, fieldnames=["step", "epoch", "loss", "lr", *extra])
    writer.writeheader()
    writer.writerows(history)
    path = write_text(output_dir / "loss_history.csv", buf.getvalue())
    write_json(output_dir / "loss_history.json", history)
    return path
