"""Generate images from the toy model (through diffusers' own `StableDiffusionPipeline`), for measurement."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(comps, prompts: list[str], seeds: list[int], *, num_inference_steps: int = 20,
           guidance_scale: float = 5.0, negative_prompt: str = "", batch_size: int = 64) -> torch.Tensor:
    """One image per (prompt, seed) pair, as a float tensor (N, 3, H, W) in [0, 1] at the model's native size.

    Uses DDIM with classifier-free guidance; `seeds[i]` seeds image i, so results do not depend on batching.
    """
    from diffusers import DDIMScheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"`prompts` and `seeds` must have the same length, got {len(prompts)} and {len(seeds)}")
    pipe = comps.pipeline(DDIMScheduler.from_config(comps.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device = next(comps.unet.parameters()).device
    size = comps.native_resolution
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[i:i + batch_size], seeds[i:i + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in chunk_seeds]
        latents = torch.stack([torch.randn(4, size // comps.vae_scale_factor, size // comps.vae_scale_factor,
                                           generator=g) for g in generators]).to(device)
        images = pipe(chunk, height=size, width=size, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, negative_prompt=[negative_prompt] * len(chunk),
                      latents=latents.to(comps.unet.dtype), output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out)
