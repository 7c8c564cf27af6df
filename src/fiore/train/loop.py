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

from fiore.train import checkpointing, ddp, memory
from fiore.train.config import TrainConfig
from fiore.train.mixture import IGNORE_INDEX, Batch, Mixture, MixtureDataset, combine, loader, token_cross_entropy

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
    """AdamW over trainable parameters only (frozen ones hold no state); no decay on 1-D params (norms, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated: a tied weight is one parameter
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("every parameter is frozen: nothing to train")
    o = config.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


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
    ):
        super().__init__()
        self.model = model
        # Wholly frozen parts stay in eval mode while training (no dropout / drop-path): fixed feature extractors.
        self.eval_paths = [path for part in frozen_parts for path in PART_MODULES.get(part, [])]
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.precision = precision
        self.decode_groups = decode_groups

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

    def forward(self, pixel_values, image_index, input_ids, attention_mask, decoder_input_ids, labels, task_index):
        model = self.model
        valid = labels != IGNORE_INDEX  # (R, T)
        lengths = valid.sum(1)  # (R,)
        order = lengths.argsort(stable=True)
        groups = length_groups(lengths[order].tolist(), self.decode_groups)
        with self.autocast(pixel_values.device):
            head = model.head_weight()  # before any token is embedded: see FlorenceModel.head_weight
            no_grad = not torch.is_grad_enabled() or vision_frozen(model)
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                features = model.encode_image(pixel_values)  # (B, N, d)
            features = features.index_select(0, image_index)  # (R, N, d)
            hidden, mask = model.encode(features, input_ids, attention_mask)  # (R, N+Tp, d)
            states, targets, token_task = [], [], []
            for rows in order.split(groups):
                T = int(lengths[rows].max())
                h = model.decode(decoder_input_ids[rows, :T], hidden[rows], mask[rows])  # (r, T, d)
                keep = valid[rows, :T]
                states.append(h[keep])
                targets.append(labels[rows, :T][keep])
                token_task.append(task_index[rows].unsqueeze(1).expand(-1, T)[keep])
            # (n_tokens, V) float32; a view, no copy
            logits = model.logits(torch.cat(states).unsqueeze(1), head).squeeze(1)
        targets, token_task = torch.cat(targets), torch.cat(token_task)
        ce = token_cross_entropy(logits.float(), targets, overwrite_logits=True)  # only this loss reads them
        K = self.weights.numel()
        loss_sum = torch.zeros(K, dtype=ce.dtype, device=ce.device).index_add(0, token_task, ce)
        tokens = torch.zeros(K, dtype=ce.dtype, device=ce.device).index_add_(0, token_task, torch.ones_like(ce))
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
    )


def param_checksum(model: nn.Module) -> str:
    """sha256 over every parameter's bytes: equal across DDP ranks, equal between a resumed and an unbroken run."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- building


def build_tokenizer(config: TrainConfig, out_dir: Path, world: ddp.World, mixture_tasks: list[str]):
    """From a preset: train a byte-level BPE on prompts + targets of `tokenizer.samples` synthetic samples (every
    task, so later fine-tunes find their tokens), save it to OUT/tokenizer. Rank 0 trains; the others load."""
    from fiore.tokenizer import Tokenizer

    tok_dir = out_dir / "tokenizer"
    if world.is_main and not tok_dir.exists():
        import fiore.tasks
        from fiore.data.synthetic import make_sample

        mixture = Mixture({t.name: 1.0 for t in fiore.tasks.all()}, tokenizer=None)
        texts = []
        for i in range(config.tokenizer.samples):
            texts.extend(mixture.texts(make_sample(config.data.seed, i)))
        tok = Tokenizer.train(texts, config.tokenizer.vocab_size)
        tmp = out_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        tmp.replace(tok_dir)
    ddp.barrier(world)
    return Tokenizer.from_dir(tok_dir)


