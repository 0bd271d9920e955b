"""The kohya file format: hand-written files (built from the format facts, not lorakit's writer) load with the
expected effect; metadata, hashes and precisions; bad input is refused with clear errors and nothing applied;
`lorakit inspect`."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from lorakit.cli import main as cli_main
from lorakit.config import TrainConfig
from lorakit.errors import LoraFormatError, UnsafeCheckpointError
from lorakit.formats import load_lora_file, parse_kohya, save_lora, to_kohya
from lorakit.lora_metadata import MINIMAL_KEYS, TRAINING_CONFIG_KEY, build_metadata, metadata_summary, unix_time
from lorakit.models import load_models
from lorakit.network import add_lora, apply_lora_file, apply_lora_weights

H = 32  # tiny models: text hidden size, U-Net first block channels, cross-attention width (lorakit.tiny)
TE_MLP = 64  # tiny text encoder intermediate size

# module -> (down shape, up shape, alpha or None), spelled out from KOHYA_FORMAT.md §1-2 for the tiny SD1 model
HAND_SD1 = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((2, H), (H, 2), 1.0),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ((3, H), (TE_MLP, 3), None),  # no alpha: alpha = rank
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((4, H), (H, 4), 8.0),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((2, H, 1, 1), (H, 2, 1, 1), 0.0),  # alpha 0: alpha = rank
    "lora_unet_down_blocks_0_resnets_0_conv1": ((2, H, 3, 3), (H, 2, 1, 1), 1.0),
    "lora_unet_down_blocks_0_downsamplers_0_conv": ((1, H, 3, 3), (H, 1, 1, 1), 0.5),
}


def hand_written(spec: dict, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (down, up, alpha) in spec.items():
        tensors[f"{name}.lora_down.weight"] = (torch.randn(down, generator=g) * 0.3).to(dtype)
        tensors[f"{name}.lora_up.weight"] = (torch.randn(up, generator=g) * 0.3).to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def expected_delta(layer: torch.nn.Module, x: torch.Tensor, down, up, alpha) -> torch.Tensor:
    """The format's definition: up(down(x)) * alpha / rank, computed by hand in fp32."""
    down, up = down.float(), up.float()
    rank = down.shape[0]
    scale = (alpha or rank) / rank
    if isinstance(layer, torch.nn.Linear):
        return F.linear(F.linear(x, down.reshape(rank, -1)), up.reshape(up.shape[0], rank)) * scale
    hidden = F.conv2d(x, down, stride=layer.stride, padding=layer.padding)
    return F.conv2d(hidden, up) * scale


def module_input(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(2, 5, layer.in_features)
    return torch.randn(1, layer.in_channels, 8, 8)


def check_effect(comps, spec, tensors, multiplier=1.0):
    for name, (_, _, alpha) in spec.items():
        component = comps.text_encoder if name.startswith("lora_te_") else comps.unet
        path = name.removeprefix("lora_te_text_model_").removeprefix("lora_unet_")
        layer = dict(component.named_modules())[_dotted(component, path)]
        assert isinstance(layer, LoraLayer), name
        base = layer.get_base_layer()
        x = module_input(base)
        with torch.no_grad():
            got = layer(x) - base(x)
        want = multiplier * expected_delta(base, x, tensors[f"{name}.lora_down.weight"],
                                           tensors[f"{name}.lora_up.weight"], alpha)
        assert want.abs().max() > 1e-3, name  # non-vacuous
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def _dotted(component, underscored: str) -> str:
    """The module path whose underscore spelling is `underscored` (looked up, not guessed)."""
    for path, _ in component.named_modules():
        if path.replace(".", "_") == underscored:
            return path
    raise KeyError(underscored)


# ---------------------------------------------------------------------------------------------- hand-written files

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hand_written_kohya_file_has_the_expected_effect(tiny_sd1_dir, tmp_path, dtype):
    tensors = hand_written(HAND_SD1, dtype)
    path = tmp_path / "hand.safetensors"
    save_file(tensors, str(path))
    comps = load_models(str(tiny_sd1_dir))
    net = apply_lora_file(comps, path, multiplier=0.75)
    assert sorted(net.targets) == sorted(HAND_SD1)
    assert {n: layer.r[net.adapter_name] for n, layer in net.layers.items()} == {
        n: d[0] for n, (d, _, _) in HAND_SD1.items()}
    check_effect(comps, HAND_SD1, tensors, multiplier=0.75)
    # what lorakit reads back is what the file holds, alpha resolved (missing/0 -> rank)
    weights = net.weights()
    assert weights["lora_te_text_model_encoder_layers_1_mlp_fc1"].alpha == 3.0
    assert weights["lora_unet_down_blocks_0_attentions_0_proj_in"].alpha == 2.0
    assert torch.equal(weights["lora_unet_down_blocks_0_resnets_0_conv1"].down,
                       tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].float())


