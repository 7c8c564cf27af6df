"""The one training loop for every task: `train(config)`.

AdamW (no decay on biases / norms), linear warmup + cosine, global-norm clipping, accumulation, optional bf16
autocast and gradient checkpointing, frozen parts excluded from the optimizer, DDP under torchrun. The pieces live
by concern: what a run starts from (`fiore.train.build`), named parts to freeze (`.parts`), the optimizer and
schedule (`.optim`), the forward and loss (`.loss`), evaluation during training (`.evaluation`), the metrics log
(`.logger`), the data (`.data`, `.mixture`), checkpoints (`.checkpointing`), DDP (`.ddp`) and LoRA (`.lora`).
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from fiore import tasks as registry
from fiore.train import checkpointing, ddp, lora, memory
from fiore.train.build import build_model, export, load_weights, starting_checkpoint
from fiore.train.config import TrainConfig
from fiore.train.data import Cycle, build_data, make_replay, read_replay, replay_cache
from fiore.train.evaluation import Best, Evaluator, ImageRelianceGuard, check_best_metric, evaluate_and_log
from fiore.train.logger import Logger, truncate_metrics
from fiore.train.loss import MultiTaskLoss, forward_batch
from fiore.train.mixture import ContrastiveTexts, Mixture, MixtureDataset, PhaseData, combine, loader
from fiore.train.optim import Schedule, make_optimizer
from fiore.train.parts import freeze


def param_checksum(model: nn.Module) -> str:
    """sha256 over every parameter's bytes: equal across DDP ranks, equal between a resumed and an unbroken run."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        truncate_metrics(out_dir / "metrics.jsonl", start)

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
                    loss, s, n = forward_batch(step_module, batch)
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
                    record = evaluate_and_log(
                        evaluator, loss_module, model_config, tokenizer, logger, done, guard, False
                    )
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
                record = evaluate_and_log(evaluator, loss_module, model_config, tokenizer, logger, o.steps, guard, True)
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
    check_best_metric(config)
    if config.train.eval_every >= 0:  # the metrics' own dependencies, not at the first evaluation
        from fiore.eval.scorers import required_modules
        from fiore.extras import require

        tasks = [registry.get(name) for name in config.eval_task_names()]
        require(required_modules(tasks), "evaluation during training ([train] eval_tasks)")
