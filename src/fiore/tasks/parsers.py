"""Generated text -> typed results, following the official Florence-2 parse rules (transformers'
`Florence2PostProcessor`) so `to_florence()` matches `post_process_generation`, with two deliberate deviations:
float coordinates and Unicode labels kept. The parsers never raise on model output: what they cannot read is
skipped and named in `result.warnings`.

Scores. Given `token_logprobs` = [(piece, logprob), ...] whose pieces concatenate exactly to the text:
- each instance's score = exp(mean log-prob of its tokens); with score_mode "loc" its tokens are its location
  tokens only (Microsoft's formula: the 4 loc tokens of a box), with "label_loc" the label tokens as well;
- `result.score` (and a text result's score) = exp(mean log-prob of all tokens except `<s>`, `</s>`, `<pad>`).
Without log-probs every score is None (never a made-up 1.0).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from fiore.results import Boxes, Label, Mixed, Phrases, Polygons, Quads, Result, Text
from fiore.tasks.locations import LOC_RE, check_image_size, dequantize_fraction, tokens_to_points

log = logging.getLogger("fiore.tasks")

SPECIAL_PIECES = ("<s>", "</s>", "<pad>")
SCORE_MODES = ("loc", "label_loc")

# Official phrase-grounding stop list (pronouns and generic words), from transformers' Florence-2 conversion config.
BANNED_GROUNDING_PHRASES = frozenset(
    "it I me mine you your yours he him his she her hers they them their theirs one oneself we us our ours its "
    "myself yourself himself herself itself ourselves yourselves themselves this that these those who whom whose "
    "which what all another any anybody anyone anything each everybody everyone everything few many nobody none "
    "several some somebody someone something the a an lots image images".split()
) | {"each other", "one another", "the image", "a group", "other objects", "a set"}

# The official regular expressions.
_PHRASE_BOXES = re.compile(r"[^<]+(?:<loc_\d+>){4,}")
_EMPTY_PHRASE_BOXES = re.compile(r"(?:<loc_\d+>){4,}")
_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_BOX = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
_PHRASE_POLYS = re.compile(r"[^<]+(?:<loc_\d+>|<sep>|<poly>|</poly>){4,}")
_EMPTY_PHRASE_POLYS = re.compile(r"(?:<loc_\d+>|<sep>|<poly>|</poly>){4,}")
_POLY_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
_POLY_INSTANCE = re.compile(r"<poly>(.*?)</poly>")
_POLY_RING = re.compile(r"((?:<loc_\d+>)+)(?:<sep>|$)")
_OCR = re.compile(r"(.+?)" + r"<loc_(\d+)>" * 8)

Span = tuple[int, int]  # [start, end) character offsets into the raw text


@dataclass
class Clean:
    """Text with `<s>`, `</s>`, `<pad>` removed (in that order, like the official parser), plus, for each kept
    character, its offset in the raw text, so spans found in the clean text map back onto tokens."""

    text: str
    origin: list[int]

    @classmethod
    def of(cls, raw: str, remove: Sequence[str] = SPECIAL_PIECES) -> Clean:
        text, origin = raw, list(range(len(raw)))
        for token in remove:  # sequential, as `str.replace` chains are: "<<s>/s>" loses both
            keep = [True] * len(text)
            for m in re.finditer(re.escape(token), text):
                keep[m.start() : m.end()] = [False] * (m.end() - m.start())
            origin = [o for o, k in zip(origin, keep, strict=True) if k]
            text = "".join(c for c, k in zip(text, keep, strict=True) if k)
        return cls(text, origin)

    def raw_span(self, start: int, end: int) -> list[int]:
        return self.origin[start:end]


@dataclass
class Scorer:
    """Maps raw-text character offsets to tokens and averages their log-probs."""

    char_token: list[int] = field(default_factory=list)  # raw char offset -> token index
    logprobs: list[float] = field(default_factory=list)
    special: list[bool] = field(default_factory=list)

    @classmethod
    def of(cls, text: str, token_logprobs: Sequence[tuple[str, float]] | None, warnings: list[str]) -> Scorer | None:
        if token_logprobs is None:
            return None
        pieces = [p for p, _ in token_logprobs]
        if "".join(pieces) != text:
            warnings.append("token_logprobs pieces do not concatenate to the text; scores left out")
            return None
        char_token = [i for i, p in enumerate(pieces) for _ in p]
        return cls(char_token, [float(lp) for _, lp in token_logprobs], [p in SPECIAL_PIECES for p in pieces])

    def tokens(self, raw_chars: Sequence[int]) -> list[int]:
        """The tokens covering raw-text characters `raw_chars`, each once, in text order."""
        return sorted({self.char_token[c] for c in raw_chars})

    def score(self, raw_chars: Sequence[int]) -> float | None:
        return self._mean_exp([self.logprobs[t] for t in self.tokens(raw_chars) if not self.special[t]])

    def sequence_score(self) -> float | None:
        return self._mean_exp([lp for lp, s in zip(self.logprobs, self.special, strict=True) if not s])

    @staticmethod
    def _mean_exp(lps: list[float]) -> float | None:
        return math.exp(sum(lps) / len(lps)) if lps else None


@dataclass
class Instance:
    """One parsed instance: label, geometry, and the clean-text spans of its label and location tokens."""

    label: str
    geometry: list  # box [4], ring list [[...], ...], quad [8] or box list [[4], ...]
    label_span: Span
    loc_spans: list[Span]


def _instance_scores(insts: list[Instance], clean: Clean, scorer: Scorer | None, mode: str) -> list[float] | None:
    if scorer is None:
        return None
    scores = []
    for inst in insts:
        spans = list(inst.loc_spans) + ([inst.label_span] if mode == "label_loc" else [])
        chars = [c for s, e in spans for c in clean.raw_span(s, e)]
        score = scorer.score(chars)
        scores.append(float("nan") if score is None else score)
    return scores


def _label(pattern: re.Pattern, phrase: str, offset: int) -> tuple[str, Span] | None:
    m = pattern.search(phrase)
    if m is None:  # e.g. a newline inside the label: the official parser drops the phrase
        return None
    label = m.group().strip()
    start = offset + m.start() + (len(m.group()) - len(m.group().lstrip()))
    return label, (start, start + len(label))


def _boxes_in(phrase: str, offset: int, size) -> list[tuple[list[float], Span]]:
    out = []
    for m in _BOX.finditer(phrase):
        box = tokens_to_points([int(m.group(j)) for j in range(1, 5)], size)
        out.append((box, (offset + m.start(), offset + m.end())))
    return out


def boxes_instances(clean: str, size, allow_empty_phrase: bool) -> list[Instance]:
    """description_with_bboxes / bboxes: one instance per box; a phrase with several boxes repeats its label."""
    pattern = _EMPTY_PHRASE_BOXES if allow_empty_phrase else _PHRASE_BOXES
    insts = []
    for m in pattern.finditer(clean):
        # The official `<ground>`/`<obj>` removal is a no-op here: a phrase holds '<' only in loc tokens.
        found = _label(_LABEL, m.group(), m.start())
        if found is None:
            continue
        label, label_span = found
        for box, span in _boxes_in(m.group(), m.start(), size):
            insts.append(Instance(label, box, label_span, [span]))
    return insts


def phrase_instances(clean: str, size) -> list[Instance]:
    """phrase_grounding: one instance per phrase, with all its boxes; stop-list phrases are dropped."""
    insts = []
    for m in _PHRASE_BOXES.finditer(clean):
        found = _label(_LABEL, m.group(), m.start())
        if found is None or found[0] in BANNED_GROUNDING_PHRASES:
            continue
        boxes = _boxes_in(m.group(), m.start(), size)
        if boxes:
            insts.append(Instance(found[0], [b for b, _ in boxes], found[1], [s for _, s in boxes]))
    return insts


def polygon_instances(clean: str, size, allow_empty_phrase: bool) -> list[Instance]:
    """polygons / description_with_polygons: `<poly>...</poly>` blocks are instances (else the whole phrase is
    one); inside, `<sep>` separates the rings of one instance; an odd trailing coordinate is dropped."""
    pattern = _EMPTY_PHRASE_POLYS if allow_empty_phrase else _PHRASE_POLYS
    insts = []
    for m in pattern.finditer(clean):
        phrase, offset = m.group(), m.start()
        lead = re.match(r"<loc_\d+>", phrase)  # the label search skips one leading loc token
        skip = lead.end() if lead else 0
        if not phrase[skip:] and not allow_empty_phrase:
            continue
        found = _label(_POLY_LABEL, phrase[skip:], offset + skip)
        if found is None:
            continue
        if "<poly>" in phrase and "</poly>" in phrase:
            blocks = [(b.group(1), offset + b.start(1)) for b in _POLY_INSTANCE.finditer(phrase)]
        else:
            blocks = [(phrase, offset)]
        for block, block_offset in blocks:
            rings, spans = [], []
            for r in _POLY_RING.finditer(block):
                locs = list(LOC_RE.finditer(r.group(1)))
                used = locs[: len(locs) - len(locs) % 2]
                rings.append(tokens_to_points([int(x.group(1)) for x in used], size))
                base = block_offset + r.start(1)
                spans += [(base + x.start(), base + x.end()) for x in used]
            if rings:
                insts.append(Instance(found[0], rings, found[1], spans))
    return insts


def ocr_instances(clean: str, size) -> list[Instance]:
    """ocr: text followed by 8 loc tokens (a quadrilateral, 4 points clockwise from top-left)."""
    insts = []
    for m in _OCR.finditer(clean):
        quad = tokens_to_points([int(m.group(j)) for j in range(2, 10)], size)
        content = m.group(1)
        start = m.start(1) + len(content) - len(content.lstrip())
        label = content.strip()
        loc_start = m.end(1)
        spans = [(loc_start + x.start(), loc_start + x.end()) for x in LOC_RE.finditer(m.group()[len(content) :])]
        insts.append(Instance(label, quad, (start, start + len(label)), spans))
    return insts


def _unread(clean: str, insts: list[Instance]) -> list[str]:
    """Loc tokens the parser could not attach to any instance (truncated or malformed output)."""
    used = {s for inst in insts for s in inst.loc_spans}
    covered = sorted(used)
    stray = 0
    for m in LOC_RE.finditer(clean):
        if not any(s <= m.start() and m.end() <= e for s, e in covered):
            stray += 1
    return [f"{stray} location token(s) could not be read (malformed or truncated output)"] if stray else []


def _sub_bin(insts: list[Instance], p: ParseInput) -> list[Instance]:
    """Instances whose coordinates come from the sub-bin location of their loc tokens (`p.token_bins`, the
    expected bin near each chosen one) instead of the chosen bins' centres; unchanged without token_bins or where a
    token has none. The loc tokens of an instance, in order, are its flattened coordinates, x and y alternating."""
    if p.token_bins is None or p.scorer is None:
        return insts
    width, height = p.size
    out = []
    for inst in insts:
        tokens = p.scorer.tokens([c for start, end in inst.loc_spans for c in p.clean.raw_span(start, end)])
        values = [float(p.token_bins[t]) for t in tokens]
        if len(values) != len(_flatten(inst.geometry)) or any(math.isnan(v) for v in values):
            out.append(inst)
            continue
        out.append(dataclasses.replace(inst, geometry=_rebuild(inst.geometry, iter(values), width, height)))
    return out


def _flatten(geometry) -> list[float]:
    if geometry and isinstance(geometry[0], list):
        return [v for g in geometry for v in _flatten(g)]
    return list(geometry)


def _rebuild(geometry, bins, width: float, height: float):
    """`geometry`'s nesting with each coordinate from the next of `bins`; x and y alternate within each list."""
    if geometry and isinstance(geometry[0], list):
        return [_rebuild(g, bins, width, height) for g in geometry]
    return [dequantize_fraction(next(bins), width if i % 2 == 0 else height) for i in range(len(geometry))]


