"""fiore's decoding loop on fiore's model vs transformers' `generate` on transformers' Florence2, same weights.

Both sides get identical settings: transformers' native generation config (decoder start 2, forced EOS 2 at the
last step) with `min_new_tokens = max_new_tokens = 30`, so exactly 30 tokens come out, the last one the forced EOS.
Random weights produce repetitive text; the `no_repeat_ngram_size` cases force varied tokens and exercise the
ngram ban, beam reordering and padded batches.
"""

from __future__ import annotations

import pytest
import torch
from florence_oracle import NATIVE_VOCAB, hf_inputs, hf_model, prompt_ids
from reference_files import TOKENIZER_DIR, needs_tokenizer_files

import fiore
from fiore.checkpoint import build_model
from fiore.config import preset
from fiore.generate import GenerationConfig, generate
from fiore.model import TIED_KEYS

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (dev dependency)")

STEPS = 30


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny").replace(text={"vocab_size": NATIVE_VOCAB})
    hf = hf_model(config)
    model = build_model(config, {k: v for k, v in hf.state_dict().items() if k not in TIED_KEYS})
    return hf, model, config


def both(hf, model, pixel_values, prompt, mask=None, **opts):
    """(transformers ids without the decoder start, fiore ids) for the same inputs and options."""
    with torch.no_grad():
        feats = model.encode_image(pixel_values)
        ids, hf_mask = hf_inputs(prompt, feats.shape[1], mask)
        out = hf.generate(
            input_ids=ids,
            attention_mask=hf_mask,
            pixel_values=pixel_values,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            **opts,
        )
        hidden, enc_mask = model.encode(feats, prompt, mask)
    assert hf.generation_config.forced_eos_token_id == 2 and hf.generation_config.decoder_start_token_id == 2
    assert (out[:, 0] == 2).all()
    cfg = GenerationConfig(max_new_tokens=STEPS, min_new_tokens=STEPS, forced_eos_token_id=2, **opts)
    seqs = generate(model, hidden, enc_mask, cfg)
    return out[:, 1:].tolist(), [s.ids for s in seqs], seqs


@pytest.mark.parametrize("num_beams", [1, 3])
def test_tiny_tokens_match_transformers(tiny, num_beams):
    hf, model, config = tiny
    torch.manual_seed(3)
    px = torch.randn(1, 3, *config.image_size)
    want, got, seqs = both(hf, model, px, prompt_ids(1, 9, NATIVE_VOCAB), num_beams=num_beams)
    assert got == want
    assert len(got[0]) == STEPS and got[0][-1] == 2 and seqs[0].truncated  # forced end: reported truncated


@pytest.mark.parametrize("num_beams", [1, 3])
def test_tiny_padded_batch_with_ngram_ban_matches_transformers(tiny, num_beams):
    hf, model, config = tiny
    torch.manual_seed(4)
    px = torch.randn(2, 3, *config.image_size)
    prompt = prompt_ids(2, 11, NATIVE_VOCAB, seed=5)
    mask = torch.ones_like(prompt)
    prompt[1, 7], prompt[1, 8:], mask[1, 8:] = 2, 1, 0  # second prompt shorter, right-padded
    want, got, _ = both(hf, model, px, prompt, mask, num_beams=num_beams, no_repeat_ngram_size=3)
    assert got == want
    assert len(set(got[0])) >= 8, "the ngram ban should force varied tokens"


def test_tiny_beam_options_match_transformers(tiny):
    hf, model, config = tiny
    torch.manual_seed(5)
    px = torch.randn(1, 3, *config.image_size)
    prompt = prompt_ids(1, 6, NATIVE_VOCAB, seed=9)
    opts = dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6, early_stopping=True)
    want, got, _ = both(hf, model, px, prompt, **opts)
    assert got == want


@needs_tokenizer_files
def test_predict_matches_transformers_with_official_tokenizer(tiny, tmp_path):
    """The whole `Florence.predict` path (processor prompt ids, forced settings) against transformers."""
    from PIL import Image

    from fiore.tokenizer import Tokenizer

    hf, model, config = tiny
    florence = fiore.Florence(model, config, tokenizer=Tokenizer.from_dir(TOKENIZER_DIR))
    im = Image.fromarray((torch.rand(120, 90, 3) * 255).to(torch.uint8).numpy())
    opts = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, forced_bos_token_id=None, forced_eos_token_id=2)
    result = florence.predict(im, "caption", no_repeat_ngram_size=3, **opts)
    prompt, _ = florence.processor.prompt_ids(["What does the image describe?"])
    px = florence.processor.pixel_values([im])
    with torch.no_grad():
        ids, mask = hf_inputs(prompt, model.encode_image(px).shape[1])
        out = hf.generate(
            input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, no_repeat_ngram_size=3,
            max_new_tokens=STEPS, min_new_tokens=STEPS,
        )  # fmt: skip
    text = florence.tokenizer.decode(out[0, 1:].tolist())
    assert result.text == text.replace("<s>", "").replace("</s>", "").strip()
    assert result.truncated


@pytest.mark.slow
def test_base_greedy_matches_transformers():
    config = preset("base").replace(text={"vocab_size": NATIVE_VOCAB})
    hf = hf_model(config)
    model = build_model(config, {k: v for k, v in hf.state_dict().items() if k not in TIED_KEYS})
    torch.manual_seed(6)
    px = torch.randn(1, 3, *config.image_size)
    want, got, _ = both(hf, model, px, prompt_ids(1, 8, NATIVE_VOCAB))
    assert got == want and len(got[0]) == STEPS
