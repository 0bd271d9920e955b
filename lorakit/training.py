"""`lorakit train`: train a LoRA on a Stable Diffusion model (DreamBooth folders or captioned images).

`train(cfg)` is the whole job: set up (`lorakit.training_setup`), then the loop below, top to bottom; its per-batch
loss is `denoising_loss`, one comment per diffusion step. The maths follow sd-scripts (docs/KOHYA_FORMAT.md §7):
latents × scale, Gaussian noise (+ offset and multires noise, `lorakit.noise`), uniform timesteps, DDPM forward
noising (+ input perturbation), epsilon or v target, per-sample MSE (× loss mask) × sample weight × timestep weight
(min-SNR, debiased), mean. With `validation_split`, `validation_loss` measures the same loss on held-out images.

Outputs in `output_dir`: `<output_name>.safetensors` (kohya format), `<output_name>.toml` (the config),
`loss_history.csv/.json` (with `val_loss` where the validation loss was measured), `dataset_report.txt/.json`,
`samples/*.png` and `samples_grid.png`, and with `save_state` the `state-<step>/` folders that `resume` continues
from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .config.train import HUBER_LOSSES
from .errors import ConfigError, TrainingError, memory_advice
from .host_memory import keep_freed_memory
from .noise import (
    elementwise_loss,
    huber_thresholds,
    input_noise,
    snr_weights,
    training_noise,
    training_schedule,
    weight_snr,
)
from .sampling import eval_mode
from .save_rotation import earlier_run, prune_saves, remove_replaced
from .skip_gradients import frozen_skip_gradients
from .train_state import (
    check_config,
    check_layout,
    clear_latest,
    find_state,
    load_state,
    restore_params,
    rng_state,
    save_state,
    saved_state_in,
    set_rng_state,
)
from .training_setup import (
    Callbacks,
    StepInfo,
    build_optimizer,
    encode_text,
    latents_of,
    prepare_run,
    restore_weights,
    write_history,
)


@dataclass
class TrainResult:
    """What a run produced (returned by `train`)."""

    lora_path: Path
    output_dir: Path
    steps: int
    epochs: int
    final_loss: float | None
    loss_history: list[dict] = field(default_factory=list)
    history_csv: Path | None = None
    sample_paths: list[Path] = field(default_factory=list)
    samples_grid: Path | None = None
    saved: list[Path] = field(default_factory=list)
    state_dir: Path | None = None
    config_path: Path | None = None
    report_path: Path | None = None

    def __repr__(self) -> str:
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        return f"TrainResult({self.lora_path}, steps={self.steps}, epochs={self.epochs}, final_loss={loss})"


TRAIN_MEMORY_ADVICE = ("set `gradient_checkpointing = true`, a lower `train_batch_size` (with "
                       "`gradient_accumulation_steps` to keep the effective batch), `mixed_precision = fp16` on a GPU, "
                       "`cache_latents = true`, a smaller `resolution` / `max_bucket_reso`, or `optimizer_type = "
                       "AdamW8bit`. The last saved LoRA and state are intact")


def train(cfg: TrainConfig | None = None, /, callbacks=None, components=None, **overrides) -> TrainResult:
    """Train a LoRA. `cfg` is a `TrainConfig` (or None: built from `overrides`); keyword overrides win.

    `callbacks`: an object (or a list of them) with any of `on_step(info)`, `on_sample(step=, images=, prompts=,
    paths=)`, `on_save(step=, path=)` and, when the run resumes, `on_resume(step=, loss_history=, samples=)` (its
    earlier `on_sample` payloads, read back from samples/) — e.g. a notebook's live view.
    `components`: an already loaded `SDComponents` to train on instead of loading `pretrained_model_name_or_path`
    (a notebook keeps one model in memory); the LoRA is removed from it again when training ends.
    """
    cfg = TrainConfig.from_dict(overrides) if cfg is None else (cfg.replace(**overrides) if overrides else cfg)
    if cfg.seed is None:
        cfg = cfg.replace(seed=_seed_for(cfg))
    with memory_advice(TRAIN_MEMORY_ADVICE):
        run = prepare_run(cfg, components)  # device, precision, models, dataset (+ report), latent cache, LoRA
        try:
            # on a CPU, malloc keeps the memory each step frees for the next one (no page faults per step); the
            # U-Net's backward pass skips the input gradient of skip connections that need none (conv_in's output)
            with keep_freed_memory(run.device.type == "cpu"), frozen_skip_gradients(run.components.unet):
                return _train_loop(cfg, run, Callbacks(callbacks))
        finally:
            run.lock.release()
            if components is not None:  # the caller's model, given back as it was
                run.network.remove()
                restore_weights(run.components, run.base_originals)


def _seed_for(cfg: TrainConfig) -> int:
    """`seed = none`: a random seed, printed and saved with the run (its config, metadata and states); a resumed
    run takes the seed of the state it continues, so it stays exact."""
    import random

    folder = find_state(cfg.resume, cfg.output_dir) if cfg.resume else None
    saved = TrainConfig.from_toml(folder / "config.toml").seed if folder and (folder / "config.toml").is_file() \
        else None
    seed = saved if saved is not None else random.SystemRandom().randrange(2**31)
    print(f"seed = none: this run uses seed {seed}" + (" (the resumed state's)" if saved is not None else
                                                        " (saved with the run, to repeat it)"))
    return seed


def optimizer_step(optimizer, scheduler, scaler, params, max_grad_norm: float | None) -> bool:
    """Unscale (fp16), clip the gradient norm, step, advance the LR schedule, clear the gradients. Returns whether
    the weights were updated: with fp16, the grad scaler skips a step whose gradients overflowed (and lowers its
    scale); the LR schedule then stays where it is, as accelerate does."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    stepped = True
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale
    else:
        optimizer.step()
    if stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


