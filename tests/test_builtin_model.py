"""The built-in name `lorakit-toy` works wherever a model path is accepted (load, merge, extract)."""

from __future__ import annotations

import torch

import lorakit
from lorakit.models import TOY_PATH, load_models, resolve_builtin
from lorakit.network import add_lora


def test_resolve_builtin_name():
    assert resolve_builtin("lorakit-toy") == str(TOY_PATH)
    assert resolve_builtin("some/repo") == "some/repo" and resolve_builtin(None) is None


def test_merge_and_extract_accept_the_builtin_name(tmp_path):
    comps = load_models("lorakit-toy")
    net = add_lora(comps, dim=2, alpha=2.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for params in net.trainable_parameters().values():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    from lorakit.formats import save_lora

    lora = save_lora(tmp_path / "l.safetensors", net.state_dict())
    merged = lorakit.merge(sd_model="lorakit-toy", models=[str(lora)], save_to=str(tmp_path / "merged.safetensors"))
    assert (tmp_path / "merged.safetensors").is_file() and merged is not None
    back = lorakit.extract(model_org="lorakit-toy", model_tuned=str(tmp_path / "merged.safetensors"),
                           save_to=str(tmp_path / "x.safetensors"), dim=2)
    # the extracted LoRA recovers the rank-2 change (fp16 weights: loose tolerance)
    assert max(back.errors.values()) < 0.05
