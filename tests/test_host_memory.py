"""keep_freed_memory: while it is on, memory the process frees is reused without new page faults; on leaving,
glibc's usual limits come back and the free memory is returned."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit import host_memory
from lorakit.host_memory import keep_freed_memory

# Run in a fresh process: malloc's state depends on everything the process allocated before (after a training run,
# for one, its heap holds large free blocks that later allocations reuse without an mmap).
PROBE = r"""
import json, resource, torch
from lorakit.host_memory import keep_freed_memory

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold: by default every such block is a fresh mmap


def faults_of_second_touch():
    # minor page faults when a block is allocated, written, freed, and allocated and written again
    torch.empty(BLOCK, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()


out = {"pages": BLOCK // resource.getpagesize(), "default": faults_of_second_touch()}
with keep_freed_memory() as active:
    for _ in range(4):  # the heap grows, and its free blocks get touched once, in the first rounds
        faults_of_second_touch()
    out.update(active=active, kept=faults_of_second_touch(), resident_inside=resident())
out["resident_after"] = resident()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_freed_memory_is_reused_without_page_faults():
    """In a fresh process: by default a freed 64 MB block is unmapped and faulted in again; while the setting is on
    the same memory is reused; on leaving, the memory kept is handed back to the OS."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    pages = out["pages"]
    assert out["default"] > pages // 2
    assert out["active"]
    assert out["kept"] < pages // 20
    assert out["resident_inside"] - out["resident_after"] > 64 * 2**20  # malloc_trim returned the kept blocks


class FakeLibc:
    def __init__(self, accept: bool = True, refuse: tuple[int, ...] = ()):
        self.calls, self.accept, self.refuse = [], accept, refuse

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1 if self.accept and param not in self.refuse else 0

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_settings_and_restore():
    libc = FakeLibc()
    with keep_freed_memory(libc=libc) as active:
        assert active
        assert libc.calls == [("mallopt", p, v) for p, v in host_memory._KEEP.items()]
        assert dict(host_memory._KEEP) == {host_memory.M_MMAP_MAX: 0, host_memory.M_TRIM_THRESHOLD: 2**31 - 1}
        libc.calls.clear()
    assert libc.calls == [*(("mallopt", p, v) for p, v in host_memory._STEADY.items()), ("malloc_trim", 0)]


def test_restored_after_an_error_and_inactive_cases():
    libc = FakeLibc()
    with pytest.raises(KeyboardInterrupt), keep_freed_memory(libc=libc):
        raise KeyboardInterrupt
    assert libc.calls[-1] == ("malloc_trim", 0)

    off = FakeLibc()
    with keep_freed_memory(enabled=False, libc=off) as active:
        assert not active
    assert off.calls == []

    refused = FakeLibc(accept=False)  # a C library that refuses the settings: nothing to restore
    with keep_freed_memory(libc=refused) as active:
        assert not active
    assert all(call[0] == "mallopt" for call in refused.calls)


def test_a_partly_refused_setting_is_inactive_and_still_restored():
    """A C library that takes "no mmap" but refuses the trim threshold: every setting is tried, the block reports
    inactive, and what was changed is set back on leaving."""
    libc = FakeLibc(refuse=(host_memory.M_TRIM_THRESHOLD,))
    with keep_freed_memory(libc=libc) as active:
        assert not active
        assert libc.calls == [("mallopt", p, v) for p, v in host_memory._KEEP.items()]
        libc.calls.clear()
    assert libc.calls == [*(("mallopt", p, v) for p, v in host_memory._STEADY.items()), ("malloc_trim", 0)]


def test_nested_blocks_leave_the_setting_to_the_outermost():
    """Sampling inside training, generation inside a notebook's training cell: an inner block changes nothing and
    its end does not restore the limits under the enclosing block."""
    libc = FakeLibc()
    with host_memory.keep_freed_memory(libc=libc) as outer:
        libc.calls.clear()
        with host_memory.keep_freed_memory(libc=libc) as inner:
            assert outer and inner
        with host_memory.keep_freed_memory(enabled=False, libc=libc) as off:
            assert not off
        assert libc.calls == []
    assert libc.calls == [*(("mallopt", p, v) for p, v in host_memory._STEADY.items()), ("malloc_trim", 0)]
    libc.calls.clear()
    with host_memory.keep_freed_memory(libc=libc):  # and a later block applies it again
        assert libc.calls == [("mallopt", p, v) for p, v in host_memory._KEEP.items()]
