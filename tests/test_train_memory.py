"""fiore.train.memory: the allocator setting `fiore train` applies."""

from __future__ import annotations

import sys

import pytest

from fiore.train import memory


def test_opt_out_by_environment(monkeypatch):
    monkeypatch.setattr(memory, "_done", False)
    monkeypatch.setenv("FIORE_KEEP_FREED_MEMORY", "0")
    assert memory.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applies_on_linux_and_is_idempotent(monkeypatch):
    monkeypatch.delenv("FIORE_KEEP_FREED_MEMORY", raising=False)
    assert memory.keep_freed_memory() is True
    assert memory.keep_freed_memory() is True