def _image_key(path: Path) -> str:
    """An image as a resumed run must find it again: its folder's and its own name (the data may move, with
    `train_data_dir`), and its size in bytes (other pixels under the same name)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    return f"{path.parent.name}/{path.name}:{size}"


def run_layout(cfg: TrainConfig, dataset) -> dict:
    """What a saved position means: the images (their folders, names and sizes) and repeats drawn, batches per
    epoch, accumulation."""
    import hashlib

    images = sorted(f"{_image_key(ex.item.path)}:{ex.item.repeats}:{ex.batch_size}" for ex in dataset.examples)
    return {"images": hashlib.sha256("\n".join(images).encode()).hexdigest()[:16] + f" ({len(images)} draws)",
            "batches per epoch": len(dataset), "gradient_accumulation_steps": cfg.gradient_accumulation_steps}


@dataclass
class Diffusion:
    """The training noise schedule and what the loss reads from it (built once per run)."""

    noise_scheduler: object  # DDPM schedule (zero-terminal-SNR rescaled with `zero_terminal_snr`)
    alphas_cumprod: torch.Tensor  # ᾱ_t of that schedule on the training device (the Huber thresholds)
    snr: torch.Tensor  # SNR_t for the loss weights: of the model's betas, before the rescale (sd-scripts; finite)
    t_min: int
    t_max: int
    v_target: bool  # v-prediction model

    @classmethod
    def of(cls, cfg: TrainConfig, run) -> Diffusion:
        schedule = training_schedule(run.components.noise_scheduler, cfg.zero_terminal_snr)
        return cls(schedule, schedule.alphas_cumprod.to(run.device), weight_snr(schedule).to(run.device),
                   cfg.min_timestep,
                   min(cfg.max_timestep, schedule.config.num_train_timesteps),
                   run.components.prediction_type == "v_prediction")


def denoising_loss(batch, run, diffusion: Diffusion, gen: torch.Generator, timestep: int | None = None) -> torch.Tensor:
    """Steps 1-8 of a training step: the batch's mean weighted denoising loss, its random numbers from `gen`.
    `timestep`: every sample at this timestep (the validation loss) instead of uniformly drawn ones."""
    cfg, comps, device = run.cfg, run.components, run.device
    with run.autocast():
        # 1. encode: images -> latents (cached, or through the VAE now), × the latent scale (0.18215)
        latents = latents_of(batch, run, gen)
        bsz = latents.shape[0]
        # 2. noise ε ~ N(0, I), with sd-scripts' offset and multires options (lorakit.noise)
        noise = training_noise(latents, gen, offset=cfg.noise_offset,
                               offset_random_strength=cfg.noise_offset_random_strength,
                               adaptive_scale=cfg.adaptive_noise_scale,
                               multires_iterations=cfg.multires_noise_iterations,
                               multires_discount=cfg.multires_noise_discount)
        # 3. timestep t ~ U{min_timestep, ..., max_timestep - 1} per sample (default: all T of them; sd-scripts:
        #    t = max_timestep when the two are equal)
        if timestep is None and diffusion.t_min == diffusion.t_max:
            timestep = diffusion.t_max
        timesteps = (torch.randint(diffusion.t_min, diffusion.t_max, (bsz,), generator=gen) if timestep is None
                     else torch.full((bsz,), timestep)).to(device)
        # 4. forward diffusion q(x_t | x_0): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (with input perturbation,
        #    ε + γ·ξ here while the target stays ε)
        noisy = diffusion.noise_scheduler.add_noise(
            latents, input_noise(noise, gen, cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength), timesteps)
        # 5. condition: caption -> text-encoder hidden states (with clip_skip)
        hidden = encode_text(batch.captions, run)
        # 6. predict with the LoRA-adapted U-Net
        pred = comps.unet(noisy.to(run.weight_dtype), timesteps, hidden.to(run.weight_dtype)).sample
        # 7. target: the noise ε, or the velocity v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)
        target = diffusion.noise_scheduler.get_velocity(latents, noise, timesteps) if diffusion.v_target else noise
        # 8. loss: per-sample mean of the elementwise loss (squared error; or `loss_type` l1 / huber / smooth_l1,
        #    lorakit.noise.elementwise_loss) × each latent pixel's loss mask (masked_loss / alpha_mask) × sample
        #    weight (reg images: prior_loss_weight) × the timestep's weight (Min-SNR: min(SNR, γ)/SNR for ε,
        #    /(SNR + 1) for v; debiased estimation: 1/√SNR; sd-scripts' v-prediction scalings: snr_weights)
        huber_c = huber_thresholds(cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, timesteps,
                                   diffusion.alphas_cumprod, diffusion.noise_scheduler.config.num_train_timesteps
                                   ) if cfg.loss_type in HUBER_LOSSES else None
        loss = elementwise_loss(pred.float(), target.float(), cfg.loss_type, huber_c)
        if batch.masks is not None:
            loss = loss * batch.masks.to(device)
        loss = loss.mean(dim=(1, 2, 3))
        loss = loss * batch.weights.to(device) * snr_weights(
            diffusion.snr[timesteps], v_prediction=diffusion.v_target, min_snr_gamma=cfg.min_snr_gamma,
            debiased=cfg.debiased_estimation_loss, scale_v_like_noise=cfg.scale_v_pred_loss_like_noise_pred,
            v_pred_like=cfg.v_pred_like_loss)  # all ones without these options
        return loss.mean()


VALIDATION_TIMESTEPS = 4  # sd-scripts' validation: 200, 400, 600, 800 of 1000


@torch.no_grad()
def validation_loss(run, diffusion: Diffusion) -> float:
    """The mean loss on the held-out images (`validation_split`), as sd-scripts measures it: each batch without
    augmentations, at four timesteps spread evenly over the trained range, its noise from the validation seed —
    the same inputs every time, so two validations differ only by what the LoRA learned in between. Dropout is
    off meanwhile, and the training's random numbers are untouched."""
    cfg, val = run.cfg, run.dataset.validation
    seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
    timesteps = torch.linspace(diffusion.t_min, diffusion.t_max, VALIDATION_TIMESTEPS + 2)[1:-1].long().tolist()
    losses = []
    with eval_mode(run.components.unet, run.components.text_encoder):
        for position, indices in enumerate(val.batches(0)[:cfg.max_validation_steps or None]):
            batch = val.load(indices, 0, position, augment=False)
            for t in timesteps:
                gen = torch.Generator().manual_seed((seed or 0) * 1_000_003 + position * 1_009 + t)
                losses.append(denoising_loss(batch, run, diffusion, gen, timestep=t).item())
    return sum(losses) / len(losses)


