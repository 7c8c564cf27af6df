"""Official checkpoints by name: a Hugging Face repository id (`microsoft/Florence-2-base`) -> a local directory.

`fiore.load("microsoft/Florence-2-base")` and `--model microsoft/Florence-2-base` look in huggingface_hub's cache
first (`HF_HUB_CACHE` / `HF_HOME`, so an offline machine with the files cached needs no network), and download
only when the files are not cached and the machine allows it (`HF_HUB_OFFLINE` unset). The strict loader then
reads the directory as any other. Needs the `hub` extra: `pip install 'fiore[hub]'`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fiore.checkpoint import CheckpointError

# What a Florence-2 repository holds that fiore reads (not the remote code, not other weights formats' duplicates).
PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "tokenizer*", "vocab*", "merges*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_repo_id(name: str | Path) -> bool:
    text = str(name)
    return bool(_REPO_ID.fullmatch(text)) and not Path(text).exists()


def resolve(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id`, from the cache or (when allowed) downloaded into it."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a directory; to load it as a Hugging Face repository: pip install 'fiore[hub]'"
        ) from None
    cache_dir = os.environ.get("HF_HUB_CACHE")  # read now: the library reads its constants once, at import
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    kwargs = {"revision": revision, "cache_dir": cache_dir, "allow_patterns": PATTERNS}
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(
                f"{repo_id}: no such directory, and as a Hugging Face repository it is not in the cache "
                f"({cache_dir or 'the default cache'}) and HF_HUB_OFFLINE forbids downloading it"
            ) from None
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # no network, unknown repository, gated model, ...
        raise CheckpointError(
            f"{repo_id}: no such directory, and as a Hugging Face repository it is not cached and could not be "
            f"downloaded ({type(e).__name__}: {e})"
        ) from None
