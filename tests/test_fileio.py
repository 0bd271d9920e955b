"""lorakit's file writing: atomic (nothing half-written survives a failure) and byte-reproducible safetensors."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from safetensors import safe_open

from lorakit.fileio import atomic_path, save_safetensors


def test_same_content_gives_the_same_bytes(tmp_path):
    """The safetensors writer orders metadata differently from call to call; lorakit's files do not."""
    tensors = {"up": torch.randn(3, 4), "down": torch.arange(5).half(), "steps": torch.zeros(2, dtype=torch.int64)}
    metadata = {f"ss_key{i}": f"value {i}: \"quoted\" \\ é ☃ \n" * i for i in range(30)}
    digests = set()
    rng = random.Random(0)
    for i in range(4):
        keys = list(metadata)
        rng.shuffle(keys)
        path = save_safetensors(tensors, tmp_path / f"lora{i}.safetensors", {k: metadata[k] for k in keys})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == metadata
            assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    assert len(digests) == 1


def test_a_failed_write_leaves_the_old_file(tmp_path):
    dest = tmp_path / "weights.safetensors"
    save_safetensors({"w": torch.ones(2)}, dest)
    before = dest.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")
    assert dest.read_bytes() == before
    assert list(tmp_path.iterdir()) == [dest]


def test_safetensors_header_reader(tmp_path):
    from lorakit.fileio import read_safetensors_header

    path = save_safetensors({"w": torch.ones(2, 3)}, tmp_path / "ok.safetensors", {"ss_network_dim": "4"})
    with open(path, "rb") as f:
        length, header = read_safetensors_header(f, path.stat().st_size)
    assert header["__metadata__"] == {"ss_network_dim": "4"} and header["w"]["shape"] == [2, 3]
    assert length == int.from_bytes(path.read_bytes()[:8], "little")

    bad = {"empty": b"", "short": b"\x01\x00\x00", "too long": (10**6).to_bytes(8, "little") + b"{}",
           "not json": (4).to_bytes(8, "little") + b"abcd", "a list": (2).to_bytes(8, "little") + b"[]"}
    for name, data in bad.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with open(p, "rb") as f, pytest.raises(ValueError):
            read_safetensors_header(f, len(data))


def test_streaming_reader_names_a_bad_file(tmp_path):
    from lorakit.errors import ModelLoadError
    from lorakit.tensorstream import SafetensorsReader

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelLoadError, match="garbage.safetensors: not a readable safetensors file"):
        SafetensorsReader(garbage)
    good = save_safetensors({"w": torch.ones(64)}, tmp_path / "cut.safetensors")
    good.write_bytes(good.read_bytes()[:-16])
    with pytest.raises(ModelLoadError, match="cut.safetensors: truncated"):
        SafetensorsReader(good)


def test_written_files_get_the_umask_mode_or_keep_the_replaced_ones(tmp_path):
    """A LoRA must be readable by a web UI that runs as another user: not mkstemp's owner-only 0600."""
    import os

    old = os.umask(0o022)
    try:
        new = save_safetensors({"w": torch.ones(2)}, tmp_path / "new.safetensors")
        assert new.stat().st_mode & 0o777 == 0o644
        os.chmod(new, 0o640)
        save_safetensors({"w": torch.zeros(2)}, new)  # replacing a file keeps its permissions
        assert new.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
