"""`Task`: one object per task holding its prompt, its target serializer and its output parser."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from fiore.results import Result
from fiore.tasks import parsers
from fiore.tasks.locations import LOC_RE, box_to_tokens, check_image_size, parse_locs

if TYPE_CHECKING:
    from fiore.data.sample import Sample
    from fiore.eval.scorers import Scorer

Inputs = Literal["none", "text", "region"]
MAX_TEXT_CHARS = 1000  # a cheap guard here; the processor enforces the real limit in tokens


class TaskInputError(ValueError):
    """A task was given the wrong inputs (missing text/region, too long, malformed region)."""


@dataclass
class Example:
    """One (inputs, ground truth) pair a task draws from a Sample: used by training and evaluation alike."""

    text: str | None = None
    region: tuple[float, float, float, float] | None = None  # xyxy pixels
    target: Result | None = None
    raw_target: str | None = None  # the exact training string, when a dataset gives one (Florence-2 JSONL, replay)


@dataclass(frozen=True)
class Task:
    """A Florence-2 task.

    name:            snake case of the token ("od" for "<OD>")
    token:           "<OD>"; not a tokenizer token: `prompt()` turns it into prompt text
    template:        prompt text, with "{input}" where the text or region goes
    inputs:          "none" | "text" | "region"
    max_new_tokens:  default generation budget (dense outputs get more)
    scorer:          the `fiore.eval.scorers.Scorer` class its predictions are evaluated by
    """

    name: str
    token: str
    template: str
    inputs: Inputs
    max_new_tokens: int
    description: str
    _parse: Callable[[parsers.ParseInput, str], Result] = field(repr=False)
    _serialize: Callable[[Result, tuple[float, float]], str] = field(repr=False)
    _examples: Callable[[Sample], list[Example]] = field(repr=False)
    scorer: type[Scorer] | None = field(default=None, repr=False)  # evaluates predictions (`fiore.eval.scorers`)
    max_text_chars: int = MAX_TEXT_CHARS
    echoes_region: bool = False  # the answer is followed by the region's 4 loc tokens, as official models emit it
    class_list: bool = False  # text may name several classes, "red star; blue circle": one row each (`Request.parts`)
    tileable: bool = False  # its answer is a set of located instances that tiles of the image can find separately

    def prompt(self, text: str | None = None, region: Sequence[float] | str | None = None, image_size=None) -> str:
        """The prompt text for this task.

        text:        required for "text" tasks (caption, expression, class name, question), refused otherwise.
        region:      required for "region" tasks: [x1, y1, x2, y2] in pixels of an image of `image_size`
                     (width, height), quantized to 4 loc tokens; or a string of exactly 4 loc tokens.
        """
        text, region = self.check_inputs(text, region)
        if self.inputs == "none":
            return self.template
        if self.inputs == "text":
            return self.template.format(input=text)
        return self.template.format(input=self.region_tokens(region, image_size))

    def check_inputs(self, text=None, region=None) -> tuple[str | None, tuple[float, ...] | str | None]:
        """The inputs this task takes, validated without the image: (stripped text, region as a 4-tuple of floats
        or a string of 4 loc tokens). The one rule set for every caller; `region_tokens` adds the image's."""
        if self.inputs == "none":
            if text is not None or region is not None:
                raise TaskInputError(
                    f"task {self.token} takes no input; got {'text' if text is not None else 'region'}"
                )
            return None, None
        if self.inputs == "text":
            if region is not None:
                raise TaskInputError(f"task {self.token} takes text, not a region")
            return self._check_text(text), None
        if text is not None:
            raise TaskInputError(f"task {self.token} takes a region, not text")
        return None, self._check_region(region)

    def _check_text(self, text) -> str:
        if text is None:
            raise TaskInputError(f"task {self.token} needs a text input ({self.description})")
        if not isinstance(text, str):
            raise TaskInputError(f"task {self.token} needs text as a str, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise TaskInputError(f"task {self.token} needs a non-empty text input")
        if len(text) > self.max_text_chars:
            raise TaskInputError(
                f"text input for {self.token} is {len(text)} characters; the limit is {self.max_text_chars}"
            )
        return text

    def _check_region(self, region) -> tuple[float, float, float, float] | str:
        if region is None:
            raise TaskInputError(f"task {self.token} needs a region: [x1, y1, x2, y2] in pixels and image_size")
        if isinstance(region, str):
            locs = LOC_RE.findall(region)
            if len(locs) != 4 or LOC_RE.sub("", region).strip():
                raise TaskInputError(f"a region string must be exactly 4 <loc_k> tokens, got {region!r}")
            if any(int(k) > 999 for k in locs):
                raise TaskInputError(f"location tokens go from <loc_0> to <loc_999>, got {region!r}")
            return "".join(f"<loc_{int(k)}>" for k in locs)
        try:
            x1, y1, x2, y2 = (float(v) for v in region)
        except (TypeError, ValueError):
            raise TaskInputError(f"a region is [x1, y1, x2, y2] in pixels, got {region!r}") from None
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise TaskInputError(f"region coordinates must be finite, got {region!r}")
        if x2 < x1 or y2 < y1:
            raise TaskInputError(f"region must have x1 <= x2 and y1 <= y2, got {region!r}")
        return x1, y1, x2, y2

    def region_tokens(self, region, image_size) -> str:
        """Validate a region and return its 4 loc tokens. A region in pixels must overlap the image of
        `image_size`; a part beyond an edge is clamped there by quantization, as the official processor does (a
        detector's box often overshoots by a pixel)."""
        region = self._check_region(region)
        if isinstance(region, str):
            return region
        if image_size is None:
            raise TaskInputError(f"task {self.token}: a region in pixels needs image_size=(width, height)")
        try:
            width, height = check_image_size(image_size)
        except ValueError as e:
            raise TaskInputError(str(e)) from None
        x1, y1, x2, y2 = region
        if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
            raise TaskInputError(f"region {list(region)!r} lies outside the {width:g}x{height:g} image")
        return box_to_tokens(region, (width, height))

    def serialize(self, result: Result, image_size) -> str:
        """Training target for `result` (no `<s>`/`</s>`); coordinates quantized against `image_size`."""
        return self._serialize(result, image_size)

    def target(self, example: Example, image_size) -> str:
        """The training target of `example`: the string an official Florence-2 checkpoint emits for it.

        That is `serialize(example.target)`, plus, for the region tasks that echo their input (region to
        category / description / OCR), the region's 4 loc tokens after the answer: official checkpoints answer
        `car<loc_52><loc_332><loc_932><loc_774>`, and clients that read Florence-2 output expect it.
        """
        if example.raw_target is not None:
            return example.raw_target
        text = self.serialize(example.target, image_size)
        if self.echoes_region:
            text += self.region_tokens(example.region, image_size)
        return text

    def parse(self, text: str, image_size, token_logprobs=None, score_mode: str = "loc", token_bins=None) -> Result:
        """Raw decoded text (specials included, e.g. "</s><s>car<loc_1>...</s>") -> typed Result. Never raises on
        model output; see `fiore.tasks.parsers` for the score definitions. `token_bins` (one per token of
        `token_logprobs`, NaN for non-location tokens): sub-bin positions that replace the bin centres."""
        p = parsers.make_input(text, image_size, token_logprobs, score_mode, token_bins)
        result = self._parse(p, self.name)
        past = [k for k in parse_locs(text) if k >= 1000]
        if past:  # no model vocabulary has them, but a hand-written or foreign string may
            result.warnings.append(
                f"{len(past)} location token(s) past <loc_999> (first <loc_{past[0]}>) clamped to the image edge"
            )
        return result

    def examples(self, sample: Sample) -> list[Example]:
        """The (inputs, ground truth) pairs this task draws from `sample` (may be empty): from its annotations, and
        its raw prompt/target pairs of this task (trained verbatim; parsed for evaluation)."""
        examples = list(self._examples(sample))
        for pair in sample.pairs:
            if pair.task == self.name:
                examples.append(self.pair_example(pair, sample.size))
        return examples

    def pair_example(self, pair, image_size) -> Example:
        """A raw pair (`fiore.data.sample.PromptPair`) as an Example; TaskInputError if its input does not fit."""
        text = region = None
        if self.inputs == "text":
            text = self._check_text(pair.input)
        elif self.inputs == "region":
            region = self.region_tokens(pair.input.strip(), image_size)
        elif pair.input.strip():
            raise TaskInputError(f"task {self.token} takes no input, but the prompt has {pair.input.strip()!r}")
        target = self.parse(pair.target, image_size) if image_size[0] > 0 and image_size[1] > 0 else None
        return Example(text=text, region=region, target=target, raw_target=pair.target)
