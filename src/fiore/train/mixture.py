"""Task mixture: Samples -> training rows -> padded micro-batches, and the multi-task loss.

One image carries several rows. Each image of a micro-batch is encoded once by the vision tower; its K rows (one per
sampled task) index into those features, so a step costs B vision encodings for B*K (prompt, target) rows.

Row layout (Florence-2 generation emits `</s><s> ... </s>`: decoder start 2, then `<s>` 0, tokens, `</s>` 2):

    input_ids          = <s> prompt </s>                (as `Processor.prompt_ids` builds it for inference)
    labels             = <s> target </s>                (target truncated to max_target_tokens; then no </s>)
    decoder_input_ids  = decoder_start, labels[:-1]     (labels shifted right)

Loss normalisation (one micro-batch): L_t = mean token cross-entropy over all label tokens of the rows of task t;
L = sum_{t in batch} lambda_t L_t / sum_{t in batch} lambda_t. Tasks absent from a micro-batch drop out of both sums,
so the loss scale does not depend on which tasks a batch happened to draw. Tasks are also *drawn* in proportion to
lambda_t, so a heavy task gets both more rows (lower-variance L_t) and more weight.

Everything a row depends on is a function of (seed, sample index): resuming at a step replays the same data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fiore.processor import pad_right

IGNORE_INDEX = -100


@dataclass
class Row:
    """One (prompt, target) pair of one image; ids without padding."""

    task: int  # index into Mixture.names
    input_ids: list[int]
    labels: list[int]


@dataclass
class Batch:
    """A padded micro-batch. B images, R rows (R >= B when several tasks share an image)."""

    pixel_values: torch.Tensor  # (B, 3, H, W) float32
    image_index: torch.Tensor  # (R,) long: the image of each row
    input_ids: torch.Tensor  # (R, Tp) long, right-padded with pad id
    attention_mask: torch.Tensor  # (R, Tp) bool, True = real token
    decoder_input_ids: torch.Tensor  # (R, Td) long, right-padded with pad id
    labels: torch.Tensor  # (R, Td) long, IGNORE_INDEX on padding
    task_index: torch.Tensor  # (R,) long
    # Image-text pairs for the contrastive loss (phases that train it): one text per image.
    text_ids: torch.Tensor | None = None  # (B, Tt) long, `<s> text </s>` right-padded
    text_mask: torch.Tensor | None = None  # (B, Tt) bool
    text_group: torch.Tensor | None = None  # (B,) long: equal ids = the same text (UniCL's label-aware targets)

    def to(self, device) -> Batch:
        return Batch(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in vars(self).items()})

    @property
    def num_rows(self) -> int:
        return self.image_index.numel()


class Mixture:
    """Weighted tasks and how one Sample becomes rows.

    `tasks`: name -> weight lambda_t. `tokenizer` needs `.encode`, `.bos_id`, `.eos_id`, `.pad_id`;
    `task_lookup(name)` returns a Task with `.examples(sample)`, `.prompt(text, region, image_size)`,
    `.target(example, image_size)` (fiore.tasks contract).
    """

    def __init__(
        self,
        tasks: dict[str, float],
        tokenizer,
        tasks_per_image: int = 4,
        max_target_tokens: int = 256,
        max_prompt_tokens: int = 64,
        decoder_start_id: int = 2,
        task_lookup: Callable | None = None,
        pairs_only: Sequence[str] = (),
    ):
        if task_lookup is None:
            from fiore.tasks import get as task_lookup
        self.names = list(tasks)
        self.weights = [float(tasks[n]) for n in self.names]
        self.tasks = []
        for name in self.names:
            try:
                self.tasks.append(task_lookup(name))
            except (KeyError, ValueError) as e:
                raise ValueError(f"unknown task {name!r} in the training mixture: {e}") from None
        self.tokenizer = tokenizer
        self.tasks_per_image = tasks_per_image
        self.max_target_tokens = max_target_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.decoder_start_id = decoder_start_id
        # Tasks learnt only from raw pairs (replayed answers), not from a sample's own annotations.
        self.pairs_only = [name in pairs_only for name in self.names]

    def rows(self, sample, rng: random.Random) -> list[Row]:
        """Up to K rows for one sample: K distinct tasks drawn by weight among those with examples for it."""
        candidates = []  # (key, task position, examples); Efraimidis-Spirakis keys u^(1/w) = weighted draw w/o repl.
        for i, (task, w) in enumerate(zip(self.tasks, self.weights, strict=True)):
            if w <= 0:  # off in this phase
                continue
            examples = task.examples(sample)
            if self.pairs_only[i]:
                examples = [e for e in examples if e.raw_target is not None]
            if examples:
                candidates.append((math.log(1.0 - rng.random()) / w, i, examples))
        candidates.sort(key=lambda c: c[0], reverse=True)
        rows = []
        for _, i, examples in candidates[: self.tasks_per_image]:
            example = examples[rng.randrange(len(examples))]
            rows.append(self.row(i, example, sample.size))
        return rows

    def row(self, task_pos: int, example, image_size) -> Row:
        task = self.tasks[task_pos]
        tok = self.tokenizer
        prompt = task.prompt(text=example.text, region=example.region, image_size=image_size)
        prompt_ids = tok.encode(prompt)[: self.max_prompt_tokens]
        target_ids = tok.encode(task.target(example, image_size))
        labels = tok.frame(target_ids)[: self.max_target_tokens]
        return Row(task=task_pos, input_ids=tok.frame(prompt_ids), labels=labels)

    def texts(self, sample) -> list[str]:
        """Every prompt and target string this mixture's tasks draw from `sample` (tokenizer training text)."""
        out = []
        for task in self.tasks:
            for ex in task.examples(sample):
                out.append(task.prompt(text=ex.text, region=ex.region, image_size=sample.size))
                out.append(task.target(ex, sample.size))
        return out


