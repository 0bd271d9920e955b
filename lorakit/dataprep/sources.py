"""Where a dataset comes from: a folder or a .zip, read the same way (relative '/'-paths, bytes), never written."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath

from ..data.captions import caption_key
from ..data.images import IMAGE_EXTENSIONS  # what the trainer loads
from ..errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "CAPTION_EXTENSIONS", "DatasetSource", "dreambooth_folder_tokens", "stem_key"]
CAPTION_EXTENSIONS = (".txt", ".caption")


def _hidden(rel: str) -> bool:
    """Dot-files (.DS_Store), macOS zip metadata and notebook checkpoints are not part of a dataset."""
    return any(part.startswith(".") or part == "__MACOSX" or part == "__pycache__" for part in rel.split("/"))


class DatasetSource:
    """Read-only view of a dataset folder or zip file: `files()` lists relative paths, `read(rel)` returns bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DatasetError(f"dataset not found: {self.path}")
        self.is_zip = self.path.is_file()
        self._zip: zipfile.ZipFile | None = None
        if self.is_zip:
            if not zipfile.is_zipfile(self.path):
                raise DatasetError(f"{self.path.name}: not a folder and not a .zip file; point `input_dir` at the "
                                   f"folder of images")
            self._zip = zipfile.ZipFile(self.path)
        # listed name -> the zip member's own name: `./a.png` and Windows' `sub\\a.png` name the files `a.png` and
        # `sub/a.png`, read by the real name (`read` may come before `files`)
        self._members: dict[str, str] = {}
        for info in self._zip.infolist() if self._zip is not None else []:
            if not info.is_dir():
                self._members[str(PurePosixPath(info.filename.replace("\\", "/")))] = info.filename

    def files(self) -> list[tuple[str, int]]:
        """(relative path, size in bytes), sorted, hidden files skipped."""
        out = []
        if self._zip is not None:
            for rel, name in self._members.items():
                if rel.startswith("/") or ".." in rel.split("/"):
                    continue  # an unsafe member name is never read or recreated
                if not _hidden(rel):
                    out.append((rel, self._zip.getinfo(name).file_size))
        else:
            for dirpath, dirnames, filenames in os.walk(self.path):
                dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
                for name in filenames:
                    full = Path(dirpath) / name
                    rel = full.relative_to(self.path).as_posix()
                    if not _hidden(rel) and full.is_file():
                        out.append((rel, full.stat().st_size))
        return sorted(out)

    def read(self, rel: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._members.get(rel, rel))
        return (self.path / rel).read_bytes()

    def full_path(self, rel: str) -> Path | None:
        """The real file behind `rel` (None inside a zip)."""
        return None if self.is_zip else self.path / rel

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stem_key(rel: str) -> tuple[str, str]:
    """(folder, stem) with the stem Unicode-NFC-normalised and case-folded, so `é` typed on macOS (NFD) still finds
    its caption."""
    p = PurePosixPath(rel)
    return str(p.parent), caption_key(p.stem)


def dreambooth_folder_tokens(rel: str) -> str | None:
    """`10_sks dog/img.png` → `sks dog` (the caption sd-scripts uses when an image has no caption file)."""
    return dreambooth_name_tokens(PurePosixPath(rel).parent.name)


def dreambooth_name_tokens(name: str) -> str | None:
    """`10_sks dog` → `sks dog`; None for a name that is not `<repeats>_<tokens>`."""
    head, sep, tail = name.partition("_")
    if sep and head.isdigit() and tail.strip():
        return tail.strip()
    return None


def unique_name(rel: str, taken: set[str]) -> str:
    """`rel`, or `rel` with `_2`, `_3`, ... before its extension, so that no two outputs share a *stem*: an image
    and its caption file are named by the stem, so `x.png` and `x.jpg` side by side would share `x.txt`. `taken`
    holds the case-folded stems already used (case-insensitive file systems) and is updated."""
    p, n = PurePosixPath(rel), 2
    while str(PurePosixPath(rel).with_suffix("")).casefold() in taken:
        rel = str(p.with_name(f"{p.stem}_{n}{p.suffix}"))
        n += 1
    taken.add(str(PurePosixPath(rel).with_suffix("")).casefold())
    return rel
