"""Shape outlines as polygons: one unit outline per shape name, then scaled, rotated and placed.

Circles are 48-gons, fine enough that the rasterized mask is a circle at the sizes the world uses. Every outline is
centred on (0, 0) with circumradius 1, and the maximal rotation keeps each shape recognisable (a square rotated by
45 degrees would read as a diamond).
"""

from __future__ import annotations

from functools import cache

import numpy as np


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.sin(t), -np.cos(t)], axis=1)  # first vertex at the top (y grows downwards)


def _star() -> np.ndarray:
    outer = _regular(5)
    inner = 0.45 * _regular(5, phase=np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross() -> np.ndarray:
    a, b = 0.32, 0.95  # arm half-width, arm length
    return np.array(
        [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    )


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


@cache
def unit_outline(shape: str) -> np.ndarray:
    """(K, 2) float outline of `shape`, centred, max |coordinate| about 1."""
    table = {
        "circle": lambda: _regular(48),
        "square": lambda: np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.75,
        "triangle": lambda: _regular(3) + np.array([0.0, 0.2]),  # centre the triangle's box, not its centroid
        "star": _star,
        "hexagon": lambda: _regular(6, phase=np.pi / 6),
        "diamond": lambda: np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]),
        "cross": _cross,
        "heart": _heart,
    }
    if shape not in table:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(table)}")
    out = np.asarray(table[shape](), dtype=np.float64)
    out.setflags(write=False)
    return out


# Largest rotation in degrees, either way, that keeps each shape's identity.
MAX_ROTATION: dict[str, float] = {
    "circle": 0.0,
    "square": 15.0,
    "triangle": 25.0,
    "star": 36.0,
    "hexagon": 30.0,
    "diamond": 15.0,
    "cross": 15.0,
    "heart": 20.0,
}


def outline(shape: str, cx: float, cy: float, radius: float, angle_deg: float) -> np.ndarray:
    """(K, 2) outline in pixels: the unit outline scaled by `radius`, rotated by `angle_deg`, centred on (cx, cy)."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return unit_outline(shape) @ rot.T * radius + np.array([cx, cy])
