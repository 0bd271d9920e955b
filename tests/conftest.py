"""Shared fixtures: tiny SD1/SD2 models built offline once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A tiny random SD1-style model saved as a diffusers folder."""
    from lorakit.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny-sd1")
    build_tiny("sd1", seed=0, folder=folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """A tiny random SD2-style model (v-prediction, linear projections) saved as a diffusers folder."""
    from lorakit.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny-sd2")
    build_tiny("sd2", seed=0, folder=folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd1_file(tiny_sd1_dir, tmp_path_factory):
    """The model of `tiny_sd1_dir` as a single-file LDM checkpoint (`.safetensors`, original SD key layout)."""
    from lorakit.models import load_models, save_single_file

    path = tmp_path_factory.mktemp("tiny-sd1-file") / "tiny-sd1.safetensors"
    save_single_file(load_models(str(tiny_sd1_dir)), path)
    return path


@pytest.fixture(scope="session")
def tiny_sd2_file(tiny_sd2_dir, tmp_path_factory):
    """The model of `tiny_sd2_dir` as a single-file LDM checkpoint (`.safetensors`, OpenCLIP text-encoder keys)."""
    from lorakit.models import load_models, save_single_file

    path = tmp_path_factory.mktemp("tiny-sd2-file") / "tiny-sd2.safetensors"
    save_single_file(load_models(str(tiny_sd2_dir)), path)
    return path


def _meta_full_size(family: str = "sd1") -> dict:
    """A full-size text encoder and U-Net with parameters on the meta device (no memory), from the bundled configs."""
    from lorakit.checkpoint import bundled_configs, empty_modules

    unet, _, text_encoder = empty_modules(bundled_configs(family))
    return {"unet": unet, "text_encoder": text_encoder}


@pytest.fixture(scope="session")
def meta_full_size():
    """`meta_full_size(family)`: full-size SD components on the meta device (shapes and names only)."""
    return _meta_full_size


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and much faster when the machine is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy():
    """The built-in toy model in fp32 on the CPU (one copy per test module: tests may add adapters to it)."""
    import torch

    from lorakit.models import load_models

    return load_models("lorakit-toy", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def classifier():
    """The toy world's concept classifier (measurement only)."""
    from lorakit.toy.classifier import load_classifier

    return load_classifier()
