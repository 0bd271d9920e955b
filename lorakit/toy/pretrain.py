"""Pretrain the toy text-to-image model from scratch on the toy world (`lorakit.toy.world`).

The toy model has the component classes of Stable Diffusion 1.x — a diffusers `AutoencoderKL`, a
`UNet2DConditionModel` with cross-attention blocks, a transformers `CLIPTextModel` and `CLIPTokenizer`, a
`DDPMScheduler` with SD's betas, epsilon prediction — at a size where a LoRA step on a laptop CPU takes tens of
milliseconds: 32×32 images, a VAE with a 4× downsampling factor (8×8×4 latents), a ~3 M-parameter U-Net and a
3-layer, 64-wide text encoder whose tokenizer spells every word of the world as one token.

Three stages, each a plain loop, every random draw from `seed`:
1. the VAE learns to reconstruct ALL of the world (held-out concepts included: it is a codec, like SD's VAE);
2. the U-Net and the text encoder learn, jointly, to denoise latents of the HELD-IN world given its captions
   (10% empty captions so classifier-free guidance works). The shipped weights are an exponential moving average.
3. unknown words: every token that no held-in caption contains (the held-out words among them) keeps its random
   initial embedding after stage 2, and a random embedding in a prompt pushes the model off its distribution (the
   never-trained "striped" made the model draw hatching on its own). With everything else frozen, those embedding
   rows alone learn to change nothing: held-in captions with one such token inserted must still denoise their
   image. A word the model has no meaning for then behaves like a rare word in SD: it is read, and ignored.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world

TOKENIZER_MAX_LENGTH = 77


@dataclass
class PretrainSettings:
    """Everything that determines the pretrained weights (with the code)."""

    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 512
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    scale_samples: int = 1024  # images whose latents set the VAE's scaling_factor
    steps: int = 2500
    batch: int = 1024
    lr: float = 1e-3
    warmup: int = 300
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    unknown_steps: int = 200  # stage 3: embedding rows of tokens no held-in caption contains
    unknown_batch: int = 256
    unknown_lr: float = 3e-3
    unknown_insert: float = 0.5  # share of captions that get one unknown token inserted
    unknown_pool: int = 8192  # held-in images encoded once for stage 3
    device: str = "cpu"
    log_every: int = 250

    def to_dict(self) -> dict:
        return asdict(self)


def toy_configs(vocab_size: int, bos_token_id: int, eos_token_id: int, scaling_factor: float = 1.0) -> dict:
    """Configs of the toy model's components (diffusers/transformers keyword arguments)."""
    unet = dict(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=64, norm_num_groups=32, attention_head_dim=4, use_linear_projection=False,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE, layers_per_block=1,
        norm_num_groups=32, block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=scaling_factor,
    )
    text_encoder = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=64, hidden_act="quick_gelu",
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    scheduler = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def build_toy(seed: int = 0, tokenizer_dir: str | Path | None = None):
    """The toy model with freshly initialised weights (returns `lorakit.models.SDComponents`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..families import SD1
    from ..models import SDComponents
    from ..tiny import write_clip_tokenizer

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.mkdtemp(prefix="lorakit-toy-tok-"))
    write_clip_tokenizer(tok_dir, world.vocabulary(), model_max_length=TOKENIZER_MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=TOKENIZER_MAX_LENGTH)
    cfg = toy_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    comps = SDComponents(
        tokenizer=tokenizer, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        vae=AutoencoderKL(**cfg["vae"]), unet=UNet2DConditionModel(**cfg["unet"]),
        noise_scheduler=DDPMScheduler(**cfg["scheduler"]), family=SD1, prediction_type="epsilon",
        source="lorakit-toy")
    return comps


def _cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(vae, settings: PretrainSettings, log: Callable[[str], None] = print) -> float:
    """Stage 1: reconstruct the whole world (MSE + L1 + a tiny KL term). Sets and returns `scaling_factor`."""
    device = torch.device(settings.device)
    g = torch.Generator().manual_seed(settings.seed * 1000 + 1)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    start = time.time()
    for step in range(settings.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, settings.vae_steps, settings.warmup, settings.vae_lr)
        scenes = world.sample_scenes(settings.vae_batch, g, shapes=world.SHAPES, fills=world.FILLS)
        x = world.render(scenes, device=device) * 2 - 1
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
            recon = vae.decode(z).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + settings.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % settings.log_every == 0 or step == settings.vae_steps - 1:
            log(f"vae step {step:6d}  loss {loss.item():.5f}  {time.time() - start:7.1f}s")
    # the latent scale that gives unit variance, as SD's 0.18215 does for its VAE
    vae.eval()
    with torch.no_grad():
        scenes = world.sample_scenes(settings.scale_samples, g, shapes=world.SHAPES, fills=world.FILLS)
        z = vae.encode(world.render(scenes, device=device) * 2 - 1).latent_dist.mean
    scale = float(1.0 / z.float().std())
    vae.register_to_config(scaling_factor=scale)
    log(f"vae scaling_factor {scale:.5f}")
    return scale


def _denoising_loss(unet, te, ids: torch.Tensor, latents: torch.Tensor, alphas: torch.Tensor,
                    g: torch.Generator) -> torch.Tensor:
    """The epsilon loss of stages 2 and 3: noise and a uniform timestep per latent (drawn from `g`, in that order),
    the noisy latents x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε, the U-Net's prediction of ε given the token ids."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=g).to(device)
    t = torch.randint(0, len(alphas), (len(latents),), generator=g).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    with _autocast(device):
        cond = te(ids)[0]
        pred = unet(noisy, t, cond).sample.float()
    return F.mse_loss(pred, noise)


