"""Single-file (LDM) key mapping: the full-size key sets, `ldm_key_for`, detection of family and prediction type.

The expected full-size key sets are built here from the original latent-diffusion architecture (openaimodel.py
UNetModel, the LDM autoencoder, HF CLIP / OpenCLIP text towers) with SD1.5 / SD2.1 hyper-parameters written out,
independently of lorakit's diffusers-driven mapping.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.checkpoint import (
    bundled_configs,
    detect_family,
    detect_prediction_type,
    diffusers_to_ldm,
    empty_modules,
    ldm_to_diffusers,
)
from lorakit.checkpoint_keys import LdmKey, ldm_key_for
from lorakit.errors import ModelLoadError
from lorakit.families import SD1, SD2

# ------------------------------------------------------------------- the standard key sets, from LDM facts


def _resblock(prefix: str, skip: bool) -> list[str]:
    parts = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    parts += ["skip_connection"] if skip else []
    return [f"{prefix}.{p}.{wb}" for p in parts for wb in ("weight", "bias")]


def _spatial_transformer(prefix: str) -> list[str]:
    keys = [f"{prefix}.{p}.{wb}" for p in ("norm", "proj_in", "proj_out") for wb in ("weight", "bias")]
    block = f"{prefix}.transformer_blocks.0"
    for attn in ("attn1", "attn2"):
        keys += [f"{block}.{attn}.to_{x}.weight" for x in "qkv"]
        keys += [f"{block}.{attn}.to_out.0.weight", f"{block}.{attn}.to_out.0.bias"]
    keys += [f"{block}.{p}.{wb}" for p in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")
             for wb in ("weight", "bias")]
    return keys


def ldm_unet_keys() -> set[str]:
    """openaimodel.UNetModel, SD1/SD2: model_channels 320, channel_mult (1,2,4,4), num_res_blocks 2, attention at
    the first three levels, transformer depth 1."""
    mult, attn_levels, ch0 = (1, 2, 4, 4), {0, 1, 2}, 320
    keys = [f"time_embed.{i}.{wb}" for i in (0, 2) for wb in ("weight", "bias")]
    keys += ["input_blocks.0.0.weight", "input_blocks.0.0.bias"]
    idx, ch, skip_chs = 0, ch0, [ch0]
    for level, m in enumerate(mult):
        for _ in range(2):
            idx += 1
            keys += _resblock(f"input_blocks.{idx}.0", skip=ch != ch0 * m)
            ch = ch0 * m
            if level in attn_levels:
                keys += _spatial_transformer(f"input_blocks.{idx}.1")
            skip_chs.append(ch)
        if level != len(mult) - 1:
            idx += 1
            keys += [f"input_blocks.{idx}.0.op.weight", f"input_blocks.{idx}.0.op.bias"]
            skip_chs.append(ch)
    keys += _resblock("middle_block.0", False) + _spatial_transformer("middle_block.1") + _resblock("middle_block.2",
                                                                                                   False)
    idx = -1
    for level in reversed(range(len(mult))):
        for i in range(3):
            idx += 1
            in_ch = ch + skip_chs.pop()
            ch = ch0 * mult[level]
            keys += _resblock(f"output_blocks.{idx}.0", skip=in_ch != ch)
            n = 1
            if level in attn_levels:
                keys += _spatial_transformer(f"output_blocks.{idx}.1")
                n = 2
            if level and i == 2:
                keys += [f"output_blocks.{idx}.{n}.conv.weight", f"output_blocks.{idx}.{n}.conv.bias"]
    keys += [f"out.{i}.{wb}" for i in (0, 2) for wb in ("weight", "bias")]
    return {"model.diffusion_model." + k for k in keys}


def ldm_vae_keys() -> set[str]:
    """ldm.modules.diffusionmodules.model Encoder/Decoder: ch 128, ch_mult (1,2,4,4), 2 res blocks, attention only
    in the mid block, z 4 (double_z)."""
    def res(prefix, skip):
        parts = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if skip else [])
        return [f"{prefix}.{p}.{wb}" for p in parts for wb in ("weight", "bias")]

    def mid(prefix):
        attn = [f"{prefix}.mid.attn_1.{p}.{wb}" for p in ("norm", "q", "k", "v", "proj_out")
                for wb in ("weight", "bias")]
        return res(f"{prefix}.mid.block_1", False) + attn + res(f"{prefix}.mid.block_2", False)

    chs = [128 * m for m in (1, 2, 4, 4)]
    keys = [f"{p}.{c}.{wb}" for p in ("encoder", "decoder") for c in ("conv_in", "norm_out", "conv_out")
            for wb in ("weight", "bias")]
    keys += [f"{c}.{wb}" for c in ("quant_conv", "post_quant_conv") for wb in ("weight", "bias")]
    ch = 128
    for level, out in enumerate(chs):
        for r in range(2):
            keys += res(f"encoder.down.{level}.block.{r}", ch != out)
            ch = out
        if level != 3:
            keys += [f"encoder.down.{level}.downsample.conv.{wb}" for wb in ("weight", "bias")]
    keys += mid("encoder") + mid("decoder")
    ch = chs[-1]
    for level in reversed(range(4)):
        for r in range(3):
            keys += res(f"decoder.up.{level}.block.{r}", ch != chs[level])
            ch = chs[level]
        if level:
            keys += [f"decoder.up.{level}.upsample.conv.{wb}" for wb in ("weight", "bias")]
    return {"first_stage_model." + k for k in keys}


def ldm_clip_keys() -> set[str]:
    """SD1: HF CLIPTextModel (ViT-L/14 text, 12 layers) under cond_stage_model.transformer."""
    p = "cond_stage_model.transformer.text_model."
    keys = [p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight",
            p + "embeddings.position_ids", p + "final_layer_norm.weight", p + "final_layer_norm.bias"]
    for i in range(12):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
                    "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"{p}encoder.layers.{i}.{mod}.{wb}" for wb in ("weight", "bias")]
    return set(keys)


def ldm_openclip_keys() -> set[str]:
    """SD2: OpenCLIP ViT-H/14 text tower (24 residual blocks) under cond_stage_model.model."""
    p = "cond_stage_model.model."
    keys = [p + k for k in ("positional_embedding", "token_embedding.weight", "ln_final.weight", "ln_final.bias",
                            "text_projection", "logit_scale")]
    for i in range(24):
        for mod in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            keys += [f"{p}transformer.resblocks.{i}.{mod}.{wb}" for wb in ("weight", "bias")]
        keys += [f"{p}transformer.resblocks.{i}.attn.in_proj_{wb}" for wb in ("weight", "bias")]
    return set(keys)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def full_size(request):
    """(family, diffusers meta modules, LDM state dict of meta tensors) for the full-size architecture."""
    family = SD1 if request.param == "sd1" else SD2
    configs = bundled_configs(family)
    unet, vae, te = empty_modules(configs)
    ldm = diffusers_to_ldm({"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": te.state_dict()},
                           configs)
    return family, (unet, vae, te), ldm


def test_full_size_key_set_is_the_standard_one(full_size):
    family, _, ldm = full_size
    expected = ldm_unet_keys() | ldm_vae_keys() | (ldm_openclip_keys() if family.v2 else ldm_clip_keys())
    assert set(ldm) == expected
    assert len(ldm) == (1228 if family.v2 else 1131)  # 686 U-Net + 248 VAE + 197 CLIP / 294 OpenCLIP
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248


def test_full_size_spot_names_and_shapes(full_size):
    family, _, ldm = full_size
    assert ldm["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].shape == (320, 320)
    assert ldm["first_stage_model.encoder.down.0.block.0.conv1.weight"].shape == (128, 128, 3, 3)
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)  # conv 1x1 in LDM
    assert ldm["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert ldm["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ldm["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    proj_in = ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    to_k = ldm["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    if family.v2:
        assert proj_in.shape == (320, 320)  # use_linear_in_transformer
        assert to_k.shape == (320, 1024)
        assert ldm["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
        assert ldm["cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"].shape == (4096, 1024)
        assert ldm["cond_stage_model.model.positional_embedding"].shape == (77, 1024)
    else:
        assert proj_in.shape == (320, 320, 1, 1)
        assert to_k.shape == (320, 768)
        assert ldm["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"].shape == (768, 3072)
        assert ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_ldm_key_for_covers_every_parameter_exactly_once(full_size):
    family, (unet, vae, te), ldm = full_size
    seen = set()
    for component, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        for name, param in module.state_dict().items():
            if name.endswith("position_ids"):
                continue
            name = "text_model." + name if component == "text_encoder" and not name.startswith("text_model.") \
                else name
            target = ldm_key_for(f"{component}.{name}", family)
            assert target.key in ldm
            rows = (target.rows.start, target.rows.stop) if target.rows else None
            assert (target.key, rows) not in seen
            seen.add((target.key, rows))
            tensor = ldm[target.key][target.rows] if target.rows else ldm[target.key]
            assert tensor.numel() == param.numel()
            assert (tensor.shape != param.shape) == target.conv1x1


def test_ldm_key_for_named_examples():
    assert ldm_key_for("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", SD1) == LdmKey(
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
    assert ldm_key_for("text_encoder.text_model.encoder.layers.11.mlp.fc2.weight", "sd1").key == \
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
    # the flat transformers-5 spelling is accepted too
    assert ldm_key_for("text_encoder.encoder.layers.11.mlp.fc2.weight", SD1).key == \
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
    assert ldm_key_for("vae.encoder.down_blocks.0.resnets.0.conv1.weight", SD1).key == \
        "first_stage_model.encoder.down.0.block.0.conv1.weight"
    assert ldm_key_for("vae.decoder.up_blocks.0.upsamplers.0.conv.weight", SD1).key == \
        "first_stage_model.decoder.up.3.upsample.conv.weight"
    assert ldm_key_for("vae.encoder.mid_block.attentions.0.to_out.0.weight", SD1) == LdmKey(
        "first_stage_model.encoder.mid.attn_1.proj_out.weight", conv1x1=True)
    assert ldm_key_for("unet.up_blocks.1.upsamplers.0.conv.bias", SD2).key == \
        "model.diffusion_model.output_blocks.5.2.conv.bias"
    assert ldm_key_for("unet.up_blocks.0.upsamplers.0.conv.bias", SD2).key == \
        "model.diffusion_model.output_blocks.2.1.conv.bias"
    assert ldm_key_for("unet.mid_block.resnets.1.time_emb_proj.weight", SD1).key == \
        "model.diffusion_model.middle_block.2.emb_layers.1.weight"
    for i, part in enumerate("qkv"):
        key = ldm_key_for(f"text_encoder.text_model.encoder.layers.3.self_attn.{part}_proj.weight", SD2)
        assert key == LdmKey("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight",
                             rows=slice(1024 * i, 1024 * (i + 1)))
    assert ldm_key_for("text_encoder.text_model.encoder.layers.3.mlp.fc1.bias", SD2).key == \
        "cond_stage_model.model.transformer.resblocks.3.mlp.c_fc.bias"
    assert ldm_key_for("text_encoder.text_model.embeddings.position_embedding.weight", SD2).key == \
        "cond_stage_model.model.positional_embedding"
    with pytest.raises(KeyError, match="no key in the single-file"):
        ldm_key_for("unet.not_a_block.weight", SD1)
    with pytest.raises(KeyError):
        ldm_key_for("lora_unet_down_blocks_0", SD1)


def test_ldm_key_for_follows_the_configs():
    """Tiny architectures: index arithmetic comes from the configs (2 blocks, 4 VAE blocks, hidden size 32)."""
    from lorakit.tiny import tiny_configs

    cfg = tiny_configs(SD2)
    # tiny U-Net: down = [CrossAttn, plain], up = [plain, CrossAttn]; layers_per_block 2
    assert ldm_key_for("unet.down_blocks.1.resnets.1.conv2.weight", cfg).key == \
        "model.diffusion_model.input_blocks.5.0.out_layers.3.weight"
    assert ldm_key_for("unet.up_blocks.0.upsamplers.0.conv.weight", cfg).key == \
        "model.diffusion_model.output_blocks.2.1.conv.weight"
    assert ldm_key_for("text_encoder.text_model.encoder.layers.1.self_attn.v_proj.bias", cfg).rows == slice(64, 96)


# ------------------------------------------------------------------------------------------------ detection
def _tiny_ldm(family: str, seed: int = 0) -> dict:
    from lorakit.checkpoint import components_to_ldm
    from lorakit.tiny import build_tiny

    return components_to_ldm(build_tiny(family, seed=seed))


def test_detect_family_from_keys():
    assert detect_family(_tiny_ldm("sd1")) is SD1
    assert detect_family(_tiny_ldm("sd2")) is SD2
    # no text encoder in the file: the cross-attention width decides (768 SD1, 1024 SD2)
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_family({to_k: torch.zeros(320, 1024)}) is SD2
    assert detect_family({to_k: torch.zeros(320, 768)}) is SD1


@pytest.mark.parametrize("state_dict, message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, "LoRA"),
    ({"weight": torch.zeros(3)}, "not a Stable Diffusion"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
      "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, "SDXL"),
])
def test_detect_family_rejects_other_files(state_dict, message):
    with pytest.raises(ModelLoadError, match=message):
        detect_family(state_dict)


def test_detect_prediction_type():
    sd1, sd2 = _tiny_ldm("sd1"), _tiny_ldm("sd2")
    norm = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.norm1.bias"  # last attention output block
    assert norm in sd2
    sd2[norm] = torch.zeros_like(sd2[norm])  # untrained-looking: epsilon (SD2-512-base)
    assert detect_prediction_type(sd2, SD2) == "epsilon"
    sd2[norm] = torch.randn(sd2[norm].shape, generator=torch.Generator().manual_seed(0)) * 0.2  # 768-v statistics
    assert detect_prediction_type(sd2, SD2) == "v_prediction"
    assert detect_prediction_type(sd2, SD2, metadata={"global_step": "875000"}) == "epsilon"
    assert detect_prediction_type(sd2, SD2, metadata={"modelspec.prediction_type": "epsilon"}) == "epsilon"
    assert detect_prediction_type(sd2, SD2, configs={"scheduler": {"prediction_type": "epsilon"}}) == "epsilon"
    inpaint = dict(sd2)
    conv_in = inpaint["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(conv_in.shape[0], 9, 3, 3)
    assert detect_prediction_type(inpaint, SD2) == "epsilon"
    assert detect_prediction_type(sd1, SD1) == "epsilon"
    assert detect_prediction_type({**sd1, "v_pred": torch.tensor(1)}, SD1) == "v_prediction"
    assert detect_prediction_type(sd1, SD1, metadata={"modelspec.prediction_type": "v"}) == "v_prediction"


def test_ldm_to_diffusers_names_missing_and_mismatched_tensors():
    from lorakit.tiny import tiny_configs

    ldm = _tiny_ldm("sd1")
    cfg = tiny_configs(SD1)
    del ldm["first_stage_model.decoder.up.0.block.0.conv1.weight"]
    with pytest.raises(ModelLoadError, match="decoder.up.0.block.0.conv1.weight"):
        ldm_to_diffusers(ldm, cfg)
    with pytest.raises(ModelLoadError, match="shape"):  # tiny tensors against the full-size architecture
        ldm_to_diffusers(_tiny_ldm("sd1"), bundled_configs(SD1))


def test_full_size_mapping_agrees_with_diffusers_converters(full_size):
    """Oracle on the full-size architectures without allocating weights: diffusers' own LDM -> diffusers converters
    (single_file_utils) take each tensor of lorakit's LDM dict to the diffusers name lorakit maps it from. Tensors
    passed through unchanged are matched by identity; reshaped/sliced ones (VAE attention, SD2 q/k/v) by name set."""
    from diffusers.loaders import single_file_utils as sfu

    family, (unet, vae, te), ldm = full_size
    configs = bundled_configs(family)
    key_of = {id(t): k for k, t in ldm.items()}
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(ldm, configs["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(ldm, configs["vae"]),
        "text_encoder": sfu.convert_open_clip_checkpoint(te, ldm) if family.v2
        else sfu.convert_ldm_clip_checkpoint(ldm),
    }
    identical = 0
    for component, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        names = {("text_model." + k.removeprefix("text_model.")) if component == "text_encoder" else k
                 for k in converted[component] if not k.endswith("position_ids")}
        ours = {("text_model." + k.removeprefix("text_model.")) if component == "text_encoder" else k
                for k in module.state_dict() if not k.endswith("position_ids")}
        assert names == ours, component
        for name, tensor in converted[component].items():
            if id(tensor) in key_of:
                name = "text_model." + name.removeprefix("text_model.") if component == "text_encoder" else name
                assert ldm_key_for(f"{component}.{name}", family).key == key_of[id(tensor)], name
                identical += 1
    assert identical == (686 + 240 + (234 if family.v2 else 197))
