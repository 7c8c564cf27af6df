"""The closed vocabulary of the synthetic world: shapes, colours, sizes, backgrounds, positions and words.

Everything the generator can draw or say is named here, so captions, questions and the tests that check them share
one source of truth.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")

# Saturated or extreme colours, far from the mid-tone, low-saturation backgrounds (see `render.background`), so every
# object stands out on every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 30),
    "purple": (150, 45, 200),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# Circumradius as a fraction of the canvas' short side: diameters ~0.15, ~0.24 and ~0.35 of it, well apart, and the
# smallest still >= 1/8 of the short side so it survives a resize to 256x256.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.075, 0.09),
    "medium": (0.115, 0.13),
    "large": (0.165, 0.185),
}

# Background kind -> the adjective captions use.
BACKGROUNDS: dict[str, str] = {"solid": "plain", "gradient": "gradient", "noise": "noisy", "stripes": "striped"}

# 3x3 grid of the canvas, row-major; the names answer "where is ...?" questions.
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# How a caption says "at <position>".
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}

# Short, distinct words that never name a shape, colour or size (so OCR text cannot be confused with a caption word).
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "bird", "fish", "car", "boat", "book", "milk",
    "rain", "snow", "moon", "lake", "rock", "leaf", "hat", "cup", "pen", "key",
    "door", "lamp", "bell", "ship", "frog", "bear", "lion", "wolf", "duck", "goat",
    "bee", "owl", "fox", "cow", "pig", "egg", "jam", "tea", "pie", "cake",
    "rice", "corn", "apple", "bread", "map", "king", "gold", "hill", "road", "wind",
)  # fmt: skip

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def plural(noun: str) -> str:
    """English plural of a shape name ("cross" -> "crosses")."""
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def article(word: str) -> str:
    """ "a" or "an" before `word`."""
    return "an" if word[:1] in "aeiou" else "a"


def count_phrase(n: int, noun: str) -> str:
    """ "a red star" / "an orange star" / "two red stars"."""
    if n == 1:
        return f"{article(noun)} {noun}"
    words = noun.split()
    words[-1] = plural(words[-1])
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {' '.join(words)}"
