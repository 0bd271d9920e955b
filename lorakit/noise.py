"""The noise of a training step and the loss weights that depend on the timestep — sd-scripts' options, as pure
functions. Every random number comes from the step's generator, so a run stays reproducible and resumable.

- offset noise (`noise_offset`, crosslabs.org/blog/diffusion-with-offset-noise): a per-sample, per-channel constant
  added to the noise, so the model can learn very dark or bright images; `noise_offset_random_strength` draws its
  strength from U(0, noise_offset) each step; `adaptive_noise_scale` adds that many times each channel's
  |mean latent| to it.
- multires ("pyramid") noise (`multires_noise_iterations`, `multires_noise_discount`): noise at ever coarser
  random scales (each 2–4× smaller), upsampled and added with weight discountⁱ, then scaled back to unit variance.
- input perturbation (`ip_noise_gamma`, Ning et al. 2023, arxiv.org/abs/2301.11706): the noisy input is made with
  ε + γ·ξ while the target stays ε; `ip_noise_gamma_random_strength` draws γ from U(0, γ) each step.
- loss weights per timestep: Min-SNR (Hang et al. 2023) min(SNR, γ)/SNR for ε (/(SNR + 1) for v), and debiased
  estimation (`debiased_estimation_loss`) 1/√SNR for ε (1/(SNR + 1) for v), SNR capped at 1000.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def training_noise(latents: torch.Tensor, gen: torch.Generator, *, offset: float = 0.0,
                   offset_random_strength: bool = False, adaptive_scale: float | None = None,
                   multires_iterations: int | None = None, multires_discount: float = 0.3) -> torch.Tensor:
    """ε for `latents` [b, c, h, w] (on the latents' device and dtype): N(0, I), then offset and multires noise."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=gen)
    if offset:
        strength = offset * float(torch.rand((), generator=gen)) if offset_random_strength else offset
        scale = torch.full((b, c, 1, 1), strength)
        if adaptive_scale:
            mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
            scale = (scale + adaptive_scale * mean).clamp(min=0.0)
        noise = noise + scale * torch.randn((b, c, 1, 1), generator=gen)
    if multires_iterations:
        noise = pyramid_noise(noise, gen, multires_iterations, multires_discount)
    return noise.to(latents.device, latents.dtype)


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """`noise` plus noise drawn at sizes h/rⁱ × w/rⁱ (r ~ U(2, 4) each level, down to 1 pixel), bilinearly
    upsampled and weighted discountⁱ, i = 0 … iterations − 1; scaled to unit standard deviation."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand((), generator=gen))
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=gen)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def input_noise(noise: torch.Tensor, gen: torch.Generator, gamma: float | None,
                random_strength: bool = False) -> torch.Tensor:
    """The noise the noisy input is made with: ε, or with input perturbation ε + γ·ξ (ξ ~ N(0, I))."""
    if not gamma:
        return noise
    strength = gamma * float(torch.rand((), generator=gen)) if random_strength else gamma
    return noise + strength * torch.randn(noise.shape, generator=gen).to(noise.device, noise.dtype)


def training_schedule(noise_scheduler, zero_terminal_snr: bool = False):
    """The noise schedule training draws x_t from: the model's own, or with `zero_terminal_snr` the same betas
    rescaled so that the last timestep is pure noise (diffusers' `rescale_betas_zero_snr`, Lin et al. 2023,
    Algorithm 1). The model's scheduler (used for sampling) is left as it is."""
    if not zero_terminal_snr:
        return noise_scheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(noise_scheduler.config, rescale_betas_zero_snr=True)


def weight_snr(noise_scheduler) -> torch.Tensor:
    """SNR_t = ᾱ_t/(1 − ᾱ_t) for every timestep, as the loss weights (`snr_weights`) read it: that of the model's
    betas before any zero-terminal-SNR rescale, as in sd-scripts (which computes it before rescaling). The rescaled
    schedule's last SNR is 0, where 1/√SNR and 1/SNR are infinite."""
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(noise_scheduler.config, rescale_betas_zero_snr=False).alphas_cumprod
    return ac / (1 - ac)


def snr_weights(snr: torch.Tensor, *, v_prediction: bool, min_snr_gamma: float | None = None,
                debiased: bool = False, scale_v_like_noise: bool = False,
                v_pred_like: float | None = None) -> torch.Tensor:
    """Per-sample loss weights from the timesteps' SNR = ᾱ/(1 − ᾱ), multiplied together as sd-scripts applies them:
    Min-SNR; `scale_v_like_noise` (s = SNR/(SNR + 1), the v-loss on the ε-loss's scale); `v_pred_like` λ (adds λ
    times the loss over s: 1 + λ/s); debiased estimation. The SNR is capped at 1000 where sd-scripts caps it."""
    weight = torch.ones_like(snr)
    capped = torch.clamp(snr, max=1000.0)  # SNR is infinite at t = 0
    if min_snr_gamma:  # for ε at SNR 0 (a zero-terminal-SNR schedule's last step): min(SNR, γ)/SNR → 1
        weight = weight * (torch.clamp(snr, max=min_snr_gamma) / (snr + 1) if v_prediction else torch.where(
            snr > 0, torch.clamp(snr, max=min_snr_gamma) / snr.clamp(min=torch.finfo(snr.dtype).tiny), 1.0))
    if scale_v_like_noise or v_pred_like:
        scale = capped / (capped + 1)
        if scale_v_like_noise:
            weight = weight * scale
        if v_pred_like:
            weight = weight * (1 + v_pred_like / scale)
    if debiased:
        weight = weight / (capped + 1 if v_prediction else torch.sqrt(capped))
    return weight


def huber_thresholds(schedule: str, c: float, scale: float, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     num_train_timesteps: int) -> torch.Tensor:
    """The pseudo-Huber threshold δ of each sample (sd-scripts' `huber_schedule`): `snr` δ = (1 − c)/(1 + σ_t)² + c
    with σ_t = √((1 − ᾱ_t)/ᾱ_t) (near 1 at low noise, c at high noise); `exponential` δ = scale · c^(t/T);
    `constant` δ = c · scale."""
    if schedule == "snr":
        ac = alphas_cumprod[timesteps].float()
        sigma = ((1 - ac) / ac).sqrt()
        return (1 - c) / (1 + sigma) ** 2 + c
    if schedule == "exponential":
        return scale * torch.exp(math.log(c) * timesteps.float() / num_train_timesteps)
    if schedule == "constant":
        return torch.full(timesteps.shape, c * scale, device=timesteps.device)
    raise ValueError(f"unknown Huber schedule {schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The per-element loss (sd-scripts' `loss_type`): l2 (x − y)², l1 |x − y|, huber 2δ(√((x − y)² + δ²) − δ),
    smooth_l1 2(√((x − y)² + δ²) − δ), with δ per sample (`huber_thresholds`). Huber is ≈ l2 for |x − y| ≪ δ and
    ≈ 2δ|x − y| beyond."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    delta = huber_c.view(-1, *([1] * (pred.ndim - 1))).to(pred)
    robust = torch.sqrt((pred - target) ** 2 + delta**2) - delta
    if loss_type == "huber":
        return 2 * delta * robust
    if loss_type == "smooth_l1":
        return 2 * robust
    raise ValueError(f"unknown loss type {loss_type!r}")