def build_model(config: TrainConfig, out_dir: Path, world: ddp.World):
    """-> (model, model_config, tokenizer). Preset: fresh weights (seeded) + a tokenizer trained here.
    Checkpoint: its config (with [model] overrides) and weights, loaded strictly, and its tokenizer."""
    from fiore.model import FlorenceModel

    m = config.model
    overrides = {"text": dict(m.text), "vision": dict(m.vision)}
    if m.image_size is not None:
        overrides["image_size"] = tuple(m.image_size)
    if m.checkpoint is not None:
        import fiore

        florence = fiore.load(m.checkpoint)
        tokenizer = florence.tokenizer
        model_config = florence.config.replace(**overrides)
        torch.manual_seed(config.train.seed)
        model = FlorenceModel(model_config)
        model.load_state_dict(florence.model.state_dict(), strict=True)
        del florence
    else:
        from fiore.config import preset

        tokenizer = build_tokenizer(config, out_dir, world, list(config.tasks))
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

    def __init__(self, config: TrainConfig, dataset: MixtureDataset, names: list[str]):
        self.config = config
        n = max(1, math.ceil(config.train.eval_samples / dataset.B))
        self.batches = [dataset[k] for k in range(n)]
        self.names = names

    @torch.no_grad()
    def loss(self, loss_module: MultiTaskLoss, device) -> dict:
        was_training = loss_module.training
        loss_module.eval()
        total_sum = total_tok = 0
        for b in self.batches:
            _, s, t = _call(loss_module, b.to(device))
            total_sum, total_tok = total_sum + s, total_tok + t
        loss_module.train(was_training)
        per_task = {n: float(s / t) for n, s, t in zip(self.names, total_sum, total_tok, strict=True) if t > 0}
        weights = loss_module.weights
        return {"val_loss": float(combine(total_sum, total_tok, weights)), "val_task_loss": per_task}

    def report(self, loss_module: MultiTaskLoss, model_config, tokenizer):
        """The eval runner's Report on `eval_samples` held-out synthetic samples; generation is capped at
        `max_target_tokens` (no target the model saw was longer)."""
        from fiore.data.synthetic import make_sample
        from fiore.eval.runner import evaluate
        from fiore.florence import Florence

        t = self.config.train
        samples = [make_sample(self.config.data.eval_seed, i) for i in range(t.eval_samples)]
        was_training = loss_module.training
        loss_module.eval()
        try:
            florence = Florence(loss_module.model, model_config, tokenizer=tokenizer)
            return evaluate(
                florence, samples, t.eval_tasks or self.names, progress=False, max_new_tokens=t.max_target_tokens
            )
        finally:
            loss_module.train(was_training)


