"""lorakit's file writing: atomic (nothing half-written survives a failure) and byte-reproducible safetensors."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

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


def test_a_file_is_on_disk_before_its_name_points_at_it(tmp_path, monkeypatch):
    """After a power cut the name holds the old file or the whole new one: the temporary file is fsynced before the
    rename, and the folder after it."""
    import os

    from lorakit.fileio import write_text

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    write_text(tmp_path / "lora.toml", "x = 1\n")
    kinds = [(kind, Path(where).name) for kind, where in events]
    assert kinds[1] == ("replace", "lora.toml")
    assert kinds[0][0] == "fsync" and kinds[0][1].startswith(".lora.toml.") and kinds[0][1].endswith(".tmp")
    assert kinds[2] == ("fsync", tmp_path.name)


def test_folders_written_whole_get_the_umask_mode(tmp_path):
    import os

    from lorakit.fileio import temp_folder

    old = os.umask(0o022)
    try:
        assert temp_folder(tmp_path / "merged").stat().st_mode & 0o777 == 0o755  # mkdtemp's own is 0700
    finally:
        os.umask(old)


def test_what_a_killed_write_left_is_removed_and_nothing_else(tmp_path):
    from lorakit.fileio import remove_stale_temporaries

    # the last: safetensors' own temporary file, written inside lorakit's when the run was killed
    left = [".lora.safetensors.k2j_9xq1.tmp", ".loss_history.csv.abcdefgh.tmp", ".tmpuDrLVR"]
    kept = ["lora.safetensors", ".hidden.tmp", "notes.tmp", ".state-00000004.old.abcd1234"]
    for name in left + kept[:3]:
        (tmp_path / name).write_text("x")
    (tmp_path / ".state-00000004.ab_cd123").mkdir()  # a state folder being written when the run died
    (tmp_path / kept[3]).mkdir()  # one set aside while being replaced: resume puts it back
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([*left, ".state-00000004.ab_cd123"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_full_disk_is_named_as_one(tmp_path, monkeypatch):
    """torch reports a full disk as "unexpected pos" and safetensors as its own error: the write says what happened,
    naming the file, as an OSError the CLI prints as one line; the earlier file is intact."""
    import errno
    import shutil
    from collections import namedtuple

    from lorakit.fileio import torch_save

    dest = tmp_path / "train_state.pt"
    torch_save({"step": 1}, dest)
    before = dest.read_bytes()

    def torch_full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")

    monkeypatch.setattr("torch.save", torch_full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    with pytest.raises(OSError) as info:
        torch_save({"step": 2}, dest)
    assert info.value.errno == errno.ENOSPC and "no space left on the disk while writing train_state.pt" in str(
        info.value)
    assert dest.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 0, 10 << 30))  # a real bug stays itself
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch_save({"step": 2}, dest)


def test_a_linked_file_is_written_through_its_link(tmp_path):
    """A LoRA linked into a web UI's folder (or kept on Drive) is updated where it lives; the link stays a link."""
    (tmp_path / "drive").mkdir()
    target = tmp_path / "drive" / "style.safetensors"
    save_safetensors({"w": torch.zeros(2)}, target)
    link = tmp_path / "style.safetensors"
    link.symlink_to(target)
    save_safetensors({"w": torch.ones(2)}, link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    with safe_open(str(target), framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drive", "style.safetensors"]
    assert [p.name for p in (tmp_path / "drive").iterdir()] == ["style.safetensors"]


def test_a_name_near_the_length_limit_is_written(tmp_path):
    """The temporary's random suffix must not push a long (or multi-byte) name over the file system's limit."""
    for name in ("a" * 250 + ".json", "é" * 120 + ".txt"):
        assert len(name.encode()) <= 255
        with atomic_path(tmp_path / name) as tmp:
            assert len(tmp.name.encode()) <= 255
            tmp.write_text("x")
        assert (tmp_path / name).read_text() == "x"
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_checkpoints_lightning_and_numpy_objects_are_read_as_inert_stand_ins(tmp_path, monkeypatch, zip_format):
    """The original SD .ckpt files hold PyTorch Lightning's callback state (`callbacks: {ModelCheckpoint: {...}}`,
    with numpy numbers): weights_only refused them whole. They load now, without running any of that code; another
    class is still refused, by name."""
    import sys
    import types

    import numpy as np

    from lorakit.errors import UnsafeCheckpointError
    from lorakit.fileio import safe_torch_load

    ran = []

    class ModelCheckpoint:
        def __setstate__(self, state):
            ran.append(state)

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    weights = {"model.diffusion_model.out.2.weight": torch.randn(4, 3)}
    ckpt = {"state_dict": weights, "global_step": 470000,
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.1), "kth": np.zeros(2)}},
            "checkpoint": ModelCheckpoint()}
    path = tmp_path / "sd-v1-4.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without Lightning
    out = safe_torch_load(path, mmap=True)
    assert torch.equal(out["state_dict"]["model.diffusion_model.out.2.weight"], weights[
        "model.diffusion_model.out.2.weight"]) and out["global_step"] == 470000 and not ran

    class Other:
        pass

    Other.__module__, Other.__qualname__ = "mytrainer.state", "Other"
    monkeypatch.setitem(sys.modules, "mytrainer", types.ModuleType("mytrainer"))
    monkeypatch.setitem(sys.modules, "mytrainer.state", types.SimpleNamespace(Other=Other))
    torch.save({"state_dict": weights, "x": Other()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match=r"it asks for `mytrainer\.state\.Other`"):
        safe_torch_load(path)


def test_a_checkpoint_on_a_file_system_that_cannot_map_files_is_read(tmp_path, monkeypatch):
    from lorakit.fileio import safe_torch_load

    torch.save({"w": torch.arange(3.0)}, tmp_path / "m.ckpt")
    real = torch.load

    def load(*args, mmap=None, **kwargs):
        if mmap:
            raise RuntimeError("unable to mmap 100 bytes from file </content/drive/m.ckpt>: Invalid argument (22)")
        return real(*args, mmap=mmap, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    assert torch.equal(safe_torch_load(tmp_path / "m.ckpt", mmap=True)["w"], torch.arange(3.0))


def test_a_folder_is_held_by_one_run_and_freed_when_its_process_dies(tmp_path):
    import subprocess
    import sys

    from lorakit.errors import ConfigError
    from lorakit.fileio import LOCK_NAME, FolderLock

    held = FolderLock.take(tmp_path)
    with pytest.raises(ConfigError, match=rf"another lorakit run \(process {__import__('os').getpid()}\) is writing"):
        FolderLock.take(tmp_path)
    held.release()
    held.release()  # again: nothing happens
    assert not (tmp_path / LOCK_NAME).exists()
    FolderLock.take(tmp_path).release()
    # a holder killed outright (a Colab disconnect) leaves its lock file, but no hold
    code = (f"import os; from lorakit.fileio import FolderLock; FolderLock.take({str(tmp_path)!r}); "
            "os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert (tmp_path / LOCK_NAME).exists()
    FolderLock.take(tmp_path).release()