def _validates(cfg: TrainConfig, step: int, max_steps: int, epoch: int, epoch_done: bool) -> bool:
    """Whether to measure the validation loss after `step`: every `validate_every_n_steps`, at the end of every
    `validate_every_n_epochs`-th epoch (unset: every epoch), and after the last step."""
    n_steps, n_epochs = cfg.validate_every_n_steps, cfg.validate_every_n_epochs
    return (step == max_steps or bool(n_steps and step % n_steps == 0)
            or (epoch_done and (n_epochs is None or bool(n_epochs and (epoch + 1) % n_epochs == 0))))


def _sample_due_at_end(cfg: TrainConfig, step: int, resume_point: tuple[int, int]) -> bool:
    """Whether the last step is one that `sample_every_n_steps` or (the last epoch having ended)
    `sample_every_n_epochs` samples: the loop leaves the last step to the end of the run, after the final save."""
    epochs_done, batches_into_next = resume_point
    return bool(step and ((cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0)
                          or (cfg.sample_every_n_epochs and batches_into_next == 0 and epochs_done
                              and epochs_done % cfg.sample_every_n_epochs == 0)))


def _saved_config(folder: Path) -> dict | None:
    """The options a state was saved with (its `config.toml`), or None when it has none that this version reads."""
    try:
        return TrainConfig.from_toml(folder / "config.toml").to_dict()
    except (OSError, ConfigError):
        return None


