"""Images and prompts -> model inputs; generated ids -> text.

`load_image` opens anything image-like safely (pixel limit, verify + full decode, EXIF orientation, every PIL mode
to RGB). `Processor.pixel_values` reproduces transformers' Florence-2 image processor (CLIPImageProcessor, PIL
backend) bit for bit: exact resize to the model size with PIL bicubic, x * (1/255) in float64 cast to float32,
then (x - mean) / std in float32.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fiore.limits import DEFAULT_MAX_PIXELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 2  # a 1x1 "image" is almost always an error (tracking pixel, failed download)
DEFAULT_MAX_PROMPT_TOKENS = 256


class ImageError(ValueError):
    """An input that is not a usable image (corrupt, truncated, empty, too small or too large)."""


def _read_source(src: Any) -> tuple[bytes | None, Image.Image | None, str]:
    """(encoded bytes, PIL image, description) from a path, bytes, file object or PIL image."""
    if isinstance(src, Image.Image):
        return None, src, "PIL image"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), None, "image bytes"
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        return path.read_bytes(), None, str(path)
    if hasattr(src, "read"):
        data = src.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("image file object must be opened in binary mode")
        return bytes(data), None, getattr(src, "name", "image file object")
    raise ImageError(f"cannot read an image from a {type(src).__name__}; give a path, bytes, file object or PIL image")


def _open(data: bytes, what: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError(f"{what}: image is too large ({e})") from None
        except UnidentifiedImageError:  # its message shows the BytesIO's repr, which names nothing
            raise ImageError(f"{what}: not a readable image (no format PIL can identify)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{what}: not a readable image ({e})") from None


def _check_size(im: Image.Image, what: str, max_pixels: int | None) -> None:
    w, h = im.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{what}: image is {w}x{h}; each side must be at least {MIN_SIDE} pixels")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{what}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            "(a possible decompression bomb; raise the limit to allow it: --max-pixels, or max_pixels=)"
        )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, palette expanded, CMYK/YCbCr converted, 16-bit and float
    images scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0  # 0..65535 -> 0..255
        elif im.mode == "F" and a.size and 0.0 <= np.nanmin(a) and np.nanmax(a) <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        elif a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 255):
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))  # other ranges: stretch to 0..255
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        a = np.nan_to_num(a, nan=0.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert an image of mode {im.mode} to RGB ({e})") from None


def load_image(src: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as a fully decoded RGB PIL image with EXIF orientation applied.

    src: a path, bytes, a binary file object or a PIL image. `max_pixels` (width * height) guards against
    decompression bombs; None disables our limit (PIL's own hard limit still applies to encoded files).
    Raises ImageError (a ValueError) naming the problem.
    """
    data, im, what = _read_source(src)
    if data is not None:
        if not data:
            raise ImageError(f"{what}: empty image data (0 bytes)")
        probe = _open(data, what)
        _check_size(probe, what, max_pixels)  # from the header, before decoding anything
        try:
            probe.verify()  # structural check (e.g. PNG CRCs); the image must be reopened afterwards
        except Exception as e:  # PIL raises many types here
            raise ImageError(f"{what}: corrupt image ({e})") from None
        im = _open(data, what)
    else:
        _check_size(im, what, max_pixels)
    try:
        im.load()  # a truncated file fails here rather than later inside the model
        im = ImageOps.exif_transpose(im)
    except Exception as e:
        raise ImageError(f"{what}: image data is truncated or corrupt ({e})") from None
    _check_size(im, what, max_pixels)
    return _to_rgb(im)


class Processor:
    """Builds model inputs. `image_size` is (height, width) as in `ModelConfig.image_size`."""

    def __init__(
        self,
        tokenizer,
        image_size: tuple[int, int] = (768, 768),
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_prompt_tokens = max_prompt_tokens
        self.max_pixels = max_pixels
        self._mean = np.asarray(image_mean, dtype=np.float32)
        self._std = np.asarray(image_std, dtype=np.float32)

    def pixel_values(self, images: Any | Sequence[Any]) -> torch.Tensor:
        """One image or a list (paths, bytes, file objects, PIL) -> (B, 3, H, W) float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("pixel_values needs at least one image")
        return torch.from_numpy(np.stack([self._pixels(im) for im in images]))

    def _pixels(self, image: Any) -> np.ndarray:
        im = load_image(image, max_pixels=self.max_pixels)
        h, w = self.image_size
        x = np.asarray(im.resize((w, h), resample=Image.Resampling.BICUBIC), dtype=np.uint8)  # (H, W, 3)
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - self._mean) / self._std
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)

    def encode_prompt(self, prompt: str) -> list[int]:
        """`<s> prompt </s>` ids; refuses prompts over `max_prompt_tokens` tokens."""
        ids = self.tokenizer.encode(prompt)
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt is {len(ids)} tokens; the limit is {self.max_prompt_tokens} "
                f"(Processor(max_prompt_tokens=...) changes it): {prompt[:60]!r}..."
            )
        return self.tokenizer.frame(ids)

    def prompt_ids(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt texts -> (input_ids (B, T) long, attention_mask (B, T) long, 1 = token, 0 = right padding)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompt_ids needs at least one prompt")
        input_ids, mask = pad_right([self.encode_prompt(p) for p in prompts], self.tokenizer.pad_id)
        return input_ids, mask.long()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Generated ids -> raw text with special tokens kept (what `Task.parse` takes)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids (B, T) long right-padded with `pad_id`, mask (B, T) bool, True = token)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask
