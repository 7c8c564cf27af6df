"""The one training loop for every task: `train(config)`.

Step anatomy (one micro-batch of B images and R >= B rows, see `fiore.train.mixture`):

    features = model.encode_image(pixel_values)            (B, N, d)   each image encoded once
    features = features[image_index]                        (R, N, d)   shared by the image's K task rows
    hidden, mask = model.encode(features, input_ids, attention_mask)
    h = model.decode(decoder_input_ids, hidden, mask)       (R, T, d)
    logits = model.logits(h[labels != -100])                only real label tokens reach the LM head
    loss = sum_t lambda_t L_t / sum_t lambda_t              (tasks present in the micro-batch)

AdamW (no decay on biases / norms), linear warmup + cosine, global-norm clipping, accumulation, optional bf16
autocast and gradient checkpointing, frozen parts excluded from the optimizer, DDP under torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fiore import tasks as registry
from fiore.model.contrastive import unicl_loss
from fiore.model.kernels import token_cross_entropy
from fiore.train import checkpointing, ddp, lora, memory
from fiore.train.config import TrainConfig
from fiore.train.data import Cycle, build_data, make_replay, read_replay, replay_cache
from fiore.train.mixture import (
    IGNORE_INDEX,
    Batch,
    ContrastiveTexts,
    Mixture,
    MixtureDataset,
    PhaseData,
    combine,
    loader,
)

# Named parts for `[train] freeze`: (name prefixes, substrings excluded). Tied token embeddings belong to
# "embeddings" only, so freezing "encoder" leaves the shared embedding (also the LM head) trainable.
PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vision_tower": (("model.vision_tower.",), ()),
    "projector": (("model.multi_modal_projector.",), ()),
    "vision": (("model.vision_tower.", "model.multi_modal_projector."), ()),
    "embeddings": (
        (
            "model.language_model.shared.",
            "lm_head.",
            "model.language_model.encoder.embed_tokens.",
            "model.language_model.decoder.embed_tokens.",
        ),
        (),
    ),
    "encoder": (("model.language_model.encoder.",), ("embed_tokens",)),
    "decoder": (("model.language_model.decoder.",), ("embed_tokens",)),
    "language_model": (("model.language_model.", "lm_head."), ()),
}
# Modules put in eval mode (no dropout / drop-path) when the part is frozen as a whole.
PART_MODULES = {
    "vision_tower": ["model.vision_tower"],
    "projector": ["model.multi_modal_projector"],
    "vision": ["model.vision_tower", "model.multi_modal_projector"],
    "encoder": ["model.language_model.encoder"],
    "decoder": ["model.language_model.decoder"],
    "language_model": ["model.language_model"],
}


# ---------------------------------------------------------------------------------------------------- freezing


def freeze(model: nn.Module, names: list[str]) -> list[str]:
    """Set requires_grad=False on the named parts (see PARTS) or parameter-name prefixes; return frozen names.

    Names are the deduplicated `named_parameters()` names (a tied weight appears once).
    """
    params = dict(model.named_parameters())
    frozen = set()
    for name in names:
        include, exclude = PARTS.get(name, ((name,), ()))
        hit = [n for n in params if n.startswith(include) and not any(x in n for x in exclude)]
        if not hit:
            raise ValueError(f"freeze: {name!r} matches no parameter; parts: {sorted(PARTS)} or a parameter prefix")
        frozen.update(hit)
    for n in frozen:
        params[n].requires_grad_(False)
    return sorted(frozen)


def vision_frozen(model: nn.Module) -> bool:
    prefixes = ("model.vision_tower.", "model.multi_modal_projector.")
    ps = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
    return bool(ps) and not any(p.requires_grad for p in ps)


# ---------------------------------------------------------------------------------------------------- optimizer


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only (frozen ones hold no state); no decay on 1-D params (norms, biases).

    Each group carries `lr_scale` (from `[optim] lr_scale`, by part name or parameter prefix): the loop sets a
    group's lr to the schedule's value times it.
    """
    o = config.optim
    scales = [(part, *PARTS.get(part, ((part,), ())), float(scale)) for part, scale in o.lr_scale.items()]
    groups: dict[tuple[float, bool], list] = {}
    matched = set()
    for name, p in model.named_parameters():  # deduplicated: a tied weight is one parameter
        if not p.requires_grad:
            continue
        scale = 1.0
        for part, include, exclude, part_scale in scales:
            if name.startswith(include) and not any(x in name for x in exclude):
                scale = part_scale
                matched.add(part)
                break
        groups.setdefault((scale, p.ndim >= 2), []).append(p)
    if not groups:
        raise ValueError("every parameter is frozen: nothing to train")
    unmatched = [part for part in o.lr_scale if part not in matched]
    if unmatched:
        raise ValueError(f"[optim] lr_scale: {unmatched} match no trainable parameter; parts: {sorted(PARTS)}")
    param_groups = [
        {"params": ps, "weight_decay": o.weight_decay if decay else 0.0, "lr_scale": scale}
        for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    try:
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


@dataclass
class Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then cosine to lr * min_lr_ratio at `steps`. A pure function of
    the step, so the scheduler state is the step count."""

    lr: float
    warmup_steps: int
    steps: int
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------------- the step


class MultiTaskLoss(nn.Module):
    """The whole training forward as one module, so DDP's forward hook sees it. Returns (loss, loss_sum, tokens).

    Target lengths vary a lot (a class name vs. a paragraph or a polygon), so rows are sorted by label length and
    decoded in up to `decode_groups` groups (as many as pay off, see `length_groups`), each padded only to its own
    longest row; only real label tokens reach the
    LM head. Same loss as one padded pass, a fraction of the decoder work.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: list[float],
        precision: str = "fp32",
        decode_groups: int = 4,
        frozen_parts: Sequence[str] = (),
        contrastive: float = 0.0,
    ):
        super().__init__()
        self.model = model
        # Wholly frozen parts stay in eval mode while training (no dropout / drop-path): fixed feature extractors.
        self.eval_paths = [path for part in frozen_parts for path in PART_MODULES.get(part, [])]
        # lambda_t of each task, then of the contrastive loss; `set_weights` changes them at a phase boundary
        self.register_buffer("weights", torch.tensor([*weights, contrastive], dtype=torch.float32), persistent=False)
        self.precision = precision
        self.decode_groups = decode_groups
        # Set per phase by the loop: False = the task rows read the image tokens detached (no task gradient into
        # the vision tower and projector); the contrastive loss, if any, still trains them.
        self.vision_from_tasks = True

    def set_weights(self, weights: Sequence[float], contrastive: float = 0.0) -> None:
        self.weights.copy_(torch.tensor([*weights, contrastive], dtype=torch.float32))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for path in self.eval_paths:
                self.model.get_submodule(path).eval()
        return self

    def autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(
        self,
        pixel_values,
        image_index,
        input_ids,
        attention_mask,
        decoder_input_ids,
        labels,
        task_index,
        text_ids=None,
        text_mask=None,
        text_group=None,
    ):
        """-> (loss, loss_sum (K+1,), tokens (K+1,)): K tasks, then the contrastive loss (its "tokens" = 1 when
        the batch had image-text pairs, else 0, so `combine` leaves it out)."""
        model = self.model
        valid = labels != IGNORE_INDEX  # (R, T)
        lengths = valid.sum(1)  # (R,)
        order = lengths.argsort(stable=True)
        groups = length_groups(lengths[order].tolist(), self.decode_groups)
        with self.autocast(pixel_values.device):
            no_grad = not torch.is_grad_enabled() or vision_frozen(model)
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                image_features = model.encode_image(pixel_values)  # (B, N, d)
            task_features = image_features if self.vision_from_tasks else image_features.detach()
            features = task_features.index_select(0, image_index)  # (R, N, d)
            row_groups = order.split(groups)
            logits = model.target_logits(features, input_ids, attention_mask, decoder_input_ids, valid, row_groups)
            # the same tokens in the same order as the logits: group by group, row-major
            targets = torch.cat([labels[rows][valid[rows]] for rows in row_groups])
            token_task = torch.cat([task_index[rows, None].expand_as(valid[rows])[valid[rows]] for rows in row_groups])
            contrastive = None
            if text_ids is not None and bool((text_group >= 0).any()):
                keep = text_group >= 0
                images = model.embed_image(image_features[keep])
                texts = model.embed_text(text_ids[keep], text_mask[keep])
                contrastive = unicl_loss(images.float(), texts.float(), model.contrastive.scale(), text_group[keep])
        ce = token_cross_entropy(logits.float(), targets, overwrite_logits=True)  # only this loss reads them
        K = self.weights.numel()  # tasks + 1: the contrastive loss is the last entry
        loss_sum = torch.zeros(K, dtype=ce.dtype, device=ce.device).index_add(0, token_task, ce)
        tokens = torch.zeros(K, dtype=ce.dtype, device=ce.device).index_add_(0, token_task, torch.ones_like(ce))
        if contrastive is not None:
            loss_sum = torch.cat([loss_sum[:-1], contrastive.reshape(1)])
            tokens[-1] = 1.0
        return combine(loss_sum, tokens, self.weights), loss_sum.detach(), tokens


