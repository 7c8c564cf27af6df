"""Processor: pixel values bit-identical to transformers' Florence-2 image processor; safe image loading; prompts."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from reference_files import TOKENIZER_DIR, needs_tokenizer_files

from fiore.processor import ImageError, Processor, load_image
from fiore.tokenizer import Tokenizer

REF = TOKENIZER_DIR
RNG = np.random.RandomState(0)


def _png(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["what does the image describe? a red star"] * 10, vocab_size=300)


@needs_tokenizer_files
@pytest.mark.parametrize("hw", [(480, 640), (1000, 333), (768, 768)])
def test_pixel_values_bit_identical(tok, hw):
    pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    native = CLIPImageProcessorPil.from_pretrained(str(REF))
    image = Image.fromarray(RNG.randint(0, 256, (*hw, 3), dtype=np.uint8))
    want = native(images=[image], return_tensors="pt")["pixel_values"]
    got = Processor(tok, image_size=(768, 768)).pixel_values([image])
    assert got.dtype == torch.float32 and got.shape == want.shape == (1, 3, 768, 768)
    assert torch.equal(got, want)  # bit-identical


def test_pixel_values_batch_and_sources(tok, tmp_path):
    image = Image.fromarray(RNG.randint(0, 256, (40, 60, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    image.save(path)
    p = Processor(tok, image_size=(32, 48))
    data = _png(image)
    out = p.pixel_values([image, str(path), path, data, io.BytesIO(data)])
    assert out.shape == (5, 3, 32, 48)
    assert all(torch.equal(out[0], out[i]) for i in range(1, 5))
    # normalisation: a white image maps to (1 - mean) / std
    white = p.pixel_values(Image.new("RGB", (10, 10), "white"))
    assert white[0, :, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])


def test_prompt_ids(tok):
    p = Processor(tok, max_prompt_tokens=12)
    ids, mask = p.prompt_ids(["a red star", "what does the image describe?"])
    assert ids.dtype == torch.long and ids.shape == mask.shape
    n0 = len(tok.encode("a red star")) + 2
    assert ids[0, 0] == tok.bos_id and ids[0, n0 - 1] == tok.eos_id
    assert (ids[0, n0:] == tok.pad_id).all() and mask[0].tolist() == [1] * n0 + [0] * (ids.shape[1] - n0)
    assert mask[1].all()
    with pytest.raises(ValueError, match="the limit is 12"):
        p.prompt_ids(["star " * 40])
    assert p.decode(ids[0, :n0]) == "<s>a red star</s>"


@pytest.mark.parametrize(
    "mode, make",
    [
        ("L", lambda: Image.new("L", (8, 6), 128)),
        ("LA", lambda: Image.new("LA", (8, 6), (10, 0))),
        ("P", lambda: Image.new("RGB", (8, 6), (200, 10, 10)).convert("P")),
        ("RGBA", lambda: Image.new("RGBA", (8, 6), (0, 0, 0, 0))),
        ("CMYK", lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0))),
        ("I;16", lambda: Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))),
        ("F", lambda: Image.fromarray(np.full((6, 8), 0.5, dtype=np.float32))),
        ("1", lambda: Image.new("1", (8, 6), 1)),
    ],
)
def test_modes_to_rgb(mode, make):
    im = make()
    assert im.mode == mode
    rgb = load_image(im)
    assert rgb.mode == "RGB" and rgb.size == (8, 6)
    px = rgb.getpixel((0, 0))
    expected = {
        "L": (128,) * 3, "LA": (255,) * 3, "RGBA": (255,) * 3,  # fully transparent -> white background
        "CMYK": (255, 0, 0), "I;16": (255,) * 3, "F": (128,) * 3, "1": (255,) * 3,
    }  # fmt: skip
    if mode in expected:
        assert px == expected[mode]
    else:
        assert px[0] > 150 and px[1] < 60


def test_exif_orientation():
    im = Image.new("RGB", (20, 10), "red")
    im.paste((0, 0, 255), (0, 0, 5, 5))  # blue top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_image(_png(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (10, 20)
    r, g, b = out.getpixel((8, 1))  # the blue corner is now top-right
    assert b > 150 and r < 100


def test_bad_images(tmp_path):
    good = _png(Image.new("RGB", (50, 40), "red"))
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"this is not an image")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(good[: len(good) // 2])
    with pytest.raises(ImageError, match="1x1"):
        load_image(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="over the limit of 1000"):
        load_image(good, max_pixels=1000)  # 2000 pixels
    assert load_image(good, max_pixels=None).size == (50, 40)
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(3)
    assert issubclass(ImageError, ValueError)


def test_decompression_bomb_header_only():
    """A tiny file whose header claims 30000x30000 pixels is refused from the header, before decoding."""
    data = bytearray(_png(Image.new("L", (4, 4))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ImageError, match="too large|over the limit"):
        load_image(bytes(data))


def test_image_errors_name_the_source_once_and_never_a_repr(tmp_path):
    import io

    from typer.testing import CliRunner

    from fiore.cli import app
    from fiore.processor import ImageError, load_image

    with pytest.raises(ImageError) as e:
        load_image(io.BytesIO(b"garbage, not an image"))
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", str(empty)])
    flat = "".join(ch for ch in result.output if not ch.isspace() and ch not in "│╭╮╰╯─")  # rich wraps the box
    assert result.exit_code != 0 and "emptyimagedata" in flat and flat.count("empty.png") == 1, flat
