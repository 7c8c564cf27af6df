"""What a training run reads: `[data]` -> checked sources -> the training stream and the validation samples.

Everything here happens before the first step: dataset files are read, every example is checked
(`fiore.data.check`; `on_bad = "error"` stops with the file and line of each problem, `"skip"` drops those
samples and reports how many), a validation split is held out when none is named, and the replay labels are made.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fiore.data.check import check_samples, summary, without_problems
from fiore.data.readers import DatasetError
from fiore.data.sample import PromptPair, Sample
from fiore.data.sources import ListSource, Source, SourceSpec, Stream, hold_out, read_source
from fiore.train.config import ConfigError, TrainConfig


@dataclass
class TrainingData:
    stream: Stream  # stream position -> training Sample
    val: list[Sample]  # the held-out samples (eval runner and held-out loss)
    skipped: dict[str, int] = field(default_factory=dict)  # source name -> samples dropped by on_bad = "skip"

    def describe(self) -> str:
        skipped = "".join(f"; skipped {n} bad sample(s) of {name}" for name, n in self.skipped.items())
        return f"training data: {self.stream.describe()}; validation: {len(self.val)} images{skipped}"


class Cycle:
    """A finite list read at any position (position i -> item i mod n): fixed validation batches of any size."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i % len(self.samples)]


def _checked(source: Source, config: TrainConfig, skipped: dict[str, int]) -> Source:
    if not isinstance(source, ListSource):
        return source
    problems = check_samples(source.samples, images=config.data.check_images)
    if not problems:
        return source
    bad = len({p.sample for p in problems})
    if config.data.on_bad == "error":
        raise DatasetError(
            f"{source.name}: {len(problems)} problem(s) in {bad} of {source.size} samples:\n{summary(problems)}\n"
            'Fix them, or set [data] on_bad = "skip" to train without those samples '
            "(`fiore data check PATH` lists every problem)."
        )
    skipped[source.name] = bad
    print(f"warning: {source.name}: skipping {bad} sample(s) with problems, e.g. {problems[0]}", file=sys.stderr)
    return ListSource(without_problems(source.samples, problems), source.name)


def build_data(config: TrainConfig, labeller=None) -> TrainingData:
    """Read, check and split the sources of `config.data`. `labeller(samples) -> list[Sample]` makes the replay
    source (`replay_source`), called only when [data.replay] has a weight."""
    d = config.data
    skipped: dict[str, int] = {}
    specs = d.train or [SourceSpec(kind="synthetic", seed=d.seed)]
    train = [_checked(read_source(spec), config, skipped) for spec in specs]
    weights = [spec.weight for spec in specs]
    if d.val:
        val_sources = [_checked(read_source(spec), config, skipped) for spec in d.val]
    elif any(s.size is not None for s in train):
        val_sources = []
        for j, source in enumerate(train):
            if isinstance(source, ListSource):
                train[j], held = hold_out(source, d.val_fraction, d.seed)
                val_sources.append(held)
    else:
        val_sources = [read_source(SourceSpec(kind="synthetic", seed=d.eval_seed))]
    val = _first(val_sources, config.train.eval_samples)
    _warn_untrained_pairs(train, {n for phase in config.plan() for n, w in phase.tasks.items() if w > 0})
    primary = len(train)
    if d.replay.weight > 0:
        if labeller is None:
            raise ValueError("[data.replay] needs a labeller (the starting checkpoint)")
        own = [s for source in train if isinstance(source, ListSource) for s in source.samples]
        if not own:
            raise ConfigError("[data.replay] labels the training images of dataset sources; there are none")
        labelled = labeller(own)
        if not labelled:
            raise DatasetError(f"[data.replay]: the starting model gave empty answers to {d.replay.tasks} on all "
                               f"{len(own)} training images; there is nothing to replay")  # fmt: skip
        train.append(ListSource(labelled, "replay"))
        weights.append(d.replay.weight)
    return TrainingData(Stream(train, weights, d.seed, primary=primary), val, skipped)


def _warn_untrained_pairs(sources: list[Source], trained: set[str]) -> None:
    """Florence-2 JSONL lines of a task the mixture does not train are never seen: say so, with the count."""
    counts: dict[str, int] = {}
    for source in sources:
        for s in getattr(source, "samples", []):
            for pair in s.pairs:
                if pair.task not in trained:
                    counts[pair.task] = counts.get(pair.task, 0) + 1
    if counts:
        listed = ", ".join(f"{n} ({c} lines)" for n, c in sorted(counts.items()))
        warnings.warn(f"prompt/target pairs of tasks not in [tasks] are not trained: {listed}", stacklevel=3)


def _first(sources: list[Source], n: int) -> list[Sample]:
    """Up to n samples of the validation sources (n = 0: all of the finite ones), taken in turn from each."""
    if n <= 0 and any(s.size is None for s in sources):
        raise ValueError("train.eval_samples = 0 (the whole validation set) needs finite validation sources")
    out: list[Sample] = []
    lists = [
        s.samples if isinstance(s, ListSource) else [s[i] for i in range(n)]  # endless: its first n
        for s in sources
    ]
    limit = n if n > 0 else sum(len(x) for x in lists)
    i = 0
    while len(out) < limit and any(i < len(x) for x in lists):
        out.extend(x[i] for x in lists if i < len(x))
        i += 1
    return out[:limit]


# ------------------------------------------------------------------------------------------------------ replay


def replay_cache(checkpoint: str, samples: list[Sample], tasks: list[str], cache_dir: Path) -> Path:
    """Where the replay answers of (checkpoint, tasks, images) are cached."""
    images = [str(s.image_path or s.image_id) for s in samples]
    key = hashlib.sha256(json.dumps([str(checkpoint), list(tasks), images]).encode()).hexdigest()[:16]
    return cache_dir / f"replay-{key}.jsonl"


def make_replay(florence, samples: list[Sample], tasks: list[str], path: Path, batch_size: int = 8) -> None:
    """The starting model's own answers to `tasks` on `samples`, written once to `path` (JSONL): each answer as the
    official target string of its parsed result, i.e. what the model would be trained to emit for it."""
    import fiore.tasks

    tasks_ = [fiore.tasks.get(t) for t in tasks]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            answers = florence.run([s.read_image() for s in chunk], [t.name for t in tasks_])
            for offset, (s, answer) in enumerate(zip(chunk, answers, strict=True)):
                for t in tasks_:
                    suffix = t.serialize(answer[t.name], s.size)
                    f.write(json.dumps({"sample": start + offset, "prefix": t.token, "suffix": suffix}) + "\n")
            print(f"replay: labelled {min(start + batch_size, len(samples))}/{len(samples)} images", file=sys.stderr)
    tmp.replace(path)


def read_replay(path: Path, samples: list[Sample]) -> list[Sample]:
    """The replay source: per image, a sample holding only its image and the cached answers as raw pairs (empty
    answers, e.g. no boxes found, are left out)."""
    import fiore.tasks

    pairs: dict[int, list[PromptPair]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            r = json.loads(line)
            if r["suffix"].strip():
                task = fiore.tasks.get(r["prefix"])
                pairs.setdefault(r["sample"], []).append(PromptPair(task.name, "", r["suffix"], f"{path}:{line_no}"))
    return [
        Sample(
            s.image_id,
            s.width,
            s.height,
            image=s.image,
            image_path=s.image_path,
            pairs=pairs[i],
            origin=f"replay of {s.origin}",
        )  # fmt: skip
        for i, s in enumerate(samples)
        if i in pairs
    ]
