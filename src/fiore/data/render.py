"""Pixel-level helpers of the synthetic world: backgrounds, polygon rasterization, mask -> polygon, text layers.

Coordinates are pixel-corner coordinates: pixel (row r, column c) covers [c, c+1] x [r, r+1], so a mask whose
columns span c0..c1 has the box x1 = c0, x2 = c1 + 1 and every traced polygon lies inside that box.
"""

from __future__ import annotations

from functools import lru_cache

import contourpy
import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND_KINDS = ("solid", "gradient", "noise", "stripes")
POLYGON_TOLERANCE = 1.0  # px a simplified polygon may stray from the mask outline
MIN_RING_AREA = 4.0  # px^2; smaller mask components (rasterization specks) get no polygon
BACKGROUND_LEVELS = 64  # palette entries a gradient or noise background uses


def background_color(rng: np.random.Generator) -> np.ndarray:
    """A mid-tone, low-saturation colour (3,) float: far from every object colour in `lexicon.COLORS`."""
    grey = rng.uniform(105, 165)
    return np.clip(grey + rng.uniform(-22, 22, size=3), 0, 255)


def background(kind: str, width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background of `kind` (one of BACKGROUND_KINDS) as palette indices.

    Returns (index (H, W) uint8, palette (P, 3) uint8), P <= BACKGROUND_LEVELS: images are built as palette images
    and converted to RGB once, which is several times faster than writing RGB triplets with numpy.
    """
    if kind not in BACKGROUND_KINDS:
        raise ValueError(f"unknown background kind {kind!r}; choose one of {BACKGROUND_KINDS}")
    a = background_color(rng)
    if kind == "solid":
        return np.zeros((height, width), dtype=np.uint8), a[None].astype(np.uint8)
    if kind == "noise":
        # Smooth blotches: a coarse random grid upsampled, so the noise never looks like an object edge.
        cell = int(rng.integers(12, 32))
        small = rng.uniform(0, 1, size=(height // cell + 2, width // cell + 2)).astype(np.float32)
        t = np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.BILINEAR))
        index = np.clip(t * (BACKGROUND_LEVELS - 1) + 0.5, 0, BACKGROUND_LEVELS - 1).astype(np.uint8)
        levels = np.linspace(-0.5, 0.5, BACKGROUND_LEVELS)[:, None]
        return index, np.clip(a + levels * 56, 0, 255).astype(np.uint8)
    # Gradients and stripes both vary along one direction t: u = x cos t + y sin t, built separably in float32
    # (float floor/mod on whole images costs 50x more than this).
    b = background_color(rng)
    t = rng.uniform(0, 2 * np.pi)
    ux = np.arange(width, dtype=np.float32) * np.float32(np.cos(t))
    uy = np.arange(height, dtype=np.float32) * np.float32(np.sin(t))
    ux -= ux.min()
    uy -= uy.min()  # u >= 0 from here on
    if kind == "gradient":
        scale = np.float32((BACKGROUND_LEVELS - 1) / max(float(ux.max() + uy.max()), 1.0))
        index = ((ux * scale)[None, :] + (uy * scale + np.float32(0.5))[:, None]).astype(np.uint8)
        return index, (a + np.linspace(0.0, 1.0, BACKGROUND_LEVELS)[:, None] * (b - a)).astype(np.uint8)
    b = np.clip(a + rng.choice([-1.0, 1.0]) * rng.uniform(18, 32), 0, 255)  # stripes: two close tones
    scale = np.float32(2 / rng.uniform(14, 40))  # half a period per band
    index = ((ux * scale)[None, :] + (uy * scale)[:, None]).astype(np.int32) & 1
    return index.astype(np.uint8), np.stack([a, b]).astype(np.uint8)


def to_rgb(index: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) uint8 palette indices + (P, 3) palette -> (H, W, 3) uint8 RGB (via PIL's palette conversion)."""
    img = Image.fromarray(index, mode="P")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(palette)] = palette
    img.putpalette(full.tobytes())
    return np.array(img.convert("RGB"))


def rasterize(points: np.ndarray, width: int, height: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Boolean mask of a polygon, cropped to its bounding pixels.

    points: (K, 2) float pixel-corner coordinates. Returns (mask (h, w) bool, (x0, y0) offset of the crop).
    """
    x0 = max(int(np.floor(points[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(points[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(points[:, 0].max())) + 1, width)
    y1 = min(int(np.ceil(points[:, 1].max())) + 1, height)
    img = Image.new("1", (x1 - x0, y1 - y0), 0)
    # PIL fills pixel centres; shift by -0.5 so a pixel is in when its centre is inside the polygon.
    shifted = points - np.array([x0 + 0.5, y0 + 0.5])
    ImageDraw.Draw(img).polygon([tuple(p) for p in shifted.tolist()], fill=1)
    return np.asarray(img, dtype=bool), (x0, y0)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel-corner box (x1, y1, x2, y2) of a boolean mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices that sit on the straight line through their neighbours (staircase runs of a traced mask)."""
    a = ring - np.concatenate([ring[-1:], ring[:-1]])  # from the previous vertex
    b = np.concatenate([a[1:], a[:1]])  # to the next vertex
    turn = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) > 1e-9
    return ring[turn] if np.count_nonzero(turn) >= 3 else ring


def simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring (K, 2) -> (K', 2), K' >= 3.

    Vectorised by level: each round splits every segment at its farthest vertex (when farther than `tolerance`),
    so the Python loop runs ~log2(K') times instead of once per kept vertex.
    """
    ring = _drop_collinear(ring)
    n = len(ring)
    if n <= 4:
        return ring
    z = ring[:, 0] + 1j * ring[:, 1]  # complex points: fewer numpy calls per round, which is what costs here
    closed = np.concatenate([z, z[:1]])
    kept = np.array([0, int(np.argmax(np.abs(z - z[0]))), n])
    idx = np.arange(n)
    while True:
        ends = closed[kept]
        d = ends[1:] - ends[:-1]
        seg = np.searchsorted(kept, idx, side="right") - 1  # segment of each vertex
        # Distance to the segment's line; segment ends are distance 0, so they are never picked again.
        dist = np.abs((np.conj(d[seg]) * (z - ends[seg])).imag) / np.maximum(np.abs(d), 1e-12)[seg]
        seg_max = np.maximum.reduceat(dist, kept[:-1])
        hit = (dist == seg_max[seg]) & (dist > tolerance)  # ties may add two vertices: harmless
        if not hit.any():
            break
        kept = np.sort(np.concatenate([kept, idx[hit]]))
    out = ring[kept[:-1]]
    return out if len(out) >= 3 else ring


def mask_polygons(
    mask: np.ndarray, offset: tuple[int, int] = (0, 0), tolerance: float = POLYGON_TOLERANCE
) -> list[list[float]]:
    """Outer rings of a boolean mask as flat [x1, y1, x2, y2, ...] lists in pixel-corner coordinates.

    The ring follows the pixel boundary (marching squares at level 0.5 of the mask, diagonal steps cutting pixel
    corners), simplified by Douglas-Peucker with `tolerance` pixels, so it stays inside the mask's box. Holes are not
    represented (COCO polygons have none); the generator keeps visible masks hole-free.
    """
    padded = np.pad(mask, 1).astype(np.float64)
    h, w = padded.shape
    # Grid = pixel centres of the padded mask in pixel-corner coordinates: padded (r, c) is pixel (r - 1, c - 1).
    xs, ys = np.meshgrid(
        np.arange(w, dtype=np.float64) + (offset[0] - 0.5), np.arange(h, dtype=np.float64) + (offset[1] - 0.5)
    )
    # The generator class directly: contourpy.contour_generator's argument checks cost 10x the tracing itself.
    gen = contourpy.SerialContourGenerator(
        xs, ys, padded, None, corner_mask=True, line_type=contourpy.LineType.Separate,
        fill_type=contourpy.FillType.OuterOffset, quad_as_tri=False, z_interp=contourpy.ZInterp.Linear,
        x_chunk_size=0, y_chunk_size=0,
    )  # fmt: skip
    lines = gen.lines(0.5)
    rings = []
    for line in lines:
        ring = line[:-1] if len(line) > 1 and np.array_equal(line[0], line[-1]) else line
        if len(ring) < 3:
            continue
        area = _signed_area(ring)
        if area < MIN_RING_AREA:  # holes (negative: they run the other way round) and specks of a pixel or two
            continue
        ring = simplify(ring, tolerance)
        rings.append(np.round(ring.reshape(-1), 2).tolist())
    return rings


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` px (no extra package)."""
    return ImageFont.load_default(size)


def text_layer(text: str, size: int, angle_deg: float, pad: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Alpha layer of `text` rotated by `angle_deg` (counter-clockwise) and the quad around its ink.

    Returns (alpha (h, w) uint8, quad (4, 2) float): quad corners in layer coordinates, clockwise from the text's own
    top-left (top-left, top-right, bottom-right, bottom-left), `pad` px outside the glyphs' ink box.
    """
    f = font(size)
    l, t, r, b = f.getbbox(text)
    w, h = r - l + 2 * pad, b - t + 2 * pad
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).text((pad - l, pad - t), text, font=f, fill=255)
    corners = np.array([(0, 0), (w, 0), (w, h), (0, h)], dtype=np.float64)
    if angle_deg:
        img = img.rotate(angle_deg, resample=Image.BILINEAR, expand=True)
        a = np.deg2rad(angle_deg)
        c, s = np.cos(a), np.sin(a)
        d = corners - np.array([w / 2, h / 2])
        # Counter-clockwise on screen with y pointing down.
        corners = np.stack([d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c], axis=1)
        corners += np.array([img.width / 2, img.height / 2])
    return np.asarray(img), corners