def collate(pixel_values: torch.Tensor, rows_per_image: Sequence[list[Row]], pad_id: int, decoder_start_id: int):
    """Pad rows into a Batch. pixel_values (B,3,H,W); rows_per_image[b] are image b's rows."""
    rows = [(b, r) for b, rs in enumerate(rows_per_image) for r in rs]
    if not rows:
        raise ValueError("no task in the mixture has examples for any image of this batch")
    R = len(rows)
    Tp = max(len(r.input_ids) for _, r in rows)
    Td = max(len(r.labels) for _, r in rows)
    input_ids = torch.full((R, Tp), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((R, Tp), dtype=torch.bool)
    decoder_input_ids = torch.full((R, Td), pad_id, dtype=torch.long)
    labels = torch.full((R, Td), IGNORE_INDEX, dtype=torch.long)
    for i, (_, r) in enumerate(rows):
        n, m = len(r.input_ids), len(r.labels)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        attention_mask[i, :n] = True
        labels[i, :m] = torch.tensor(r.labels)
        decoder_input_ids[i, :m] = torch.tensor([decoder_start_id, *r.labels[:-1]])
    return Batch(
        pixel_values=pixel_values,
        image_index=torch.tensor([b for b, _ in rows], dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        labels=labels,
        task_index=torch.tensor([r.task for _, r in rows], dtype=torch.long),
    )


def combine(loss_sum: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = sum_t w_t L_t / sum_t w_t over the tasks present (tokens > 0), L_t = loss_sum_t / tokens_t."""
    present = tokens > 0
    per_task = loss_sum / tokens.clamp_min(1)
    w = weights.to(per_task) * present
    return (w * per_task).sum() / w.sum().clamp_min(1e-12)


class ContrastiveTexts:
    """The text paired with each image for the contrastive loss: one of `sources` that the sample has, drawn
    uniformly ("label" = the class name put in `template`; "object" = the category name of one of its annotated
    objects, drawn uniformly; a caption key = that caption)."""

    def __init__(self, sources: Sequence[str], template: str, tokenizer, max_tokens: int = 64):
        self.sources = list(sources)
        self.template = template
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def pick(self, sample, rng: random.Random) -> str | None:
        options = []
        for source in self.sources:
            if source == "label":
                if sample.label:
                    options.append(self.template.format(sample.label))
            elif source == "object":
                if sample.objects:
                    options.append(rng.choice(sample.objects).label)
            elif sample.captions.get(source):
                options.append(sample.captions[source])
        return rng.choice(options) if options else None

    def batch(self, texts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (ids (B, T), mask (B, T), group (B,)); a sample without a text gets group -1 (left out of the loss)."""
        tok = self.tokenizer
        rows = [tok.frame(tok.encode(t)[: self.max_tokens - 2]) if t else [tok.bos_id] for t in texts]
        ids, mask = pad_right(rows, tok.pad_id)
        first: dict[str, int] = {}
        group = torch.tensor([-1 if t is None else first.setdefault(t, i) for i, t in enumerate(texts)])
        return ids, mask, group


@dataclass
class PhaseData:
    """What the micro-batches of one training phase hold: rows of `mixture` and, if `contrastive`, a text per image."""

    end: int  # first micro-batch index past the phase (its end step x grad_accum); the last phase runs on
    mixture: Mixture
    contrastive: bool = False
    texts: ContrastiveTexts | None = None  # this phase's text sources (default: the dataset's)


class MixtureDataset(torch.utils.data.Dataset):
    """Item k = micro-batch k of one process, built deterministically from stream positions.

    Global micro-batch m of process `rank` holds stream positions (m * world_size + rank) * B + j, j < B (so ranks
    read disjoint shards of the stream). With
    m = step * grad_accum + a, the data position of a run is its step: resuming there replays the same batches,
    and the phase of micro-batch m (`phases`) is a function of m too, so a resume across a phase boundary does too.
    """

    def __init__(
        self,
        mixture: Mixture | list[PhaseData],
        samples: Any,
        pixel_values: Callable,
        seed: int,
        images_per_batch: int,
        rank: int = 0,
        world_size: int = 1,
        texts: ContrastiveTexts | None = None,
        augment: Sequence[str] = (),
    ):
        self.phases = mixture if isinstance(mixture, list) else [PhaseData(0, mixture, texts is not None)]
        if any(p.contrastive for p in self.phases) and texts is None:
            raise ValueError("a phase trains the contrastive loss but no ContrastiveTexts were given")
        self.texts = texts
        self.samples = samples  # stream position -> Sample (`fiore.data.sources.Stream`)
        self.pixel_values = pixel_values  # list[PIL] -> (B,3,H,W)
        self.seed = seed
        self.B = images_per_batch
        self.rank = rank
        self.world_size = world_size
        self.augment = list(augment)

    def __len__(self) -> int:
        return 2**62 // max(1, self.B * self.world_size)

    def indices(self, k: int) -> list[int]:
        start = (k * self.world_size + self.rank) * self.B
        return list(range(start, start + self.B))

    def phase(self, k: int) -> PhaseData:
        return next((p for p in self.phases if k < p.end), self.phases[-1])

    def __getitem__(self, k: int) -> Batch:
        phase = self.phase(k)
        indices = self.indices(k)
        samples = [self.samples[i] for i in indices]
        images = [s.read_image() for s in samples]  # decoded here: in a loader worker when num_workers > 0
        if self.augment:
            from fiore.data.augment import augment

            for j, i in enumerate(indices):
                rng = random.Random(f"fiore-augment:{self.seed}:{i}")
                samples[j], images[j] = augment(self.augment, samples[j], images[j], rng)
        rows = [
            phase.mixture.rows(s, random.Random(f"fiore-mixture:{self.seed}:{i}"))
            for s, i in zip(samples, indices, strict=True)
        ]
        pixels = self.pixel_values(images)
        tok = phase.mixture.tokenizer
        batch = collate(pixels, rows, tok.pad_id, phase.mixture.decoder_start_id)
        if phase.contrastive:
            source = phase.texts or self.texts
            texts = [
                source.pick(s, random.Random(f"fiore-text:{self.seed}:{i}"))
                for s, i in zip(samples, indices, strict=True)
            ]
            batch.text_ids, batch.text_mask, batch.text_group = source.batch(texts)
        return batch


def loader(dataset: MixtureDataset, start: int, num_workers: int = 0):
    """Iterate micro-batches start, start+1, ... (a DataLoader when num_workers > 0, prefetching in the background)."""
    sampler = range(start, len(dataset))
    if num_workers <= 0:
        return (dataset[k] for k in sampler)
    # A private generator: creating the iterator must not consume the global RNG (exact resume).
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=num_workers,
            prefetch_factor=4,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_worker_init,
        )
    )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the worker builds data; leave the cores' BLAS threads to the training process
