"""Atomic writes and safe reads. Every file lorakit writes goes through `atomic_path`: a temporary file in the
destination folder, renamed over the target only when fully written, so a crash never leaves a half file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError, ModelLoadError, UnsafeCheckpointError, first_line


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success rename it onto `dest`, on error remove it.

    A `dest` that is a symbolic link (a LoRA linked into a web UI's folder, a file kept on Drive) is written through:
    the file it points at is replaced and the link stays.
    """
    dest = Path(dest)
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode(dest))  # mkstemp makes it owner-only (0600)
        sync(tmp_path)  # the data is on disk before the name points at it: a power cut leaves the old file or the new
        os.replace(tmp_path, dest)
        sync(dest.parent)  # and the rename itself
    except BaseException as e:
        # torch and safetensors report a full disk in their own words ("unexpected pos", SafetensorError)
        full = not isinstance(e, (OSError, KeyboardInterrupt)) and _disk_full(tmp_path.parent)
        tmp_path.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on the disk while writing {dest.name} (the earlier file, "
                                        f"if any, is intact)", str(dest)) from e
        raise


def _temp_prefix(dest: Path) -> str:
    """`.<name>.` for a temporary next to `dest`, the name shortened where the random part and `.tmp` would make it
    longer than a file name may be (255 bytes on the usual file systems)."""
    room = _NAME_MAX - len(".") - len(".12345678.tmp")
    name = dest.name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return f".{name}."


_NAME_MAX = 255


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def sync(path: Path) -> None:
    """fsync a file or a folder (its entries: a rename in it), where the system allows it."""
    try:
        fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY)
    except OSError:
        return  # e.g. folders cannot be opened on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without fsync (some network and FUSE mounts)
    finally:
        os.close(fd)


def temp_folder(dest: Path) -> Path:
    """A new empty folder next to `dest` (`.<name>.<random>`), to be renamed onto it when complete, with the
    permissions a new folder gets from the umask (mkdtemp's are owner-only: a web UI running as another user could
    not read a merged model)."""
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# what `atomic_path` and `temp_folder` leave behind when the process is killed mid-write
_STALE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_STALE_STATE = re.compile(r"^\.state-\d{8}\.[a-z0-9_]{8}$")
_STALE_SAFETENSORS = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors' own temporary file, inside ours


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove the temporary files (and half-written state folders) that a killed run left in `folder`, e.g. on
    Google Drive after a Colab disconnect; returns their names. A state folder set aside while being replaced
    (`.state-<step>.old.<random>`) is kept: resuming puts it back."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.is_file() and (_STALE.match(path.name) or _STALE_SAFETENSORS.match(path.name)):
            path.unlink(missing_ok=True)
        elif path.is_dir() and not path.is_symlink() and _STALE_STATE.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        removed.append(path.name)
    return removed


def read_utf8(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> str:
    """A text file the user wrote (prompts, a config, captions' metadata) as UTF-8 (a byte-order mark, as Notepad
    writes it, is not part of the text); another encoding is an `error` naming the file, line and byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{what} {path.name} is not UTF-8 text (byte {data[e.start]:#04x} on line {line}): save it as "
                    f"UTF-8") from None


def _file_mode(dest: Path) -> int:
    """The permissions a new file gets from the umask (usually 0644), or those of the file it replaces: a LoRA
    must stay readable by a web UI that runs as another user."""
    try:
        return dest.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def write_text(dest: str | os.PathLike, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_json(dest: str | os.PathLike, obj) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def save_safetensors(tensors: dict, dest: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically. Tensors are made contiguous (shared storage is not allowed).

    The same tensors and metadata always give the same bytes (see `_sort_metadata`), so a file's sha256 identifies
    its content.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
    return Path(dest)


def read_safetensors_header(f, size: int) -> tuple[int, dict]:
    """(header length, header) of the safetensors file open as `f` (at offset 0) of `size` bytes; ValueError (or
    UnicodeDecodeError) when the first bytes are not a safetensors header."""
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(raw, "little")
    if length > size - 8:
        raise ValueError("header length exceeds the file size")
    header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return length, header


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` entries in key order.

    The safetensors writer keeps metadata in a hash map whose order changes from process to process, so two writes
    of the same content differed in their header bytes. The tensor entries and the data are left as written; the
    header keeps its length (the JSON only changes order; any spare bytes are spaces, as the format allows).
    """
    with open(path, "r+b") as f:
        length, header = read_safetensors_header(f, os.fstat(f.fileno()).st_size)
        if "__metadata__" not in header:
            return
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > length:  # cannot happen for a JSON re-ordering; keep the file as written rather than move data
            return
        f.seek(8)
        f.write(raw + b" " * (length - len(raw)))


def torch_save(obj, dest: str | os.PathLike) -> Path:
    import torch

    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)
    return Path(dest)


