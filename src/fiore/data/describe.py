"""Templated language for synthetic scenes: captions at three levels, referring expressions, phrase groundings,
questions and answers, open-vocabulary queries and the classification label.

Everything is a pure function of the scene (objects with their `attributes`, texts, background kind), so the same
scene always reads the same way. Objects arrive in raster order (see `synthetic._objects`).
"""

from __future__ import annotations

from collections import Counter

from fiore.data import lexicon
from fiore.data.sample import QA, Grounding, Object, Ref, Sample, TextItem

_EXTREMES = (  # word, coordinate (0 = x, 1 = y), +1 = smallest wins, -1 = largest wins
    ("leftmost", 0, 1),
    ("rightmost", 0, -1),
    ("topmost", 1, 1),
    ("bottommost", 1, -1),
)
EXTREME_GAP = 0.1  # the extreme object must lead the next by this fraction of the canvas side


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _name(o: Object, *keys: str) -> str:
    return " ".join(o.attributes[k] for k in keys)


def _center(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def position_of(box, width: int, height: int) -> str:
    """The 3x3-grid cell name ("top left", "center", ...) holding the centre of `box`."""
    cx, cy = _center(box)
    return lexicon.POSITIONS[min(int(3 * cy / height), 2)][min(int(3 * cx / width), 2)]


def _groups(objects: list[Object]) -> list[tuple[str, list[int]]]:
    """(colour shape, object indices) in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault(_name(o, "color", "shape"), []).append(i)
    return list(groups.items())


def caption(objects: list[Object]) -> tuple[str, list[tuple[str, list[int]]]]:
    """Short caption ("a red star and two blue circles") and its phrases with the objects each names."""
    if not objects:
        return "an empty scene", []
    phrases = [(lexicon.count_phrase(len(idx), name), idx) for name, idx in _groups(objects)]
    return _join([p for p, _ in phrases]), phrases


def _text_clause(texts: list[TextItem]) -> str:
    quoted = [f'"{t.text}"' for t in texts]
    return f"the text {quoted[0]}" if len(quoted) == 1 else f"the texts {_join(quoted)}"


def detailed_caption(sample: Sample, background: str) -> str:
    """One sentence: every object with size and position, the background, the texts."""
    parts = [
        f"a {_name(o, 'size', 'color', 'shape')} {lexicon.POSITION_PHRASES[o.attributes['position']]}"
        for o in sample.objects
    ]
    out = f"{_join(parts) if parts else 'nothing'} on a {lexicon.BACKGROUNDS[background]} background"
    if sample.texts:
        out += f", with {_text_clause(sample.texts)}"
    return out + "."


def more_detailed_caption(sample: Sample, background: str) -> str:
    """A paragraph: counts, then one sentence per object, then the texts with their positions."""
    n = len(sample.objects)
    noun = "object" if n == 1 else "objects"
    out = [f"The image shows {lexicon.NUMBER_WORDS[n] if n <= 10 else n} {noun} on a "
           f"{lexicon.BACKGROUNDS[background]} background."]  # fmt: skip
    counts = Counter(o.label for o in sample.objects)
    if counts:
        verb = "is" if next(iter(counts.values())) == 1 else "are"  # agrees with the first noun
        out.append(f"There {verb} {_join([lexicon.count_phrase(c, s) for s, c in counts.items()])}.")
    for o in sample.objects:
        out.append(f"A {_name(o, 'size', 'color', 'shape')} is {lexicon.POSITION_PHRASES[o.attributes['position']]}.")
    if not sample.texts:
        out.append("There is no text.")
    for t in sample.texts:
        where = lexicon.POSITION_PHRASES[position_of(t.box, sample.width, sample.height)]
        out.append(f'The text "{t.text}" is written {where}.')
    return " ".join(out)


def referring_expression(objects: list[Object], i: int, width: int, height: int) -> str | None:
    """The shortest template that names objects[i] and no other object, None when none does.

    Templates, tried in order: "the star", "the red star", "the large red star", then "the leftmost star",
    "the leftmost red star", ... (extremes only with a clear lead, EXTREME_GAP of the canvas side).
    """
    target = objects[i]
    for keys in (("shape",), ("color", "shape"), ("size", "color", "shape")):
        words = [target.attributes[k] for k in keys]
        if sum(all(o.attributes[k] == w for k, w in zip(keys, words, strict=True)) for o in objects) == 1:
            return "the " + " ".join(words)
    for keys in (("shape",), ("color", "shape"), ("size", "color", "shape")):
        same = [j for j, o in enumerate(objects) if all(o.attributes[k] == target.attributes[k] for k in keys)]
        for word, axis, sign in _EXTREMES:
            ranked = sorted(same, key=lambda j: sign * _center(objects[j].box)[axis])
            gap = abs(_center(objects[ranked[0]].box)[axis] - _center(objects[ranked[1]].box)[axis])
            if ranked[0] == i and gap >= EXTREME_GAP * (width if axis == 0 else height):
                return f"the {word} " + " ".join(target.attributes[k] for k in keys)
    return None


def questions(sample: Sample) -> list[QA]:
    """Counting, colour, existence, position and reading questions whose answers the scene fixes."""
    objs = sample.objects
    qas: list[QA] = []
    shape_counts = Counter(o.label for o in objs)
    absent = [s for s in lexicon.SHAPES if s not in shape_counts]
    qas.append(QA("how many objects are there?", str(len(objs)), kind="counting"))
    for shape, c in shape_counts.items():
        qas.append(QA(f"how many {lexicon.plural(shape)} are there?", str(c), kind="counting"))
    if absent:
        # One absent shape, picked by the scene (not at random) so the question set is a function of the scene.
        shape = absent[len(objs) % len(absent)]
        qas.append(QA(f"how many {lexicon.plural(shape)} are there?", "0", kind="counting"))
        qas.append(QA(f"is there a {shape}?", "no", kind="existence"))
    for shape, c in shape_counts.items():
        qas.append(QA(f"is there a {shape}?", "yes", kind="existence"))
        if c == 1:
            color = next(o.attributes["color"] for o in objs if o.label == shape)
            qas.append(QA(f"what color is the {shape}?", color, kind="color"))
    pairs = Counter(_name(o, "color", "shape") for o in objs)
    for o in objs:
        name = _name(o, "color", "shape")
        if pairs[name] == 1:
            qas.append(QA(f"where is the {name}?", o.attributes["position"], kind="position"))
    if objs:
        # A present shape in a colour it does not have: a negative that needs both attributes.
        o = objs[0]
        missing = [c for c in lexicon.COLORS if f"{c} {o.label}" not in pairs]
        color = missing[len(objs) % len(missing)]
        qas.append(QA(f"is there a {color} {o.label}?", "no", kind="existence"))
        qas.append(QA(f"is there a {_name(o, 'color', 'shape')}?", "yes", kind="existence"))
    if len(sample.texts) == 1:
        qas.append(QA("what does the text say?", sample.texts[0].text, kind="reading"))
    numbers = [t.text for t in sample.texts if t.text.isdigit()]
    if len(numbers) == 1:
        qas.append(QA("what number is written?", numbers[0], kind="reading"))
    return qas


def label(background: str) -> str:
    """Classification label: the scene's background kind (solid, gradient, noise, stripes).

    A property of the whole image with no near-ties: an earlier rule (the shape of the largest object) was often
    decided by a few pixels between two objects, which made the label ill-posed rather than hard.
    """
    return background


def vocabulary(objects: list[Object]) -> list[str]:
    """Open-vocabulary queries that name objects in the scene: every shape, and every "colour shape", in order."""
    out: dict[str, None] = {}
    for o in objects:
        out[o.label] = None
    for o in objects:
        out[_name(o, "color", "shape")] = None
    return list(out)


def query_matches(query: str, obj: Object) -> bool:
    """Whether an open-vocabulary query names `obj`: every query word is its label or a word of its description."""
    words = set((obj.description or "").split()) | {obj.label}
    return bool(query.split()) and all(w in words for w in query.split())


def annotate(sample: Sample, background: str) -> Sample:
    """Fill captions, refs, groundings, questions, label and vocabulary of `sample` from its objects and texts."""
    short, phrases = caption(sample.objects)
    sample.captions = {
        "caption": short,
        "detailed_caption": detailed_caption(sample, background),
        "more_detailed_caption": more_detailed_caption(sample, background),
    }
    sample.groundings = [Grounding(short, [(p, [sample.objects[i].box for i in idx]) for p, idx in phrases])]
    sample.refs = []
    for i in range(len(sample.objects)):
        expr = referring_expression(sample.objects, i, sample.width, sample.height)
        if expr is not None:
            sample.refs.append(Ref(expr, i))
    sample.qas = questions(sample)
    sample.label = label(background)
    sample.vocabulary = vocabulary(sample.objects)
    return sample
