"""Evaluation during training: held-out loss per task and with the images swapped (`Evaluator`), the eval
runner's metrics on held-out samples, the guard against a model that answers blind, and OUT/best."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import torch

from fiore import tasks as registry
from fiore.train.config import TrainConfig
from fiore.train.loss import MultiTaskLoss, forward_batch
from fiore.train.mixture import MixtureDataset, combine


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
            _, s, t = forward_batch(loss_module, b)
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


def evaluate_and_log(evaluator, loss_module, model_config, tokenizer, logger, step, guard, full: bool) -> dict:
    """Held-out loss and the eval runner's metrics at `step`, checked by the guard and logged; `full` (the end of
    the run) also saves the eval report under OUT/eval."""
    with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG streams
        record = {"step": step, **evaluator.loss(loss_module, next(loss_module.parameters()).device)}
        report = evaluator.report(loss_module, model_config, tokenizer)
    guard.check(record)
    record["eval"] = {k: (None if v != v else round(v, 4)) for k, v in report.headline().items()}  # NaN -> null
    logger.write(record, echo=True)
    if full:
        report.save(Path(evaluator.config.train.out_dir) / "eval" / "report.json")
    return record


def check_best_metric(config: TrainConfig) -> None:
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