def _train_loop(cfg: TrainConfig, run, cbs: Callbacks) -> TrainResult:
    """The loop: from the prepared run to the saved LoRA."""
    dataset = run.dataset
    named_params = run.named_params  # {"unet.<path>": Parameter, ...}: the LoRA weights being trained
    params = list(named_params.values())
    optimizer, scheduler, scaler = build_optimizer(cfg, run)
    diffusion = Diffusion.of(cfg, run)
    accumulation = cfg.gradient_accumulation_steps
    seed = cfg.seed or 0

    # ---- where to start: fresh, or exactly where a saved state stopped
    step, start_epoch, skip_batches, history = 0, 0, 0, []
    folder = find_state(cfg.resume, cfg.output_dir) if cfg.resume else None
    if cfg.resume == "auto" and folder is None:
        run.log(f"resume = auto: no saved state in {cfg.output_dir} yet, so this is a new run")
    elif folder is None and (found := saved_state_in(cfg.output_dir)) is not None:
        run.log(f"note: {cfg.output_dir} holds a saved state ({found.name}) that this run does not continue: it "
                f"starts at step 0 (set `resume = latest` or `auto` to continue it)")
        if cfg.overwrite:  # until this run saves its own, `resume = auto` must not pick up the run it replaces
            clear_latest(cfg.output_dir)
    # a run that replaces an earlier one (`overwrite`) removes what that run left, once it has finished itself
    replacing = cfg.overwrite and folder is None
    earlier = earlier_run(cfg.output_dir, cfg.output_name, cfg.save_model_as) if replacing else {}
    layout = run_layout(cfg, dataset)
    if folder is not None:
        state = load_state(folder)
        check_config(_saved_config(state.folder), cfg.to_dict(), state.folder)
        check_layout(state.layout, layout, state.folder)
        restore_params(named_params, state.params, state.folder)
        try:
            optimizer.load_state_dict(state.optimizer)
        except ValueError as e:  # other parameter groups: LoRA+ switched on or off, or other parts trained
            raise TrainingError(f"{state.folder}: the saved optimizer state does not fit this run ({e}); resume "
                                f"with the options it was saved with (`network_args`, `network_train_*_only`)"
                                ) from None
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        set_rng_state(state.rng)
        step, start_epoch, skip_batches, history = state.step, state.epoch, state.batches_done, state.loss_history
        run.session_id = state.session_id if state.session_id is not None else run.session_id
        # a run that was replacing an earlier one (`overwrite`) still removes that run's files when it ends
        earlier = {Path(cfg.output_dir) / rel: identity for rel, identity in (state.replaces or {}).items()
                   if ".." not in Path(rel).parts and not Path(rel).is_absolute()}
        cbs.on_resume(step=step, loss_history=list(history), samples=run.restore_samples(step))
        run.log(f"resumed from {state.folder} at step {step} (epoch {start_epoch + 1}, batch {skip_batches})"
                + ("; set `resume = 'none'` to start over" if cfg.resume == "auto" else ""))
        if step >= run.max_steps:
            run.log(f"the saved state is at step {step} of {run.max_steps}: nothing left to train (raise "
                    f"`max_train_steps` to train on, or set `resume = 'none'` to train again from scratch)")

    def save_full_state(epoch: int, batches_done: int, saved_with: str | None = None) -> None:
        """Everything `resume` needs to continue after `batches_done` batches of `epoch`."""
        run.state_dir = save_state(cfg.output_dir, params=named_params, optimizer=optimizer, scheduler=scheduler,
                                   scaler=scaler, step=step, epoch=epoch, batches_done=batches_done,
                                   loss_history=history, config_toml=cfg.to_toml(), layout=layout,
                                   saved_with=saved_with, rng=rng_at_step, session_id=run.session_id,
                                   replaces=earlier)

    def checkpoint(tag: str, epoch: int, batches_done: int) -> None:
        """Save the LoRA (and, with save_state, the full state) mid-run; tell the callbacks."""
        path = run.save_lora(run.intermediate_name(tag), step=step, epoch=epoch)
        cbs.on_save(step=step, path=path)
        if cfg.save_state:
            save_full_state(epoch, batches_done, saved_with=tag)
        write_history(run.output_dir, history)
        deleted = prune_saves(run.output_dir, cfg.output_name, cfg.save_model_as, step=step,
                              last_n_epochs=cfg.save_last_n_epochs, last_n_steps=cfg.save_last_n_steps,
                              last_n_epochs_state=cfg.save_last_n_epochs_state,
                              last_n_steps_state=cfg.save_last_n_steps_state)
        run.saved = [p for p in run.saved if p not in deleted]

    if cfg.sample_at_first and step == 0:  # the starting point (a resumed run has it already)
        run.sample(0, cbs)
    progress = run.progress_bar(initial=step, disable=cbs.shows_progress)
    started, steps_at_start = time.perf_counter(), step
    accumulated, micro, last_val = 0.0, 0, ""
    resume_point = (start_epoch, skip_batches)  # (epoch, batches done in it) after the latest optimizer step
    rng_at_step = rng_state()  # the random numbers' state then
    try:
        for epoch in range(start_epoch, run.num_epochs):
            batches = dataset.batches(epoch)
            for position, indices in enumerate(batches):
                if epoch == start_epoch and position < skip_batches:
                    continue  # already trained before the state was saved
                if step >= run.max_steps:
                    break
                batch = dataset.load(indices, epoch, position)
                # the random numbers of this batch depend only on (seed, epoch, position): resumable exactly
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 100_003 + position)
                loss = denoising_loss(batch, run, diffusion, gen)  # steps 1-8
                # 9. backward: gradients reach only the LoRA weights (the base model is frozen). The loss is read
                #    (a GPU sync) only after the backward pass is queued, so the GPU is never idle waiting for it.
                (scaler.scale(loss / accumulation) if scaler else loss / accumulation).backward()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"loss became {loss_value} at step {step + 1} (epoch {epoch + 1}); training stopped and no NaN "
                        f"weights were written (the last saved LoRA is intact). Try a lower learning rate, "
                        f"`mixed_precision = bf16` or `no`, or `max_grad_norm = 1`")
                accumulated += loss_value
                micro += 1
                if micro < accumulation and position < len(batches) - 1:
                    continue
                # 10. optimizer step: unscale (fp16), clip the gradient norm, step, advance the LR schedule
                optimizer_step(optimizer, scheduler, scaler, params, cfg.max_grad_norm)
                #     with `scale_weight_norms`, modules whose ΔW grew past the norm are scaled back
                scaled = run.network.apply_max_norm(cfg.scale_weight_norms) if cfg.scale_weight_norms else None
                step += 1
                resume_point = (epoch, position + 1) if position + 1 < len(batches) else (epoch + 1, 0)
                rng_at_step = rng_state()  # a stop before the next step rewinds to here, random numbers included
                # 11. with `validation_split`: the loss on the held-out images (no gradients)
                val_loss = validation_loss(run, diffusion) if dataset.validation is not None and _validates(
                    cfg, step, run.max_steps, epoch, epoch_done=resume_point[1] == 0) else None
                info = StepInfo(step=step, epoch=epoch + 1, loss=accumulated / micro, lr=run.lrs(optimizer),
                                total_steps=run.max_steps,
                                it_per_s=(step - steps_at_start) / max(time.perf_counter() - started, 1e-9),
                                keys_scaled=scaled and scaled[0], max_key_norm=scaled and scaled[2],
                                val_loss=val_loss)
                accumulated, micro = 0.0, 0
                history.append(info.record())
                progress.update(1)
                if val_loss is not None:
                    last_val = f"{val_loss:.4f}"
                progress.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}",
                                     **({"val": last_val} if last_val else {}), refresh=False)
                cbs.on_step(info)
                if step < run.max_steps:  # saves before samples: a stop while sampling loses no save
                    if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
                        checkpoint(f"step{step:08d}", *resume_point)
                    if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                        run.sample(step, cbs)
            if step >= run.max_steps:
                break
            # end of an epoch (not the last): saves and samples by epoch; the state points at the next epoch
            if run.save_every_n_epochs and (epoch + 1) % run.save_every_n_epochs == 0:
                checkpoint(f"{epoch + 1:06d}", *resume_point)
            if cfg.sample_every_n_epochs and (epoch + 1) % cfg.sample_every_n_epochs == 0:
                run.sample(step, cbs)
    except KeyboardInterrupt:
        # stopped by the user (Ctrl-C, the notebook's stop button): keep what was learned, then stop
        progress.close()
        if step > 0:
            checkpoint("interrupted", *resume_point)
            run.log(f"interrupted at step {step}: saved {run.intermediate_name('interrupted').name}"
                    + (" and its state (resume = latest)" if cfg.save_state else ""))
        raise
    progress.close()

    # ---- the final LoRA, its state, the history and the samples grid
    final_epoch = resume_point[0] + (1 if resume_point[1] else 0)  # epochs begun
    lora_path = run.save_lora(run.final_path, step=step, epoch=final_epoch)
    cbs.on_save(step=step, path=lora_path)
    if cfg.save_state or cfg.save_state_on_train_end:
        save_full_state(*resume_point)
    csv_path = write_history(run.output_dir, history)
    if cfg.sample_at_end or _sample_due_at_end(cfg, step, resume_point):
        run.sample(step, cbs)
    grid = run.save_grid()
    if removed := remove_replaced(earlier):
        run.log(f"removed {len(removed)} file(s) of the earlier run that this one replaced (`overwrite`), e.g. "
                f"{removed[0].relative_to(run.output_dir)}")
    run.log(f"saved {lora_path} ({step} steps, final loss {history[-1]['loss']:.4f})" if history
            else f"saved {lora_path}")
    return TrainResult(lora_path=lora_path, output_dir=run.output_dir, steps=step, epochs=final_epoch,
                       final_loss=history[-1]["loss"] if history else None, loss_history=history,
                       history_csv=csv_path, sample_paths=run.sample_paths, samples_grid=grid, saved=run.saved,
                       state_dir=run.state_dir, config_path=run.config_path, report_path=run.report_path)
