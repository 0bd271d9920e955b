"""Model loading and single-file saving: round trips, diffusers' own loader as oracle, detection, overrides,
bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit import cli
from lorakit.checkpoint import components_to_ldm, diffusers_to_ldm, read_single_file, write_single_file
from lorakit.errors import ModelLoadError, UnsafeCheckpointError
from lorakit.families import SD1, SD2
from lorakit.models import load_models, save_single_file
from lorakit.tiny import build_tiny, tiny_configs

COMPONENTS = ("unet", "vae", "text_encoder")


def randomized_tiny(family: str, seed: int = 0):
    """A tiny model whose every tensor (norm weights and biases included) holds distinct random values, so a
    mapping that swaps two same-shaped tensors cannot pass unnoticed."""
    comps = build_tiny(family, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name in COMPONENTS:
            for p in getattr(comps, name).parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return comps


def assert_same_weights(a, b, dtype=None):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            expected = sa[k] if dtype is None or not sa[k].is_floating_point() else sa[k].to(dtype)
            assert torch.equal(expected, sb[k]), f"{name}.{k}"


# ---------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_single_file_round_trip_is_bit_identical(tmp_path, family, ext):
    comps = randomized_tiny(family)
    path = save_single_file(comps, tmp_path / f"model.{ext}")
    loaded = load_models(str(path))
    assert_same_weights(comps, loaded)
    assert loaded.family is comps.family
    assert loaded.prediction_type == comps.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert loaded.noise_scheduler.config.prediction_type == loaded.prediction_type
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.unet.config) == public(comps.unet.config)
    assert public(loaded.vae.config) == public(comps.vae.config)
    assert loaded.native_resolution == comps.native_resolution == 64
    prompt = "a photo of a dog"
    assert loaded.tokenizer(prompt).input_ids == comps.tokenizer(prompt).input_ids
    ldm, meta = read_single_file(path)
    assert set(ldm) == set(components_to_ldm(comps))
    assert meta["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision(tmp_path, capfd, precision, dtype):
    comps = randomized_tiny("sd1")
    path = save_single_file(comps, tmp_path / "half.safetensors", save_precision=precision)
    ldm, _ = read_single_file(path)
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"].dtype == dtype
    assert ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    loaded = load_models(str(path), dtype=dtype)
    assert_same_weights(comps, loaded, dtype=dtype)
    capfd.readouterr()
    fp32 = load_models(str(path))  # default dtype: float32, cast while loading
    assert {p.dtype for c in COMPONENTS for p in getattr(fp32, c).parameters()} == {torch.float32}
    fp32.to(dtype=dtype)
    assert "should be kept in float32" not in capfd.readouterr().err  # no diffusers warning on casts
    with pytest.raises(ValueError, match="save_precision"):
        save_single_file(comps, tmp_path / "x.safetensors", save_precision="fp8")


def test_state_dict_level_pair_round_trips(tmp_path):
    """`components_to_ldm` + `components_from_ldm`: the pair the merge job streams tensors through."""
    from lorakit.checkpoint import components_configs
    from lorakit.models import components_from_ldm

    comps = randomized_tiny("sd2", seed=3)
    ldm = components_to_ldm(comps)
    q = comps.text_encoder.state_dict()["encoder.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(ldm["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"][32:64], q)
    rebuilt = components_from_ldm({k: v.clone() for k, v in ldm.items()}, components_configs(comps),
                                  tokenizer=comps.tokenizer)
    assert_same_weights(comps, rebuilt)
    assert rebuilt.family is SD2
    # older SD1 files spell the CLIP keys without `text_model.`
    sd1 = randomized_tiny("sd1", seed=4)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in components_to_ldm(sd1).items()}
    assert_same_weights(sd1, components_from_ldm(old, components_configs(sd1), tokenizer=sd1.tokenizer))


# --------------------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("family, ext", [("sd1", "safetensors"), ("sd2", "safetensors"), ("sd2", "ckpt")])
def test_diffusers_single_file_loader_reads_lorakit_files(tmp_path, family, ext, tiny_sd1_dir, tiny_sd2_dir):
    """diffusers' own converter (pointed at a diffusers folder of the same architecture for configs, offline)
    finds exactly the weights lorakit wrote and lorakit reads."""
    from diffusers import StableDiffusionPipeline

    comps = randomized_tiny(family, seed=7)
    path = save_single_file(comps, tmp_path / f"model.{ext}")
    config = tiny_sd1_dir if family == "sd1" else tiny_sd2_dir
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    ours = load_models(str(path))
    assert_same_weights(pipe, ours)
    assert_same_weights(comps, pipe)


# ------------------------------------------------------------------------------------- folders, detection, options
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_folder_and_single_file_fixture_agree(family, tiny_sd1_dir, tiny_sd2_dir, tiny_sd1_file, tiny_sd2_file):
    folder, single = (tiny_sd1_dir, tiny_sd1_file) if family == "sd1" else (tiny_sd2_dir, tiny_sd2_file)
    a, b = load_models(str(folder)), load_models(str(single))
    assert a.family is b.family is (SD1 if family == "sd1" else SD2)
    assert a.prediction_type == b.prediction_type
    assert_same_weights(a, b)


def test_overrides(tiny_sd1_file, tiny_sd2_dir):
    comps = load_models(str(tiny_sd1_file), v_parameterization=True)
    assert comps.prediction_type == comps.noise_scheduler.config.prediction_type == "v_prediction"
    comps = load_models(str(tiny_sd2_dir), v_parameterization=False, v2=True)
    assert comps.prediction_type == comps.noise_scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ModelLoadError, match="v2=True"):
        load_models(str(tiny_sd1_file), v2=True)
    with pytest.raises(ModelLoadError, match="v2=False"):
        load_models(str(tiny_sd2_dir), v2=False)


@pytest.mark.parametrize("family, norm_std, prediction, resolution", [
    ("sd1", 0.0, "epsilon", 64), ("sd2", 0.2, "v_prediction", 64), ("sd2", 0.0, "epsilon", 512)])
def test_standard_file_without_lorakit_metadata(tmp_path, monkeypatch, family, norm_std, prediction, resolution):
    """A file written by another tool (no `lorakit.configs`): configs are the bundled ones (patched here to a small
    architecture with CLIP's real 49,408-token vocabulary), family and prediction come from keys and weights, and
    the tokenizer is the standard CLIP BPE shipped with lorakit."""
    import lorakit.checkpoint as checkpoint
    from lorakit.checkpoint import empty_modules
    from lorakit.models import components_from_ldm

    fam = SD1 if family == "sd1" else SD2
    configs = tiny_configs(fam, vocab_size=49408)
    configs["text_encoder"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    modules = empty_modules(configs)
    for m in modules:
        m.to_empty(device="cpu")
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
    ldm = diffusers_to_ldm({c: m.state_dict() for c, m in zip(COMPONENTS, modules)}, configs)
    norm = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.norm1.bias"
    ldm[norm] = torch.randn(ldm[norm].shape) * norm_std
    path = write_single_file(ldm, tmp_path / "other-tool.safetensors", metadata={})
    monkeypatch.setattr(checkpoint, "bundled_configs", lambda f: json.loads(json.dumps(configs)))
    comps = load_models(str(path))
    assert comps.family is fam and comps.prediction_type == prediction
    assert comps.native_resolution == resolution
    assert comps.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert comps.tokenizer.pad_token == ("!" if fam.v2 else "<|endoftext|>")
    assert torch.equal(comps.unet.state_dict()["up_blocks.1.attentions.2.transformer_blocks.0.norm1.bias"], ldm[norm])
    assert components_from_ldm(ldm).family is fam


def test_vae_override(tmp_path, tiny_sd1_dir):
    other = randomized_tiny("sd1", seed=5)
    other_file = save_single_file(other, tmp_path / "other.safetensors")
    other.save_pretrained(tmp_path / "other-folder")
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in read_single_file(other_file)[0].items()
                if k.startswith("first_stage_model.")}
    vae_file = write_single_file(vae_only, tmp_path / "vae.safetensors")
    for spec in (other_file, vae_file, tmp_path / "other-folder", tmp_path / "other-folder" / "vae"):
        comps = load_models(str(tiny_sd1_dir), vae=str(spec))
        for k, v in other.vae.state_dict().items():
            assert torch.equal(comps.vae.state_dict()[k], v), (spec, k)
    with pytest.raises(ModelLoadError, match="vae"):
        load_models(str(tiny_sd1_dir), vae=str(tmp_path / "nope.safetensors"))


def test_a_checkpoint_without_a_vae_loads_with_one_given(tmp_path, tiny_sd1_file, tiny_sd1_dir):
    """Checkpoints shared without a VAE ("noVAE") are meant to be used with one: the file's VAE is not read when
    `vae` is given (it was converted first, so the missing keys stopped the load)."""
    ldm, meta = read_single_file(tiny_sd1_file)
    no_vae = write_single_file({k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")},
                               tmp_path / "model_noVAE.safetensors", meta)
    with pytest.raises(ModelLoadError, match="first_stage_model"):
        load_models(str(no_vae))
    comps = load_models(str(no_vae), vae=str(Path(tiny_sd1_dir) / "vae"))
    want = load_models(str(tiny_sd1_dir))
    for part in ("vae", "unet"):
        got = getattr(comps, part).state_dict()
        assert all(torch.equal(got[k], v) for k, v in getattr(want, part).state_dict().items()), part


def test_an_inpainting_model_is_refused_by_name(tmp_path, tiny_sd1_file, tiny_sd1_dir):
    """A 9-channel U-Net loaded as text-to-image failed deep inside the sampler ("size of tensor a (9) must match")."""
    ldm, meta = read_single_file(tiny_sd1_file)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    ldm[key] = torch.cat([ldm[key], torch.zeros(ldm[key].shape[0], 5, *ldm[key].shape[2:])], dim=1)
    path = write_single_file(ldm, tmp_path / "inpainting.safetensors", meta)
    with pytest.raises(ModelLoadError, match="inpainting.safetensors is an inpainting model .*9 input channels.*"
                                             "merge and extract take this file"):
        load_models(str(path))
    comps = load_models(str(tiny_sd1_dir))
    old = comps.unet.conv_in
    comps.unet.conv_in = torch.nn.Conv2d(9, old.out_channels, old.kernel_size, padding=old.padding)
    comps.unet.register_to_config(in_channels=9)
    comps.save_pretrained(tmp_path / "inpainting-folder")
    with pytest.raises(ModelLoadError, match="inpainting model"):
        load_models(str(tmp_path / "inpainting-folder"))


def test_lorakit_toy(monkeypatch, tmp_path, tiny_sd1_file):
    import lorakit.models as models

    monkeypatch.setattr(models, "TOY_PATH", tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="lorakit-toy.*not installed"):
        load_models("lorakit-toy")
    monkeypatch.setattr(models, "TOY_PATH", Path(tiny_sd1_file))
    assert load_models("lorakit-toy").family is SD1


def test_a_diffusers_folder_of_fp16_variant_files_loads(tmp_path, tiny_sd1_dir):
    """`save_pretrained(variant="fp16")` writes `diffusion_pytorch_model.fp16.safetensors` and nothing else: the folder
    was refused ("no file named diffusion_pytorch_model.bin")."""
    want = load_models(str(tiny_sd1_dir))
    want.pipeline().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert not (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    got = load_models(str(tmp_path / "fp16"))
    for part in ("unet", "text_encoder", "vae"):
        ref = getattr(want, part).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in getattr(got, part).state_dict().items()), part


def test_fp16_training_asks_the_hub_for_the_fp16_files_and_falls_back_to_the_full_ones(tiny_sd1_dir, monkeypatch):
    """Half the download on Colab when the repo has them (stable-diffusion-v1-5 does); a repo without them still
    loads, with its full-precision files."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    asked = []
    for cls in (UNet2DConditionModel, DDPMScheduler, CLIPTokenizer, CLIPTextModel, AutoencoderKL):
        def fake(repo, *args, _real=cls.from_pretrained, **kw):
            assert repo == "someone/sd15-no-fp16"
            asked.append(kw.get("variant"))
            if kw.pop("variant", None) == "fp16":
                raise OSError("someone/sd15-no-fp16 does not appear to have a file named "
                              "unet/diffusion_pytorch_model.fp16.safetensors")
            return _real(str(tiny_sd1_dir), *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    comps = load_models("someone/sd15-no-fp16", dtype=torch.float16)
    assert comps.unet.dtype == torch.float16 and asked[0] == "fp16" and asked[1:] == [None] * 5
    asked.clear()
    load_models("someone/sd15-no-fp16")  # full precision asked for: the full files, first time
    assert set(asked) == {None}


def test_hub_repo_id_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="lorakit-test/no-such-model: it is not in the local Hugging Face cache"):
        load_models("lorakit-test/no-such-model", local_files_only=True)


# ------------------------------------------------------------------------------------------------------ bad input
class _Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _bad_inputs(tmp_path: Path, good_file: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the error must contain)."""
    no_index = tmp_path / "not-a-model"
    (no_index / "unet").mkdir(parents=True)
    truncated = tmp_path / "truncated.safetensors"
    data = good_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    lora = write_single_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
                             tmp_path / "a-lora.safetensors")
    other = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1), "x": _Evil(tmp_path / "PWNED")}}, evil)
    return {
        "missing": (tmp_path / "nope.safetensors", "not found"),
        "no_model_index": (no_index, "model_index.json"),
        "truncated": (truncated, "truncated.safetensors"),
        "lora": (lora, "LoRA"),
        "non_sd": (other, "not a Stable Diffusion"),
        "malicious": (evil, "refused"),
    }


@pytest.mark.parametrize("case", ["missing", "no_model_index", "truncated", "lora", "non_sd", "malicious"])
def test_bad_input_api_and_cli(tmp_path, tiny_sd1_file, monkeypatch, capsys, case):
    path, words = _bad_inputs(tmp_path, Path(tiny_sd1_file))[case]
    with pytest.raises(ModelLoadError, match=words) as info:
        load_models(str(path))
    if case == "malicious":
        assert isinstance(info.value, UnsafeCheckpointError)
    # the CLI: any job that loads a model goes through `load_models_from_config`
    monkeypatch.setitem(cli.RUNNERS, "generate", "lorakit.models:load_models_from_config")
    capsys.readouterr()
    assert cli.main(["generate", "--pretrained_model_name_or_path", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "PWNED").exists()
    if case == "malicious":  # the file really is malicious: an unsafe load runs its payload
        torch.load(path, weights_only=False)
        assert (tmp_path / "PWNED").exists()


def test_unsupported_file_type(tmp_path):
    (tmp_path / "model.bin.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="unsupported model file type"):
        load_models(str(tmp_path / "model.bin.txt"))


def test_tiny_cli_writes_folder_and_single_file(tmp_path):
    out = tmp_path / "tiny2"
    assert cli.main(["tiny", "--output_dir", str(out), "--family", "sd2"]) == 0
    assert (out / "model_index.json").is_file() and (out / "model.safetensors").is_file()
    a, b = load_models(str(out)), load_models(str(out / "model.safetensors"))
    assert a.family is b.family is SD2 and b.prediction_type == "v_prediction"
    assert_same_weights(a, b)


def test_a_tiny_model_in_memory_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from lorakit.tiny import build_tiny

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    comps = build_tiny("sd1", seed=0)
    assert comps.tokenizer("a photo").input_ids[0] == comps.tokenizer.bos_token_id
    assert not list(tmp_path.glob("lorakit-tok-*"))


def test_a_hub_repo_id_without_a_network_says_so(monkeypatch):
    """Online mode with no network: huggingface_hub's retries end in "does not appear to have a file named
    config.json"; lorakit checks whether the Hub can be reached at all and says that instead."""
    import socket

    import diffusers

    from lorakit import models

    def no_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    tried = []

    def offline_download(*args, **kwargs):
        tried.append(args)
        raise OSError("someone/sd15 does not appear to have a file named config.json.")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", offline_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_route)
    for cached in (False, True):  # not in the cache: said before any download is tried; cached: after it failed
        monkeypatch.setattr(models, "_cached", lambda repo_id, cached=cached: cached)
        with pytest.raises(ModelLoadError, match=r"someone/sd15: the Hub \(huggingface.co\) cannot be reached from "
                                                 r"this machine \(no network\?\) and the repo is not in the local"):
            models.load_models("someone/sd15")
        assert bool(tried) == cached
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy a direct connection proves nothing
    assert models._hub_reachable() is None
    with pytest.raises(ModelLoadError, match="does not appear to have a file named config.json"):
        models.load_models("someone/sd15")