# What training frameworks pickle beside the weights, whose objects lorakit never uses: PyTorch Lightning's callback
# state (`callbacks: {ModelCheckpoint: {...}}` in the original SD .ckpt files) and numpy numbers and arrays in it.
# A1111's unpickler allows the same names.
_INERT_GLOBALS = re.compile(r"(pytorch_lightning|lightning|lightning_fabric)\.[\w.]+"
                            r"|numpy\.(_?core\.multiarray\.(scalar|_reconstruct)|dtype|ndarray|dtypes\.\w+)")


class _Inert:
    """Stands in for one of `_INERT_GLOBALS` while unpickling: takes any arguments and state and runs none of the
    real object's code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = False):
    """Load a .ckpt/.pt/.bin with `weights_only=True`: plain tensors and containers only, never code.

    The training framework's objects a model checkpoint carries (`_INERT_GLOBALS`) come back as inert stand-ins.
    A pickle that references anything else (a function to call, a class to build) is refused with
    `UnsafeCheckpointError` naming it; its payload is never executed. `mmap`: map the tensors from the file instead
    of reading them into memory (a 7 GB .ckpt then costs page cache, not RAM; files in the old format are read).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"file not found: {path}")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # a static scan: nothing runs
    except Exception:  # the old (pre-zip) format or not a torch file: torch.load says which below
        names, mmap = [], False
    inert = [(_Inert, name) for name in names if _INERT_GLOBALS.fullmatch(name)]
    for _ in range(16):  # the old format cannot be scanned: allow its inert names as the loader meets them
        try:
            with torch.serialization.safe_globals(inert):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
            if blocked and _INERT_GLOBALS.fullmatch(blocked[1]) and (_Inert, blocked[1]) not in inert:
                inert.append((_Inert, blocked[1]))
                continue
            what = (f"it asks for `{blocked[1]}`" if blocked else
                    re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0][:200])
            raise UnsafeCheckpointError(
                f"{path.name}: refused to load — this pickle file asks to run code or build objects that are not "
                f"plain tensors ({what}). Convert it to .safetensors with a tool you trust.") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            if mmap:  # a file system that cannot map files (some network mounts): read it instead
                mmap = False
                continue
            raise ModelLoadError(f"{path.name}: not a readable checkpoint ({first_line(e)})") from None
    raise UnsafeCheckpointError(f"{path.name}: refused to load — too many objects that are not tensors")


LOCK_NAME = ".lorakit.lock"


class FolderLock:
    """One run's hold on its output folder (an `flock` on `<folder>/.lorakit.lock`, which names the holder's pid):
    a second run started on the same folder is refused, before it removes the first run's temporary files or writes
    over its saves. The operating system drops the hold when the process ends, however it ends, so a killed run
    leaves no stale lock. Where the folder's file system has no locks (some network mounts), runs go unguarded."""

    def __init__(self, folder: Path, fd: int | None):
        self.path, self._fd = folder / LOCK_NAME, fd

    @classmethod
    def take(cls, folder: str | os.PathLike) -> FolderLock:
        folder = Path(folder)
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return cls(folder, None)
        path = folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(
                        f"another lorakit run (process {holder or '?'}) is writing to {folder}: wait for it to end, "
                        f"stop it, or choose another `output_dir`") from None
                return cls(folder, None)  # no locks on this file system
            try:  # the file may have been removed by a holder that released it just now: lock the one on disk
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(folder, fd)
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and let go (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
