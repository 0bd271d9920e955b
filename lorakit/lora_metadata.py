"""The metadata written into a LoRA's safetensors header: sd-scripts' `ss_*` keys, `modelspec.*`, the
`sshs_*` hashes, and lorakit's own resolved training config. All values are strings (a safetensors rule).

- `build_metadata(cfg, components, *, steps=..., ...)` — for a trained LoRA (the `train` job).
- `lora_base_metadata(family, prediction_type, *, network_dim, ...)` — for LoRAs made by merge/extract/resize.
- `sshs_hashes(tensors, metadata) -> (sshs_model_hash, sshs_legacy_hash)` — exactly as sd-scripts computes them.
- `training_config_of(metadata)`, `metadata_summary(metadata)` — reading side, used by `inspect`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import json
import time
from collections import Counter
from pathlib import Path

TRAINING_CONFIG_KEY = "lorakit.training_config"
VERSION_KEY = "lorakit.version"
SESSION_TEXT = "lorakit_session"  # a training sample PNG's text chunk: the ss_session_id of its run
STEP_TEXT = "lorakit_step"  # and the optimizer step it shows
# sd-scripts keeps these even with `no_metadata`: readers need them to know what the file is
MINIMAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def stringify_metadata(metadata: dict) -> dict[str, str]:
    """Make every value a string: str for scalars, JSON for dicts/lists; None values are dropped."""
    out = {}
    for k, v in metadata.items():
        if v is None:
            continue
        out[str(k)] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
    return out


def sshs_hashes(tensors: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-scripts precalculates them for sd-webui-additional-networks.

    The tensors are serialised with only the `ss_*` metadata (so user metadata does not change the hashes);
    the model hash is the sha256 of those bytes after the header (8-byte length + JSON), the legacy hash the
    first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (of the empty string for small files).
    """
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    stream = io.BytesIO(data)
    stream.seek(0x100000)
    legacy_hash = hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def unix_time() -> str:
    """Now as sd-scripts writes `ss_training_started_at` / `_finished_at`: seconds since 1970 (A1111's metadata
    panel reads them with `float()`; an ISO date there makes it fail)."""
    return repr(time.time())


TIMESTAMP_KEYS = ("ss_training_started_at", "ss_training_finished_at")


def lora_base_metadata(family, prediction_type: str, *, network_dim: int | None, network_alpha: float | None,
                       conv_dim: int | None = None, conv_alpha: float | None = None, resolution: int | tuple | None
                       = None, title: str | None = None, clip_skip: int | None = None, extra: dict | None = None,
                       network_args: dict | None = None) -> dict[str, str]:
    """The metadata every lorakit LoRA carries: what it is for (family, network) and the modelspec block.

    `family` is a `lorakit.families.Family`; `resolution` an int or (width, height), default the family's.
    """
    from . import __version__
    from .families import base_model_version, modelspec_architecture

    w, h = (resolution, resolution) if isinstance(resolution, int) else (resolution or (family.default_resolution,) * 2)
    args = {}
    if conv_dim is not None:
        args = {"conv_dim": str(conv_dim), "conv_alpha": f"{conv_alpha if conv_alpha is not None else conv_dim:g}"}
    args.update({k: f"{v:g}" for k, v in (network_args or {}).items()})  # e.g. LoRA+ ratios, as sd-scripts saves
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": network_dim,
        "ss_network_alpha": None if network_alpha is None else f"{network_alpha:g}",
        "ss_network_args": args,
        "ss_v2": family.v2,
        "ss_base_model_version": base_model_version(family, prediction_type),
        "ss_resolution": f"({w}, {h})",
        "ss_clip_skip": clip_skip,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(family, prediction_type),
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or "lora",
        "modelspec.date": _now(),
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.encoder_layer": clip_skip if clip_skip and clip_skip > 1 else None,
        VERSION_KEY: __version__,
    }
    meta.update(extra or {})
    return stringify_metadata(meta)


def base_model_hashes(model: str) -> dict[str, str]:
    """`ss_sd_model_hash` (A1111's old 8-digit hash) and `ss_new_sd_model_hash` (the file's sha256) of a base model
    given as a single file, as sd-scripts writes them: A1111 and model sites find the base checkpoint by them. A
    folder or a Hub id has none."""
    path = Path(str(model))
    if not path.is_file():
        return {}
    st = path.stat()
    legacy, full = _file_hashes(str(path.resolve()), st.st_size, st.st_mtime_ns)
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": full}