def test_sd2_file_with_4d_proj_loads_into_linear_projections(tiny_sd2_dir, tmp_path):
    spec = {"lora_unet_down_blocks_0_attentions_0_proj_in": ((2, H, 1, 1), (H, 2, 1, 1), 1.0),
            "lora_unet_down_blocks_0_attentions_0_proj_out": ((4, H), (H, 4), 2.0),
            "lora_te_text_model_encoder_layers_0_mlp_fc2": ((2, TE_MLP), (H, 2), 2.0)}
    tensors = hand_written(spec)
    save_file(tensors, str(tmp_path / "sd2.safetensors"), metadata={"ss_base_model_version": "sd_v2_v"})
    comps = load_models(str(tiny_sd2_dir))
    assert isinstance(comps.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    apply_lora_file(comps, tmp_path / "sd2.safetensors")
    check_effect(comps, spec, tensors)


def test_files_adapting_more_layers_than_lorakit_trains_load(tiny_sd1_dir):
    """LyCORIS-style presets also adapt e.g. conv_in and the time embedding; diffusers reads them, so does lorakit."""
    spec = {"lora_unet_conv_in": ((2, 4, 3, 3), (H, 2, 1, 1), 1.0),
            "lora_unet_time_embedding_linear_1": ((2, H), (4 * H, 2), 2.0)}
    tensors = hand_written(spec)
    comps = load_models(str(tiny_sd1_dir))
    net = apply_lora_weights(comps, tensors)
    assert {t.kind for t in net.targets.values()} == {"conv", "linear"}
    check_effect(comps, spec, tensors)


def test_full_size_sd2_file_with_4d_projections_is_recognised_and_applied(meta_full_size):
    comps = meta_full_size("sd2")  # meta device: shapes and names only
    spec = {"lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 320, 1, 1), (320, 4, 1, 1), 4.0),
            "lora_unet_up_blocks_3_attentions_2_proj_out": ((4, 320, 1, 1), (320, 4, 1, 1), 4.0),
            "lora_te_text_model_encoder_layers_22_mlp_fc2": ((4, 4096), (1024, 4), 4.0),
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k": ((4, 1024), (320, 4), 2.0)}
    net = apply_lora_weights(comps, hand_written(spec))
    assert sorted(net.layers) == sorted(spec)
    assert net.layers["lora_unet_down_blocks_0_attentions_0_proj_in"].lora_A[net.adapter_name].weight.shape == (
        4, 320)  # squeezed onto the Linear projection


def test_flat_text_encoder_spelling_is_read_as_the_classic_one(tiny_sd1_dir, tmp_path):
    tensors = hand_written({"lora_te_encoder_layers_0_mlp_fc2": ((2, TE_MLP), (H, 2), 1.0)})
    weights = parse_kohya(tensors)
    assert list(weights) == ["lora_te_text_model_encoder_layers_0_mlp_fc2"]
    net = apply_lora_weights(load_models(str(tiny_sd1_dir)), tensors)
    assert list(net.state_dict())[0].startswith("lora_te_text_model_encoder_layers_0_mlp_fc2.")


def test_parse_and_to_kohya_round_trip():
    tensors = hand_written(HAND_SD1)
    weights = parse_kohya(tensors)
    back = to_kohya(weights)
    assert set(back) == {f"{n}.{s}" for n in HAND_SD1 for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for key, value in tensors.items():
        if not key.endswith(".alpha"):
            assert torch.equal(back[key], value)
    assert float(back["lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"]) == 3.0  # written explicitly
    assert weights["lora_unet_down_blocks_0_resnets_0_conv1"].kernel_size == (3, 3)


# ---------------------------------------------------------------------------------------------- writing

def test_save_precisions_and_pickle_formats(tiny_sd1_dir, tmp_path):
    net = add_lora(load_models(str(tiny_sd1_dir)), dim=2, alpha=1, conv_dim=2)
    for p in net.trainable_parameters()["unet"]:
        p.data.normal_()
    state = net.state_dict()
    for precision, dtype in (("float", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        tensors, _ = load_lora_file(save_lora(tmp_path / f"{precision}.safetensors", state, {}, precision))
        assert {t.dtype for t in tensors.values()} == {dtype}
        assert torch.equal(tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"],
                           state["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].to(dtype))
    for suffix in (".ckpt", ".pt"):
        path = save_lora(tmp_path / f"x{suffix}", state, {"ss_ignored": "1"}, "float")
        plain = torch.load(path, weights_only=True)  # a plain tensor dict, as sd-scripts writes
        assert plain.keys() == state.keys() and all(torch.equal(plain[k], state[k]) for k in state)
        tensors, header = load_lora_file(path)
        assert header == {} and tensors.keys() == state.keys()
    with pytest.raises(ValueError, match="must end in"):
        save_lora(tmp_path / "x.bin", state)
    huge = {**state, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.full((64, 2), 1e6)}
    with pytest.raises(LoraFormatError, match="infinite"):  # 1e6 overflows fp16: refused, nothing written
        save_lora(tmp_path / "huge.safetensors", huge, save_precision="fp16")
    assert not (tmp_path / "huge.safetensors").exists()
    with pytest.raises(ValueError, match="save_precision"):
        save_lora(tmp_path / "x.safetensors", state, save_precision="fp8")


def test_metadata_strings_and_hashes_as_sd_scripts_computes_them(tmp_path):
    big = {"lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": torch.randn(64, 4096),  # > 1 MiB
           "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight": torch.randn(4096, 64),
           "lora_unet_mid_block_attentions_0_proj_out.alpha": torch.tensor(32.0)}
    meta = {"ss_network_dim": 64, "ss_v2": False, "ss_network_args": {"conv_dim": "4"}, "modelspec.title": "t",
            "skip": None}
    path = save_lora(tmp_path / "big.safetensors", big, meta)
    _, header = load_lora_file(path)
    assert all(isinstance(v, str) for v in header.values())
    assert header["ss_network_dim"] == "64" and header["ss_v2"] == "False" and "skip" not in header
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "4"}
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert header["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()  # the tensor data only
    # legacy: sd-scripts re-serialises with only the ss_* metadata, then hashes 64 KiB at 1 MiB
    ss_only = tmp_path / "ss_only.safetensors"
    save_file(big, str(ss_only), metadata={k: v for k, v in header.items() if k.startswith("ss_")})
    assert header["sshs_legacy_hash"] == hashlib.sha256(ss_only.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    # user metadata does not change the hashes; ss_* metadata moves the legacy window
    _, header2 = load_lora_file(save_lora(tmp_path / "b2.safetensors", big, {**meta, "modelspec.title": "other"}))
    assert (header2["sshs_model_hash"], header2["sshs_legacy_hash"]) == (header["sshs_model_hash"],
                                                                        header["sshs_legacy_hash"])
    _, header3 = load_lora_file(save_lora(tmp_path / "b3.safetensors", big, {**meta, "ss_training_comment": "x" * 100}))
    assert header3["sshs_model_hash"] == header["sshs_model_hash"]
    assert header3["sshs_legacy_hash"] != header["sshs_legacy_hash"]


def test_build_metadata_from_the_train_config(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    cfg = TrainConfig.from_dict({"network_dim": 8, "network_alpha": 4.0, "network_args": ["conv_dim=4"],
                                 "output_name": "sks_dog", "learning_rate": 2e-4, "text_encoder_lr": 5e-5})
    meta = build_metadata(cfg, comps, steps=100, epoch=2, tag_frequency={"10_sks dog": {"sks": 10, "dog": 10}},
                          training_started_at=unix_time())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    # unix seconds, as sd-scripts writes them: A1111's metadata panel reads them with float()
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert time.time() - 60 < started <= finished <= time.time()
    assert metadata_summary(meta)["ss_training_started_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime(started)))
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8"
    assert meta["ss_network_alpha"] == "4" and json.loads(meta["ss_network_args"]) == {"conv_dim": "4",
                                                                                        "conv_alpha": "4"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_steps"] == "100" and meta["ss_epoch"] == "2" and meta["ss_unet_lr"] == "0.0002"
    assert meta["ss_text_encoder_lr"] == "5e-05" and meta["ss_output_name"] == "sks_dog"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.title"] == "sks_dog"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_sks dog": {"sks": 10, "dog": 10}}
    assert TrainConfig.from_dict(json.loads(meta[TRAINING_CONFIG_KEY])).to_dict() == cfg.to_dict()
    minimal = build_metadata(cfg.replace(no_metadata=True), comps)
    assert {k for k in minimal if not k.startswith("modelspec.")} == set(MINIMAL_KEYS)
    assert minimal["modelspec.architecture"] == "stable-diffusion-v1/lora"  # sd-scripts writes modelspec all the same
    assert minimal["ss_base_model_version"] == "sd_v1" and TRAINING_CONFIG_KEY not in minimal


# ---------------------------------------------------------------------------------------------- bad input

def _lora_layers(comps) -> int:
    return sum(isinstance(m, LoraLayer) for c in (comps.unet, comps.text_encoder) for m in c.modules())


def test_truncated_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file(hand_written(HAND_SD1), str(path))
    data = path.read_bytes()
    for cut in (len(data) // 2, 6):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(LoraFormatError, match="truncated or corrupt"):
            load_lora_file(bad)
    with pytest.raises(LoraFormatError, match="not found"):
        load_lora_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("keys, message", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "not kohya LoRA keys"),
    ({"lora_unet_x.hada_w1_a": (4, 4)}, "LoHa"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 4)}, "diffusers/peft"),
    ({"lora_unet_x.lora_down.weight": (4, 4)}, "no `lora_up.weight`"),
])
def test_foreign_and_incomplete_keys(keys, message):
    with pytest.raises(LoraFormatError, match=message):
        parse_kohya({k: torch.zeros(s) for k, s in keys.items()})


def test_zero_rank_and_nan_files(tmp_path):
    zero = {"lora_unet_a.lora_down.weight": torch.zeros(0, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 0)}
    save_file(zero, str(tmp_path / "zero.safetensors"))
    with pytest.raises(LoraFormatError, match="rank"):
        parse_kohya(load_lora_file(tmp_path / "zero.safetensors")[0])
    nan = hand_written(HAND_SD1)
    nan["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(LoraFormatError, match="NaN"):
        parse_kohya(nan)


def test_fp8_files_are_read_as_fp16_and_integer_ones_refused():
    tensors = hand_written(HAND_SD1)
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}
    weights = parse_kohya(fp8)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert weights[name].up.dtype == torch.float16
    assert torch.equal(weights[name].up, fp8[name + ".lora_up.weight"].to(torch.float16))
    ints = dict(tensors, **{name + ".lora_up.weight": tensors[name + ".lora_up.weight"].to(torch.int32)})
    with pytest.raises(LoraFormatError, match=f"module `{name}` has int32 values in its up tensor"):
        parse_kohya(ints)


def test_pickle_with_code_is_refused_and_not_executed(tmp_path, tiny_sd1_dir):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"lora_unet_a.lora_down.weight": Payload()}, protocol=2))
    comps = load_models(str(tiny_sd1_dir))
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        apply_lora_file(comps, path)
    assert not marker.exists() and _lora_layers(comps) == 0


def test_sd2_lora_on_sd1_model_is_refused_before_anything_is_applied(tiny_sd1_dir, tiny_sd2_dir, tmp_path):
    sd2 = load_models(str(tiny_sd2_dir))
    net = add_lora(sd2, dim=2, alpha=1)
    cfg = TrainConfig.from_dict({"network_dim": 2, "network_alpha": 1.0})
    path = save_lora(tmp_path / "sd2.safetensors", net.state_dict(), build_metadata(cfg, sd2))
    sd1 = load_models(str(tiny_sd1_dir))
    with pytest.raises(LoraFormatError, match=r"for SD 2\.x .*sd_v2.* but the model is SD 1\.x"):
        apply_lora_file(sd1, path)
    assert _lora_layers(sd1) == 0


def test_sd2_shaped_file_without_metadata_on_full_size_sd1(tmp_path, meta_full_size):
    comps = meta_full_size("sd1")
    # SD2's OpenCLIP-H text encoder (1024 wide, 23 layers) and U-Net cross-attention (1024)
    spec = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((4, 1024), (1024, 4), 4.0),
            "lora_te_text_model_encoder_layers_22_mlp_fc2": ((4, 4096), (1024, 4), 4.0),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 1024), (320, 4), 4.0)}
    with pytest.raises(LoraFormatError, match=r"for SD 2\.x \(its text-encoder layers are 1024 wide\)"):
        apply_lora_weights(comps, hand_written(spec))
    # the U-Net part alone: caught by its cross-attention width
    unet_only = {k: v for k, v in spec.items() if k.startswith("lora_unet_")}
    with pytest.raises(LoraFormatError, match="cross-attention input is 1024 wide"):
        apply_lora_weights(comps, hand_written(unet_only))
    assert sum(isinstance(m, LoraLayer) for c in comps.values() for m in c.modules()) == 0


def test_keys_for_other_layers_and_wrong_shapes_apply_nothing(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    unknown = hand_written({**HAND_SD1, "lora_unet_down_blocks_7_attentions_0_proj_in": ((2, H), (H, 2), 1.0)})
    with pytest.raises(LoraFormatError, match="1 of 7 modules match no layer.*down_blocks_7"):
        apply_lora_weights(comps, unknown)
    wrong = hand_written({**HAND_SD1, "lora_te_text_model_encoder_layers_0_mlp_fc2": ((2, 48), (H, 2), 1.0)})
    with pytest.raises(LoraFormatError, match=r"mlp_fc2` lora_down: shape \(2, 48\).*\(2, 64\)"):
        apply_lora_weights(comps, wrong)
    sdxl = hand_written({"lora_te1_text_model_encoder_layers_0_mlp_fc1": ((2, H), (TE_MLP, 2), 1.0)})
    with pytest.raises(LoraFormatError, match="SDXL"):
        apply_lora_weights(comps, sdxl)
    assert _lora_layers(comps) == 0


# ---------------------------------------------------------------------------------------------- inspect

def test_inspect_cli_prints_the_summary(tiny_sd1_dir, tmp_path, capsys):
    comps = load_models(str(tiny_sd1_dir))
    cfg = TrainConfig.from_dict({"network_dim": 4, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0,
                                 "output_name": "inspect_me"})
    net = add_lora(comps, dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    path = save_lora(tmp_path / "x.safetensors", net.state_dict(), build_metadata(cfg, comps, steps=7), "fp16")
    assert cli_main(["inspect", str(path)]) in (0, None)
    out = capsys.readouterr().out
    te = sum(t.component == "text_encoder" for t in net.targets.values())
    conv = sum(t.kind == "conv" for t in net.targets.values())
    assert "SD 1.x" in out and f"text encoder {te}, U-Net {len(net.targets) - te}, of which conv 3x3 {conv}" in out
    assert f"2 ×{conv}, 4 ×{len(net.targets) - conv}" in out  # ranks
    assert "float16" in out and "ss_steps: 7" in out and "sshs_model_hash" in out
    from lorakit.formats import inspect

    summary = inspect(path=str(path))  # a notebook echoes the return value after the printed report: one line
    assert repr(summary) == f"LoraSummary('x.safetensors', family=sd1, {len(net.targets)} modules, rank 2, 4)"
    assert "training config (lorakit; 5 options set" in out and 'output_name = "inspect_me"' in out
    # a hand-written file without metadata or alphas
    tensors = hand_written(HAND_SD1)
    save_file(tensors, str(tmp_path / "hand.safetensors"))
    assert cli_main(["inspect", str(tmp_path / "hand.safetensors")]) in (0, None)
    out = capsys.readouterr().out
    assert "unknown" in out and "1 without alpha (= rank)" in out and "metadata:   none" in out
    assert cli_main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`lorakit inspect f | head`: the pipe closes before the report is written; no 'Broken pipe' error."""
    import subprocess
    import sys

    save_file(hand_written(HAND_SD1), str(tmp_path / "hand.safetensors"))
    code = "import sys; from lorakit.cli import main; raise SystemExit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "inspect", str(tmp_path / "hand.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err


def test_a_single_file_base_model_is_named_by_a1111_s_hashes(tmp_path, tiny_sd1_dir):
    """As sd-scripts: the old 8-digit hash (64 KiB at 1 MiB) and the sha256 of the whole file; none for a folder."""
    import hashlib

    comps = load_models(str(tiny_sd1_dir))
    data = bytes(range(256)) * 5000  # 1.28 MB
    (tmp_path / "model.safetensors").write_bytes(data)
    cfg = TrainConfig.from_dict({"pretrained_model_name_or_path": str(tmp_path / "model.safetensors")})
    meta = build_metadata(cfg, comps)
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert "ss_sd_model_hash" not in build_metadata(cfg.replace(pretrained_model_name_or_path=str(tiny_sd1_dir)),
                                                    comps)


def test_modelspec_architecture_follows_the_prediction_type_not_the_size():
    """sd-scripts' rule: an SD2 LoRA is `768-v` when its model predicts v, whatever size it was trained at — an
    SD2-768-v LoRA trained at 512 px and an SD2-base LoRA trained at 768 px keep their model's label."""
    from lorakit.families import SD1, SD2
    from lorakit.lora_metadata import lora_base_metadata

    def arch(family, prediction, resolution):
        meta = lora_base_metadata(family, prediction, network_dim=4, network_alpha=4, resolution=resolution)
        return meta["modelspec.architecture"], meta["modelspec.prediction_type"]

    assert arch(SD2, "v_prediction", 512) == ("stable-diffusion-v2-768-v/lora", "v")
    assert arch(SD2, "epsilon", 768) == ("stable-diffusion-v2-512/lora", "epsilon")
    assert arch(SD1, "epsilon", 768) == ("stable-diffusion-v1/lora", "epsilon")
    # ss_base_model_version marks v-prediction for either family, as sd-scripts does
    versions = [lora_base_metadata(f, p, network_dim=4, network_alpha=4, resolution=512)["ss_base_model_version"]
                for f, p in ((SD1, "epsilon"), (SD1, "v_prediction"), (SD2, "epsilon"), (SD2, "v_prediction"))]
    assert versions == ["sd_v1", "sd_v1_v", "sd_v2", "sd_v2_v"]


def test_loras_in_the_original_models_names_are_named_as_such(tmp_path):
    """A LoRA spelt with the LDM block names (input_blocks…, A1111 loads such SD1 files) is not called an SDXL file
    without saying so; ComfyUI's own `diffusion_model.` spelling is named."""
    from lorakit.formats import detect_family

    ldm = parse_kohya({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(2, 8),
                       "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(8, 2)})
    family, why = detect_family(ldm)
    assert family == "sdxl" and "input_blocks/output_blocks" in why and "SD 1.x LoRA in that spelling" in why
    assert detect_family(parse_kohya({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(
        2, 8), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 2)}))[1] == (
        "it has SDXL keys (lora_te1_/lora_te2_)")
    comfy = tmp_path / "comfy.safetensors"
    save_file({"diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.ones(8, 2),
               "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.ones(2, 8)}, str(comfy))
    with pytest.raises(LoraFormatError, match="a LoRA saved by ComfyUI, with the original model's `diffusion_model.`"):
        parse_kohya(load_lora_file(comfy)[0])
