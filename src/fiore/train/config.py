"""Training configuration: a TOML file -> `TrainConfig` (plain dataclasses, validated, unknown keys rejected).

Layout (see docs/training.md for every field):

    [model]      preset = "tiny" | checkpoint = "PATH";  [model.text] / [model.vision] / image_size overrides
    [tokenizer]  vocab_size, samples          (from-preset runs train a byte-level BPE on the data's text first)
    [data]       seed, eval_seed, num_workers, val_fraction, on_bad, check_images, augment
    [[data.train]] / [[data.val]]  path, kind, weight, seed, limit   (default: the synthetic world)
    [data.replay] tasks, weight   (the starting checkpoint's own answers on the training images, against forgetting)
    [lora]       r, alpha, dropout, targets, scope   (peft LoRA adapters, merged into the saved checkpoints)
    [tasks]      task name = weight lambda_t  (loss = sum_t lambda_t L_t, see `fiore.train.mixture`)
    [contrastive] weight, texts              (image-text InfoNCE beside the tasks: `fiore.model.contrastive`)
    [[phases]]   name, end, tasks, contrastive  (optional: training in phases, each with its own weights)
    [optim]      lr, weight_decay, betas, warmup_steps, steps | epochs, min_lr_ratio, batch_size, grad_accum, clip
    [train]      out_dir, seed, tasks_per_image, max_target_tokens, checkpoint_every, keep_checkpoints,
                 eval_every, eval_samples, best_metric, log_every, freeze, precision, gradient_checkpointing
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fiore.data.sources import KINDS, SourceSpec


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the offending key."""


@dataclass
class ModelSection:
    preset: str | None = None  # "tiny" | "base" | "large": fresh weights (the default: tiny, when no checkpoint)
    checkpoint: str | None = None  # fine-tune a checkpoint dir (fiore or official, either key format); "default" =
    # the shipped model
    text: dict[str, Any] = field(default_factory=dict)  # TextConfig field overrides
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig field overrides
    image_size: tuple[int, int] | None = None  # (height, width) override
    contrastive_dim: int | None = None  # image-text heads of this size (0 = none); default: the preset's/checkpoint's
    contrastive_template: str | None = None  # how a class name becomes a text, e.g. "a photo of a {}."


@dataclass
class TokenizerSection:
    vocab_size: int = 3000  # incl. the 1000 <loc_k> tokens and the Florence special tokens
    samples: int = 2000  # synthetic samples whose prompts + targets train the BPE


@dataclass
class ReplaySection:
    """Replay against forgetting: before training, the starting checkpoint answers `tasks` (input-free ones, e.g.
    caption and od) on every training image, once (cached in OUT/replay); those answers join the stream as a
    source with `weight`, so the fine-tune keeps rehearsing what the model already did."""

    tasks: list[str] = field(default_factory=list)
    weight: float = 0.0  # share of the training stream; 0 = off
    batch_size: int = 8  # images per generation batch while labelling


@dataclass
class DataSection:
    # Sources (fiore.data.sources): none given = the synthetic world, seed `seed` for training and `eval_seed`
    # for validation. With dataset sources and no [[data.val]], `val_fraction` of each is held out.
    train: list[SourceSpec] = field(default_factory=list)
    val: list[SourceSpec] = field(default_factory=list)
    seed: int = 0  # synthetic training stream (sample i = make_sample(seed, i)), and the shuffling of datasets
    eval_seed: int = 1  # synthetic held-out stream, never seen in training
    val_fraction: float = 0.1
    on_bad: str = "error"  # bad examples (fiore.data.check): "error" stops before the first step; "skip" drops them
    check_images: bool = True  # decode every image before training (finds corrupt files; costs one read of each)
    augment: list[str] = field(default_factory=list)  # fiore.data.augment names, e.g. ["color", "crop"]
    num_workers: int = 0  # DataLoader worker processes reading images and building batches (0 = main process)
    replay: ReplaySection = field(default_factory=ReplaySection)


@dataclass
class LoraSection:
    """LoRA adapters (peft) on the linear layers named `targets` under the module path `scope`; everything else is
    frozen. Saved checkpoints have the adapters merged: a plain Florence-2 checkpoint."""

    r: int = 0  # rank; 0 = no LoRA
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    scope: str = "model.language_model"  # "model" = the vision tower too (its qkv, proj, fc1, fc2)

    def target_regex(self) -> str:
        """peft's `target_modules` as a regex (full match on module names)."""
        import re

        names = "|".join(re.escape(t) for t in self.targets)
        return rf"{re.escape(self.scope)}(\..+)?\.({names})"


