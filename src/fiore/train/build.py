"""What a training run starts from: the model (a preset with fresh weights, or a checkpoint with [model]
overrides), its tokenizer (trained on the run's own data for a preset), and the weights of a saved step."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn

from fiore.train import ddp
from fiore.train.config import TrainConfig
from fiore.train.mixture import Mixture


def build_tokenizer(config: TrainConfig, out_dir: Path, world: ddp.World, stream):
    """From a preset: train a byte-level BPE on prompts + targets of the first `tokenizer.samples` samples of the
    training stream (every task, so later fine-tunes find their tokens), save it to OUT/tokenizer. Rank 0 trains;
    the others load."""
    from fiore.tokenizer import Tokenizer

    tok_dir = out_dir / "tokenizer"
    if world.is_main and not tok_dir.exists():
        import fiore.tasks

        mixture = Mixture({t.name: 1.0 for t in fiore.tasks.all()}, tokenizer=None)
        texts = []
        for i in range(config.tokenizer.samples):
            texts.extend(mixture.texts(stream[i]))
        tok = Tokenizer.train(texts, config.tokenizer.vocab_size)
        tmp = out_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        tmp.replace(tok_dir)
    ddp.barrier(world)
    return Tokenizer.from_dir(tok_dir)


def build_model(config: TrainConfig, out_dir: Path, world: ddp.World, stream=None):
    """-> (model, model_config, tokenizer). Preset: fresh weights (seeded) + a tokenizer trained here.
    Checkpoint: its config (with [model] overrides) and weights, loaded strictly, and its tokenizer."""
    from fiore.model import FlorenceModel

    m = config.model
    overrides = {"text": dict(m.text), "vision": dict(m.vision)}
    if m.image_size is not None:
        overrides["image_size"] = tuple(m.image_size)
    if m.contrastive_dim is not None:
        overrides["contrastive_dim"] = m.contrastive_dim
    if m.contrastive_template is not None:
        overrides["contrastive_template"] = m.contrastive_template
    if m.checkpoint is not None:
        from fiore.checkpoint import CONTRASTIVE_PREFIX, CheckpointError, has_tokenizer_files, load_checkpoint
        from fiore.checkpoint import load_weights as load_state
        from fiore.florence import checkpoint_dir
        from fiore.tokenizer import Tokenizer

        path = checkpoint_dir(starting_checkpoint(config))
        base_config, state = load_checkpoint(path)
        if not has_tokenizer_files(path):
            raise CheckpointError(f"checkpoint {path} has no tokenizer files (tokenizer.json) to train with")
        tokenizer = Tokenizer.from_dir(path)
        model_config = base_config.replace(**overrides)
        torch.manual_seed(config.train.seed)
        model = FlorenceModel(model_config)
        if model.contrastive is not None and not any(k.startswith(CONTRASTIVE_PREFIX) for k in state):
            # image-text heads asked of a checkpoint without them (an official one): they start fresh
            state.update({CONTRASTIVE_PREFIX + k: v for k, v in model.contrastive.state_dict().items()})
        load_state(model, state, str(path))
    else:
        from fiore.config import preset

        tokenizer = build_tokenizer(config, out_dir, world, stream)
        overrides["text"].update(
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_id,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            decoder_start_token_id=tokenizer.eos_id,
        )
        model_config = preset(m.preset).replace(**overrides)
        torch.manual_seed(config.train.seed)
        model = FlorenceModel(model_config)
    if model_config.text.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size {model_config.text.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}"
        )
    return model.to(world.device), model_config, tokenizer


def starting_checkpoint(config: TrainConfig) -> str | None:
    """[model] checkpoint as `fiore.load` takes it ("default" = the shipped model)."""
    return None if config.model.checkpoint == "default" else config.model.checkpoint


def export(model: nn.Module, model_config, tokenizer, path: Path) -> None:
    """Write a loadable fiore checkpoint (fiore.load(path) works)."""
    from fiore.checkpoint import save_checkpoint

    save_checkpoint(model, model_config, path, tokenizer=tokenizer)


def load_weights(model: nn.Module, path: Path) -> None:
    """A saved step's weights back into the live model (resume), through `fiore.checkpoint` (strict)."""
    from fiore.checkpoint import load_checkpoint
    from fiore.checkpoint import load_weights as load_state

    _, state = load_checkpoint(path)
    load_state(model, state, str(path))
