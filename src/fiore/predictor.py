"""Inference on top of the decoding loop: images + tasks -> typed Results, and closed-set label scoring.

Work is organised around the image encoding, which is the expensive part (the vision tower is compute bound):
every image goes through the vision tower once; each (image, task) pair becomes one *row* whose prompt is encoded
with that image's features; rows are decoded together in one batch, so the decoder's weights (read from memory
once per step, whatever the batch) are shared by all tasks and images of the batch.

    p = Predictor(florence); p.set_images([im1, im2])   the vision tower runs once per image
    p.predict([[Request.make("od")], [Request.make("caption"), Request.make("ocr")]])  -> [[Boxes], [Text, Text]]
    p.classify(["cat", "dog"], image=1)                 -> Label (ranked candidates with probabilities)

`Predictor` is the one way from requests to results: the CLI, the server, `fiore label` and the eval runner use it.
`predict`, `run` and `classify` are conveniences over it that answer in the shape they were asked:

    predict(florence, image, "od")                    -> Result
    predict(florence, [im1, im2], "caption")          -> [Result, Result]
    run(florence, image, ["caption", "od", "ocr"])    -> {"caption": Result, ...}   one vision pass
    classify(florence, image, ["cat", "dog"])         -> Label

Scores: structured instances get exp(mean log-prob of their tokens) and results a sequence score (see
`fiore.tasks.parsers`); the log-probs come from `fiore.generate` (model distribution, along the final beam).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from fiore.generate import GenerationConfig, generate
from fiore.request import Request, get_task
from fiore.results import Label, Mixed, Result
from fiore.tasks import Task, TaskInputError
from fiore.tasks.parsers import SCORE_MODES

DEFAULT_MAX_ROWS = 16  # rows decoded in one batch: bounds the KV cache (base: ~60 MB per row at 1024 tokens)
DEFAULT_IMAGE_BATCH = 8  # images per vision-tower call: bounds activation memory
CLASSIFY_CHUNK = 32  # candidate labels scored per teacher-forced pass

_GEN_FIELDS = {f.name for f in fields(GenerationConfig)} - {"max_new_tokens"}
COORDS = ("bin", "expected")
# Sub-bin coordinates: the expected bin over the chosen bin and LOC_WINDOW neighbours on each side (docs/design.md).
LOC_WINDOW = 2


@dataclass
class _Row:
    image: int  # index into the set images
    task: Task
    prompt: str
    limit: int  # max_new_tokens


def _generation_config(florence, options: dict[str, Any], score_mode: str) -> GenerationConfig:
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    unknown = set(options) - _GEN_FIELDS
    if unknown:
        raise TypeError(f"unknown generation options {sorted(unknown)}; known: {sorted(_GEN_FIELDS)}")
    text, tok = florence.config.text, florence.tokenizer
    base = dict(
        decoder_start_token_id=text.decoder_start_token_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        forced_bos_token_id=tok.bos_id,  # Florence targets are `<s> ... </s>`; as the original generation config
    )
    base.update(options)
    config = GenerationConfig(**base)
    config.validate(1)  # bad options fail before any image is encoded
    return config


def _budget(florence, request: Request) -> int:
    """max_new_tokens for a row: the request's, else the task's default, within the decoder's positions."""
    positions = florence.config.text.max_position_embeddings
    if request.max_new_tokens is None:
        return min(request.task.max_new_tokens, positions)
    if not 1 <= request.max_new_tokens <= positions:
        raise TaskInputError(
            f"max_new_tokens for {request.task.name} must be in 1..{positions} (decoder positions), "
            f"got {request.max_new_tokens}"
        )
    return request.max_new_tokens


def _load_images(florence, images: list) -> list:
    from fiore.processor import load_image

    return [load_image(im, max_pixels=florence.processor.max_pixels) for im in images]


@torch.inference_mode()
def _encode_images(florence, pils: list, image_batch: int) -> torch.Tensor:
    """Vision tower + projector, `image_batch` images at a time -> (B, N, d)."""
    model = florence.model
    out = []
    for i in range(0, len(pils), image_batch):
        pixel_values = florence.processor.pixel_values(pils[i : i + image_batch]).to(model.device, model.dtype)
        out.append(model.encode_image(pixel_values))
    return out[0] if len(out) == 1 else torch.cat(out)


@torch.inference_mode()
def _decode_rows(florence, features, sizes, rows: list[_Row], config: GenerationConfig, score_mode, max_rows):
    """Encode each row's prompt with its image's features and decode rows in batches -> one Result per row."""
    model, tok = florence.model, florence.tokenizer
    results: list[Result | None] = [None] * len(rows)
    # similar budgets together: a batch's cache is sized by its largest budget
    order = sorted(range(len(rows)), key=lambda i: (rows[i].limit, rows[i].image))
    for start in range(0, len(order), max_rows):
        chunk = order[start : start + max_rows]
        input_ids, attention_mask = florence.processor.prompt_ids([rows[i].prompt for i in chunk])
        img = torch.tensor([rows[i].image for i in chunk], device=features.device)
        hidden, mask = model.encode(
            features.index_select(0, img), input_ids.to(model.device), attention_mask.to(model.device)
        )
        config.max_new_tokens = [rows[i].limit for i in chunk]
        seqs = generate(model, hidden, mask, config)
        del hidden, mask
        for i, seq in zip(chunk, seqs, strict=True):
            row = rows[i]
            # native checkpoints pad the embedding past the tokenizer (51289 -> 51328 rows): such ids have no text
            known = [i for i, t in enumerate(seq.ids) if t < tok.vocab_size]
            ids = [seq.ids[i] for i in known]
            text = tok.decode(ids)
            logprobs = list(zip(tok.pieces(ids), [seq.token_logprobs[i] for i in known], strict=True))
            bins = None if seq.token_bins is None else [seq.token_bins[i] for i in known]
            result = row.task.parse(
                text, sizes[row.image], token_logprobs=logprobs, score_mode=score_mode, token_bins=bins
            )
            result.task = result.task or row.task.name
            result.truncated = seq.truncated
            if len(known) != len(seq.ids):
                result.warnings.append(
                    f"{len(seq.ids) - len(known)} generated token(s) outside the tokenizer's vocabulary were dropped"
                )
            if seq.truncated:
                result.warnings.append(
                    f"output truncated at max_new_tokens={row.limit}; pass a larger max_new_tokens for the full output"
                )
            results[i] = result
    return results