# ---- per-kind entry points: (raw text, image size, log-probs, mode) -> Result ----------------------------------


@dataclass
class ParseInput:
    raw: str
    size: tuple[float, float]
    token_logprobs: Sequence[tuple[str, float]] | None
    score_mode: str
    warnings: list[str] = field(default_factory=list)
    token_bins: Sequence[float] | None = None  # sub-bin location of each token of token_logprobs (NaN: none)

    def __post_init__(self):
        self.raw = "" if self.raw is None else str(self.raw)
        self.clean = Clean.of(self.raw)
        self.scorer = Scorer.of(self.raw, self.token_logprobs, self.warnings)


def _finish(result: Result, p: ParseInput, task: str) -> Result:
    result.task = task
    result.warnings = list(p.warnings) + result.warnings
    if p.scorer is not None and result.score is None:
        result.score = p.scorer.sequence_score()
    for w in result.warnings:
        log.debug("%s: %s", task, w)
    return result


def official_pure_text(raw: str) -> str:
    return raw.replace("<s>", "").replace("</s>", "").strip()


def parse_text(p: ParseInput, task: str, strip_locs: bool) -> Text:
    raw = official_pure_text(p.raw)
    text = raw.replace("<pad>", "")
    if strip_locs:  # region tasks echo the region's loc tokens
        text = LOC_RE.sub("", text)
    text = text.strip()
    return _finish(Text(text, raw=None if raw == text else raw), p, task)