def length_groups(sorted_lengths: list[int], max_groups: int, overhead: float = 0.1) -> list[int]:
    """Sizes of consecutive groups of length-sorted rows to decode separately.

    Each group pads to its own longest row. Tries 1..max_groups near-equal groups and takes the fewest whose padded
    token count is within `overhead` (per extra group) of the best: one more decoder call only when it saves work.
    """
    R = len(sorted_lengths)
    best = None
    for g in range(1, min(max_groups, R) + 1):
        sizes = [R // g + (i < R % g) for i in range(g)]
        ends = [sum(sizes[: i + 1]) for i in range(g)]
        padded = sum(n * sorted_lengths[e - 1] for n, e in zip(sizes, ends, strict=True))
        cost = padded * (1 + overhead * (g - 1))
        if best is None or cost < best[0]:
            best = (cost, sizes)
    return best[1]


def _call(module: nn.Module, batch: Batch):
    return module(
        batch.pixel_values,
        batch.image_index,
        batch.input_ids,
        batch.attention_mask,
        batch.decoder_input_ids,
        batch.labels,
        batch.task_index,
        batch.text_ids,
        batch.text_mask,
        batch.text_group,
    )


def param_checksum(model: nn.Module) -> str:
    """sha256 over every parameter's bytes: equal across DDP ranks, equal between a resumed and an unbroken run."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- building


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
        import fiore

        florence = fiore.load(starting_checkpoint(config), strategies="none")  # weights to train from
        tokenizer = florence.tokenizer
        model_config = florence.config.replace(**overrides)
        torch.manual_seed(config.train.seed)
        model = FlorenceModel(model_config)
        state = florence.model.state_dict()
        if model.contrastive is not None and florence.model.contrastive is None:
            # image-text heads asked of a checkpoint without them (an official one): they start fresh
            state.update({f"contrastive.{k}": v for k, v in model.contrastive.state_dict().items()})
        model.load_state_dict(state, strict=True)
        del florence
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
    from fiore.checkpoint import load_checkpoint
    from fiore.model import SHARED_KEY, TIED_KEYS

    _, state = load_checkpoint(path)
    state.update({k: state[SHARED_KEY] for k in TIED_KEYS})  # stored once; copy into the live (tied) parameters
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl (rank 0) plus a rich progress bar on a terminal, or plain lines every log_every steps."""

    def __init__(self, path: Path, total: int, start: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 - closed in close()
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def step(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def write(self, record: dict, echo: bool = False) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if echo and self.bar is None:
            print(json.dumps(record), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.file is not None:
            self.file.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume drop records past the checkpoint step: those steps run again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Held-out loss per task on fixed batches from the eval seed, plus the eval runner's metrics when asked."""

    def __init__(self, config: TrainConfig, dataset: MixtureDataset, names: list[str], samples: list, inference_model):
        self.config = config
        self.inference_model = inference_model  # () -> the model to generate with (LoRA: adapters merged)
        self._budgets: dict[str, int] = {}
        self.samples = samples  # dataset reads these, in order (the last batch wraps around)
        n = max(1, math.ceil(len(samples) / dataset.B))
        self.batches = [dataset[k] for k in range(n)]
        self.names = names

    @torch.no_grad()
    def loss(self, loss_module: MultiTaskLoss, device) -> dict:
        """Held-out loss per task, and the same with every image swapped for the next one of its batch: the gap
        (`image_reliance`, nats per token) is what the image is worth to the model; ~0 means it answers blind."""
        was_training = loss_module.training
        loss_module.eval()
        real = self._sums(loss_module, device, shuffle=False)
        swapped = self._sums(loss_module, device, shuffle=True)
        loss_module.train(was_training)
        names = [*self.names, "contrastive"]
        weights = loss_module.weights
        val, val_swapped = (float(combine(s, t, weights)) for s, t in (real, swapped))
        per_task = {n: float(s / t) for n, s, t in zip(names, *real, strict=True) if t > 0}
        reliance = {n: float(s / t) - per_task[n] for n, s, t in zip(names, *swapped, strict=True) if t > 0}
        return {
            "val_loss": val,
            "val_task_loss": per_task,
            "val_loss_swapped_images": val_swapped,
            "image_reliance": val_swapped - val,
            "task_image_reliance": {n: round(r, 4) for n, r in reliance.items()},
        }

    def _sums(self, loss_module: MultiTaskLoss, device, shuffle: bool):
        total_sum = total_tok = 0
        for b in self.batches:
            b = b.to(device)
            if shuffle:  # image i's rows (and text) now see image i-1: a derangement for batches of 2+ images
                b = dataclasses.replace(b, pixel_values=b.pixel_values.roll(1, 0))
            _, s, t = _call(loss_module, b)
            total_sum, total_tok = total_sum + s, total_tok + t
        return total_sum, total_tok

    def report(self, loss_module: MultiTaskLoss, model_config, tokenizer):
        """The eval runner's Report on the held-out samples; generation is capped at `max_target_tokens` (no target
        the model saw was longer)."""
        from fiore.eval.runner import evaluate
        from fiore.florence import Florence

        t = self.config.train
        tasks = self.config.eval_task_names()
        budgets = self.budgets(tasks, tokenizer)
        was_training = loss_module.training
        loss_module.eval()
        try:
            florence = Florence(self.inference_model(), model_config, tokenizer=tokenizer)
            progress = t.progress and sys.stderr.isatty()
            if not progress:
                print(f"evaluating {len(self.samples)} held-out images on {', '.join(tasks)}", file=sys.stderr)
            return evaluate(florence, self.samples, tasks, progress=progress, max_new_tokens=budgets)
        finally:
            loss_module.train(was_training)

    def budgets(self, tasks: list[str], tokenizer) -> dict[str, int]:
        missing = [name for name in tasks if name not in self._budgets]
        if missing:
            cap = self.config.train.max_target_tokens
            self._budgets.update(generation_budgets(self.samples, missing, tokenizer, cap))
        return {name: self._budgets[name] for name in tasks}


def generation_budgets(samples, tasks: list[str], tokenizer, cap: int, slack: int = 8) -> dict[str, int]:
    """Generation budget per task for evaluating on `samples`: the longest target in tokens plus `slack`, at most
    `cap`. An untrained model rarely stops by itself; each task's full budget (up to 1024 tokens) on every held-out
    image turned a 2-minute smoke run into a quarter of an hour."""
    import fiore.tasks

    out = {}
    for name in tasks:
        task = fiore.tasks.get(name)
        lengths = [len(tokenizer.encode(task.target(e, s.size))) for s in samples for e in task.examples(s)]
        out[name] = min(cap, max(lengths, default=0) + slack)
    return out


class ImageRelianceGuard:
    """Warns when the held-out loss barely changes with the images swapped, past warmup: a model answering from
    the text prior alone (the failure the first default model had, unseen in its loss curve)."""

    def __init__(self, after_step: int, threshold: float = 0.02):
        self.after_step = after_step
        self.threshold = threshold  # nats per token
        self.last: float | None = None
        self.warnings = 0

    def check(self, record: dict) -> None:
        """Reads `image_reliance` from a held-out loss record; adds `blind_warning` to it when it fires."""
        reliance = record.get("image_reliance")
        if reliance is None:
            return
        self.last = reliance
        if record["step"] > self.after_step and reliance < self.threshold:
            self.warnings += 1
            record["blind_warning"] = True
            message = (
                f"step {record['step']}: image reliance {reliance:.4f} nats/token (held-out loss with images "
                f"swapped minus the real one) is below {self.threshold}: the model is not using the image"
            )
            warnings.warn(message, stacklevel=2)
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        return "" if self.last is None else f" img {self.last:+.3f}"


def phase_at(ends: list[int], step: int) -> int:
    """Index of the phase that optimizer step `step` (0-based) belongs to."""
    return next((i for i, end in enumerate(ends) if step < end), len(ends) - 1)


# ---------------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: bool = False, callback: Callable[[int, nn.Module], None] | None = None) -> Path:
    """Train as `config` says; returns OUT/final (a loadable fiore checkpoint).

    resume: continue from OUT/checkpoints/latest (model, optimizer, schedule, RNG, data position).
    callback(step, model): called after every optimizer step (and its checkpoint, if one falls there); an exception
    raised there stops the run as a crash would (the resume tests use this).
    """
    _preflight(config)
    memory.keep_freed_memory()  # activations on CPU: see fiore.train.memory (harmless on GPU)
    threads = torch.get_num_threads()
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    try:
        return _train(config, resume, callback)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, resume: bool, callback) -> Path:
    world = ddp.setup()
    out_dir = Path(config.train.out_dir)
    ckpt_root = out_dir / "checkpoints"
    if not resume and checkpointing.latest(ckpt_root) is not None:
        ddp.cleanup(world)
        raise FileExistsError(f"{out_dir} already holds checkpoints: pass --resume or choose another out_dir")
    # The data first: a bad dataset stops the run here, before any model is built or step taken.
    data = build_data(config, lambda samples: _replay(config, samples, out_dir, world))
    if config.optim.epochs > 0:
        config = config.replace({"optim.steps": data.stream.steps_for(config.optim.epochs, config.optim.batch_size)})
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        print(data.describe() + f"; {config.optim.steps} steps", file=sys.stderr, flush=True)
    ddp.barrier(world)

    o, t = config.optim, config.train
    micro_images = o.batch_size // (o.grad_accum * world.world_size)
    if micro_images * o.grad_accum * world.world_size != o.batch_size:
        raise ValueError(
            f"batch_size {o.batch_size} is not divisible by grad_accum {o.grad_accum} x {world.world_size} processes"
        )

    model, model_config, tokenizer = build_model(config, out_dir, world, data.stream)
    adapters = lora.add_adapters(model, config.lora) if config.lora.r else None
    freeze(model, t.freeze)
    if t.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    optimizer = make_optimizer(model, config)
    schedule = Schedule(o.lr, o.warmup_steps, o.steps, o.min_lr_ratio)

    start = 0
    state = None
    if resume:
        step_dir = checkpointing.latest(ckpt_root)
        if step_dir is None:
            warnings.warn(f"--resume: no checkpoint under {ckpt_root}; starting from step 0", stacklevel=2)
        else:
            if adapters is None:
                load_weights(model, step_dir)
            else:  # the base weights are the starting checkpoint's; the adapters hold everything trained
                lora.load_adapters(adapters, step_dir)
            state = checkpointing.load_state(step_dir)
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["step"])
    # Dropout streams differ per rank; on resume the saved streams are restored below.
    torch.manual_seed(t.seed + 1 + world.rank)
    if state is not None:
        rngs = state["rng"]
        if len(rngs) == world.world_size:
            checkpointing.set_rng_state(rngs[world.rank])
        else:
            warnings.warn("resuming with a different number of processes: RNG streams are reseeded", stacklevel=2)
    if world.is_main:
        _truncate_metrics(out_dir / "metrics.jsonl", start)

    from fiore.processor import Processor

    processor = Processor(tokenizer, model_config.image_size)
    plan, ends = config.plan(), config.phase_ends()
    names = config.task_names()  # every task of any phase, in order
    # replayed tasks the user does not train: learnt from the start model's answers only
    own = set(config.tasks) | {n for phase in config.phases for n in phase.tasks}
    replay_only = [n for n in config.data.replay.tasks if n not in own] if config.data.replay.weight > 0 else []

    def mixture_of(weights: dict[str, float]) -> Mixture:
        return Mixture(
            {n: weights.get(n, 0.0) for n in names},
            tokenizer,
            tasks_per_image=t.tasks_per_image,
            max_target_tokens=t.max_target_tokens,
            max_prompt_tokens=t.max_prompt_tokens,
            decoder_start_id=model_config.text.decoder_start_token_id,
            pairs_only=replay_only,
        )

    mixtures = [mixture_of(phase.tasks) for phase in plan]
    contrastive = any(phase.contrastive > 0 for phase in plan)
    texts = None
    if contrastive:
        if model.contrastive is None:
            raise ValueError("the contrastive loss needs image-text heads: set [model] contrastive_dim (e.g. 256)")
        texts = ContrastiveTexts(
            config.contrastive.texts, model_config.contrastive_template, tokenizer, t.max_prompt_tokens
        )
    phase_data = [
        PhaseData(
            end * o.grad_accum,
            mix,
            phase.contrastive > 0,
            ContrastiveTexts(phase.texts, model_config.contrastive_template, tokenizer, t.max_prompt_tokens)
            if phase.contrastive > 0
            else None,
        )
        for end, mix, phase in zip(ends, mixtures, plan, strict=True)
    ]
    dataset = MixtureDataset(
        phase_data, data.stream, processor.pixel_values, config.data.seed, micro_images, world.rank,
        world.world_size, texts, config.data.augment,
    )  # fmt: skip
    phase = phase_at(ends, start)
    loss_module = MultiTaskLoss(
        model, mixtures[phase].weights, t.precision, t.decode_groups, t.freeze, plan[phase].contrastive
    ).to(world.device)
    loss_module.vision_from_tasks = plan[phase].vision_from_tasks
    step_module = loss_module
    if world.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            # heads that some phases leave out get no gradient there
            find_unused_parameters=model.contrastive is not None,
        )
    evaluator = None
    if world.is_main and (t.eval_every >= 0 or t.val_every > 0):
        # Held-out batches draw from every task of every phase (and the image-text pairs, if any phase uses them).
        union = mixture_of({n: max(phase.tasks.get(n, 0.0) for phase in plan) for n in names})
        eval_set = MixtureDataset(
            union, Cycle(data.val), processor.pixel_values, config.data.eval_seed, micro_images, texts=texts
        )

        def inference_model() -> nn.Module:
            return model if adapters is None else lora.merged(adapters).eval()

        evaluator = Evaluator(config, eval_set, names, data.val, inference_model)
    epoch_ends = set()
    if o.epochs > 0 and t.eval_every == 0:  # evaluate at every epoch end
        epoch_ends = {math.ceil(e * data.stream.epoch_length / o.batch_size) for e in range(1, math.ceil(o.epochs) + 1)}
    best = Best(out_dir, t.best_metric, start)

    def save(directory: Path, step_checkpoint: bool = False) -> None:
        export(model if adapters is None else lora.merged(adapters), model_config, tokenizer, directory)
        if adapters is not None and step_checkpoint:
            lora.save_adapters(adapters, directory)

    guard = ImageRelianceGuard(after_step=o.warmup_steps)

    trainable = [p for p in model.parameters() if p.requires_grad]
    logger = Logger(out_dir / "metrics.jsonl", o.steps, start, world.is_main, t.progress)
    if start == 0:
        logger.write({"step": 0, "data": data.describe(), "skipped": data.skipped, "steps": o.steps})
    batches = loader(dataset, start * o.grad_accum, config.data.num_workers)
    loss_module.train()
    columns = [*names, "contrastive"]  # the loss module's entries: tasks, then the contrastive loss
    window = {"t0": time.perf_counter(), "images": 0, "rows": 0, "sum": 0.0, "tok": 0.0}
    try:
        for step in range(start, o.steps):
            if phase_at(ends, step) != phase:
                phase = phase_at(ends, step)
                loss_module.set_weights(mixtures[phase].weights, plan[phase].contrastive)
                loss_module.vision_from_tasks = plan[phase].vision_from_tasks
                logger.write({"step": step, "phase": plan[phase].name}, echo=True)
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss_sum = torch.zeros(len(columns))
            tokens = torch.zeros(len(columns))
            rows = 0
            for micro in range(o.grad_accum):
                batch = next(batches).to(world.device)
                sync = micro == o.grad_accum - 1 or not world.distributed
                with contextlib.nullcontext() if sync else step_module.no_sync():
                    loss, s, n = _call(step_module, batch)
                    (loss / o.grad_accum).backward()
                loss_sum += s.cpu()
                tokens += n.cpu()
                rows += batch.num_rows
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, o.clip) if o.clip > 0 else torch.zeros(())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            stats = ddp.all_reduce_sum(world, torch.cat([loss_sum, tokens, torch.tensor([float(rows)])]))
            K = len(columns)
            window["sum"] = window["sum"] + stats[:K]
            window["tok"] = window["tok"] + stats[K : 2 * K]
            window["images"] += o.batch_size
            window["rows"] += int(stats[-1])
            train_loss = float(combine(stats[:K], stats[K : 2 * K], loss_module.weights))
            logger.step(done, f"loss {train_loss:.3f} lr {lr:.2e} {plan[phase].name}{guard.summary()}")

            if done % t.log_every == 0 or done == o.steps:
                dt = time.perf_counter() - window["t0"]
                per_task = {
                    n: round(float(s / k), 4)
                    for n, s, k in zip(columns, window["sum"], window["tok"], strict=True)
                    if k
                }
                logger.write(
                    {
                        "step": done,
                        "loss": round(float(combine(window["sum"], window["tok"], loss_module.weights)), 4),
                        "task_loss": per_task,
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "images_per_s": round(window["images"] / dt, 2),
                        "rows_per_s": round(window["rows"] / dt, 2),
                        "time": time.time(),
                    },
                    echo=True,
                )
                window = {"t0": time.perf_counter(), "images": 0, "rows": 0, "sum": 0.0, "tok": 0.0}

            if evaluator is not None and done != o.steps:
                if (t.eval_every > 0 and done % t.eval_every == 0) or done in epoch_ends:
                    record = _evaluate(evaluator, loss_module, model_config, tokenizer, logger, done, guard, False)
                    best.update(record, save)
                elif t.val_every > 0 and done % t.val_every == 0:
                    with torch.random.fork_rng(devices=[]):
                        record = {"step": done, **evaluator.loss(loss_module, world.device)}
                    guard.check(record)
                    logger.write(record, echo=True)
                    if t.best_metric == "val_loss":
                        best.update(record, save)

            if done % t.checkpoint_every == 0 or done == o.steps:
                _checkpoint(ckpt_root, done, save, optimizer, world, t.keep_checkpoints)
            if callback is not None:
                callback(done, model)
        checksums = ddp.gather_objects(world, param_checksum(model))
        final = out_dir / "final"
        if world.is_main:
            logger.write({"step": o.steps, "param_sha256": checksums})  # one per rank: DDP keeps them equal
            tmp = out_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
        ddp.barrier(world)  # the other ranks are done; rank 0 evaluates alone
        if evaluator is not None:
            if t.eval_every >= 0:
                record = _evaluate(evaluator, loss_module, model_config, tokenizer, logger, o.steps, guard, True)
            else:
                with torch.random.fork_rng(devices=[]):
                    record = {"step": o.steps, **evaluator.loss(loss_module, world.device)}
                guard.check(record)
                logger.write(record, echo=True)
            best.update(record, save)
        return final
    finally:
        logger.close()
        ddp.cleanup(world)


