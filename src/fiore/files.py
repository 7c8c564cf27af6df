"""File modes: files fiore writes get the permissions the user's umask gives any new file.

Writers that go through a private temporary file (`tempfile.mkstemp`, safetensors' own writer) create it with mode
0600, which would leave labels and checkpoints unreadable by other users and services (a model server running as
another user, say). `honour_umask` sets the mode `open()` would have given.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_mode() -> int:
    """0666 less the process umask (os.umask can only be read by setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def honour_umask(path: str | Path) -> None:
    os.chmod(path, default_mode())


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the umask's file mode."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)