def parse_label(p: ParseInput, task: str) -> Label:
    t = parse_text(p, task, strip_locs=True)
    return _finish(Label(t.text, raw=t.raw), p, task)


def parse_boxes(p: ParseInput, task: str, allow_empty_phrase: bool) -> Boxes:
    insts = _sub_bin(boxes_instances(p.clean.text, p.size, allow_empty_phrase), p)
    scores = _instance_scores(insts, p.clean, p.scorer, p.score_mode)
    result = Boxes([i.geometry for i in insts], [i.label for i in insts], scores)
    result.warnings = _unread(p.clean.text, insts)
    return _finish(result, p, task)


def parse_phrases(p: ParseInput, task: str) -> Phrases:
    insts = _sub_bin(phrase_instances(p.clean.text, p.size), p)
    scores = _instance_scores(insts, p.clean, p.scorer, p.score_mode)
    result = Phrases([i.label for i in insts], [i.geometry for i in insts], scores)
    return _finish(result, p, task)


def _polygon_warnings(insts: list[Instance]) -> list[str]:
    bad = sum(1 for i in insts for ring in i.geometry if len(ring) < 6)
    return [f"{bad} polygon ring(s) have fewer than 3 points"] if bad else []


def parse_polygons(p: ParseInput, task: str, allow_empty_phrase: bool) -> Polygons:
    insts = _sub_bin(polygon_instances(p.clean.text, p.size, allow_empty_phrase), p)
    scores = _instance_scores(insts, p.clean, p.scorer, p.score_mode)
    result = Polygons([i.geometry for i in insts], [i.label for i in insts], scores)
    result.warnings = _unread(p.clean.text, insts) + _polygon_warnings(insts)
    return _finish(result, p, task)


