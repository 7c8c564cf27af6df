"""Training and validation data as sources of `Sample`s, mixed by weight into one deterministic stream.

A source is the synthetic world (endless: item i = `make_sample(seed, i)`), a dataset directory that
`fiore.data.readers.read_dataset` reads (COCO instances/captions, refs, fiore JSONL), or a Florence-2 JSONL file
(Roboflow / maestro exports, trained as the raw prompt/target pairs they are). The training loop is handed a
`Stream` and knows nothing of where its samples come from.

Stream position -> sample is a pure function of (seed, position), so a resumed run replays the same data and DDP
ranks can take disjoint positions. Weights are shares of the stream. An *epoch* is one pass over the user's data:
every example of each finite training source appears once per epoch when it has the largest `size / share` (the
others, and replayed or synthetic sources, appear in proportion to their weights).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fiore.data import readers
from fiore.data.readers import DatasetError
from fiore.data.sample import Sample

KINDS = ("synthetic", "dataset", "florence2")


@dataclass
class SourceSpec:
    """One `[[data.train]]` / `[[data.val]]` entry."""

    path: str | None = None  # a dataset directory or a Florence-2 JSONL file (or a folder with annotations.jsonl)
    kind: str | None = None  # "synthetic" | "dataset" | "florence2"; default: from the path
    weight: float = 1.0  # share of the training stream
    seed: int = 0  # synthetic sources: the generator's seed
    limit: int = 0  # use only the first N samples (0 = all)

    def resolved_kind(self) -> str:
        if self.kind is not None:
            if self.kind not in KINDS:
                raise DatasetError(f"unknown source kind {self.kind!r}; choose from {list(KINDS)}")
            return self.kind
        if self.path is None:
            raise DatasetError('a data source needs a `path` (or kind = "synthetic")')
        path = Path(self.path)
        if path.suffix == ".jsonl" or (path / "annotations.jsonl").is_file():
            return "florence2"
        return "dataset"

    def describe(self) -> str:
        kind = self.resolved_kind()
        return f"synthetic (seed {self.seed})" if kind == "synthetic" else f"{kind} {self.path}"


class Source:
    """Indexable samples. `size` is None for an endless source."""

    name: str = ""
    size: int | None = None

    def __getitem__(self, i: int) -> Sample:
        raise NotImplementedError


class SyntheticSource(Source):
    def __init__(self, seed: int):
        self.seed = seed
        self.name = f"synthetic (seed {seed})"

    def __getitem__(self, i: int) -> Sample:
        from fiore.data.synthetic import make_sample

        return make_sample(self.seed, i)


class ListSource(Source):
    """Samples read from disk (their images stay there until a loader worker reads them)."""

    def __init__(self, samples: Sequence[Sample], name: str):
        if not samples:
            raise DatasetError(f"{name}: no samples")
        self.samples = list(samples)
        self.name = name
        self.size = len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def read_samples(spec: SourceSpec) -> list[Sample]:
    """The samples of a dataset or Florence-2 JSONL source, as its reader gives them (possibly none)."""
    kind = spec.resolved_kind()
    if kind == "synthetic" or spec.path is None:
        raise DatasetError(f"a {kind} source has no files to read")
    return readers.read_florence2_jsonl(spec.path) if kind == "florence2" else readers.read_dataset(spec.path)


def read_source(spec: SourceSpec) -> Source:
    """Open one source; dataset files are read now (images are not)."""
    kind = spec.resolved_kind()
    if kind == "synthetic":
        source: Source = SyntheticSource(spec.seed)
        if spec.limit:
            source = ListSource([source[i] for i in range(spec.limit)], source.name)
        return source
    samples = read_samples(spec)
    if spec.limit:
        samples = samples[: spec.limit]
    return ListSource(samples, f"{kind} {spec.path}")


def hold_out(source: ListSource, fraction: float, seed: int) -> tuple[ListSource, ListSource]:
    """Split a source's images into (train, validation): a seeded `fraction` of them (at least one) held out."""
    n = source.size
    if n < 2:
        raise DatasetError(f"{source.name}: {n} image(s) cannot be split into training and validation")
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(f"fiore-holdout:{seed}:{source.name}").sample(range(n), k))
    train = [s for i, s in enumerate(source.samples) if i not in held]
    val = [s for i, s in enumerate(source.samples) if i in held]
    return ListSource(train, source.name), ListSource(val, f"{source.name} (held out)")


class Stream:
    """Weighted sources -> one endless, shuffled sequence of samples.

    With a single endless source position i is its item i (the synthetic world's stream, unchanged). Otherwise the
    stream is cut into epochs of `epoch_length` positions holding `counts[j]` draws of source j, shuffled per epoch;
    a finite source's successive draws walk through its own per-cycle permutations, so every item is used before
    any repeats.
    """

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], seed: int, primary: int | None = None):
        if not sources or len(sources) != len(weights) or any(not w > 0 for w in weights):
            raise ValueError("a stream needs sources with weights > 0")
        self.sources = list(sources)
        self.seed = seed
        total = sum(weights)
        shares = [w / total for w in weights]
        # The epoch is set by the finite sources counted as the user's data (default: every finite one).
        finite = [j for j, s in enumerate(self.sources) if s.size is not None]
        anchors = finite if primary is None else finite[:primary]
        if len(self.sources) == 1 and not finite:
            self.epoch_length, self.counts = None, [None]
            return
        length = max((self.sources[j].size / shares[j] for j in anchors), default=1024)
        self.counts = [max(1, round(length * share)) for share in shares]
        self.epoch_length = sum(self.counts)

    @property
    def finite(self) -> bool:
        return self.epoch_length is not None

    def __getitem__(self, i: int) -> Sample:
        if self.epoch_length is None:
            return self.sources[0][i]
        epoch, offset = divmod(i, self.epoch_length)
        j, k = self._plan(epoch)[offset]
        source = self.sources[j]
        draw = epoch * self.counts[j] + k  # this source's draw number since the start
        if source.size is None:
            return source[draw]
        cycle, at = divmod(draw, source.size)
        return source[self._permutation(j, cycle)[at]]

    @lru_cache(maxsize=4)  # noqa: B019 - a stream lives as long as its run
    def _plan(self, epoch: int) -> list[tuple[int, int]]:
        plan = [(j, k) for j, count in enumerate(self.counts) for k in range(count)]
        random.Random(f"fiore-stream:{self.seed}:{epoch}").shuffle(plan)
        return plan

    @lru_cache(maxsize=16)  # noqa: B019
    def _permutation(self, j: int, cycle: int) -> list[int]:
        order = list(range(self.sources[j].size))
        random.Random(f"fiore-stream:{self.seed}:{j}:{cycle}").shuffle(order)
        return order

    def steps_for(self, epochs: float, batch_size: int) -> int:
        """Optimizer steps that cover `epochs` passes over the data at `batch_size` images a step."""
        if self.epoch_length is None:
            raise ValueError("an endless stream (synthetic data only) has no epochs: set optim.steps")
        return max(1, math.ceil(epochs * self.epoch_length / batch_size))

    def describe(self) -> str:
        parts = [
            f"{s.name}: {s.size if s.size is not None else 'endless'}" + (f" x{c}/epoch" if c is not None else "")
            for s, c in zip(self.sources, self.counts, strict=True)
        ]
        return "; ".join(parts)
