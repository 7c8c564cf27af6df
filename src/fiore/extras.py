"""Optional dependencies, checked before a command does any work: a missing one is named with its pip line.

The extras (pyproject.toml): eval (pycocotools, pycocoevalcap: COCO mAP, masks, CIDEr/BLEU), serve (fastapi,
uvicorn, python-multipart), finetune (peft: LoRA), export (onnx, onnxscript, onnxruntime: `fiore export onnx`),
tile (supervision: NMS for `--tile`). `pip install 'fiore[eval,serve,finetune,export,tile]'` installs them all.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

# import name -> the extra that installs it
EXTRA_OF = {
    "pycocotools": "eval",
    "pycocoevalcap": "eval",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "peft": "finetune",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "supervision": "tile",
}


class MissingExtra(ImportError):
    """An optional dependency a command needs is not installed; the message has the pip line."""


def require(modules: Iterable[str], what: str) -> None:
    """Raise MissingExtra naming the pip install line when any of `modules` cannot be imported."""
    missing = [m for m in dict.fromkeys(modules) if importlib.util.find_spec(m) is None]
    if missing:
        extras = ",".join(dict.fromkeys(EXTRA_OF.get(m, m) for m in missing))
        raise MissingExtra(f"{what} needs {', '.join(missing)}: pip install 'fiore[{extras}]'")