class Predictor:
    """Images encoded once, then asked any number of requests (segment-anything's `set_image`/`predict`).

        predictor = florence.predictor()               # generation options: num_beams=3, score_mode=..., ...
        predictor.set_images([im1, im2])               # the vision tower runs here, once per image
        predictor.predict([[Request.make("od")], [Request.make("caption"), Request.make("ocr")]])
            -> [[Boxes], [Text, Text]]                  # one list of results per image, in request order

    `predict` takes one list of requests per set image (lists may differ and repeat a task with other inputs);
    all rows of a call are decoded together, `max_rows` at a time. Requests are checked against their image
    (a region must overlap it) before anything is decoded.
    """

    def __init__(
        self,
        florence,
        *,
        score_mode: str = "loc",
        coords: str = "bin",
        max_rows: int = DEFAULT_MAX_ROWS,
        image_batch: int = DEFAULT_IMAGE_BATCH,
        **generation,
    ) -> None:
        if max_rows < 1 or image_batch < 1:
            raise ValueError(f"max_rows and image_batch must be >= 1, got {max_rows} and {image_batch}")
        self.florence = florence
        self.score_mode, self.max_rows, self.image_batch = score_mode, max_rows, image_batch
        if coords not in COORDS:
            raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")
        if coords == "expected":  # sub-bin coordinates (`fiore.generate._expected_bins`)
            generation = {"loc_token_start": florence.tokenizer.loc_id(0), "loc_window": LOC_WINDOW, **generation}
        self.config = _generation_config(florence, generation, score_mode)
        self.sizes: list[tuple[int, int]] = []  # (width, height) of each set image
        self._features: torch.Tensor | None = None

    def set_images(self, images: Sequence) -> None:
        """Read (paths, bytes, PIL or arrays; EXIF applied) and encode `images`, replacing any set before."""
        images = list(images)
        if not images:
            raise ValueError("no images given")
        pils = _load_images(self.florence, images)
        self._features = None  # a failed encoding leaves no stale images behind
        self._features = _encode_images(self.florence, pils, self.image_batch)
        self.sizes = [im.size for im in pils]

    def predict(self, requests: Sequence[Sequence[Request]]) -> list[list[Result]]:
        """One list of requests per set image -> one list of Results per image, in the same order."""
        if self._features is None:
            raise RuntimeError("no images are set: call set_images(images) first")
        if len(requests) != len(self.sizes):
            raise ValueError(f"{len(requests)} request lists for {len(self.sizes)} set images; give one per image")
        # a request naming several classes is one row per class; all rows of the call are decoded together
        parts = [[r.parts() for r in image_requests] for image_requests in requests]
        rows = [
            _Row(i, part.task, part.prompt(self.sizes[i]), _budget(self.florence, part))
            for i, image_parts in enumerate(parts)
            for request_parts in image_parts
            for part in request_parts
        ]
        results = iter(
            _decode_rows(self.florence, self._features, self.sizes, rows, self.config, self.score_mode, self.max_rows)
        )
        return [[_merged(request_parts, results) for request_parts in image_parts] for image_parts in parts]

    def classify(
        self, labels: Sequence[str], region: Sequence[float] | None = None, task: str | Task | None = None, image=0
    ) -> Label:
        """Rank candidate `labels` for set image number `image` (whole, or a region) by sequence log-likelihood;
        see `_classify` for the score."""
        if self._features is None:
            raise RuntimeError("no images are set: call set_images(images) first")
        features = self._features[image : image + 1]
        return _classify(self.florence, features, self.sizes[image], labels, region, task)


def _merged(parts: list[Request], results) -> Result:
    """The next result of `results` for a one-row request; the merge of the next len(parts) for a class list."""
    if len(parts) == 1:
        return next(results)
    return Mixed.merge([next(results) for _ in parts], [part.text for part in parts])


def _as_list(x) -> tuple[list, bool]:
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("no images given")
        return list(x), False
    return [x], True


def _per_image(value, n: int, what: str) -> list:
    """A single text/region for every image, or one per image."""
    if value is None:
        return [None] * n
    if what == "text":
        if isinstance(value, str):
            return [value] * n
    elif isinstance(value, str) or (len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        return [value] * n  # one region (pixels, or a string of loc tokens)
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"{what} must be one value for all {n} images or a list of {n}, got {value!r}")
    return list(value)


def predict(
    florence,
    images,
    task: str | Task,
    text: str | Sequence[str | None] | None = None,
    region: Sequence[float] | Sequence[Sequence[float] | None] | None = None,
    *,
    max_new_tokens: int | None = None,
    tile=None,
    **options,
) -> Result | list[Result]:
    """One task on one image (-> Result) or on a list of images (-> list[Result]), decoded as one batch; the
    answer has the shape of `images`. A convenience over `Predictor`.

    text / region: the task's input, one for all images or one per image; a region is [x1, y1, x2, y2] in pixels of
    the original image. max_new_tokens: default the task's budget. Other keywords go to `Predictor`: score_mode
    ("loc": an instance's confidence is exp(mean log-prob of its location tokens), as Microsoft's original code;
    "label_loc": its label and location tokens, see `fiore.tasks.parsers`), coords ("bin": each coordinate at
    its bin's centre, as official code; "expected": sub-bin, the expected bin over the chosen one and its LOC_WINDOW
    neighbours on each side under the model's distribution), max_rows, image_batch, and
    `GenerationConfig` fields (num_beams, length_penalty, early_stopping, no_repeat_ngram_size, do_sample,
    temperature, top_k, top_p, generator, ...). Default decoding is greedy. tile: True or a `fiore.tiling.Tiling`
    to also run the tileable tasks on native-resolution tiles of large images and merge (needs supervision).
    """
    images, single = _as_list(images)
    texts, regions = _per_image(text, len(images), "text"), _per_image(region, len(images), "region")
    requests = [[Request.make(task, t, r, max_new_tokens)] for t, r in zip(texts, regions, strict=True)]
    results = [answers[0] for answers in _answer(florence, images, requests, tile, options)]
    return results[0] if single else results


