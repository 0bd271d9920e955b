"""Extraction: known low-rank fine-tunes are recovered; TE-same detection; files in every layout."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.checkpoint import components_to_ldm, write_single_file
from lorakit.errors import ConfigError
from lorakit.extraction import extract, extract_lora
from lorakit.formats import load_lora_file, parse_kohya
from lorakit.lora_math import lora_delta, relative_error
from lorakit.model_weights import StateDictWeights
from lorakit.tiny import build_tiny

RANK = 2


def _fine_tune(comps, *, seed=1, rank=RANK, text_encoder=True, conv=True, noise=0.0):
    """A copy of `comps` with a known rank-`rank` change on every LoRA target layer; returns (tuned, deltas)."""
    tuned = copy.deepcopy(comps)
    weights = StateDictWeights.from_components(tuned)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for t in weights.targets(conv=conv):
        if t.component == "text_encoder" and not text_encoder:
            continue
        w = weights.get(t.param)  # shares storage with the module's parameter
        out, rest = t.shape[0], t.shape[1:]
        up = torch.randn(out, rank, generator=g)
        down = torch.randn(rank, *rest, generator=g)
        d = lora_delta(up, down, shape=t.shape)
        d = d * (0.2 * w.norm() / d.norm())
        if noise:
            d = d + noise * w.norm() / w.numel() ** 0.5 * torch.randn(t.shape, generator=g)
        with torch.no_grad():
            w.add_(d)
        deltas[t.kohya] = (t.param, d)
    return tuned, deltas


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1", seed=0)


@pytest.mark.parametrize("svd", ["lowrank", "exact"])
def test_recovers_a_known_low_rank_change(sd1, svd):
    tuned, deltas = _fine_tune(sd1)
    result = extract_lora(sd1, tuned, dim=4, conv_dim=3, svd=svd, log=None)
    modules = parse_kohya(result.state_dict)
    assert set(modules) == set(deltas)
    assert {n for n, m in modules.items() if m.down.dim() == 4 and m.down.shape[2] == 3}  # 3x3 convs are there
    for name, (_, d) in deltas.items():
        m = modules[name]
        assert m.down.dim() == d.dim()  # Linear 2-D, conv (1x1 and 3x3) 4-D as in the kohya layout
        assert relative_error(d, lora_delta(m.up, m.down, m.alpha, shape=d.shape)) < 1e-4, name
    assert max(result.errors.values()) < 1e-4
    assert result.modules["text_encoder"] == 12 and not result.text_encoder_skipped


@pytest.mark.parametrize("svd", ["lowrank", "exact"])
def test_dynamic_ranks_find_each_modules_own_rank(sd1, svd, tmp_path):
    """A fine-tune whose modules change with ranks 1, 2 or 3: sv_fro / sv_cumulative at 0.9999 and sv_ratio find each
    module's rank (dim the cap), and the LoRA reproduces the change."""
    tuned = copy.deepcopy(sd1)
    weights = StateDictWeights.from_components(tuned)
    g = torch.Generator().manual_seed(4)
    true_rank, deltas = {}, {}
    for i, t in enumerate(weights.targets(conv=False)):
        rank = 1 + i % 3
        d = lora_delta(torch.randn(t.shape[0], rank, generator=g), torch.randn(rank, *t.shape[1:], generator=g),
                       shape=t.shape)
        w = weights.get(t.param)
        with torch.no_grad():
            w.add_(d * (0.2 * w.norm() / d.norm()))
        true_rank[t.kohya], deltas[t.kohya] = rank, d
    for method, target in (("sv_fro", 0.9999), ("sv_cumulative", 0.9999), ("sv_ratio", 1e4)):
        result = extract_lora(sd1, tuned, dim=4, svd=svd, dynamic=(method, target), log=None)
        modules = parse_kohya(result.state_dict)
        assert {n: m.rank for n, m in modules.items()} == true_rank == result.ranks, method
        assert max(result.errors.values()) < 1e-4 and all(m.alpha == m.rank for m in modules.values())
    capped = extract_lora(sd1, tuned, dim=2, svd=svd, dynamic=("sv_fro", 0.9999), log=None)
    assert capped.ranks == {n: min(r, 2) for n, r in true_rank.items()}
    # the job: the option pair, checked, and the file's metadata
    sd1_file, tuned_file = tmp_path / "org.safetensors", tmp_path / "tuned.safetensors"
    write_single_file(components_to_ldm(sd1), sd1_file)
    write_single_file(components_to_ldm(tuned), tuned_file)
    out = tmp_path / "dyn.safetensors"
    extract(model_org=str(sd1_file), model_tuned=str(tuned_file), save_to=str(out), dim=8, svd=svd,
            dynamic_method="sv_fro", dynamic_param=0.9999)
    tensors, meta = load_lora_file(out)
    assert {n: m.rank for n, m in parse_kohya(tensors).items()} == true_rank
    assert meta["lorakit.dynamic_rank"] == "sv_fro=0.9999"
    assert meta["ss_network_dim"] == "3" and "conv_dim" not in meta.get("ss_network_args", "")  # the largest: 3 of 8
    with pytest.raises(ConfigError, match="needs `dynamic_param`"):
        extract(model_org=str(sd1_file), model_tuned=str(tuned_file), save_to=str(tmp_path / "x.safetensors"),
                dynamic_method="sv_ratio")