# ---------------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: bool = False, callback: Callable[[int, nn.Module], None] | None = None) -> Path:
    """Train as `config` says; returns OUT/final (a loadable fiore checkpoint).

    resume: continue from OUT/checkpoints/latest (model, optimizer, schedule, RNG, data position).
    callback(step, model): called after every optimizer step (and its checkpoint, if one falls there); an exception
    raised there stops the run as a crash would (the resume tests use this).
    """
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
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    ddp.barrier(world)

    o, t = config.optim, config.train
    micro_images = o.batch_size // (o.grad_accum * world.world_size)
    if micro_images * o.grad_accum * world.world_size != o.batch_size:
        raise ValueError(
            f"batch_size {o.batch_size} is not divisible by grad_accum {o.grad_accum} x {world.world_size} processes"
        )

    model, model_config, tokenizer = build_model(config, out_dir, world)
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
            load_weights(model, step_dir)
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

    from fiore.data.synthetic import make_sample
    from fiore.processor import Processor

    processor = Processor(tokenizer, model_config.image_size)
    mixture = Mixture(
        config.tasks,
        tokenizer,
        tasks_per_image=t.tasks_per_image,
        max_target_tokens=t.max_target_tokens,
        max_prompt_tokens=t.max_prompt_tokens,
        decoder_start_id=model_config.text.decoder_start_token_id,
    )
    dataset = MixtureDataset(
        mixture, make_sample, processor.pixel_values, config.data.seed, micro_images, world.rank, world.world_size
    )
    loss_module = MultiTaskLoss(model, mixture.weights, t.precision, t.decode_groups, t.freeze).to(world.device)
    step_module = loss_module
    if world.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[world.device.index] if world.device.type == "cuda" else None
        )
    evaluator = None
    if world.is_main and (t.eval_every >= 0 or t.val_every > 0):
        eval_set = MixtureDataset(mixture, make_sample, processor.pixel_values, config.data.eval_seed, micro_images)
        evaluator = Evaluator(config, eval_set, mixture.names)

    trainable = [p for p in model.parameters() if p.requires_grad]
    logger = Logger(out_dir / "metrics.jsonl", o.steps, start, world.is_main, t.progress)
    batches = loader(dataset, start * o.grad_accum, config.data.num_workers)
    loss_module.train()
    names = mixture.names
    window = {"t0": time.perf_counter(), "images": 0, "rows": 0, "sum": 0.0, "tok": 0.0}
    try:
        for step in range(start, o.steps):
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros(len(names))
            tokens = torch.zeros(len(names))
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
            window["sum"] = window["sum"] + stats[: len(names)]
            window["tok"] = window["tok"] + stats[len(names) : 2 * len(names)]
            window["images"] += o.batch_size
            window["rows"] += int(stats[-1])
            train_loss = float(combine(stats[: len(names)], stats[len(names) : 2 * len(names)], loss_module.weights))
            logger.step(done, f"loss {train_loss:.3f} lr {lr:.2e}")

            if done % t.log_every == 0 or done == o.steps:
                dt = time.perf_counter() - window["t0"]
                per_task = {
                    n: round(float(s / k), 4) for n, s, k in zip(names, window["sum"], window["tok"], strict=True) if k
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
                if t.eval_every > 0 and done % t.eval_every == 0:
                    _evaluate(evaluator, loss_module, model_config, tokenizer, world, logger, done, full=False)
                elif t.val_every > 0 and done % t.val_every == 0:
                    with torch.random.fork_rng(devices=[]):
                        logger.write({"step": done, **evaluator.loss(loss_module, world.device)}, echo=True)

            if done % t.checkpoint_every == 0 or done == o.steps:
                _checkpoint(ckpt_root, done, model, model_config, tokenizer, optimizer, world, t.keep_checkpoints)
            if callback is not None:
                callback(done, model)
        checksums = ddp.gather_objects(world, param_checksum(model))
        final = out_dir / "final"
        if world.is_main:
            logger.write({"step": o.steps, "param_sha256": checksums})  # one per rank: DDP keeps them equal
            tmp = out_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            export(model, model_config, tokenizer, tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
        ddp.barrier(world)  # the other ranks are done; rank 0 evaluates alone
        if evaluator is not None:
            if t.eval_every >= 0:
                _evaluate(evaluator, loss_module, model_config, tokenizer, world, logger, o.steps, full=True)
            else:
                with torch.random.fork_rng(devices=[]):
                    logger.write({"step": o.steps, **evaluator.loss(loss_module, world.device)}, echo=True)
        return final
    finally:
        logger.close()
        ddp.cleanup(world)


def _evaluate(evaluator, loss_module, model_config, tokenizer, world, logger, step, full: bool) -> None:
    with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG streams
        record = {"step": step, **evaluator.loss(loss_module, world.device)}
        report = evaluator.report(loss_module, model_config, tokenizer)
    record["eval"] = {k: (None if v != v else round(v, 4)) for k, v in report.headline().items()}  # NaN -> null
    logger.write(record, echo=True)
    if full:
        report.save(Path(evaluator.config.train.out_dir) / "eval" / "report.json")


def _checkpoint(ckpt_root, step, model, model_config, tokenizer, optimizer, world, keep) -> None:
    rngs = ddp.gather_objects(world, checkpointing.rng_state())
    if world.is_main:
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rngs}
        checkpointing.save(ckpt_root, step, lambda d: export(model, model_config, tokenizer, d), state, keep=keep)
    ddp.barrier(world)