def _answer(florence, images: list, requests: list[list[Request]], tile, options) -> list[list[Result]]:
    """One list of Results per image: all images encoded and decoded together, or, with `tile` (True or a
    `fiore.tiling.Tiling`), each image with its tiles (`fiore.tiling.predict_tiled`)."""
    predictor = Predictor(florence, **options)
    if not tile:
        predictor.set_images(images)
        return predictor.predict(requests)
    from fiore.tiling import Tiling, predict_tiled

    tiling = Tiling() if tile is True else tile
    pils = _load_images(florence, images)
    return [predict_tiled(predictor, image, rs, tiling) for image, rs in zip(pils, requests, strict=True)]


def _requests(tasks, max_new_tokens) -> list[Request]:
    """["od", "caption"] or {"od": {}, "caption_to_phrase_grounding": {"text": "a ball"}} -> Requests."""
    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    items = tasks.items() if isinstance(tasks, Mapping) else ((t, {}) for t in tasks)
    requests, seen = [], set()
    for name, inputs in items:
        inputs = dict(inputs or {})
        unknown = set(inputs) - {"text", "region", "max_new_tokens"}
        if unknown:
            raise TaskInputError(f"task {name}: unknown inputs {sorted(unknown)} (text, region, max_new_tokens)")
        task = get_task(name)
        if task.name in seen:
            raise TaskInputError(f"task {task.name!r} listed twice")
        seen.add(task.name)
        limit = max_new_tokens.get(task.name) if isinstance(max_new_tokens, Mapping) else max_new_tokens
        limit = inputs.get("max_new_tokens", limit)
        requests.append(Request.make(task, inputs.get("text"), inputs.get("region"), limit))
    if not requests:
        raise TaskInputError("no tasks given")
    return requests


def run(
    florence,
    images,
    tasks: Sequence[str] | Mapping[str, Mapping[str, Any]],
    *,
    max_new_tokens: int | Mapping[str, int] | None = None,
    tile=None,
    **options,
) -> dict[str, Result] | list[dict[str, Result]]:
    """Many tasks on one image (-> {task name: Result}) or on each of a list of images (-> list of dicts); the
    answer has the shape of `images`. A convenience over `Predictor`.

    Each image is encoded by the vision tower once; all its tasks reuse that encoding, their prompts are encoded as
    one batch and decoded together. `tasks`: a list of task names, or a dict name -> {"text": ..., "region": ...,
    "max_new_tokens": ...} for tasks that take inputs. max_new_tokens: one limit for all tasks, or per task name.
    tile and other keywords: as `predict`.
    """
    requests = _requests(tasks, max_new_tokens)
    images, single = _as_list(images)
    answers = _answer(florence, images, [requests] * len(images), tile, options)
    out = [{r.task.name: result for r, result in zip(requests, results, strict=True)} for results in answers]
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------- label scoring


def classify(
    florence,
    image,
    labels: Sequence[str],
    region: Sequence[float] | None = None,
    task: str | Task | None = None,
) -> Label:
    """Rank candidate `labels` for the whole image or a region (see `Predictor.classify`)."""
    predictor = Predictor(florence)
    predictor.set_images([image])
    return predictor.classify(labels, region=region, task=task)