def test_dim_below_the_true_rank_reports_its_error(sd1):
    tuned, _ = _fine_tune(sd1, rank=6)
    result = extract_lora(sd1, tuned, dim=2, log=None)
    assert 0.1 < result.errors["unet"] < 1.0
    exact = extract_lora(sd1, tuned, dim=2, svd="exact", log=None)
    assert result.errors["unet"] <= exact.errors["unet"] * 1.01


def test_same_text_encoder_gives_a_unet_only_lora(sd1):
    tuned, _ = _fine_tune(sd1, text_encoder=False, conv=False)
    lines = []
    result = extract_lora(sd1, tuned, dim=4, log=lines.append)
    assert result.text_encoder_skipped and "text_encoder" not in result.modules
    assert not any(k.startswith("lora_te_") for k in result.state_dict)
    assert any("U-Net only" in line for line in lines)
    # a text-encoder change larger than min_diff keeps the text encoder
    with torch.no_grad():
        tuned.text_encoder.encoder.layers[0].mlp.fc1.weight[0, 0] += 0.05
    kept = extract_lora(sd1, tuned, dim=4, log=None)
    assert not kept.text_encoder_skipped and kept.modules["text_encoder"] == 12
    assert extract_lora(sd1, tuned, dim=4, min_diff=0.1, log=None).text_encoder_skipped


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_files_round_trip_reproduces_the_tuned_model(tmp_path, family):
    """Single-file base and diffusers-folder tuned model -> LoRA file -> applied to base ≈ tuned (U-Net output)."""
    base = build_tiny(family, seed=0)
    tuned, deltas = _fine_tune(base, seed=3, noise=0.003)
    write_single_file(components_to_ldm(base), tmp_path / "base.safetensors")
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    result = extract(model_org=str(tmp_path / "base.safetensors"), model_tuned=str(tmp_path / "tuned"),
                     save_to=str(out), dim=4, conv_dim=4)
    assert result.family.name == family
    tensors, metadata = load_lora_file(out)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_v2"] == str(family == "sd2")
    modules = parse_kohya(tensors)
    assert set(modules) == set(deltas)
    # apply the file to the base through diffusers' own loader (an independent implementation)
    pipe = copy.deepcopy(base).pipeline()
    pipe.load_lora_weights(str(out), adapter_name="x")
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    ids = base.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        def unet_out(c, unet):
            return unet(sample, t, encoder_hidden_states=c.text_encoder(ids)[0]).sample
        want = unet_out(tuned, tuned.unet)
        got = unet_out(pipe, pipe.unet)
        was = unet_out(base, base.unet)
    assert relative_error(want - was, got - was) < 0.05
    assert (got - want).abs().max() < 0.1 * (want - was).abs().max()


def test_bad_input_is_refused(tmp_path, sd1):
    sd1.save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match="save_to"):
        extract(model_org=str(tmp_path / "base"), model_tuned=str(tmp_path / "base"), save_to=str(tmp_path / "x.bin"))
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="overwrite"):
        extract(model_org=str(tmp_path / "base"), model_tuned=str(tmp_path / "base"), save_to=str(existing))
    assert existing.read_bytes() == b"keep"
    with pytest.raises(Exception, match="not found"):
        extract(model_org=str(tmp_path / "missing.safetensors"), model_tuned=str(tmp_path / "base"),
                save_to=str(tmp_path / "y.safetensors"))
    assert not (tmp_path / "y.safetensors").exists()
    weights = tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"  # a file of a folder input
    before = weights.read_bytes()
    with pytest.raises(ConfigError, match="is inside the `model_org` folder"):
        extract(model_org=str(tmp_path / "base"), model_tuned=str(tmp_path / "base"), save_to=str(weights),
                overwrite=True)
    assert weights.read_bytes() == before
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ConfigError, match="dir.safetensors is a folder"):
        extract(model_org=str(tmp_path / "base"), model_tuned=str(tmp_path / "base"),
                save_to=str(tmp_path / "dir.safetensors"), overwrite=True)
    sd2 = build_tiny("sd2", seed=0)
    with pytest.raises(Exception, match="SD1 but model_tuned is SD2"):
        extract_lora(sd1, sd2, dim=2, log=None)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_metadata_follows_the_models_prediction_type(tmp_path, prediction):
    """An SD2-base (epsilon, 512 px) model's LoRA is labelled `sd_v2` at 512, a 768-v model's `sd_v2_v` at 768:
    read from the model, not assumed from the family (UIs pick the base model and the sampler from it)."""
    import json

    base = build_tiny("sd2", seed=0)
    tuned, _ = _fine_tune(base, seed=3)
    for comps, name in ((base, "org"), (tuned, "tuned")):
        comps.save_pretrained(tmp_path / name)
        scheduler = tmp_path / name / "scheduler" / "scheduler_config.json"
        scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": prediction}))
    out = tmp_path / "x.safetensors"
    extract(model_org=str(tmp_path / "org"), model_tuned=str(tmp_path / "tuned"), save_to=str(out), dim=2)
    meta = load_lora_file(out)[1]
    v = prediction == "v_prediction"
    assert meta["ss_base_model_version"] == ("sd_v2_v" if v else "sd_v2")
    assert meta["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert meta["ss_resolution"] == ("(768, 768)" if v else "(512, 512)")
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512")

    from lorakit.merging import merge

    resized = merge(models=[str(out)], merge_mode="svd", new_rank=1, save_to=str(tmp_path / "small.safetensors"))
    small = load_lora_file(resized.path)[1]
    for key in ("ss_base_model_version", "modelspec.prediction_type", "ss_resolution", "modelspec.architecture",
                "modelspec.resolution"):
        assert small[key] == meta[key], key
