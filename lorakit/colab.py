"""Notebook set-up that works the same on Colab and locally: detect Colab, keep Colab's torch, Google Drive.

The first code cell of every lorakit notebook installs lorakit if it is missing (on Colab) and then calls
`setup()`, which:
- on Colab, turns on Colab's widget manager (ipywidgets 8 forms need it) and, with `use_drive=True`, mounts Google
  Drive and makes a folder on it the working folder — every relative path (datasets, `output_dir`, saved states)
  then lives on Drive, so a runtime disconnect loses nothing and training resumes from the saved state;
- off Colab, asking for Drive is answered with one clear sentence and the local folder is used; a kernel that
  Jupyter started in a checkout's `notebooks/` folder works in the checkout (where README's paths point), so the
  notebooks do not write a second `data_examples/` and `output/` inside `notebooks/`;
- on Colab, says so when the files would be lost at a disconnect (Drive not used) or the runtime has no GPU;
- makes lorakit's own errors (bad input, not bugs) show as one red line instead of a traceback wall.

Installing lorakit never replaces the preinstalled torch: `install_command()` pins torch to the version already
there, so pip either keeps it or stops with a conflict instead of downloading a different CUDA build.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, LorakitError

DRIVE_MOUNT = "/content/drive"
DRIVE_HOME = f"{DRIVE_MOUNT}/MyDrive"


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


def is_drive_path(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(DRIVE_MOUNT)


def check_drive_paths(cfg) -> None:
    """Refuse Google Drive paths (`/content/drive/...`) off Colab, naming the option, instead of a deep error."""
    if in_colab():
        return
    for name, value in cfg.to_dict().items():
        for v in value if isinstance(value, list) else [value]:
            if is_drive_path(v):
                raise ConfigError(
                    f"`{name}` is a Google Drive path ({v}), but this is not Colab, where Drive is mounted: "
                    f"use a local folder here, or run the notebook on Colab with USE_DRIVE = True")


def drive_path(path: str | os.PathLike) -> Path:
    """`path` inside your Google Drive folder; off Colab a clear `ConfigError` says why this cannot work."""
    if not in_colab():
        raise ConfigError(f"Google Drive is only available on Colab, and this is not Colab: use a local path "
                          f"instead of the Drive path {path!r}")
    p = Path(path)
    return p if is_drive_path(p) else Path(DRIVE_HOME) / p


def install_command(source: str = "lorakit") -> list[str]:
    """The pip command that installs lorakit from `source` next to the installed torch, never replacing it."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", source]
    try:
        cmd.append(f"torch=={importlib.metadata.version('torch').split('+')[0]}")
    except importlib.metadata.PackageNotFoundError:
        pass
    return cmd


def install(source: str = "lorakit") -> None:
    """Run `install_command(source)` (what the notebooks' first cell does when lorakit is missing)."""
    import subprocess

    subprocess.run(install_command(source), check=True)


@dataclass(frozen=True)
class Workspace:
    """Where a notebook works: `root` is the working folder (on Drive when mounted)."""

    root: Path
    on_colab: bool
    on_drive: bool

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def _one_line_errors(shell, etype, evalue, tb, tb_offset=None):
    """IPython handler: lorakit's own errors as one red line (they describe bad input, not a bug).

    IPython leaves the display to the handler, so it sends the error output itself (ename, evalue and a one-line
    "traceback"), which front ends show in red and which still stops "Run all"."""
    stb = [f"\x1b[31m{etype.__name__}: {evalue}\x1b[0m"]
    shell._showtraceback(etype, evalue, stb)
    return stb


def short_errors(enable: bool = True) -> bool:
    """Show `LorakitError`s in this notebook as one line; returns False outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.set_custom_exc((LorakitError,) if enable else (), _one_line_errors if enable else None)
    return True


def setup(use_drive: bool = False, drive_folder: str = "lorakit", *, quiet: bool = False) -> Workspace:
    """Prepare this notebook session (see the module docstring); returns the `Workspace`."""
    short_errors()
    colab = in_colab()
    root, on_drive = Path.cwd(), False
    if colab:
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()
        if use_drive:
            from google.colab import drive  # type: ignore[import-not-found]

            drive.mount(DRIVE_MOUNT)
            root, on_drive = Path(DRIVE_HOME) / drive_folder, True
            root.mkdir(parents=True, exist_ok=True)
            os.chdir(root)
        if not quiet:
            for note in colab_notes(on_drive, _has_cuda()):
                print(f"⚠ {note}")
    else:
        checkout = _checkout_root(root)
        if checkout is not None:  # Jupyter starts a kernel in the notebook's folder
            root = checkout
            os.chdir(root)  # the notebooks' relative paths (data_examples/, output/) mean the checkout's, as in README
        if use_drive and not quiet:
            print(f"Google Drive is only available on Colab; this is not Colab, so files stay in {root}")
    if not quiet:
        print(f"lorakit {_version()} · {_device()} · working folder: {root}")
    return Workspace(root, colab, on_drive)


def _checkout_root(folder: Path) -> Path | None:
    """The lorakit checkout whose `notebooks/` folder `folder` is, else None."""
    parent = folder.parent
    if folder.name == "notebooks" and (parent / "lorakit" / "__init__.py").is_file() and (
            parent / "pyproject.toml").is_file():
        return parent
    return None


def colab_notes(on_drive: bool, cuda: bool) -> list[str]:
    """What a Colab user should know before training: where files go when Drive is not used, and a runtime
    without a GPU."""
    notes = []
    if not on_drive:
        notes.append("files are kept in /content, which a disconnect or a new session wipes: set USE_DRIVE = True "
                     "to keep datasets, LoRAs and saved training states on Google Drive (training then resumes)")
    if not cuda:
        notes.append(GPU_RUNTIME_HINT)
    return notes


GPU_RUNTIME_HINT = ("this Colab runtime has no GPU: Runtime → Change runtime type → T4 GPU, then run all again "
                    "(SD training on a CPU takes hours; the toy model is fine)")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _version() -> str:
    from . import __version__

    return __version__


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "torch missing"
    if torch.cuda.is_available():
        return f"torch {torch.__version__} · GPU {torch.cuda.get_device_name(0)}"
    return f"torch {torch.__version__} · CPU only (fine for the toy model; use a GPU runtime for SD)"
