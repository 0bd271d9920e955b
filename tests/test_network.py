"""LoRA injection on SD models: target selection (full-size SD1.5 names and counts), invariants with non-zero
adapters, save → load round trips, multipliers, several adapters, merge/unmerge, removal, trainable groups."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lorakit.formats import load_lora_file, save_lora
from lorakit.models import load_models
from lorakit.network import add_lora, apply_lora_file, lora_targets, remove_lora


def run(comps, seed: int = 0):
    """Text-encoder hidden states and U-Net prediction for fixed random inputs (deterministic on CPU)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, comps.text_encoder.config.vocab_size - 2, (1, 77), generator=g)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden = comps.text_encoder(ids)[0]
        pred = comps.unet(latents, torch.tensor([500]), hidden).sample
    return hidden, pred


def randomize(net, seed: int = 1, std: float = 0.2) -> None:
    """Make the adapter non-zero (a fresh LoRA's up is zero, which would make every invariant vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for params in net.trainable_parameters().values():
        for p in params:
            p.data.copy_(torch.randn(p.shape, generator=g) * std)


def lora_layer_count(module) -> int:
    return sum(isinstance(m, LoraLayer) for m in module.modules())


# ---------------------------------------------------------------------------------------------- targets

@pytest.fixture(scope="module")
def full_sd1(meta_full_size):
    comps = meta_full_size("sd1")
    te_cfg = comps["text_encoder"].config
    assert comps["unet"].config.cross_attention_dim == 768 and te_cfg.hidden_size == 768
    assert te_cfg.num_hidden_layers == 12  # CLIP ViT-L/14
    return comps


def test_full_size_sd15_targets_match_the_format(full_sd1):
    targets = lora_targets(full_sd1)
    te = [n for n, t in targets.items() if t.component == "text_encoder"]
    unet = [n for n, t in targets.items() if t.component == "unet"]
    assert len(te) == 72 and len(unet) == 192
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
                 "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_11_mlp_fc2"):
        assert name in targets, name
    # transformers 5 has no `text_model` module; the interchange name keeps it (and the module path does not)
    assert targets["lora_te_text_model_encoder_layers_0_mlp_fc1"].path == "encoder.layers.0.mlp.fc1"
    assert targets["lora_unet_down_blocks_0_attentions_0_proj_in"].kind == "conv1x1"  # SD1: 1x1 conv proj
    assert {t.kind for t in targets.values()} == {"linear", "conv1x1"}


def test_full_size_sd15_locon_targets(full_sd1):
    targets = lora_targets(full_sd1, conv=True)
    unet = {n: t for n, t in targets.items() if t.component == "unet"}
    # 22 ResnetBlock2D × (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 downsamplers + 3 upsamplers = 86
    assert len(unet) == 192 + 86
    assert unet["lora_unet_down_blocks_0_resnets_0_conv1"].kind == "conv"
    assert unet["lora_unet_down_blocks_0_downsamplers_0_conv"].kind == "conv"
    assert unet["lora_unet_up_blocks_0_upsamplers_0_conv"].kind == "conv"
    assert unet["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].kind == "linear"
    assert unet["lora_unet_up_blocks_3_resnets_0_conv_shortcut"].kind == "conv1x1"


def test_full_size_sd2_targets(meta_full_size):
    comps = meta_full_size("sd2")
    assert comps["text_encoder"].config.num_hidden_layers == 23  # OpenCLIP-H without its last layer
    targets = lora_targets(comps)
    assert sum(t.component == "text_encoder" for t in targets.values()) == 23 * 6
    assert sum(t.component == "unet" for t in targets.values()) == 192
    assert targets["lora_unet_down_blocks_0_attentions_0_proj_in"].kind == "linear"  # use_linear_projection
    assert "lora_te_text_model_encoder_layers_22_self_attn_out_proj" in targets


def test_full_size_injection_on_meta_device(full_sd1):
    net = add_lora(full_sd1, dim=4, alpha=2)
    assert lora_layer_count(full_sd1["text_encoder"]) == 72 and lora_layer_count(full_sd1["unet"]) == 192
    groups = net.trainable_parameters()
    assert len(groups["text_encoder"]) == 2 * 72 and len(groups["unet"]) == 2 * 192
    remove_lora(full_sd1)
    assert lora_layer_count(full_sd1["unet"]) == 0


# ---------------------------------------------------------------------------------------------- invariants

@pytest.fixture(params=["sd1", "sd2"])
def model_dir(request, tiny_sd1_dir, tiny_sd2_dir):
    return {"sd1": tiny_sd1_dir, "sd2": tiny_sd2_dir}[request.param]


def test_fresh_lora_leaves_outputs_unchanged(model_dir):
    comps = load_models(str(model_dir))
    hidden, pred = run(comps)
    add_lora(comps, dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    hidden2, pred2 = run(comps)
    assert torch.equal(hidden, hidden2) and torch.equal(pred, pred2)


def test_save_load_round_trip_is_exact(model_dir, tmp_path):
    comps = load_models(str(model_dir))
    base = run(comps)
    net = add_lora(comps, dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    kinds = {t.kind for t in net.targets.values()}
    assert kinds == {"linear", "conv1x1", "conv"}  # conv1x1: SD1's proj_in/out and the resnets' conv_shortcut
    proj = net.targets["lora_unet_down_blocks_0_attentions_0_proj_in"].kind
    assert proj == ("conv1x1" if comps.family.name == "sd1" else "linear")
    randomize(net)
    out = run(comps)
    assert (out[1] - base[1]).abs().max() > 1e-2 and (out[0] - base[0]).abs().max() > 1e-2  # non-vacuous
    path = save_lora(tmp_path / "lora.safetensors", net.state_dict(), {"ss_network_dim": 4}, "float")

    fresh = load_models(str(model_dir))
    # trainable like the original: torch picks a different (equally exact) matmul path for 3-D inputs when a
    # weight requires grad, which would differ in the last bit
    net2 = apply_lora_file(fresh, path, trainable=True)
    out2 = run(fresh)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[1], out2[1])
    frozen = load_models(str(model_dir))
    apply_lora_file(frozen, path)
    torch.testing.assert_close(run(frozen)[1], out[1], rtol=1e-6, atol=1e-6)
    # module by module, one of each kind: Linear, 1x1 conv (SD1 proj_in / conv_shortcut), 3x3 conv
    probes = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
              "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_up_blocks_0_resnets_0_conv_shortcut",
              "lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_1_mlp_fc2"]
    assert {net.targets[p].kind for p in probes} == {"linear", "conv1x1", "conv"}
    ours, theirs, base_layers = layer_outputs(net, probes), layer_outputs(net2, probes), layer_outputs(
        net, probes, base=True)
    for name in probes:
        assert torch.equal(ours[name], theirs[name]) and not torch.equal(ours[name], base_layers[name]), name
    sd, sd2 = net.state_dict(), net2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_state_dict_shapes_follow_the_format(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    sd = add_lora(comps, dim=4, alpha=2, conv_dim=2).state_dict()
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (32, 4, 1, 1)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].shape == (4, 32)
    assert float(sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 2.0
    assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 2.0  # conv_alpha unset = conv_dim
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].dim() == 0
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_multiplier_scales_the_delta(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    net = add_lora(comps, dim=4, alpha=8)
    randomize(net)
    layer = net.layers["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    x = torch.randn(5, 32)
    with torch.no_grad():
        base = layer.get_base_layer()(x)
        full = layer(x)
        net.set_multiplier(0.25)
        quarter = layer(x)
        net.set_multiplier(0.0)
        zero = layer(x)
    torch.testing.assert_close(quarter - base, 0.25 * (full - base), rtol=1e-5, atol=1e-6)
    assert torch.equal(zero, base)
    w = net.weights()["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    torch.testing.assert_close(full - base, x @ w.down.T @ w.up.T * (8 / 4), rtol=1e-5, atol=1e-6)


def layer_outputs(net, names, seed=0, base=False):
    """Outputs of the named LoRA layers (or of their base layers) on fixed random inputs: cheaper than running
    the whole model, and exact per module."""
    g = torch.Generator().manual_seed(seed)
    outs = {}
    with torch.no_grad():
        for name in names:
            layer = net.layers[name]
            linear = isinstance(layer.get_base_layer(), torch.nn.Linear)
            shape = (3, layer.in_features) if linear else (1, layer.in_features, 8, 8)
            outs[name] = (layer.get_base_layer() if base else layer)(torch.randn(shape, generator=g))
    return outs


PROBES = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
          "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_1_mlp_fc2"]
CONV_PROBES = PROBES + ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv"]


def test_two_adapters_act_together_and_switch_independently(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    base = run(comps)
    one = add_lora(comps, dim=2, alpha=2, adapter_name="one")
    randomize(one, seed=1)
    two = add_lora(comps, dim=4, alpha=1, adapter_name="two")
    randomize(two, seed=2)
    assert two.multiplier == 1.0 and one.enabled and two.enabled
    both = layer_outputs(one, PROBES)
    two.disable()
    only_one = layer_outputs(one, PROBES)
    two.enable()
    one.disable()
    only_two = layer_outputs(one, PROBES)
    one.enable()
    base_layers = layer_outputs(one, PROBES, base=True)
    for name in PROBES:
        y0 = base_layers[name]
        assert (only_one[name] - y0).abs().max() > 1e-3 and (only_two[name] - y0).abs().max() > 1e-3
        torch.testing.assert_close(both[name] - y0, (only_one[name] - y0) + (only_two[name] - y0),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already applied"):
        add_lora(comps, dim=2, alpha=1, adapter_name="one")
    two.remove()
    after = layer_outputs(one, PROBES)
    assert all(torch.equal(after[n], only_one[n]) for n in PROBES)
    remove_lora(comps)
    assert lora_layer_count(comps.unet) == 0 and lora_layer_count(comps.text_encoder) == 0
    torch.testing.assert_close(run(comps)[1], base[1], rtol=0, atol=0)


def test_two_files_with_own_multipliers(tiny_sd1_dir, tmp_path):
    comps = load_models(str(tiny_sd1_dir))
    for i in (1, 2):
        net = add_lora(comps, dim=2, alpha=1, adapter_name=f"a{i}", conv_dim=2)
        randomize(net, seed=i)
        save_lora(tmp_path / f"style{i}.safetensors", net.state_dict())
        net.remove()
    n1 = apply_lora_file(comps, tmp_path / "style1.safetensors", multiplier=0.5)
    n2 = apply_lora_file(comps, tmp_path / "style2.safetensors", multiplier=-1.0)
    assert (n1.adapter_name, n2.adapter_name) == ("style1", "style2")
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    layer = n1.layers[name]
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        got = layer(x) - layer.get_base_layer()(x)
    expected = torch.zeros_like(got)
    for net, m in ((n1, 0.5), (n2, -1.0)):
        w = net.weights()[name]
        expected += m * w.scale * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, w.down, padding=1), w.up)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    third = apply_lora_file(comps, tmp_path / "style1.safetensors")
    assert third.adapter_name == "style1_2"


def test_merge_and_unmerge(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    weight0 = comps.unet.down_blocks[0].resnets[0].conv1.weight.detach().clone()
    net = add_lora(comps, dim=4, alpha=2, conv_dim=2)
    randomize(net, std=0.1)
    unmerged = run(comps)
    unmerged_layers = layer_outputs(net, CONV_PROBES)
    net.merge()
    merged = run(comps)
    torch.testing.assert_close(merged[1], unmerged[1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(comps.unet.down_blocks[0].resnets[0].conv1.base_layer.weight, weight0)
    net.set_multiplier(0.5)  # while merged: re-merged at the new strength
    half_merged = layer_outputs(net, CONV_PROBES)
    net.unmerge()
    half = layer_outputs(net, CONV_PROBES)
    for name in CONV_PROBES:
        torch.testing.assert_close(half_merged[name], half[name], rtol=1e-4, atol=1e-5)
        assert (half[name] - unmerged_layers[name]).abs().max() > 1e-4
    torch.testing.assert_close(comps.unet.down_blocks[0].resnets[0].conv1.base_layer.weight, weight0,
                               rtol=0, atol=1e-6)
    net.disable()
    with pytest.raises(ValueError, match="disabled"):
        net.merge()


def test_trainable_groups_and_frozen_base(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    net = add_lora(comps, dim=4, alpha=4, unet=True, text_encoder=False, dropout=0.1)
    groups = net.trainable_parameters()
    assert groups["text_encoder"] == [] and len(groups["unet"]) == 2 * len(net.targets)
    assert lora_layer_count(comps.text_encoder) == 0
    randomize(net)
    _, pred = (lambda h: (h, comps.unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), h).sample))(
        comps.text_encoder(torch.randint(0, 500, (1, 77)))[0])
    pred.square().mean().backward()
    lora_ids = {id(p) for p in groups["unet"]}
    assert all(p.grad is not None for p in groups["unet"])
    assert all(p.grad is None for p in comps.unet.parameters() if id(p) not in lora_ids)
    assert all(p.grad is None for p in comps.text_encoder.parameters())
    # dropout acts in training mode only
    layer = net.layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    x = torch.randn(4, layer.in_features)
    comps.unet.train()
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))
    comps.unet.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_text_encoder_only_and_argument_errors(tiny_sd1_dir):
    comps = load_models(str(tiny_sd1_dir))
    net = add_lora(comps, dim=2, alpha=1, unet=False)
    assert {t.component for t in net.targets.values()} == {"text_encoder"} and lora_layer_count(comps.unet) == 0
    with pytest.raises(ValueError, match="network_dim"):
        add_lora(comps, dim=0, alpha=1, adapter_name="x")
    with pytest.raises(ValueError, match="both were switched off"):
        add_lora(comps, dim=2, alpha=1, unet=False, text_encoder=False, adapter_name="x")
    with pytest.raises(ValueError, match="adapter_name"):
        add_lora(comps, dim=2, alpha=1, adapter_name="has.dot")


def test_applied_file_is_frozen_unless_trainable(tiny_sd1_dir, tmp_path):
    comps = load_models(str(tiny_sd1_dir))
    net = add_lora(comps, dim=2, alpha=1)
    randomize(net)
    path = save_lora(tmp_path / "x.safetensors", net.state_dict(), save_precision="fp16")
    remove_lora(comps)
    frozen = apply_lora_file(comps, path)
    assert not any(p.requires_grad for layer in frozen.layers.values() for p in layer.parameters())
    frozen.remove()
    resumed = apply_lora_file(comps, path, trainable=True, dtype=torch.float32)
    params = resumed.trainable_parameters()
    assert all(p.requires_grad and p.dtype == torch.float32 for ps in params.values() for p in ps)
    tensors, _ = load_lora_file(path)
    w = tensors["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"]
    assert w.dtype == torch.float16
    assert torch.equal(resumed.state_dict()["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"], w.float())


def test_fp32_adapter_on_a_half_precision_model(tiny_sd1_dir):
    """Mixed precision on a GPU keeps the base in fp16/bf16 and trains fp32 adapters; bf16 runs on CPU too.
    (The text encoder and single conv layers only: bf16 convolutions are slow on a CPU.)"""
    comps = load_models(str(tiny_sd1_dir)).to(dtype=torch.bfloat16)
    net = add_lora(comps, dim=4, alpha=4, conv_dim=2, dtype=torch.float32)
    randomize(net)
    params = net.trainable_parameters()
    assert {p.dtype for ps in params.values() for p in ps} == {torch.float32}
    hidden = comps.text_encoder(torch.randint(0, 500, (1, 77)))[0]
    outputs = [hidden]
    for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1"):
        outputs.append(net.layers[name](torch.randn(1, 32, 8, 8, dtype=torch.bfloat16)))
    assert all(y.dtype == torch.bfloat16 and torch.isfinite(y).all() for y in outputs)
    sum(y.float().square().mean() for y in outputs).backward()
    used = [net.layers[n].lora_A[net.adapter_name].weight for n in ("lora_unet_down_blocks_0_resnets_0_conv1",
                                                                    "lora_te_text_model_encoder_layers_0_mlp_fc1")]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in used)


def test_max_norm_scales_only_the_modules_above_it(model_dir):
    """sd-scripts' `scale_weight_norms`: a module whose ‖scale·up@down‖ exceeds the norm ends exactly at it, with
    the same direction (up and down each × √factor); the modules within it are untouched; LoCon convs included."""
    from lorakit.lora_math import lora_delta, max_norm_factor

    assert max_norm_factor(0.5, 1.0) == 1.0 and max_norm_factor(4.0, 1.0) == 0.25
    comps = load_models(str(model_dir))
    net = add_lora(comps, dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    randomize(net)
    before = net.weights()
    norms = {k: lora_delta(w.up, w.down, w.alpha).norm().item() for k, w in before.items()}
    limit = sorted(norms.values())[len(norms) // 2]  # about half of the modules are above it
    scaled, mean, largest = net.apply_max_norm(limit)
    after = net.weights()
    above = [k for k, n in norms.items() if n > limit]
    assert scaled == len(above) and 0 < scaled < len(norms) and largest == pytest.approx(limit)
    assert mean == pytest.approx(sum(min(n, limit) for n in norms.values()) / len(norms))
    assert any(after[k].down.dim() == 4 and after[k].down.shape[-1] == 3 for k in above)  # a 3x3 LoCon module
    for k, w in after.items():
        delta, old = lora_delta(w.up, w.down, w.alpha), lora_delta(before[k].up, before[k].down, before[k].alpha)
        if k in above:
            assert delta.norm().item() == pytest.approx(limit, rel=1e-5)
            torch.testing.assert_close(delta, old * (limit / norms[k]), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(w.up, before[k].up) and torch.equal(w.down, before[k].down)