@functools.lru_cache(maxsize=4)
def _file_hashes(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """Read once per run (a multi-GB checkpoint): keyed by the file's size and modification time too."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        while chunk := f.read(1 << 24):
            full.update(chunk)
    return legacy, full.hexdigest()


def build_metadata(cfg, components, *, steps: int | None = None, epoch: int | None = None,
                   training_started_at: str | None = None, training_finished_at: str | None = None,
                   resolution: int | tuple | None = None, num_train_images: int | None = None,
                   num_reg_images: int | None = None, tag_frequency: dict | None = None,
                   dataset_dirs: dict | None = None, reg_dataset_dirs: dict | None = None,
                   max_train_steps: int | None = None, num_epochs: int | None = None,
                   num_batches_per_epoch: int | None = None, session_id: int | None = None) -> dict[str, str]:
    """The header of a trained LoRA: sd-scripts' `ss_*` keys, modelspec and lorakit's resolved config as JSON.

    `cfg` is the `TrainConfig` (the only source of option values), `components` the `SDComponents` trained on;
    the keyword arguments are what only the training run knows. With `cfg.no_metadata` only the keys readers
    need to identify the file are kept, the modelspec block with them (as sd-scripts does).
    """
    conv_dim, conv_alpha = cfg.resolved_conv
    if resolution is None:
        from .config.schema import parse_resolution

        resolution = parse_resolution(cfg.resolution) or components.native_resolution
    meta = lora_base_metadata(
        components.family, components.prediction_type, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha,
        conv_dim=conv_dim, conv_alpha=conv_alpha, resolution=resolution, title=cfg.output_name,
        clip_skip=cfg.clip_skip, network_args={k: v for k, v in cfg.network_options.items()
                                               if k not in ("conv_dim", "conv_alpha")})  # those come resolved
    if cfg.no_metadata:  # as sd-scripts: the minimal ss_* keys, and the modelspec block all the same
        return {k: v for k, v in meta.items() if k in MINIMAL_KEYS or k.startswith("modelspec.")}
    meta.update(base_model_hashes(cfg.pretrained_model_name_or_path))
    meta.update(stringify_metadata({
        "ss_sd_model_name": Path(str(cfg.pretrained_model_name_or_path)).name,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.resolved_unet_lr,
        "ss_text_encoder_lr": cfg.resolved_text_encoder_lr,
        "ss_network_dropout": cfg.network_dropout,
        "ss_network_train_unet_only": not cfg.trains_text_encoder,
        "ss_network_train_text_encoder_only": not cfg.trains_unet,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps if max_train_steps is not None else cfg.max_train_steps,
        "ss_num_epochs": num_epochs,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps,
        "ss_epoch": epoch,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_max_token_length": cfg.max_token_length,
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount if cfg.multires_noise_iterations else None,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "ss_debiased_estimation": cfg.debiased_estimation_loss,
        "ss_zero_terminal_snr": cfg.zero_terminal_snr,
        "ss_scale_v_pred_loss_like_noise_pred": cfg.scale_v_pred_loss_like_noise_pred,
        "ss_v_pred_like_loss": cfg.v_pred_like_loss,
        "ss_seed": cfg.seed,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_optimizer": cfg.resolved_optimizer + (f"({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else ""),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_scale_weight_norms": cfg.scale_weight_norms,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs or 0,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_flip_aug": cfg.flip_aug,
        "ss_color_aug": cfg.color_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_cache_latents": cfg.cache_latents,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_scale": cfg.huber_scale,
        "ss_huber_c": cfg.huber_c,
        "ss_validation_split": cfg.validation_split,
        "ss_validation_seed": cfg.validation_seed,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_training_comment": cfg.training_comment,
        "ss_session_id": session_id,  # sd-scripts': one random number for all the saves of a run
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": training_finished_at or unix_time(),
        "ss_tag_frequency": tag_frequency,
        "ss_dataset_dirs": dataset_dirs,
        "ss_reg_dataset_dirs": reg_dataset_dirs,
        TRAINING_CONFIG_KEY: cfg.to_dict(),
    }))
    return meta


def training_config_of(metadata: dict[str, str]) -> dict | None:
    """lorakit's resolved training config stored in a LoRA's header, or None."""
    raw = metadata.get(TRAINING_CONFIG_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


_SUMMARY_KEYS = ("ss_base_model_version", "modelspec.architecture", "modelspec.title", "ss_sd_model_name",
                 "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                 "ss_resolution", "ss_clip_skip", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_unet_lr",
                 "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler", "ss_mixed_precision", "ss_seed",
                 "ss_noise_offset", "ss_min_snr_gamma", "ss_training_comment", "ss_training_started_at",
                 "ss_training_finished_at", "sshs_model_hash", "sshs_legacy_hash", VERSION_KEY)


def metadata_summary(metadata: dict[str, str]) -> dict[str, str]:
    """The keys worth printing, in a fixed order; the rest is counted (the tag frequency summarised)."""
    out = {k: metadata[k] for k in _SUMMARY_KEYS if metadata.get(k) not in (None, "", "None")}
    for k in TIMESTAMP_KEYS:
        if k in out:
            out[k] = _readable_time(out[k])
    if metadata.get("ss_tag_frequency"):
        try:
            freq = json.loads(metadata["ss_tag_frequency"])
            tags = _total_tag_counts(freq)
            top = ", ".join(f"{t} ({n})" for t, n in tags.most_common(8))
            out["ss_tag_frequency"] = f"{len(tags)} tags; top: {top}"
        except (json.JSONDecodeError, AttributeError, TypeError):
            out["ss_tag_frequency"] = "(unreadable)"
    shown = set(out) | {TRAINING_CONFIG_KEY}
    rest = [k for k in metadata if k not in shown]
    if rest:
        out["(other keys)"] = str(len(rest))
    return out


def _readable_time(value: str) -> str:
    """A timestamp key as a UTC date (sd-scripts' unix seconds; an older lorakit file's ISO date is kept)."""
    try:
        return _dt.datetime.fromtimestamp(float(value), _dt.timezone.utc).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return value


def _total_tag_counts(freq: dict) -> Counter:
    """`ss_tag_frequency` is {dataset_dir: {tag: count}}; sum the counts over all folders."""
    total = Counter()
    for per_dir in freq.values():
        total.update({str(t): int(n) for t, n in per_dir.items()})
    return total