def _evaluate(evaluator, loss_module, model_config, tokenizer, logger, step, guard, full: bool) -> dict:
    with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG streams
        record = {"step": step, **evaluator.loss(loss_module, next(loss_module.parameters()).device)}
        report = evaluator.report(loss_module, model_config, tokenizer)
    guard.check(record)
    record["eval"] = {k: (None if v != v else round(v, 4)) for k, v in report.headline().items()}  # NaN -> null
    logger.write(record, echo=True)
    if full:
        report.save(Path(evaluator.config.train.out_dir) / "eval" / "report.json")
    return record


def _checkpoint(ckpt_root, step, save, optimizer, world, keep) -> None:
    rngs = ddp.gather_objects(world, checkpointing.rng_state())
    if world.is_main:
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rngs}
        checkpointing.save(ckpt_root, step, lambda d: save(d, step_checkpoint=True), state, keep=keep)
    ddp.barrier(world)


def _replay(config: TrainConfig, samples: list, out_dir: Path, world: ddp.World) -> list:
    """The replay source's samples: the starting checkpoint's answers on the training images (made by rank 0 once,
    cached under OUT/replay; every rank reads the cache)."""
    import fiore

    r = config.data.replay
    path = replay_cache(config.model.checkpoint, samples, r.tasks, out_dir / "replay")
    if world.is_main and not path.is_file():
        florence = fiore.load(starting_checkpoint(config), device=str(world.device))
        make_replay(florence, samples, r.tasks, path, r.batch_size)
        del florence
    ddp.barrier(world)
    return read_replay(path, samples)


