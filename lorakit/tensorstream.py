"""Read and write safetensors files one tensor at a time, so a 4 GB checkpoint never has to fit in memory.

`safetensors.safe_open` maps the whole file into memory; every page it touches counts in the process's resident
memory, so streaming a 4 GB checkpoint through it still peaks at ~4 GB. Here each tensor is read with a plain
`readinto` into its own buffer and dropped after use, and the output is written header first, then tensor by
tensor. The format (8-byte little-endian header length, JSON header with dtype/shape/data_offsets, raw
little-endian data) is the one documented at https://huggingface.co/docs/safetensors.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import ModelLoadError
from .fileio import read_safetensors_header

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsReader:
    """Random access to the tensors of a safetensors file; `get` reads one tensor into fresh memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"file not found: {self.path}")
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()/__exit__
        try:
            size = self.path.stat().st_size
            n, header = read_safetensors_header(self._file, size)
        except (ValueError, UnicodeDecodeError) as e:
            self._file.close()
            raise ModelLoadError(f"{self.path.name}: not a readable safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            self._file.close()
            raise ModelLoadError(f"{self.path.name}: truncated safetensors file ({size} bytes, header expects "
                                 f"{self._data_start + end})")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.entries[key]["dtype"]
        if name not in DTYPES:
            raise ModelLoadError(f"{self.path.name}: tensor {key} has unsupported dtype {name}")
        return DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        dtype = self.dtype(key)
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        buf = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled: read straight into it
        self._file.seek(self._data_start + begin)
        if self._file.readinto(memoryview(buf.numpy())) != end - begin:
            raise ModelLoadError(f"{self.path.name}: truncated while reading {key}")
        return buf.view(dtype).reshape(entry["shape"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(dest: str | os.PathLike, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (`key, shape, dtype` in `layout`) come one at a time from `produce`.

    `dest` should be a temporary path (see `fileio.atomic_path`); each produced tensor must match its layout entry.
    """
    layout = list(layout)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, shape, dtype in layout:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in layout:
            t = produce(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"tensor {key}: produced {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
