"""Merge: LoRAs into single files and diffusers folders (exact, streamed, read by diffusers), LoRA + LoRA modes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lora_files import make_lora

from lorakit.errors import ConfigError, LoraFormatError
from lorakit.fileio import save_safetensors
from lorakit.formats import load_lora_file, parse_kohya
from lorakit.merging import merge
from lorakit.model_weights import StateDictWeights, open_weights
from lorakit.models import save_single_file
from lorakit.tiny import build_tiny


def expected_weights(comps, loras_and_ratios):
    """W + Σ ratio · alpha/rank · up @ down for every changed parameter, computed here independently."""
    weights = StateDictWeights.from_components(comps)
    by_kohya = {t.kohya: t for t in weights.targets(conv=True)}
    out = {}
    for path, ratio in loras_and_ratios:
        tensors, _ = load_lora_file(path)
        for key in tensors:
            if not key.endswith(".lora_down.weight"):
                continue
            name = key.removesuffix(".lora_down.weight")
            down, up = tensors[key], tensors[name + ".lora_up.weight"]
            scale = float(tensors[name + ".alpha"]) / down.shape[0]
            t = by_kohya[name]
            w = out.get(t.param, weights.get(t.param).clone())
            out[t.param] = w + ratio * scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(
                t.shape)
    return out


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(request, tmp_path_factory):
    family = request.param
    d = tmp_path_factory.mktemp(f"merge-{family}")
    comps = build_tiny(family, seed=0)
    comps.save_pretrained(d / "folder")
    save_single_file(comps, d / "base.safetensors")
    save_single_file(comps, d / "base.ckpt")
    a = make_lora(comps, d / "a.safetensors", rank=2, seed=1, alpha=1.0)
    b = make_lora(comps, d / "b.safetensors", rank=3, seed=2, alpha=3.0, conv=False, every=2)
    return family, d, comps, a, b


def test_merged_single_file_is_w_plus_deltas_and_diffusers_reads_it(setup):
    family, d, comps, a, b = setup
    out = d / "merged.safetensors"
    merge(sd_model=str(d / "base.safetensors"), models=[str(a), str(b)], ratios=[0.7, 0.4], save_to=str(out),
          overwrite=True)
    expected = expected_weights(comps, [(a, 0.7), (b, 0.4)])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:  # sd-scripts' record of what was merged: the base, then the LoRAs
        assert f.metadata()["modelspec.merged_from"] == f"base, {a.stem}, {b.stem}"
    merged = open_weights(out)
    base = StateDictWeights.from_components(comps)
    kinds = set()
    for name, shape in merged.shapes().items():
        if name in expected:
            kinds.add((len(shape), shape[-1] if len(shape) == 4 else 0))
            torch.testing.assert_close(merged.get(name), expected[name], rtol=0, atol=2e-6)
        elif name in base.tensors:  # (not the position_ids buffer single files carry)
            assert torch.equal(merged.get(name), base.get(name)), name
    assert {(2, 0), (4, 3)} <= kinds and (family == "sd2" or (4, 1) in kinds)  # Linear, 3x3 conv, SD1 1x1 conv
    # oracle: diffusers' own single-file loader reads it completely and finds the merged weights
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(d / "folder"), local_files_only=True,
                                                        safety_checker=None)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    unet = {"unet." + k: v for k, v in pipe.unet.state_dict().items()}
    te = {"text_encoder.text_model." + k.removeprefix("text_model."): v
          for k, v in pipe.text_encoder.state_dict().items()}
    for name, want in expected.items():
        got = unet.get(name, te.get(name))
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6, msg=name)


def test_merge_into_folder_and_across_layouts(setup):
    family, d, comps, a, b = setup
    expected = expected_weights(comps, [(a, 0.5)])
    for src, dst in ((d / "folder", d / "merged-folder"), (d / "folder", d / "f2f.ckpt"),
                     (d / "base.safetensors", d / "s2c.ckpt"), (d / "base.ckpt", d / "c2s.safetensors"),
                     (d / "base.safetensors", d / "file2folder")):
        merge(sd_model=str(src), models=[str(a)], ratios=[0.5], save_to=str(dst), overwrite=True)
        merged = open_weights(dst)
        assert merged.family.name == family
        for name, want in expected.items():
            torch.testing.assert_close(merged.get(name), want, rtol=0, atol=2e-6, msg=f"{dst.name}: {name}")
        merged.close()
    from lorakit.models import load_models

    folder = load_models(str(d / "merged-folder"))  # the merged folder is a complete diffusers model
    assert folder.family.name == family


def test_merged_model_output_equals_base_with_loras_applied(setup):
    """Merged U-Net output == base with both LoRAs applied at (0.7, 0.4) through diffusers' adapters."""
    family, d, comps, a, _ = setup
    # (diffusers + transformers 5 mis-load a second text-encoder adapter that covers fewer layers than the first,
    # so the second LoRA here covers every Linear layer)
    b = make_lora(comps, d / "b-full.safetensors", rank=3, seed=2, alpha=3.0, conv=False)
    out = d / "merged-out.safetensors"
    merge(sd_model=str(d / "base.safetensors"), models=[str(a), str(b)], ratios=[0.7, 0.4], save_to=str(out),
          overwrite=True)
    from lorakit.models import load_models

    merged = load_models(str(out))
    pipe = build_tiny(family, seed=0).pipeline()
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    ids = merged.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = pipe.unet(sample, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        got = merged.unet(sample, t, encoder_hidden_states=merged.text_encoder(ids)[0]).sample
        base = comps.unet(sample, t, encoder_hidden_states=comps.text_encoder(ids)[0]).sample
    assert (want - base).abs().max() > 1e-2  # the LoRAs do change the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _deltas(path):
    return {n: (w.up.flatten(1) @ w.down.flatten(1)) * w.scale for n, w in parse_kohya(load_lora_file(path)[0]).items()}


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_lora_plus_lora_exact_modes(setup, mode):
    family, d, comps, a, b = setup
    out = d / f"ab-{mode}.safetensors"
    rank = {"new_rank": 5} if mode == "svd" else {}  # concat: the ranks' sum, 2 + 3
    result = merge(models=[str(a), str(b)], ratios=[0.8, -0.3], merge_mode=mode, save_to=str(out), overwrite=True,
                   **rank)
    da, db, dm = _deltas(a), _deltas(b), _deltas(out)
    assert set(dm) == set(da) | set(db)
    for name, got in dm.items():
        want = 0.8 * da[name] + (-0.3 * db[name] if name in db else 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if mode == "svd":
        assert max(result.errors.values()) < 1e-3
    tensors, meta = load_lora_file(out)
    assert max(m.rank for m in parse_kohya(tensors).values()) == 5
    assert meta["modelspec.merged_from"] == f"{a.stem}, {b.stem}" and meta["modelspec.title"] == out.stem


def test_resize_reports_its_error(setup):
    family, d, comps, a, b = setup
    out = d / "b-small.safetensors"
    result = merge(models=[str(b)], merge_mode="svd", new_rank=1, save_to=str(out), overwrite=True)
    assert 0.05 < result.errors["unet"] < 1.0
    assert all(m.rank == 1 for m in parse_kohya(load_lora_file(out)[0]).values())


def test_dynamic_resize_chooses_each_modules_rank_from_its_singular_values(setup, capsys):
    from lorakit.cli import main
    from lorakit.lora_math import dynamic_rank

    family, d, comps, a, b = setup
    ab = d / "ab-concat.safetensors"
    merge(models=[str(a), str(b)], ratios=[1.0, 0.5], merge_mode="concat", save_to=str(ab), overwrite=True)
    out = d / "ab-dynamic.safetensors"
    assert main(["merge", "--models", str(ab), "--merge_mode", "svd", "--dynamic_method", "sv_fro",
                 "--dynamic_param", "0.8", "--new_rank", "4", "--save_to", str(out), "--overwrite"]) == 0
    assert "by sv_fro 0.8; relative error" in capsys.readouterr().out
    deltas, tensors = _deltas(ab), load_lora_file(out)[0]
    modules = parse_kohya(tensors)
    ranks = {}
    for name, delta in deltas.items():
        s = torch.linalg.svdvals(delta.flatten(1).double())
        ranks[name] = want = dynamic_rank(s, "sv_fro", 0.8, max_rank=4)  # the oracle: the dense delta's spectrum
        assert modules[name].rank == want, name
        kept = math.sqrt(float(s[:want].square().sum() / s.square().sum()))
        assert kept >= 0.8 or want == 4
    assert len(set(ranks.values())) > 1  # the modules differ, so do their ranks
    meta = load_lora_file(out)[1]
    assert meta["lorakit.dynamic_rank"] == "sv_fro=0.8" and meta["ss_network_dim"] == str(max(ranks.values()))
    # without a cap, sv_fro 1.0 keeps each delta whole
    whole = merge(models=[str(ab)], merge_mode="svd", dynamic_method="sv_fro", dynamic_param=1.0,
                  save_to=str(d / "ab-whole.safetensors"), overwrite=True)
    assert max(whole.errors.values()) < 1e-3
    assert all(whole.ranks[n] <= 5 for n in deltas)
    for bad, match in ((dict(dynamic_method="sv_fro"), "needs `dynamic_param`"),
                       (dict(dynamic_method="sv_fro", dynamic_param=1.5), r"in \(0, 1\]"),
                       (dict(dynamic_method="sv_ratio", dynamic_param=0.5), "≥ 1"),
                       (dict(dynamic_param=0.9, new_rank=2), "`dynamic_method` is not"),
                       (dict(dynamic_method="sv_fro", dynamic_param=0.9, merge_mode="concat"), "merge_mode = svd")):
        with pytest.raises(ConfigError, match=match):
            merge(**{"models": [str(ab)], "merge_mode": "svd", "save_to": str(d / "no.safetensors"), **bad})
    assert not (d / "no.safetensors").exists()


def test_sum_mode_matches_the_documented_formula(setup):
    family, d, comps, a, b = setup
    a2 = make_lora(comps, d / "a2.safetensors", rank=2, seed=5, alpha=2.0)
    out = d / "sum.safetensors"
    merge(models=[str(a), str(a2)], ratios=[0.6, 0.5], merge_mode="sum", save_to=str(out), overwrite=True)
    ta, t2, tm = load_lora_file(a)[0], load_lora_file(a2)[0], load_lora_file(out)[0]
    ca, c2 = math.sqrt(1.0 / 1.0) * 0.6, math.sqrt(2.0 / 1.0) * 0.5
    for key in tm:
        if key.endswith("lora_up.weight"):
            torch.testing.assert_close(tm[key], abs(ca) * ta[key] + abs(c2) * t2[key])
        elif key.endswith("lora_down.weight"):
            torch.testing.assert_close(tm[key], ca * ta[key] + c2 * t2[key])
        else:
            assert float(tm[key]) == 1.0
    with pytest.raises(LoraFormatError, match="same rank"):
        merge(models=[str(a), str(b)], merge_mode="sum", save_to=str(d / "x.safetensors"))


def test_bad_input(setup, tmp_path):
    family, d, comps, a, b = setup
    base = str(d / "base.safetensors")
    with pytest.raises(ConfigError, match="one ratio per model"):
        merge(sd_model=base, models=[str(a), str(b)], ratios=[0.5], save_to=str(tmp_path / "m.safetensors"))
    with pytest.raises(ConfigError, match="not found"):
        merge(sd_model=base, models=[str(tmp_path / "nope.safetensors")], save_to=str(tmp_path / "m.safetensors"))
    with pytest.raises(ConfigError, match="unknown extension"):
        merge(sd_model=base, models=[str(a)], save_to=str(tmp_path / "m.bin"))
    with pytest.raises(ConfigError, match="one of the inputs"):
        merge(sd_model=base, models=[str(a)], save_to=base, overwrite=True)
    (tmp_path / "m.ckpt").mkdir()
    with pytest.raises(ConfigError, match="m.ckpt is a folder"):
        merge(sd_model=base, models=[str(a)], save_to=str(tmp_path / "m.ckpt"), overwrite=True)
    (tmp_path / "m.ckpt").rmdir()
    # resize_lora.py users pass only `new_rank`: a concat (or into-model) merge would ignore it
    with pytest.raises(ConfigError, match=r"`new_rank` is the rank of a LoRA re-factorised by `merge_mode = svd`.*"
                                          r"this merge is concat"):
        merge(models=[str(a)], new_rank=1, save_to=str(tmp_path / "m.safetensors"))
    with pytest.raises(ConfigError, match="`new_conv_rank` .* this merge is into a model"):
        merge(sd_model=base, models=[str(a)], merge_mode="svd", new_conv_rank=1,
              save_to=str(tmp_path / "m.safetensors"))
    # an SDXL LoRA is refused, not merged into a file labelled as an SD1 LoRA
    xl = tmp_path / "xl.safetensors"
    save_safetensors({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 8),
                      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 2)}, xl,
                     {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(LoraFormatError, match="xl.safetensors is a LoRA for SDXL .*lorakit merges LoRAs for SD 1.x"):
        merge(models=[str(xl)], save_to=str(tmp_path / "m.safetensors"))
    # a model given as a LoRA is named as a model
    with pytest.raises(LoraFormatError, match="this is a model checkpoint, not a LoRA: use it as the model"):
        merge(models=[base], save_to=str(tmp_path / "m.safetensors"))
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="overwrite"):
        merge(sd_model=base, models=[str(a)], save_to=str(existing))
    assert existing.read_bytes() == b"keep"
    with pytest.warns(UserWarning, match="outside"):
        merge(sd_model=base, models=[str(a)], ratios=[1.5], save_to=str(tmp_path / "strong.safetensors"))
    # a LoRA for the other family is refused by name, and so is a v1 + v2 LoRA mix
    other = "sd_v2" if family == "sd1" else "sd_v1"
    foreign = make_lora(comps, tmp_path / "foreign.safetensors", metadata={"ss_base_model_version": other})
    with pytest.raises(LoraFormatError, match="is a LoRA for"):
        merge(sd_model=base, models=[str(foreign)], save_to=str(tmp_path / "m.safetensors"))
    mine = make_lora(comps, tmp_path / "mine.safetensors",
                     metadata={"ss_base_model_version": "sd_v1" if family == "sd1" else "sd_v2"})
    with pytest.raises(LoraFormatError, match="different model families"):
        merge(models=[str(mine), str(foreign)], save_to=str(tmp_path / "mix.safetensors"))
    assert not list(tmp_path.glob("m.*")) and not (tmp_path / "mix.safetensors").exists()


def test_a_merge_replaces_no_folder_of_the_users_even_with_overwrite(setup, tmp_path):
    """A merge into a folder replaces the whole folder: an existing folder is replaced only when it holds an earlier
    diffusers model, never when it holds or lies inside an input (the training folder with the LoRA in it)."""
    family, d, comps, a, b = setup
    import shutil

    notes = tmp_path / "my_stuff"
    notes.mkdir()
    (notes / "precious_notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="does not hold a diffusers model"):
        merge(sd_model=str(d / "base.safetensors"), models=[str(a)], save_to=str(notes), overwrite=True)
    run = tmp_path / "training_run"
    run.mkdir()
    lora = shutil.copy(a, run / "a.safetensors")
    (run / "model_index.json").write_text("{}")  # even one that looks like a model
    with pytest.raises(ConfigError, match="holds the input"):
        merge(sd_model=str(d / "base.safetensors"), models=[str(lora)], save_to=str(run), overwrite=True)
    model = tmp_path / "model"
    shutil.copytree(d / "folder", model)
    for inside in (model / "unet", model / "merged", model / "merged.safetensors"):  # whether it exists or not
        with pytest.raises(ConfigError, match="is inside the input"):
            merge(sd_model=str(model), models=[str(a)], save_to=str(inside), overwrite=True)
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in (d / "folder").iterdir())
    assert (notes / "precious_notes.txt").read_text() == "keep me" and (run / "a.safetensors").is_file()
    assert (model / "unet").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["model", "my_stuff",
                                                                                          "training_run"]
    earlier = tmp_path / "merged"  # an earlier merge's folder is replaced
    merge(sd_model=str(d / "base.safetensors"), models=[str(a)], save_to=str(earlier))
    (tmp_path / ".merged.old").mkdir()  # a folder of the user's whose name the replaced one might take
    (tmp_path / ".merged.old" / "mine.txt").write_text("keep me")
    merge(sd_model=str(d / "base.safetensors"), models=[str(b)], save_to=str(earlier), overwrite=True)
    assert (earlier / "model_index.json").is_file() and (tmp_path / ".merged.old" / "mine.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.old", "merged", "model", "my_stuff",
                                                          "training_run"]


def test_a_folder_merge_leaves_out_what_would_hold_the_unmerged_weights(setup, tmp_path):
    """Beside the diffusers parts a repo may keep a single-file checkpoint, and a part may hold an fp16 variant or a
    .bin twin of its weights: copied unmerged into the merged folder, they would be what another loader reads."""
    family, d, comps, a, b = setup
    import shutil

    src = tmp_path / "repo"
    shutil.copytree(d / "folder", src)
    shutil.copy(d / "base.safetensors", src / "v1-5-pruned.safetensors")
    shutil.copy(src / "unet" / "diffusion_pytorch_model.safetensors",
                src / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (src / "text_encoder" / "pytorch_model.bin").write_bytes(b"unmerged")
    (src / "unused").mkdir()
    (src / "unused" / "x.safetensors").write_bytes(b"unmerged")
    (src / "README.md").write_text("the model card")
    out = tmp_path / "merged"
    merge(sd_model=str(src), models=[str(a)], ratios=[0.5], save_to=str(out))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    want = sorted(str(p.relative_to(d / "folder")) for p in (d / "folder").rglob("*") if p.is_file())
    assert files == sorted(want + ["README.md"])
    merged = open_weights(out)
    for name, value in expected_weights(comps, [(a, 0.5)]).items():
        torch.testing.assert_close(merged.get(name), value, rtol=0, atol=2e-6)
    merged.close()


def test_failed_merge_leaves_no_partial_output(setup, tmp_path, monkeypatch):
    family, d, comps, a, b = setup
    import lorakit.merging as merging

    calls = {"n": 0}
    real = merging.merge_weight

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(merging, "merge_weight", failing)
    for dst in (tmp_path / "out.safetensors", tmp_path / "out-folder"):
        calls["n"] = 0
        src = d / ("base.safetensors" if dst.suffix else "folder")
        with pytest.raises(RuntimeError, match="disk full"):
            merge(sd_model=str(src), models=[str(a)], save_to=str(dst))
        assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_svd_merge_of_2d_and_4d_1x1_spellings_of_one_module(setup, tmp_path):
    """sd-scripts stores proj_in/proj_out as 4-D 1x1 convolutions, lorakit's SD2 LoRAs as 2-D: one module, two
    spellings. The merge's error must be measured on the module's matrix (summing a [o, i] and an [o, i, 1, 1] delta
    would broadcast to [o, i, o, i])."""
    from lorakit.fileio import save_safetensors

    family, d, comps, a, b = setup
    tensors, meta = load_lora_file(a)
    changed = [k for k in tensors if "proj_" in k and not k.endswith(".alpha")]
    assert changed  # SD1's projections are 1x1 convolutions (stored 4-D), SD2's are Linear (2-D): respell them
    other = {k: (v.flatten(1) if v.ndim == 4 else v[:, :, None, None]) if k in changed else v
             for k, v in tensors.items()}
    save_safetensors(other, tmp_path / "a2d.safetensors", meta)
    mixed = merge(models=[str(a), str(tmp_path / "a2d.safetensors")], ratios=[0.5, 0.5], merge_mode="svd",
                  new_rank=1, save_to=str(tmp_path / "mixed.safetensors"))
    same = merge(models=[str(a), str(a)], ratios=[0.5, 0.5], merge_mode="svd", new_rank=1,
                 save_to=str(tmp_path / "same.safetensors"))
    assert same.errors["unet"] > 0.05  # rank 2 cut to 1
    assert mixed.errors["unet"] == pytest.approx(same.errors["unet"], rel=1e-4)


@pytest.mark.parametrize("mode", ["concat", "svd", "sum"])
def test_merged_1x1_convolutions_are_4d_whatever_the_first_file_stored(setup, tmp_path, mode):
    """A first input that stores SD1's proj_in/out and the ResNets' conv_shortcut as 2-D (as some tools do) must not
    make the merged file 2-D there: sd-scripts' merge of such a file fails on its conv branch. SD2's projections are
    Linear layers: 2-D as lorakit writes them."""
    from lorakit.fileio import save_safetensors

    family, d, comps, a, b = setup
    tensors, meta = load_lora_file(a)
    one_by_one = {k.rsplit(".", 2)[0] for k, v in tensors.items() if k.endswith("lora_down.weight") and v.ndim == 4
                  and v.shape[2:] == (1, 1)}
    flat = {k: v.flatten(1) if k.split(".")[0] in one_by_one and v.ndim == 4 else v for k, v in tensors.items()}
    save_safetensors(flat, tmp_path / "flat.safetensors", {**meta, "ss_base_model_version": f"sd_v{family[-1]}"})
    merged, _ = load_lora_file(merge(models=[str(tmp_path / "flat.safetensors"), str(a)], ratios=[0.5, 0.5],
                                     merge_mode=mode, new_rank=2 if mode == "svd" else None,
                                     save_to=str(tmp_path / "m.safetensors")).path)
    for key, value in merged.items():
        if key.endswith(".alpha"):
            continue
        expected = tensors[key].ndim if family == "sd1" or "proj_" not in key else 2
        assert value.ndim == expected, key
    assert any("proj_in" in k and v.ndim == (4 if family == "sd1" else 2) for k, v in merged.items())


def test_old_clip_key_spelling_and_missing_text_encoder(tmp_path):
    """Older SD1 single files spell the CLIP keys without `text_model.` (the loader accepts them); merge reads
    them too. A file without a text encoder is refused by name."""
    from lorakit.checkpoint_keys import CLIP_PREFIX
    from lorakit.errors import ModelLoadError
    from lorakit.fileio import save_safetensors

    comps = build_tiny("sd1", seed=0)  # the spelling variant exists in SD1 files only
    save_single_file(comps, tmp_path / "base.safetensors")
    a = make_lora(comps, tmp_path / "a.safetensors", rank=2, seed=1, alpha=1.0)
    with open_weights(tmp_path / "base.safetensors") as base:
        ldm = {k: base.read_ldm(k) for k in base.ldm_shapes}
    old = {k.replace(CLIP_PREFIX + "text_model.", CLIP_PREFIX): v for k, v in ldm.items()}
    assert old.keys() != ldm.keys()
    save_safetensors(old, tmp_path / "old.safetensors", {"sshs_model_hash": "0" * 64, "modelspec.hash_sha256": "0x0",
                                                          "modelspec.title": "base"})
    for base, out in (("old", "o"), ("base", "n")):
        merge(sd_model=str(tmp_path / f"{base}.safetensors"), models=[str(a)], ratios=[0.7],
              save_to=str(tmp_path / f"{out}.safetensors"))
    from lorakit.hub import read_lora_metadata

    merged_meta = read_lora_metadata(tmp_path / "o.safetensors")  # the base's hashes would be stale: dropped
    assert not any(k.startswith(("sshs_", "modelspec.hash")) for k in merged_meta)
    # a model of its own name, made from the base (by its title) and the LoRA, as sd-scripts records it
    assert merged_meta["modelspec.title"] == "o" and merged_meta["modelspec.merged_from"] == "base, a"
    with open_weights(tmp_path / "o.safetensors") as got, open_weights(tmp_path / "n.safetensors") as want:
        assert got.ldm_shapes.keys() == want.ldm_shapes.keys()
        assert all(torch.equal(got.read_ldm(k), want.read_ldm(k)) for k in want.ldm_shapes)
    save_safetensors({k: v for k, v in ldm.items() if not k.startswith(CLIP_PREFIX)}, tmp_path / "unet.safetensors")
    with pytest.raises(ModelLoadError, match="no text encoder in this checkpoint"):
        merge(sd_model=str(tmp_path / "unet.safetensors"), models=[str(a)], save_to=str(tmp_path / "u.safetensors"))
    # SDXL keeps its text encoders under conditioner.embedders: named as SDXL, not as a file without a text encoder
    sdxl = {k: v for k, v in ldm.items() if not k.startswith(CLIP_PREFIX)}
    sdxl["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    save_safetensors(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(ModelLoadError, match="this is an SDXL checkpoint"):
        merge(sd_model=str(tmp_path / "sdxl.safetensors"), models=[str(a)], save_to=str(tmp_path / "x.safetensors"))


def test_loras_on_the_layers_outside_the_blocks_merge_into_a_single_file(setup):
    """`conv_in`, `conv_out` and the time embedding are outside the U-Net's blocks (A1111 and diffusers apply LoRAs
    on them): merged into a single file or a folder, each becomes W + alpha/rank · up @ down."""
    from lorakit.formats import save_lora

    family, d, comps, _, _ = setup
    gen = torch.Generator().manual_seed(5)
    layers = {"conv_in": comps.unet.conv_in, "conv_out": comps.unet.conv_out,
              "time_embedding_linear_1": comps.unet.time_embedding.linear_1}
    tensors = {}
    for name, layer in layers.items():
        w = layer.weight
        down_shape = (2, *w.shape[1:]) if w.dim() == 4 else (2, w.shape[1])
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen)
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn((w.shape[0], 2, 1, 1)[:w.dim()], generator=gen)
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    lora = d / "outside.safetensors"
    save_lora(lora, tensors)
    for dst in (d / "outside-merged.safetensors", d / "outside-merged-folder"):
        merge(sd_model=str(d / "base.safetensors"), models=[str(lora)], ratios=[0.5], save_to=str(dst),
              overwrite=True)
        merged = open_weights(dst)
        for name, layer in layers.items():
            up, down = tensors[f"lora_unet_{name}.lora_up.weight"], tensors[f"lora_unet_{name}.lora_down.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
            param = "unet." + ("time_embedding.linear_1" if name.startswith("time") else name) + ".weight"
            torch.testing.assert_close(merged.get(param), layer.weight.detach() + 0.5 * 0.5 * delta, rtol=0,
                                       atol=2e-6, msg=f"{dst.name}: {param}")
        merged.close()


def test_an_sd2_file_converted_back_from_diffusers_keeps_its_last_text_encoder_layer(tmp_path):
    """diffusers' converter writes SD2's OpenCLIP tower without the unused last block and `text_projection`: every
    block there is a layer in use, so a LoRA on the last one merges (it was called a module matching no layer)."""
    import re

    from lorakit.checkpoint_keys import OPENCLIP_PREFIX

    comps = build_tiny("sd2", seed=0)
    save_single_file(comps, tmp_path / "full.safetensors")
    with open_weights(tmp_path / "full.safetensors") as full:
        ldm = {k: full.read_ldm(k) for k in full.ldm_shapes}
    last = comps.text_encoder.config.num_hidden_layers  # the original files' extra block
    dropped = re.compile(re.escape(OPENCLIP_PREFIX)
                         + rf"(transformer\.resblocks\.{last}\.|text_projection|logit_scale)")
    save_safetensors({k: v for k, v in ldm.items() if not dropped.match(k)}, tmp_path / "from_diffusers.safetensors")
    lora = make_lora(comps, tmp_path / "a.safetensors", rank=2, seed=1, alpha=1.0)
    for name in ("full", "from_diffusers"):
        merge(sd_model=str(tmp_path / f"{name}.safetensors"), models=[str(lora)], ratios=[1.0],
              save_to=str(tmp_path / f"{name}_merged.safetensors"))
    with open_weights(tmp_path / "full_merged.safetensors") as want, \
            open_weights(tmp_path / "from_diffusers_merged.safetensors") as got:
        changed = [k for k in got.ldm_shapes if f"resblocks.{last - 1}." in k and not torch.equal(
            got.read_ldm(k), ldm[k])]
        assert changed and all(torch.equal(got.read_ldm(k), want.read_ldm(k)) for k in got.ldm_shapes)
