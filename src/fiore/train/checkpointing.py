"""Training checkpoints, written atomically.

    OUT/checkpoints/step_N/    a loadable fiore checkpoint (config.json, model.safetensors, tokenizer files)
                               + train_state.pt: optimizer, schedule step, per-rank RNG states, data position
    OUT/checkpoints/latest     the name of the newest complete step dir (written to a temp file, then os.replace)

A step dir is assembled under a temporary name and renamed into place, so a crash never leaves a half-written
`step_N`; `latest` only ever names a complete one. `train_state.pt` holds only tensors, numbers, strings, lists,
tuples and dicts, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "train_state.pt"


def rng_state() -> dict:
    """The process's RNG states (torch CPU [+ CUDA], python `random`, numpy) in weights_only-loadable form."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    ckpt_root: Path,
    step: int,
    write_model: Callable[[Path], None],
    train_state: dict,
    keep: int = 2,
) -> Path:
    """Write `ckpt_root/step_{step}` atomically and point `latest` at it; delete all but the `keep` newest.

    `write_model(dir)` writes the model files (config.json, model.safetensors, tokenizer) into `dir`.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp)
    torch.save(train_state, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step (resumed after a crash past this point): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(ckpt_root / "latest", final.name)
    _fsync_dir(ckpt_root)
    if keep > 0:
        for old in sorted(steps(ckpt_root))[:-keep]:
            shutil.rmtree(ckpt_root / f"step_{old}", ignore_errors=True)
    return final


def steps(ckpt_root: Path) -> list[int]:
    """Steps of the complete checkpoints under ckpt_root."""
    out = []
    for p in ckpt_root.glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).is_file():
            out.append(int(p.name[5:]))
    return out


def latest(ckpt_root: Path) -> Path | None:
    """The step dir `latest` names, or None when there is no checkpoint yet."""
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def load_state(step_dir: Path) -> dict:
    return torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
