"""keep_freed_memory: while it is on, memory the process frees is reused without new page faults; on leaving,
glibc's usual limits come back and the free memory is returned."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from lorakit import host_memory
from lorakit.host_memory import keep_freed_memory

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold: by default every such block is a fresh mmap


def faults_of_second_touch() -> int:
    """Minor page faults when a 64 MB block is allocated, written, freed, and allocated and written again."""
    torch.empty(BLOCK, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_freed_memory_is_reused_without_page_faults():
    pages = BLOCK // resource.getpagesize()
    assert faults_of_second_touch() > pages // 2  # default: the block is unmapped on free and faulted in again
    with keep_freed_memory() as active:
        assert active
        for _ in range(4):  # the heap grows, and its free blocks get touched once, in the first rounds
            faults_of_second_touch()
        assert faults_of_second_touch() < pages // 20  # then the same memory is reused
    assert faults_of_second_touch() > pages // 2  # glibc's usual behaviour is back


class FakeLibc:
    def __init__(self, accept: bool = True):
        self.calls, self.accept = [], accept

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1 if self.accept else 0

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
