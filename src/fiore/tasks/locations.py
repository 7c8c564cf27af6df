"""The one place where location bins live: pixel coordinates <-> `<loc_k>` tokens.

Florence-2 splits each image axis into 1000 bins of the ORIGINAL image size (not the resized model input):
encode with floor into the bin, clamp to 0..999; decode at the bin centre (k + 0.5) * size / 1000 as a float.
There is no `<loc_1000>`; a coordinate exactly on the right/bottom edge lands in bin 999. A round trip therefore
moves any in-image coordinate by at most half a bin (size / 2000).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

BINS = 1000
LOC_RE = re.compile(r"<loc_(\d+)>")


def _check_size(size: float) -> float:
    if not (isinstance(size, (int, float)) and math.isfinite(size) and size > 0):
        raise ValueError(f"image size must be a positive number of pixels, got {size!r}")
    return float(size)


def check_image_size(image_size: Sequence[float]) -> tuple[float, float]:
    """Validate an (width, height) pair and return it as floats."""
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    return _check_size(width), _check_size(height)


def quantize(value: float, size: float) -> int:
    """Pixel coordinate -> bin index in 0..999 (floor, then clamp)."""
    size = _check_size(size)
    if not math.isfinite(value):
        raise ValueError(f"coordinate must be a finite number, got {value!r}")
    return min(max(math.floor(value / (size / BINS)), 0), BINS - 1)


def dequantize(index: int, size: float) -> float:
    """Bin index -> pixel coordinate at the bin centre (float). Indices outside 0..999 are clamped."""
    size = _check_size(size)
    index = min(max(int(index), 0), BINS - 1)
    return (index + 0.5) * size / BINS  # same bin centre as (k + 0.5) * (size / 1000), fewer rounding digits


def dequantize_fraction(position: float, size: float) -> float:
    """A fractional bin position (0..999, e.g. an expected bin) -> pixel coordinate; integer positions give the bin
    centres `dequantize` gives. Positions outside 0..999 are clamped."""
    size = _check_size(size)
    return (min(max(float(position), 0.0), BINS - 1) + 0.5) * size / BINS


def loc_token(index: int) -> str:
    if not 0 <= index < BINS:
        raise ValueError(f"location bin must be in 0..{BINS - 1}, got {index}")
    return f"<loc_{index}>"


def points_to_tokens(coords: Sequence[float], image_size: Sequence[float]) -> str:
    """Flat [x1, y1, x2, y2, ...] in pixels -> loc tokens (x uses the width, y the height)."""
    width, height = check_image_size(image_size)
    if len(coords) % 2:
        raise ValueError(f"expected an even number of coordinates (x, y pairs), got {len(coords)}")
    return "".join(loc_token(quantize(v, width if i % 2 == 0 else height)) for i, v in enumerate(coords))


def tokens_to_points(indices: Sequence[int], image_size: Sequence[float]) -> list[float]:
    """Bin indices [x1, y1, x2, y2, ...] -> flat float pixel coordinates; a trailing unpaired index is dropped."""
    width, height = check_image_size(image_size)
    n = len(indices) - len(indices) % 2
    return [dequantize(k, width if i % 2 == 0 else height) for i, k in enumerate(indices[:n])]


def box_to_tokens(box: Sequence[float], image_size: Sequence[float]) -> str:
    """[x1, y1, x2, y2] in pixels -> 4 loc tokens."""
    if len(box) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {len(box)} numbers")
    return points_to_tokens(box, image_size)


def parse_locs(text: str) -> list[int]:
    """All `<loc_k>` indices in `text`, in order."""
    return [int(k) for k in LOC_RE.findall(text)]
