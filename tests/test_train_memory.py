"""fiore.train.memory: the allocator setting `fiore train` applies, observed in glibc's own statistics.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone, so a test in this process
would only see what an earlier test (any training run) left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, ctypes.util, json, sys

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = None
if sys.argv[1] == "apply":
    from fiore.train.memory import keep_freed_memory
    applied = [keep_freed_memory(), keep_freed_memory()]
before = libc.mallinfo2()
block = libc.malloc(64 << 20)  # 64 MiB: above glibc's largest mmap threshold
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped_by_malloc": during.hblks - before.hblks,
                  "kept_after_free": after.arena - before.arena}))
"""


def probe(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt / mallinfo2")


def test_glibc_default_maps_a_large_block_and_returns_it():
    seen = probe("plain")
    assert seen["mmapped_by_malloc"] == 1 and seen["kept_after_free"] < 1 << 20


def test_applied_large_blocks_come_from_the_heap_and_stay_after_free():
    seen = probe("apply", FIORE_KEEP_FREED_MEMORY="1")
    assert seen["applied"] == [True, True]  # idempotent
    assert seen["mmapped_by_malloc"] == 0 and seen["kept_after_free"] > 48 << 20  # not trimmed


def test_opt_out_by_environment_changes_nothing():
    seen = probe("apply", FIORE_KEEP_FREED_MEMORY="0")
    assert seen["applied"] == [False, False]
    assert seen["mmapped_by_malloc"] == 1