@dataclass
class ContrastiveSection:
    weight: float = 0.0  # lambda of the image-text loss when no [[phases]] are given; needs model.contrastive_dim
    # Which text of a sample pairs with its image, drawn uniformly among those it has: "label" (the class name in
    # the model's contrastive_template), "object" (the category name of one of its objects, e.g. "star"), or a caption
    # key ("caption", "detailed_caption", "more_detailed_caption").
    texts: list[str] = field(default_factory=lambda: ["label", "caption"])


@dataclass
class Phase:
    """One stage of training: from the previous phase's end to `end` (a fraction of optim.steps), with its own
    task weights (default: [tasks]) and contrastive weight. The schedule (warmup, cosine) spans all phases."""

    name: str
    end: float
    tasks: dict[str, float] = field(default_factory=dict)
    contrastive: float = 0.0
    # False: the task losses see the image tokens detached, so only the contrastive loss trains the vision tower
    # and projector in this phase (a tower trained from scratch otherwise collapses to image-independent output
    # while the text model learns the text prior: docs/training.md, "Image reliance").
    vision_from_tasks: bool = True
    texts: list[str] | None = None  # the contrastive texts of this phase (default: [contrastive] texts)


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 100
    steps: int = 1000  # optimizer steps; the cosine ends here
    epochs: float = 0.0  # > 0: train this many passes over the dataset sources instead (steps is then derived)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    batch_size: int = 16  # images per optimizer step, over all processes and accumulation micro-steps
    grad_accum: int = 1
    clip: float = 1.0  # max global grad norm; 0 = no clipping
    # Learning-rate multipliers per part (names of [train] freeze's parts or parameter prefixes), e.g.
    # {vision_tower = 0.5}; the first matching entry applies, everything else trains at lr.
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainSection:
    out_dir: str = "runs/train"
    seed: int = 0  # model init, dropout
    tasks_per_image: int = 4  # K rows (task examples) per encoded image, sharing its vision encoding
    max_target_tokens: int = 256  # longer targets are truncated (no </s> then)
    max_prompt_tokens: int = 64
    decode_groups: int = 4  # rows are decoded in this many length-sorted groups (less padding)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # older step_N dirs are deleted
    # eval runner (generation, metrics) + held-out loss: every N steps; 0 = at the end (and at every epoch end when
    # training by epochs); < 0 = never
    eval_every: int = 0
    val_every: int = 0  # held-out loss alone (cheap, teacher-forced) every N steps; 0 = never
    eval_samples: int = 32  # held-out images for the eval runner and the held-out loss; 0 = the whole validation set
    # Keep OUT/best: the checkpoint with the best value of this metric at an evaluation ("val_loss", or an eval
    # runner headline such as "od/map50"; losses are minimised, everything else maximised). "" = keep none.
    best_metric: str = ""
    eval_tasks: list[str] | None = None  # default: every training task
    log_every: int = 10
    freeze: list[str] = field(default_factory=list)  # part names ("vision_tower", "encoder", ...) or param prefixes
    precision: str = "fp32"  # "fp32" | "bf16" (autocast)
    gradient_checkpointing: bool = False
    progress: bool = True
    threads: int = 0  # torch intra-op threads for this run; 0 = torch's default. 1 is far steadier on a busy machine


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    contrastive: ContrastiveSection = field(default_factory=ContrastiveSection)
    phases: list[Phase] = field(default_factory=list)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def plan(self) -> list[Phase]:
        """The phases with every field filled in: [[phases]] as given (tasks defaulting to [tasks]), or one phase
        of [tasks] and [contrastive] weight over the whole run. Replayed tasks ([data.replay]) that a phase does
        not train already join it with the replay weight as their lambda."""
        if not self.phases:
            phases = [
                Phase("train", 1.0, dict(self.tasks), self.contrastive.weight, texts=list(self.contrastive.texts))
            ]
        else:
            phases = [
                Phase(
                    p.name,
                    p.end,
                    dict(p.tasks or self.tasks),
                    p.contrastive,
                    p.vision_from_tasks,
                    list(p.texts or self.contrastive.texts),
                )
                for p in self.phases
            ]
        replay = self.data.replay
        if replay.weight > 0:
            for phase in phases:
                for name in replay.tasks:
                    phase.tasks.setdefault(name, replay.weight)
        return phases

    def task_names(self) -> list[str]:
        """Every task of any phase (replayed ones included), in order of first appearance."""
        return list(dict.fromkeys(n for phase in self.plan() for n in phase.tasks))

    def eval_task_names(self) -> list[str]:
        """The tasks evaluations generate for: [train] eval_tasks, default every training task."""
        return list(self.train.eval_tasks or self.task_names())

    def phase_ends(self) -> list[int]:
        """The optimizer step at which each phase ends (the last one at optim.steps)."""
        return [round(p.end * self.optim.steps) for p in self.plan()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        tasks = d.pop("tasks", None)
        phases = d.pop("phases", [])
        d["data"] = _data(d.get("data", {}))
        if not isinstance(phases, list):
            raise ConfigError("[[phases]] must be an array of tables")
        sections = {name: _section(kind, d.get(name, {}), name) for name, kind in _SECTIONS.items()}
        sections["data"] = d["data"]
        sections["phases"] = [_phase(p, i) for i, p in enumerate(phases)]
        config = cls(**sections) if tasks is None else cls(tasks=_tasks(tasks), **sections)
        config.validate()
        return config

    def replace(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with dotted-key overrides applied, e.g. {"optim.steps": 50, "train.out_dir": "x"}."""
        d = self.to_dict()
        for key, value in overrides.items():
            *path, last = key.split(".")
            node = d
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {key!r}: {part!r} is not a config section")
                node = node[part]
            if not path and isinstance(node.get(last), dict) and isinstance(value, dict) and last != "tasks":
                node[last] = {**node[last], **value}  # a section's fields at once: --set 'lora={r=8, alpha=16}'
                continue
            if not path and last not in ("tasks", "phases"):
                raise ConfigError(f"override {key!r} must name a field as section.field")
            node[last] = value
        return TrainConfig.from_dict(d)

    def validate(self) -> None:
        m, o, t = self.model, self.optim, self.train
        if m.preset is not None and m.checkpoint is not None:
            raise ConfigError("[model] takes `preset` (fresh weights) or `checkpoint` (fine-tuning), not both")
        if m.checkpoint is None and m.preset is None:
            m.preset = "tiny"
        data = self.data
        for split, specs in (("train", data.train), ("val", data.val)):
            for i, spec in enumerate(specs):
                if spec.kind is not None and spec.kind not in KINDS:
                    raise ConfigError(f"[[data.{split}]] entry {i}: unknown kind {spec.kind!r}; choose from {KINDS}")
                if spec.kind != "synthetic" and not spec.path:
                    raise ConfigError(f'[[data.{split}]] entry {i} needs a `path` (or kind = "synthetic")')
                if not spec.weight > 0 or spec.limit < 0:
                    raise ConfigError(f"[[data.{split}]] entry {i}: weight must be > 0 and limit >= 0")
        if not 0 < data.val_fraction < 1:
            raise ConfigError(f"[data] val_fraction must be between 0 and 1, got {data.val_fraction}")
        if data.on_bad not in ("error", "skip"):
            raise ConfigError(f"[data] on_bad must be 'error' or 'skip', got {data.on_bad!r}")
        from fiore.data.augment import AUGMENTATIONS

        for name in data.augment:
            if name not in AUGMENTATIONS:
                raise ConfigError(f"[data] augment: unknown {name!r}; choose from {sorted(AUGMENTATIONS)}")
        if data.replay.weight < 0 or (data.replay.weight > 0 and not data.replay.tasks):
            raise ConfigError("[data.replay] needs tasks = [...] and a weight >= 0")
        if data.replay.weight > 0:
            import fiore.tasks

            for name in data.replay.tasks:
                try:
                    task = fiore.tasks.get(name)
                except KeyError as e:
                    raise ConfigError(f"[data.replay] tasks: {e.args[0]}") from None
                if task.inputs != "none":
                    raise ConfigError(
                        f"[data.replay] tasks: {name} needs a {task.inputs} input; only input-free tasks replay"
                    )
            if m.checkpoint is None:
                raise ConfigError("[data.replay] replays a starting checkpoint's answers: set [model] checkpoint")
        if o.epochs < 0:
            raise ConfigError(f"[optim] epochs must be >= 0, got {o.epochs}")
        if self.lora.r < 0 or self.lora.r and not self.lora.targets:
            raise ConfigError("[lora] needs r >= 0 and at least one target module name")
        if self.lora.r and m.checkpoint is None:
            raise ConfigError("[lora] adapts a trained model: set [model] checkpoint (LoRA from a preset trains noise)")
        if not self.tasks:
            raise ConfigError("[tasks] is empty: name at least one task with a weight")
        if self.contrastive.weight < 0:
            raise ConfigError(f"[contrastive] weight must be >= 0, got {self.contrastive.weight}")
        sources = ("label", "object", "caption", "detailed_caption", "more_detailed_caption")
        for text in [*self.contrastive.texts, *(t for p in self.phases for t in p.texts or [])]:
            if text not in sources:
                raise ConfigError(f"[contrastive] texts: unknown source {text!r}; choose from {list(sources)}")
        ends = [p.end for p in self.phases]
        if self.phases and (ends != sorted(set(ends)) or not 0 < ends[0] or ends[-1] != 1.0):
            raise ConfigError(f"[[phases]] end values must rise strictly and the last must be 1.0, got {ends}")
        for p in self.phases:
            if p.contrastive < 0 or any(not w >= 0 for w in p.tasks.values()):
                raise ConfigError(f"phase {p.name!r}: weights must be >= 0")
            if not any(w > 0 for w in (p.tasks or self.tasks).values()):
                raise ConfigError(f"phase {p.name!r} needs at least one task with a weight > 0")
            if not isinstance(p.vision_from_tasks, bool):
                raise ConfigError(f"phase {p.name!r}: vision_from_tasks must be true/false")
        for name, w in self.tasks.items():
            if not w > 0:
                raise ConfigError(f"[tasks] weight of {name!r} must be > 0, got {w}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(o, name) < 1:
                raise ConfigError(f"[optim] {name} must be >= 1, got {getattr(o, name)}")
        if o.batch_size % o.grad_accum:
            raise ConfigError(f"[optim] batch_size {o.batch_size} is not divisible by grad_accum {o.grad_accum}")
        for part, scale in o.lr_scale.items():
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
                raise ConfigError(f"[optim] lr_scale of {part!r} must be a number > 0, got {scale!r}")
        if o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or o.lr <= 0:
            raise ConfigError("[optim] needs lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"[train] precision must be 'fp32' or 'bf16', got {t.precision!r}")
        for name in ("tasks_per_image", "decode_groups", "max_target_tokens", "checkpoint_every", "log_every"):
            if getattr(t, name) < 1:
                raise ConfigError(f"[train] {name} must be >= 1, got {getattr(t, name)}")


_SECTIONS = {
    "model": ModelSection,
    "tokenizer": TokenizerSection,
    "contrastive": ContrastiveSection,
    "optim": OptimSection,
    "train": TrainSection,
    "lora": LoraSection,
}


def _data(values) -> DataSection:
    """[data] with its source lists ([[data.train]], [[data.val]]) and [data.replay] subtable."""
    if isinstance(values, DataSection):
        return values
    if not isinstance(values, dict):
        raise ConfigError("[data] must be a table")
    values = dict(values)
    if "kind" in values:
        raise ConfigError(
            '[data] kind is gone: name sources as [[data.train]] tables (path = ..., or kind = "synthetic"); '
            "with none, training uses the synthetic world"
        )
    lists = {}
    for split in ("train", "val"):
        specs = values.pop(split, [])
        if not isinstance(specs, list):
            raise ConfigError(f"[[data.{split}]] must be an array of tables")
        lists[split] = [_section(SourceSpec, spec, f"data.{split}") for spec in specs]
    data = _section(DataSection, values, "data")
    data.replay = _section(ReplaySection, data.replay, "data.replay") if isinstance(data.replay, dict) else data.replay
    data.train, data.val = lists["train"], lists["val"]
    return data


def _section(kind, values: dict, name: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown keys in [{name}]: {sorted(unknown)}; known: {sorted(fields)}")
    out = {}
    for key, value in values.items():
        default = fields[key].default
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        if key == "image_size" and value is not None:
            value = tuple(value)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"[{name}] {key} must be true/false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if value != int(value):
                raise ConfigError(f"[{name}] {key} must be an integer, got {value!r}")
            value = int(value)
        out[key] = value
    return kind(**out)


def _tasks(values, allow_zero: bool = False) -> dict[str, float]:
    if not isinstance(values, dict):
        raise ConfigError("[tasks] must be a table of task name = weight")
    out = {}
    for name, w in values.items():
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise ConfigError(f"[tasks] weight of {name!r} must be a number, got {w!r}")
        out[name] = float(w)
    return out


def _phase(values, i: int) -> Phase:
    if not isinstance(values, dict):
        raise ConfigError(f"[[phases]] entry {i} must be a table")
    fields = {f.name for f in dataclasses.fields(Phase)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"unknown keys in [[phases]] entry {i}: {sorted(unknown)}; known: {sorted(fields)}")
    if "end" not in values:
        raise ConfigError(f"[[phases]] entry {i} needs `end`, the fraction of optim.steps where it ends")
    values = dict(values)
    values.setdefault("name", f"phase{i}")
    if "tasks" in values:
        values["tasks"] = _tasks(values["tasks"], allow_zero=True)
    return Phase(**values)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML training config; `overrides` are dotted keys (`optim.steps`) applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    config = TrainConfig.from_dict(d)
    return config.replace(overrides) if overrides else config


def parse_override(text: str) -> tuple[str, Any]:
    """`"optim.steps=50"` -> ("optim.steps", 50); the value is parsed as a TOML value, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
