"""Oracle: diffusers' own loader (`StableDiffusionPipeline.load_lora_weights`) must read every LoRA file lorakit
writes — every key used, one peft layer per module — and draw the same images as lorakit's own application."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from lorakit.formats import load_lora_file, parse_kohya, save_lora
from lorakit.models import load_models
from lorakit.network import add_lora, apply_lora_file


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def draw(comps) -> np.ndarray:
    pipe = comps.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def lora_modules(module) -> int:
    return sum(isinstance(m, LoraLayer) for m in module.modules())


def load_with_diffusers(comps, path) -> list[str]:
    """Load `path` with diffusers' own loader into `comps`; return the warnings it logged (it reports unexpected
    or missing keys as warnings, not errors)."""
    pipe = comps.pipeline()
    records = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        pipe.load_lora_weights(str(path), adapter_name="oracle")
    finally:
        logger.removeHandler(records)
    return records.messages


def test_the_oracle_reports_keys_it_cannot_place(tiny_sd1_dir, tmp_path):
    """The oracle's "no unused keys" check can fail: a module name no layer has is reported."""
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_zz"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1)},
              str(tmp_path / "odd.safetensors"))
    messages = load_with_diffusers(load_models(str(tiny_sd1_dir)), tmp_path / "odd.safetensors")
    assert any("unexpected keys" in m and "to.zz" in m for m in messages), messages


@pytest.mark.slow
@pytest.mark.parametrize("family, conv_dim", [("sd1", None), ("sd2", 2)])
def test_diffusers_loads_every_key_and_draws_the_same_images(family, conv_dim, tiny_sd1_dir, tiny_sd2_dir,
                                                             tmp_path):
    folder = str({"sd1": tiny_sd1_dir, "sd2": tiny_sd2_dir}[family])
    # a non-zero LoRA on text encoder + U-Net, written by lorakit (fp32, so the comparison can be tight);
    # sd1 without LoCon (1x1-conv projections), sd2 with LoCon (3x3 convs, conv_shortcut, linear projections)
    comps = load_models(folder)
    net = add_lora(comps, dim=4, alpha=2, conv_dim=conv_dim, conv_alpha=1)
    g = torch.Generator().manual_seed(3)
    for params in net.trainable_parameters().values():
        for p in params:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = save_lora(tmp_path / "lora.safetensors", net.state_dict(), {"ss_network_dim": 4}, "float")
    weights = parse_kohya(load_lora_file(path)[0])
    n_te = sum(name.startswith("lora_te_") for name in weights)
    n_unet = sum(name.startswith("lora_unet_") for name in weights)
    assert n_te > 0 and n_unet > 0

    # lorakit's application
    ours = load_models(folder)
    ours_net = apply_lora_file(ours, path)
    ours_images = draw(ours)

    # diffusers' application, with its warnings captured (unexpected/missing keys are reported as warnings)
    theirs = load_models(folder)
    messages = load_with_diffusers(theirs, path)
    assert not [m for m in messages if "key" in m.lower() or "not" in m.lower()], messages
    assert lora_modules(theirs.text_encoder) == n_te and lora_modules(theirs.unet) == n_unet
    theirs_images = draw(theirs)

    base_images = draw(load_models(folder))
    assert np.abs(ours_images - base_images).max() > 1e-2  # the LoRA visibly changes the image
    np.testing.assert_allclose(theirs_images, ours_images, rtol=0, atol=1e-5)

    # the multiplier means what diffusers' adapter weight means
    ours_net.set_multiplier(0.5)
    theirs.pipeline().set_adapters(["oracle"], adapter_weights=[0.5])
    half = draw(ours)
    assert np.abs(half - ours_images).max() > 1e-3
    np.testing.assert_allclose(draw(theirs), half, rtol=0, atol=1e-5)
