"""Tiny random Stable Diffusion models, built offline from configs.

They have the same component classes and key layout as SD1.x / SD2.x (U-Net with cross-attention blocks, a CLIP
text encoder, a VAE with an 8x downsampling factor, a CLIP BPE tokenizer whose vocab files are written here), but
a few hundred thousand parameters, so tests and CPU experiments run in seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .families import SD1, SD2, Family
from .fileio import write_text

# byte-level BPE alphabet of CLIP (as in openai/CLIP and transformers' CLIPTokenizer)


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: str | Path, words: list[str] = (), model_max_length: int = 77) -> Path:
    """Write CLIP tokenizer files: the byte alphabet, optional whole-word merges for `words`, special tokens.

    Every text can be tokenized (bytes are the fallback); words listed in `words` become single tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    byte_map = bytes_to_unicode()
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        if len(symbols) < 2:
            continue
        symbols[-1] += "</w>"
        cur = symbols[0]
        for nxt in symbols[1:]:
            merge = f"{cur} {nxt}"
            cur = cur + nxt
            if merge not in merges:
                merges.append(merge)
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    write_text(folder / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}))
    write_text(folder / "special_tokens_map.json", json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    return folder


def tiny_configs(family: Family = SD1, vocab_size: int = 514) -> dict[str, dict]:
    """Diffusers/transformers configs of a tiny model of `family` (sd1 or sd2 conventions)."""
    v2 = family.v2
    unet = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, norm_num_groups=32,
        # SD1: attention_head_dim is the number of heads (legacy naming); SD2: per-block head counts, linear proj
        attention_head_dim=[2, 4] if v2 else 8, use_linear_projection=v2, upcast_attention=False,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=family.latent_scale,
    )
    text = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu" if v2 else "quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    scheduler = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v2 else "epsilon", clip_sample=False,
        steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text, scheduler=scheduler)


def build_tiny(family: str | Family = "sd1", seed: int = 0, folder: str | Path | None = None):
    """Build a tiny random model. With `folder`, also save it there in the diffusers layout.

    Returns `SDComponents` (see `lorakit.models`).
    """
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from .checkpoint import modules_from_configs
    from .models import SDComponents

    fam = family if isinstance(family, Family) else {"sd1": SD1, "sd2": SD2}[family]
    cfg = tiny_configs(fam)
    torch.manual_seed(seed)
    unet, vae, text_encoder = modules_from_configs(cfg)
    scheduler = DDPMScheduler(**cfg["scheduler"])
    if folder:
        tok_dir = Path(folder) / "tokenizer"
        write_clip_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    else:
        with tempfile.TemporaryDirectory(prefix="lorakit-tok-") as tmp:  # read into memory, the files not kept
            write_clip_tokenizer(Path(tmp))
            tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    comps = SDComponents(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                         noise_scheduler=scheduler, family=fam,
                         prediction_type=cfg["scheduler"]["prediction_type"], source=str(folder or "tiny"))
    if folder:
        comps.save_pretrained(folder)
    return comps


def build_tiny_cli(cfg) -> None:
    """`lorakit tiny --output_dir DIR --family sd1|sd2`: write a diffusers folder and `DIR/model.safetensors`
    (the same weights as a single-file LDM checkpoint)."""
    from .models import save_single_file

    out = Path(cfg.output_dir)
    if out.is_dir() and any(out.iterdir()):
        from .errors import ConfigError

        raise ConfigError(f"`output_dir` {out} is not empty; `lorakit tiny` writes a new model into a new folder")
    comps = build_tiny(cfg.family, seed=cfg.seed, folder=cfg.output_dir)
    single = save_single_file(comps, Path(cfg.output_dir) / "model.safetensors")
    print(f"tiny {comps.family.name} model written to {cfg.output_dir} (diffusers folder) and {single}")