class _CaptionIds:
    """Token ids of captions, memoised: the world has only a few hundred distinct captions."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in set(captions) - self.cache.keys():
            self.cache[c] = self.tokenizer(c, padding="max_length", max_length=TOKENIZER_MAX_LENGTH,
                                           truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions])


def train_diffusion(comps, settings: PretrainSettings, log: Callable[[str], None] = print) -> None:
    """Stage 2: the U-Net and the text encoder learn to denoise held-in latents given captions (EMA weights kept)."""
    device = torch.device(settings.device)
    g = torch.Generator().manual_seed(settings.seed * 1000 + 2)
    vae, unet, te, sched = comps.vae.to(device).eval(), comps.unet.to(device), comps.text_encoder.to(device), \
        comps.noise_scheduler
    vae.requires_grad_(False)
    unet.train()
    te.train()
    params = list(unet.parameters()) + list(te.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    ids_of = _CaptionIds(comps.tokenizer)
    alphas = sched.alphas_cumprod.to(device)
    scale = vae.config.scaling_factor
    start = time.time()
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, settings.steps, settings.warmup, settings.lr)
        # data: held-in scenes, varied captions, some dropped for classifier-free guidance
        scenes = world.sample_scenes(settings.batch, g)
        captions = world.random_captions(scenes, g)
        drop = torch.rand(len(captions), generator=g) < settings.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            x = world.render(scenes, device=device) * 2 - 1
            posterior = vae.encode(x).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device))
            latents = latents * scale
        loss = _denoising_loss(unet, te, ids_of(captions).to(device), latents, alphas, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % settings.log_every == 0 or step == settings.steps - 1:
            log(f"unet step {step:6d}  loss {loss.item():.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - start:7.1f}s")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    te.eval()


def unknown_token_ids(tokenizer, n_captions: int = 20000, seed: int = 0) -> torch.Tensor:
    """Ids of the tokens that no held-in caption contains (every caption phrasing, `n_captions` random scenes)."""
    g = torch.Generator().manual_seed(seed)
    captions = set(world.random_captions(world.sample_scenes(n_captions, g), g)) | {""}
    used = {i for c in captions for i in tokenizer(c).input_ids}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in used])


def train_unknown_words(comps, settings: PretrainSettings, log: Callable[[str], None] = print) -> int:
    """Stage 3: the embedding rows of tokens no held-in caption contains learn to leave the picture unchanged.

    Everything else is frozen. Each step: held-in latents (one pool, encoded once) with their captions, one unknown
    token inserted at a random word position into `unknown_insert` of them, the usual denoising loss; only the
    unknown rows receive the update. Returns how many rows were trained.
    """
    device = torch.device(settings.device)
    g = torch.Generator().manual_seed(settings.seed * 1000 + 3)
    vae, unet, te, sched, tok = comps.vae.to(device).eval(), comps.unet.to(device).eval(), \
        comps.text_encoder.to(device).eval(), comps.noise_scheduler, comps.tokenizer
    unknown = unknown_token_ids(tok, seed=settings.seed)
    scenes = world.sample_scenes(settings.unknown_pool, g)
    captions = world.random_captions(scenes, g)
    with torch.no_grad():
        images = world.render(scenes, device=device) * 2 - 1
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(1024)])
        latents = latents * vae.config.scaling_factor
    ids_of = {c: tok(c).input_ids for c in set(captions)}
    for module in (vae, unet, te):
        module.requires_grad_(False)
    table = te.get_input_embeddings().weight
    table.requires_grad_(True)
    rows = torch.zeros(len(table), 1, device=device)
    rows[unknown.to(device)] = 1.0
    opt = torch.optim.Adam([table], lr=settings.unknown_lr)
    alphas = sched.alphas_cumprod.to(device)
    start = time.time()
    for step in range(settings.unknown_steps):
        pick = torch.randint(len(scenes), (settings.unknown_batch,), generator=g)
        insert = torch.rand(len(pick), generator=g) < settings.unknown_insert
        batch_ids = []
        for i, ins in zip(pick.tolist(), insert.tolist()):
            ids = ids_of[captions[i]]
            if ins:  # after the start token, before any word or the end token
                at = 1 + int(torch.randint(len(ids) - 1, (1,), generator=g))
                ids = ids[:at] + [int(unknown[torch.randint(len(unknown), (1,), generator=g)])] + ids[at:]
            batch_ids.append(ids + [tok.eos_token_id] * (TOKENIZER_MAX_LENGTH - len(ids)))
        loss = _denoising_loss(unet, te, torch.tensor(batch_ids, device=device), latents[pick.to(device)], alphas, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        table.grad *= rows  # only the unknown tokens' rows learn
        opt.step()
        if step % settings.log_every == 0 or step == settings.unknown_steps - 1:
            log(f"unknown-words step {step:6d}  loss {loss.item():.5f}  {time.time() - start:7.1f}s")
    table.requires_grad_(False)
    return len(unknown)


def pretrain(settings: PretrainSettings | None = None, log: Callable[[str], None] = print):
    """Build the toy model from scratch and pretrain it; returns `SDComponents` on `settings.device`."""
    settings = settings or PretrainSettings()
    torch.manual_seed(settings.seed)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    comps = build_toy(settings.seed)
    n = {k: sum(p.numel() for p in getattr(comps, k).parameters()) for k in ("unet", "vae", "text_encoder")}
    log("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n.items()))
    train_vae(comps.vae, settings, log)
    train_diffusion(comps, settings, log)
    log(f"unknown-words rows trained: {train_unknown_words(comps, settings, log)}")
    comps.extra["pretrain_settings"] = settings.to_dict()
    return comps


def unknown_words_stage(model: str | Path, settings: PretrainSettings | None = None,
                        log: Callable[[str], None] = print):
    """Stage 3 alone, on a model that finished stage 2 (a single file such as an earlier `lorakit-toy`)."""
    from ..models import load_models

    settings = settings or PretrainSettings()
    torch.manual_seed(settings.seed)
    comps = load_models(str(model), dtype=torch.float32, device=settings.device)
    log(f"stage 3 on {model}")
    log(f"unknown-words rows trained: {train_unknown_words(comps, settings, log)}")
    comps.extra["pretrain_settings"] = {**settings.to_dict(), "stage3_start_from": Path(model).name}
    return comps