def parse_quads(p: ParseInput, task: str) -> Quads:
    insts = _sub_bin(ocr_instances(p.clean.text, p.size), p)
    scores = _instance_scores(insts, p.clean, p.scorer, p.score_mode)
    result = Quads([i.geometry for i in insts], [i.label for i in insts], scores)
    result.warnings = _unread(p.clean.text, insts)
    return _finish(result, p, task)


def parse_mixed(p: ParseInput, task: str) -> Mixed:
    """description_with_bboxes_or_polygons: polygons when the raw text holds `<poly>`, else boxes."""
    inner = ParseInput(p.raw, p.size, p.token_logprobs, p.score_mode, token_bins=p.token_bins)  # its own warnings
    if "<poly>" in p.raw:
        polys = parse_polygons(inner, task, False)
        result = Mixed(polygons=polys)
        result.warnings = polys.warnings
    else:
        boxes = parse_boxes(inner, task, False)
        result = Mixed(boxes=boxes)
        result.warnings = boxes.warnings
    for part in (result.boxes, result.polygons):
        part.task, part.warnings = task, []
    p.warnings = []  # already carried by the inner parse
    return _finish(result, p, task)


def make_input(text, image_size, token_logprobs, score_mode, token_bins=None) -> ParseInput:
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    size = check_image_size(image_size)
    if token_bins is not None and (token_logprobs is None or len(token_bins) != len(token_logprobs)):
        raise ValueError("token_bins needs token_logprobs, one bin (or NaN) per token")
    return ParseInput(text, size, token_logprobs, score_mode, token_bins=token_bins)
