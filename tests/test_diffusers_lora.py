"""LoRAs in diffusers' formats (what diffusers' training examples save) read as kohya LoRAs; oracles: peft's own
delta weights and the peft-adapted model's images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

import lorakit
from lorakit.diffusers_lora import diffusers_to_kohya
from lorakit.errors import LoraFormatError
from lorakit.formats import kohya_module_name, load_lora_file, parse_kohya
from lorakit.sampling import make_sampler
from lorakit.tiny import build_tiny

UNET_CONFIG = dict(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                   rank_pattern={"attn2.to_q": 2}, alpha_pattern={"attn2.to_k": 8})
TEXT_CONFIG = dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "fc1"])


def peft_adapted(seed: int = 0):
    """The tiny SD1 with peft LoRA adapters on U-Net and text encoder (non-zero B), and their configs."""
    comps = build_tiny("sd1", seed=0)
    configs = LoraConfig(**UNET_CONFIG), LoraConfig(**TEXT_CONFIG)
    inject_adapter_in_model(configs[0], comps.unet)
    inject_adapter_in_model(configs[1], comps.text_encoder)
    gen = torch.Generator().manual_seed(seed)
    for model in (comps.unet, comps.text_encoder):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
    return comps, configs


@pytest.fixture(scope="module")
def diffusers_file(tmp_path_factory):
    """A `pytorch_lora_weights.safetensors` written by diffusers' `save_lora_weights` (with its adapter metadata)."""
    comps, (ucfg, tcfg) = peft_adapted()
    folder = tmp_path_factory.mktemp("diffusers-lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(comps.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(comps.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors", comps


def test_every_module_has_peft_s_delta_weight(diffusers_file):
    path, comps = diffusers_file
    tensors, _ = load_lora_file(path)
    weights = parse_kohya(tensors)
    expected = {}
    for component, model in (("unet", comps.unet), ("text_encoder", comps.text_encoder)):
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight"):
                expected[kohya_module_name(component, name)] = module.get_delta_weight("default")
    assert set(weights) == set(expected) and len(expected) > 20
    for name, delta in expected.items():
        torch.testing.assert_close(weights[name].delta().reshape(delta.shape), delta, rtol=1e-5, atol=1e-6)
    # the patterns and rsLoRA resolved to kohya alphas: scale = alpha / rank
    q2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    k2 = q2.replace("to_q", "to_k")
    assert (weights[q2].rank, weights[q2].alpha) == (2, 2.0) and weights[k2].alpha == 8.0
    fc1 = weights["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert fc1.scale == pytest.approx(4 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(rank)


def test_generate_and_merge_read_it_as_the_peft_model_runs(diffusers_file, tmp_path):
    path, adapted = diffusers_file
    settings = dict(prompt="a photo", seed=3, num_inference_steps=3, guidance_scale=5.0, scheduler="ddim")
    pipe = adapted.pipeline(scheduler=make_sampler("ddim", adapted.noise_scheduler))
    expected = pipe("a photo", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images[0]
    plain = build_tiny("sd1", seed=0)
    got = lorakit.generate(components=plain, network_weights=[str(path)], output_dir="", **settings).images[0]
    base = lorakit.generate(components=plain, output_dir="", **settings).images[0]
    got, base = np.asarray(got).astype(int), np.asarray(base).astype(int)
    assert np.abs(got - np.round(expected * 255)).max() <= 1  # the peft-adapted pipeline's own image
    assert np.abs(got - base).mean() > 1  # and the LoRA does change it
    # merge with one input writes the same LoRA in kohya format (for A1111, ComfyUI, sd-scripts)
    out = tmp_path / "kohya.safetensors"
    lorakit.merge(models=[str(path)], ratios=[1.0], save_to=str(out), save_precision="float")
    converted = parse_kohya(load_lora_file(out)[0])
    original = parse_kohya(load_lora_file(path)[0])
    assert set(converted) == set(original)
    for name, w in original.items():
        torch.testing.assert_close(converted[name].delta(), w.delta())
    summary = lorakit.inspect(path=str(path))
    assert summary.te_modules + summary.unet_modules == len(original) and set(summary.ranks) == {2, 4}


def _unet_deltas(comps) -> dict:
    return {kohya_module_name("unet", n): m.get_delta_weight("default") for n, m in comps.unet.named_modules()
            if hasattr(m, "get_delta_weight")}


def test_a_model_s_own_adapter_file_and_a_peft_adapter_folder_keep_their_scale(tmp_path, capsys):
    comps = build_tiny("sd1", seed=0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_v"])
    inject_adapter_in_model(config, comps.unet)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape) * 0.1
    expected = _unet_deltas(comps)
    comps.unet.save_lora_adapter(tmp_path / "model")  # its metadata is the config, unprefixed
    (saved,) = (tmp_path / "model").glob("*.safetensors")
    # peft's save_pretrained layout: `base_model.model.` keys, the config in adapter_config.json beside them
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(comps.unet).items()},
              str(peft_dir / "adapter_model.safetensors"))
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    (peft_dir / "adapter_config.json").write_text(json.dumps(config_dict))
    for path in (saved, peft_dir / "adapter_model.safetensors"):
        weights = parse_kohya(load_lora_file(path)[0])
        assert set(weights) == set(expected)
        for name, delta in expected.items():  # scale 16 / 4 = 4, not 1
            torch.testing.assert_close(weights[name].delta().reshape(delta.shape), delta, rtol=1e-5, atol=1e-6)
    assert "holds no LoRA scale" not in capsys.readouterr().err
    (peft_dir / "adapter_config.json").unlink()  # without it: scale 1, and a note says so
    weights = parse_kohya(load_lora_file(peft_dir / "adapter_model.safetensors")[0])
    assert all(w.scale == 1.0 for w in weights.values())
    assert "holds no LoRA scale (peft's `lora_alpha`): read with scale 1" in capsys.readouterr().err


def test_older_diffusers_formats_and_their_alphas(tmp_path):
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    conv_down, conv_up = torch.randn(2, 8, 1, 1), torch.randn(8, 2, 1, 1)
    block = "down_blocks.0.attentions.0"
    old = {
        f"unet.{block}.transformer_blocks.0.attn1.to_q.lora.down.weight": down,  # LoRACompatibleLinear era
        f"unet.{block}.transformer_blocks.0.attn1.to_q.lora.up.weight": up,
        f"unet.{block}.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(1.0),
        f"unet.{block}.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": down,  # attention processors
        f"unet.{block}.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight": down,  # processor era
        "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight": up,
        f"{block}.proj_in.lora_A.weight": conv_down,  # peft keys without a component prefix
        f"{block}.proj_in.lora_B.weight": conv_up,
    }
    weights = parse_kohya(diffusers_to_kohya(old))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn"
    assert weights[name + "1_to_q"].alpha == 1.0 and weights[name + "2_to_out_0"].alpha == 2.0  # no alpha: rank
    assert torch.equal(weights["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].down, down)
    assert weights["lora_unet_down_blocks_0_attentions_0_proj_in"].is_conv
    assert torch.equal(weights["lora_te_text_model_encoder_layers_0_self_attn_out_proj"].up, up)
    assert len(weights) == 5
    torch.save(old, tmp_path / "pytorch_lora_weights.bin")  # diffusers' older pickle file, read safely
    assert set(parse_kohya(load_lora_file(tmp_path / "pytorch_lora_weights.bin")[0])) == set(weights)
    # alphas named as the module's weights (`…to_out_lora.alpha`, `…q_proj.lora_linear_layer.alpha`) are theirs
    named = {**old, f"unet.{block}.transformer_blocks.0.attn2.processor.to_out_lora.alpha": torch.tensor(0.5),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.alpha": torch.tensor(4.0)}
    weights = parse_kohya(diffusers_to_kohya(named))
    assert weights[name + "2_to_out_0"].alpha == 0.5
    assert weights["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].alpha == 4.0
    # one that names no module is refused: its module's scale would be a guess
    with pytest.raises(LoraFormatError, match=r"1 alpha value\(s\) match no module's weights \(e.g. `unet.mid_block"):
        diffusers_to_kohya({**old, "unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(1.0)})


def test_a_file_of_two_peft_adapters_is_refused_not_read_as_one():
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    key = "unet.mid_block.attentions.0.proj_in"
    two = {f"{key}.lora_A.style.weight": down, f"{key}.lora_B.style.weight": up,
           f"{key}.lora_A.face.weight": down.clone(), f"{key}.lora_B.face.weight": up.clone()}
    with pytest.raises(LoraFormatError, match=r"holds 2 peft adapters \(face, style\): lorakit reads one LoRA per"):
        diffusers_to_kohya(two)
    one = {k: v for k, v in two.items() if ".style." in k}
    assert torch.equal(parse_kohya(diffusers_to_kohya(one))["lora_unet_mid_block_attentions_0_proj_in"].up, up)


@pytest.mark.parametrize("key, match", [
    ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "SDXL"),
    ("vae.encoder.conv_in.lora_A.weight", "cannot tell which model"),
])
def test_what_it_cannot_read_is_named(key, match, tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {key: torch.zeros(2, 4), "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4)}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2})})
    with pytest.raises(LoraFormatError, match=match):
        load_lora_file(path)
