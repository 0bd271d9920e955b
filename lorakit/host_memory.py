"""Host memory that a CPU training run keeps and reuses, instead of handing it back to the OS after every step.

A training step allocates and frees the same large activations every step. glibc's malloc, left to itself, gives
freed memory at the top of its heap back to the OS as soon as more than `M_TRIM_THRESHOLD` is free (at most 64 MB
by its dynamic rule) and serves every block over `M_MMAP_THRESHOLD` (at most 32 MB) by a fresh `mmap` that `free`
unmaps again. Either way the next step writes to new pages, and each 4 KiB page costs a page fault and the kernel
zeroing it: on full-size SD1.5 at 512 px, fp32, 240,000–310,000 faults and 0.6–0.7 s of system time per step,
a LoRA step paying more than a frozen forward + backward because each adapted layer keeps its input alive for the
adapter's weight gradient (`benchmarks/RESULTS.md`: with this setting, ~2,000 faults and ~0.01 s).

`keep_freed_memory()` makes malloc keep what the process frees while training (or CPU generation, or latent
caching) runs: no trimming of the heap and no
`mmap` per block, so after the first steps every allocation is served from memory already mapped. The process's peak
memory stays what the run needs at its peak (it is not given back in between). On leaving, the limits are set to
glibc's usual steady values (32 MB `mmap` threshold, 64 MB trim threshold) and the free memory is returned
(`malloc_trim`), so a notebook kernel does not keep the peak after training. Where the C library is not glibc
(macOS, Windows, musl) it does nothing.

Public API: `keep_freed_memory`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # never mmap a block, never trim the heap
_STEADY = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}  # glibc's defaults


@functools.cache
def _glibc():
    """glibc's handle, or None on any other C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def _set(libc, params: dict[int, int]) -> list[bool]:
    """Each setting tried (none skipped after a refusal); whether each one took effect."""
    return [libc.mallopt(param, value) == 1 for param, value in params.items()]


_active: list[bool] = []  # the setting's state in each enclosing `keep_freed_memory` block that applied it


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True, libc=None):
    """While the block runs, malloc keeps and reuses the memory the process frees (see the module docstring).
    Yields whether the setting took effect (False off glibc or with `enabled=False`). `libc`: the C library
    handle to use (default: the process's glibc). Blocks nest: inside an enclosing block that applied it, a block
    changes nothing (the outermost one restores the limits when it ends)."""
    if enabled and _active:
        yield _active[0]
        return
    libc = _glibc() if libc is None else libc
    taken = _set(libc, _KEEP) if enabled and libc is not None else []
    active = bool(taken) and all(taken)
    if taken:
        _active.append(active)
    try:
        yield active
    finally:
        if taken:
            _active.pop()
        if any(taken):  # restore whatever was changed, also when a setting was refused
            _set(libc, _STEADY)
            libc.malloc_trim(0)
