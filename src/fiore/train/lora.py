"""LoRA fine-tuning through peft: adapters on named linear layers, everything else frozen, merged on save.

Checkpoints fiore writes stay plain Florence-2 ones (transformers loads them): the adapters are merged into a copy
of the model for every export. Step checkpoints also keep the adapters alone (`adapter.safetensors`), so a resumed
run restarts from the untouched base weights plus the adapters, exactly where it stopped.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from fiore.train.config import LoraSection

ADAPTER_FILE = "adapter.safetensors"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'fiore[finetune]'") from None
    return peft


def require_peft() -> None:
    """Fail before any work when [lora] is asked for and peft is missing."""
    from fiore.extras import require

    require(["peft"], "LoRA fine-tuning ([lora])")


def add_adapters(model: nn.Module, section: LoraSection):
    """Inject LoRA layers into `model` in place (its other parameters are frozen); returns the peft wrapper."""
    peft = _peft()
    config = peft.LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout, target_modules=section.target_regex()
    )
    wrapped = peft.get_peft_model(model, config)
    if not any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError(f"[lora] targets {section.targets} under {section.scope!r} match no linear layer")
    return wrapped


def merged(wrapped) -> nn.Module:
    """A copy of the model with the adapters merged into its weights (the live model keeps training)."""
    return copy.deepcopy(wrapped).merge_and_unload()


def save_adapters(wrapped, directory: Path) -> None:
    from fiore.files import save_tensors

    state = _peft().get_peft_model_state_dict(wrapped)
    save_tensors({k: v.detach().contiguous() for k, v in state.items()}, directory / ADAPTER_FILE)


def load_adapters(wrapped, directory: Path) -> None:
    from safetensors.torch import load_file

    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA adapters to resume from (was this run started with [lora]?)")
    result = _peft().set_peft_model_state_dict(wrapped, load_file(path))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: adapters do not match the model (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")  # fmt: skip
