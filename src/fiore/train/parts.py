"""Named parts of a `FlorenceModel` for `[train] freeze` and `[optim] lr_scale`: which parameters each name covers,
found through the model's modules (not by restating state-dict key prefixes).

The tied token embedding (also the LM head and both `embed_tokens`) is one parameter and belongs to "embeddings"
only, so freezing "encoder" or "decoder" leaves it trainable. A name that is no part is read as a prefix of the
parameter names (`named_parameters()`, a tied weight listed once), for what the parts do not cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class Part:
    modules: list[nn.Module]  # the part's parameters are theirs; frozen wholly, they also stay in eval mode
    without: list[nn.Module] = field(default_factory=list)  # parameters also found here belong to another part

    def parameters(self) -> list[nn.Parameter]:
        excluded = {id(p) for m in self.without for p in m.parameters()}
        found: dict[int, nn.Parameter] = {}
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in excluded:
                    found.setdefault(id(p), p)
        return list(found.values())


def model_parts(model: nn.Module) -> dict[str, Part]:
    """The named parts of a FlorenceModel (LoRA layers injected in place belong to the part they sit in)."""
    lm = model.language_model
    embedding = [lm.shared]
    return {
        "vision_tower": Part([model.vision_tower]),
        "projector": Part([model.projector]),
        "vision": Part([model.vision_tower, model.projector]),
        "embeddings": Part(embedding),
        "encoder": Part([lm.encoder], embedding),
        "decoder": Part([lm.decoder], embedding),
        "language_model": Part([lm, model.lm_head]),
    }


def parameters_named(model: nn.Module, name: str, parts: dict[str, Part] | None = None) -> list[nn.Parameter]:
    """The parameters of part `name`, or of the parameter names starting with `name`; ValueError when none."""
    parts = model_parts(model) if parts is None else parts
    if name in parts:
        found = parts[name].parameters()
    else:
        found = [p for n, p in model.named_parameters() if n.startswith(name)]
    if not found:
        raise ValueError(f"{name!r} matches no parameter; parts: {sorted(parts)} or a parameter-name prefix")
    return found


def freeze(model: nn.Module, names: list[str]) -> list[str]:
    """Set requires_grad=False on the named parts or parameter-name prefixes; returns the frozen parameter names."""
    parts = model_parts(model)
    frozen: set[int] = set()
    for name in names:
        try:
            frozen.update(id(p) for p in parameters_named(model, name, parts))
        except ValueError as e:
            raise ValueError(f"freeze: {e}") from None
    out = []
    for n, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            out.append(n)
    return sorted(out)


def frozen_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules of the wholly frozen parts among `names` (prefixes have none): kept in eval mode in training."""
    parts = model_parts(model)
    return [m for name in names if name in parts for m in parts[name].modules]


def vision_frozen(model: nn.Module) -> bool:
    """True when the vision tower and projector have parameters and none of them trains."""
    ps = model_parts(model)["vision"].parameters()
    return bool(ps) and not any(p.requires_grad for p in ps)