def _preflight(config: TrainConfig) -> None:
    """What the config asks for that is missing, found before any process group, data or model work."""
    if config.lora.r:
        lora.require_peft()
    _check_best_metric(config)
    if config.train.eval_every >= 0:  # the metrics' own dependencies, not at the first evaluation
        from fiore.eval.scorers import required_modules
        from fiore.extras import require

        tasks = [registry.get(name) for name in config.eval_task_names()]
        require(required_modules(tasks), "evaluation during training ([train] eval_tasks)")


def _check_best_metric(config: TrainConfig) -> None:
    """[train] best_metric must be something the evaluations measure: found out now, not after the first epoch."""
    metric, t = config.train.best_metric, config.train
    if not metric or metric.startswith("val_loss"):
        return
    tasks = [registry.get(name) for name in config.eval_task_names()]
    known = [f"{task.name}/{key}" for task in tasks if task.scorer is not None for key in task.scorer.headline]
    if metric not in known:
        raise ValueError(f"[train] best_metric {metric!r} is not measured; choose val_loss or one of {known}")
    if t.eval_every < 0:
        raise ValueError(f"[train] best_metric {metric!r} needs evaluations: eval_every must be >= 0")


class Best:
    """OUT/best: the model at the evaluation with the best `metric` so far ("val_loss" or an eval headline like
    "od/map50"; names with "loss" are minimised, the rest maximised). OUT/best.json says which step and value."""

    def __init__(self, out_dir: Path, metric: str, start: int):
        self.dir, self.metric = out_dir / "best", metric
        self.minimise = "loss" in metric
        self.value = None
        info = out_dir / "best.json"
        if metric and start > 0 and info.is_file():  # resuming: the best so far, if it came before the checkpoint
            record = json.loads(info.read_text())
            if record["step"] <= start and record["metric"] == metric:
                self.value = record["value"]

    def update(self, record: dict, save) -> None:
        if not self.metric:
            return
        value = record.get(self.metric, record.get("eval", {}).get(self.metric))
        if value is None:
            known = [k for k in record if k.startswith("val_loss")] + list(record.get("eval", {}))
            raise ValueError(f"[train] best_metric {self.metric!r} is not measured; measured: {known}")
        if self.value is not None and (value >= self.value if self.minimise else value <= self.value):
            return
        self.value = value
        tmp = self.dir.with_name(".best.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        shutil.rmtree(self.dir, ignore_errors=True)
        tmp.replace(self.dir)
        info = {"step": record["step"], "metric": self.metric, "value": value}
        (self.dir.parent / "best.json").write_text(json.dumps(info) + "\n")
