"""The shipped toy model: loads through the ordinary loader as an SD1 model, matches its recorded hashes, draws
recognisable pictures for held-in prompts, and its pretraining recipe is reproducible."""

from __future__ import annotations

import re

import torch

from lorakit.toy import world
from lorakit.toy.release import CLASSIFIER_FILE, WEIGHTS_DIR, WEIGHTS_FILE, sha256


def test_loads_with_sd_component_classes(toy):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(toy.unet, UNet2DConditionModel) and isinstance(toy.vae, AutoencoderKL)
    assert isinstance(toy.text_encoder, CLIPTextModel)
    assert isinstance(toy.tokenizer, CLIPTokenizer) and isinstance(toy.noise_scheduler, DDPMScheduler)
    sched = toy.noise_scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert toy.family.name == "sd1" and toy.prediction_type == "epsilon"
    assert toy.native_resolution == world.SIZE
    assert any("attn2" in name for name, _ in toy.unet.named_modules())  # cross-attention blocks, as in SD


def test_shipped_files_match_the_hashes_in_the_card():
    card = (WEIGHTS_DIR / "README.md").read_text()
    for path in (WEIGHTS_FILE, CLASSIFIER_FILE):
        row = next(line for line in card.splitlines() if line.startswith(f"| `{path.name}`"))
        recorded = re.search(r"`([0-9a-f]{64})`", row).group(1)
        assert sha256(path) == recorded, path.name


def test_held_in_prompts_are_recognisable(toy, classifier):
    from lorakit.toy.lesson import prompt_agreement

    scenes = [dict(shape=s, colour=c, background=b) for s, c, b in zip(
        world.HELD_IN_SHAPES * 3, world.COLOUR_NAMES * 2, world.BACKGROUND_NAMES * 4)]
    rows = prompt_agreement(toy, scenes, seeds=[11], classifier=classifier, num_inference_steps=15)
    shape = sum(r["shape"] for r in rows) / len(rows)
    colour = sum(r["colour"] for r in rows) / len(rows)
    assert shape >= 0.8 and colour >= 0.8, rows


def test_vae_reconstructs_held_out_concepts(toy, classifier):
    """The VAE saw the whole world: crescents and stripes survive an encode/decode round trip."""
    scenes = world.sample_scenes(24, 9, shapes=["crescent"], fills=["striped"])
    images = world.render(scenes)
    with torch.no_grad():
        latents = toy.vae.encode(images * 2 - 1).latent_dist.mean
        recon = (toy.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    assert (recon - images).abs().mean() < 0.05
    pred = classifier.predict(recon)
    assert sum(p == "crescent" for p in pred["shape"]) >= 22
    assert sum(p == "striped" for p in pred["fill"]) >= 22


def _tiny_pretrain(seed: int):
    from lorakit.toy.pretrain import PretrainSettings, pretrain

    settings = PretrainSettings(seed=seed, vae_steps=1, vae_batch=4, steps=2, batch=4, warmup=1, log_every=1000,
                                scale_samples=16, unknown_steps=2, unknown_batch=4, unknown_pool=16)
    comps = pretrain(settings, log=lambda line: None)
    return _weights(comps), comps


def _weights(comps) -> dict[str, torch.Tensor]:
    """A copy of every weight of the U-Net, VAE and text encoder, keyed "<component>.<name>"."""
    return {f"{k}.{n}": t.clone() for k in ("unet", "vae", "text_encoder")
            for n, t in getattr(comps, k).state_dict().items()}


def test_pretraining_is_reproducible_from_the_seed():
    a, comps = _tiny_pretrain(0)
    b, _ = _tiny_pretrain(0)
    c, _ = _tiny_pretrain(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # the stages really trained: the latent scale was measured, weights moved from their initialisation
    assert comps.vae.config.scaling_factor != 1.0
    assert comps.extra["pretrain_settings"]["seed"] == 0


def test_unknown_words_stage_trains_only_the_rows_of_unknown_tokens():
    """Stage 3 moves the embedding rows of tokens no held-in caption contains (the held-out words among them) and
    leaves every other weight bit-identical."""
    from lorakit.toy import world
    from lorakit.toy.pretrain import PretrainSettings, build_toy, train_unknown_words, unknown_token_ids

    comps = build_toy(seed=0)
    tok = comps.tokenizer
    unknown = unknown_token_ids(tok)
    held_in = {i for c in world.random_captions(world.sample_scenes(200, 4), 5) for i in tok(c).input_ids}
    assert not held_in & set(unknown.tolist())
    for word in ("crescent", "sks"):
        assert tok(word, add_special_tokens=False).input_ids[0] in unknown
    before = _weights(comps)
    n = train_unknown_words(comps, PretrainSettings(unknown_steps=3, unknown_batch=8, unknown_pool=32,
                                                    unknown_insert=1.0, log_every=1000), log=lambda line: None)
    assert n == len(unknown)
    after = _weights(comps)
    table = next(k for k in before if k.endswith("embeddings.token_embedding.weight"))
    assert [k for k in before if not torch.equal(before[k], after[k])] == [table]
    moved = (before[table] != after[table]).any(dim=1)
    assert not moved[sorted(held_in)].any()
    assert moved[unknown].sum() >= 8  # the rows inserted into the 3 × 8 captions (some drawn twice)
    assert set(moved.nonzero().flatten().tolist()) <= set(unknown.tolist())


def test_release_writes_a_loadable_single_file(tmp_path):
    from lorakit.models import load_models
    from lorakit.toy.pretrain import build_toy
    from lorakit.toy.release import save_release

    comps = build_toy(seed=3)
    written = save_release(comps, tmp_path)
    single = tmp_path / "lorakit-toy.safetensors"
    assert single in written
    again = load_models(str(single))
    ref = comps.unet.state_dict()
    assert all(torch.equal(ref[k], v.to(ref[k].dtype)) for k, v in again.unet.state_dict().items())
    assert again.tokenizer("a sks crescent").input_ids == comps.tokenizer("a sks crescent").input_ids