@torch.inference_mode()
def _classify(florence, features, size, labels: Sequence[str], region, task) -> Label:
    """Rank candidate `labels` for the whole image or a region by their sequence log-likelihood.

    task: "classify" (fiore-trained models; the default without a region) or "region_to_category" (the default
    with a region; also the way to use official Florence-2 checkpoints, which then see the full-image box when no
    region is given). Each candidate is a teacher-forced target `<s> label` followed by the end of the label; all
    candidates go through the decoder as one batch against one image encoding.

    Score of a label: log p(label tokens | image, prompt) + log p(label ends), where "ends" is the probability of
    the next token being `</s>` or a location token (official region_to_category outputs echo the region as loc
    tokens after the label). Probabilities = softmax of the scores over the candidates. Returns a `Label` with the
    best label, `score` = its probability, and `ranking` = [(label, probability), ...] most likely first.
    """
    labels = list(labels) if not isinstance(labels, str) else [labels]
    if not labels:
        raise ValueError("classify needs at least one candidate label")
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ValueError(f"candidate labels must be distinct; repeated: {dup}")
    if task is None:
        task = "classify" if region is None else "region_to_category"
    task = get_task(task)
    if task.name not in ("classify", "region_to_category"):
        raise ValueError(f"classify scores labels under 'classify' or 'region_to_category', not {task.name!r}")

    model, tok = florence.model, florence.tokenizer
    if task.inputs == "region" and region is None:
        region = (0.0, 0.0, float(size[0]), float(size[1]))
    prompt = task.prompt(region=region, image_size=size) if task.inputs == "region" else task.prompt()
    targets = []
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"candidate labels must be non-empty strings, got {label!r}")
        if "<" in label or "\n" in label:  # would read as special tokens / end the label in the output grammar
            raise ValueError(f"candidate label {label!r} contains '<' or a line break, which a label cannot hold")
        ids = tok.encode(task.serialize(Label(label), size))
        if not ids:
            raise ValueError(f"label {label!r} encodes to no tokens")
        targets.append(ids)

    input_ids, attention_mask = florence.processor.prompt_ids([prompt])
    hidden, mask = model.encode(features, input_ids.to(model.device), attention_mask.to(model.device))
    start, bos, eos = florence.config.text.decoder_start_token_id, tok.bos_id, tok.eos_id
    enders = torch.tensor([eos, *range(tok.loc_id(0), tok.loc_id(999) + 1)], device=model.device)

    scores = []
    for c0 in range(0, len(targets), CLASSIFY_CHUNK):
        chunk = targets[c0 : c0 + CLASSIFY_CHUNK]
        T = max(len(t) for t in chunk) + 2  # decoder start, <s>, label tokens
        dec = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        for j, t in enumerate(chunk):
            dec[j, : len(t) + 2] = torch.tensor([start, bos, *t])
        # one cross-attention K/V computation, repeated to the chunk's rows (no per-candidate encoder work)
        cache = model.new_cache(hidden, mask, T).select(torch.zeros(len(chunk), dtype=torch.long))
        logp = torch.log_softmax(model.logits(model.decode(dec.to(model.device), None, None, cache)), -1)
        del cache
        for j, t in enumerate(chunk):
            n = len(t)
            # position p (decoder input dec[p]) predicts dec[p+1]; label tokens are predicted at 1..n, the end at n+1
            label_lp = logp[j, torch.arange(1, n + 1), torch.tensor(t, device=logp.device)].sum()
            end_lp = torch.logsumexp(logp[j, n + 1, enders], 0)
            scores.append(float(label_lp + end_lp))

    probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
    ranking = sorted(zip(labels, probs, strict=True), key=lambda x: -x[1])
    best, p_best = ranking[0]
    result = Label(best, task=task.name, score=p_best, ranking=[(lab, float(p)) for lab, p in ranking])
    if not all(math.isfinite(s) for s in scores):
        result.warnings.append("some candidates have zero probability under the model (log-likelihood -inf)")
    return result
