"""The inference layer (fiore.predictor) on a real, very small FlorenceModel with random weights and a tiny tokenizer.

Random weights give meaningless text, so the checks are structural and numerical: one vision pass per image, one
decode batch for many tasks, batched == one-by-one, truncation reported, scores equal to exp(mean log-prob) of
the right tokens (checked with a scripted logit bias and an independent teacher-forced forward pass), and label
scoring equal to per-label likelihoods computed by `model.forward`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import fiore.tasks
from fiore import predictor
from fiore.config import preset
from fiore.generate import GenerationConfig, generate
from fiore.model import FlorenceModel
from fiore.processor import Processor
from fiore.results import Boxes, Label, Text
from fiore.tasks import TaskInputError
from fiore.tokenizer import Tokenizer

WORDS = "a red ball car dog cat blue square circle star the of in on image small large green text".split()


@pytest.fixture(scope="module")
def tok():
    g = np.random.default_rng(0)
    texts = [" ".join(g.choice(WORDS, size=8)) for _ in range(300)]
    return Tokenizer.train(texts, vocab_size=300)


def micro_config(vocab: int):
    c = preset("tiny")
    return c.replace(
        vision={"embed_dims": (16, 32, 32, 64), "num_heads": (1, 1, 2, 2), "num_groups": (1, 1, 2, 2),
                "depths": (1, 1, 1, 1), "projection_dim": 64},
        text={"vocab_size": vocab, "d_model": 64, "encoder_layers": 1, "decoder_layers": 2,
              "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128, "max_position_embeddings": 256},
        image_size=(64, 64),
    )  # fmt: skip


class Holder:
    """What the predictor needs from `Florence`: model, config, tokenizer, processor."""

    def __init__(self, model, config, tokenizer):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.processor = Processor(tokenizer, config.image_size)


@pytest.fixture(scope="module")
def florence(tok):
    config = micro_config(tok.vocab_size)
    torch.manual_seed(0)
    model = FlorenceModel(config).eval()
    # Crisp, varied logits: with the training init (std 0.02) near-ties make batched-vs-single comparisons fragile,
    # and with large embeddings alone the decoder just copies its input token.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "shared" not in name and "embed_positions" not in name:
                p.normal_(0, 1.5 / math.sqrt(p.shape[1]))
        model.language_model.shared.weight.normal_(0, 0.5)
    return Holder(model, config, tok)


def image(seed: int, size=(80, 60)):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


class Spy:
    """Counts calls to model methods while delegating to the real model."""

    def __init__(self, florence, monkeypatch):
        self.calls = {"encode_image": 0, "encode": 0, "new_cache": 0, "rows": []}
        model = florence.model
        for name in ("encode_image", "encode", "new_cache"):
            real = getattr(model, name)

            def wrapped(*a, _real=real, _name=name, **k):
                self.calls[_name] += 1
                if _name == "new_cache":
                    self.calls["rows"].append(a[0].shape[0])
                return _real(*a, **k)

            monkeypatch.setattr(model, name, wrapped)


# ------------------------------------------------------------------------------------------------ batching / reuse


def test_run_encodes_image_once_and_decodes_tasks_together(florence, monkeypatch):
    spy = Spy(florence, monkeypatch)
    tasks = ["caption", "od", "ocr", "region_proposal"]
    out = predictor.run(florence, image(0), tasks, max_new_tokens=6)
    assert list(out) == tasks
    assert spy.calls["encode_image"] == 1
    assert spy.calls["encode"] == 1 and spy.calls["new_cache"] == 1 and spy.calls["rows"] == [4]
    for name, result in out.items():
        assert result.task == name
    monkeypatch.undo()
    for name in tasks:  # same answers as one task at a time
        alone = predictor.predict(florence, image(0), name, max_new_tokens=6)
        assert _summary(alone) == _summary(out[name])


def _summary(r):
    """The result as JSON with floats rounded: batched and single runs differ in the last float bits."""

    def rounded(x):
        if isinstance(x, float):
            return round(x, 4)
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rounded(v) for v in x]
        return x

    return rounded(r.to_json())


def test_predict_batch_equals_single(florence):
    ims = [image(1), image(2, (50, 90)), image(3)]
    batch = predictor.predict(florence, ims, "caption", max_new_tokens=8)
    assert isinstance(batch, list) and len(batch) == 3
    for im, r in zip(ims, batch, strict=True):
        assert _summary(predictor.predict(florence, im, "caption", max_new_tokens=8)) == _summary(r)


def test_text_inputs_per_image_and_padded_prompts(florence, monkeypatch):
    spy = Spy(florence, monkeypatch)
    ims = [image(4), image(5)]
    texts = ["a red ball", "the small green square in the image"]  # different prompt lengths -> padding
    batch = predictor.predict(florence, ims, "caption_to_phrase_grounding", text=texts, max_new_tokens=6)
    assert spy.calls["encode_image"] == 1 and spy.calls["rows"] == [2]
    monkeypatch.undo()
    for im, t, r in zip(ims, texts, batch, strict=True):
        alone = predictor.predict(florence, im, "caption_to_phrase_grounding", text=t, max_new_tokens=6)
        assert _summary(alone) == _summary(r)


def test_run_many_images_with_task_inputs(florence, monkeypatch):
    spy = Spy(florence, monkeypatch)
    tasks = {"caption": {}, "region_to_category": {"region": (5, 5, 40, 30)}, "vqa": {"text": "what is red?"}}
    out = predictor.run(florence, [image(6), image(7)], tasks, max_new_tokens={"caption": 5, "vqa": 3})
    assert spy.calls["encode_image"] == 1  # both images in one vision batch
    assert [list(o) for o in out] == [list(tasks)] * 2
    monkeypatch.undo()
    for im, o in zip([image(6), image(7)], out, strict=True):
        assert _summary(predictor.predict(florence, im, "vqa", text="what is red?", max_new_tokens=3)) == _summary(
            o["vqa"]
        )
        region = predictor.predict(florence, im, "region_to_category", region=(5, 5, 40, 30))
        assert _summary(region) == _summary(o["region_to_category"])
        assert len(o["caption"].warnings) == 0 or o["caption"].truncated


def test_per_task_budgets_and_truncation_reported(florence):
    out = predictor.run(florence, image(8), ["caption", "od"], max_new_tokens={"caption": 2, "od": 5}, min_new_tokens=5)
    # EOS is banned for 5 steps, so both rows run to their own limit and must say so
    for name in ("caption", "od"):
        assert out[name].truncated
        assert any("truncated" in w for w in out[name].warnings)
    free = predictor.predict(florence, image(8), "caption", max_new_tokens=40)
    assert isinstance(free, Text)


def test_beam_search_through_predict(florence, tok):
    im = image(9)
    r3 = predictor.predict(florence, im, "caption", max_new_tokens=6, num_beams=3, no_repeat_ngram_size=2)
    assert isinstance(r3, Text) and r3.score is not None
    # the same decoding by hand: encode, beam search, decode the text
    px = florence.processor.pixel_values([im])
    ids, mask = florence.processor.prompt_ids([fiore.tasks.get("caption").prompt()])
    h, m = florence.model.encode(florence.model.encode_image(px), ids, mask)
    cfg = GenerationConfig(max_new_tokens=6, num_beams=3, no_repeat_ngram_size=2, forced_bos_token_id=tok.bos_id)
    (seq,) = generate(florence.model, h, m, cfg)
    assert r3.text == tok.decode(seq.ids).replace("<s>", "").replace("</s>", "").strip()
    assert r3.truncated == seq.truncated


def test_sampling_needs_no_global_rng(florence):
    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return _summary(predictor.predict(florence, image(1), "caption", max_new_tokens=8, do_sample=True, generator=g))

    torch.manual_seed(123)
    a = sample(5)
    torch.manual_seed(456)
    assert sample(5) == a


# ----------------------------------------------------------------------------------------------------- scores


class Scripted:
    """Wraps a FlorenceModel so that greedy decoding follows `script`: at decoder position p the logit of script[p]
    becomes the row maximum + margin[p % len(margin)]. Small margins keep the log-probs far from 0."""

    def __init__(self, model, script: list[int], margin=(0.3, 1.0, 0.1, 2.0, 0.6)):
        self.model, self.script, self.margin = model, script, margin
        self._positions = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decode(self, ids, encoder_hidden, encoder_mask, cache=None):
        start = 0 if cache is None else cache.length
        self._positions = list(range(start, start + ids.shape[1]))
        return self.model.decode(ids, encoder_hidden, encoder_mask, cache)

    def logits(self, hidden):
        out = self.model.logits(hidden).clone()
        for j, p in enumerate(self._positions):
            if p < len(self.script):
                out[:, j, self.script[p]] = out[:, j].max(-1).values + self.margin[p % len(self.margin)]
        return out


def test_instance_scores_are_exp_mean_loc_logprob(florence, tok):
    target = "<s>car<loc_100><loc_200><loc_600><loc_700></s>"
    script = tok.encode(target)
    scripted = Holder(Scripted(florence.model, script), florence.config, tok)
    im = image(10, (200, 100))
    r = predictor.predict(scripted, im, "od", max_new_tokens=20)
    assert isinstance(r, Boxes) and r.labels == ["car"] and not r.truncated
    assert r.boxes[0] == pytest.approx([100.5 * 0.2, 200.5 * 0.1, 600.5 * 0.2, 700.5 * 0.1])

    # independent check: teacher-forced log-probs of the script under the same (biased) model
    px = florence.processor.pixel_values([im])
    ids, mask = florence.processor.prompt_ids([fiore.tasks.get("od").prompt()])
    with torch.no_grad():
        h, m = florence.model.encode(florence.model.encode_image(px), ids, mask)
        dec = torch.tensor([[florence.config.text.decoder_start_token_id, *script[:-1]]])
        logp = torch.log_softmax(scripted.model.logits(scripted.model.decode(dec, h, m)), -1)[0]
    lp = logp.gather(1, torch.tensor(script)[:, None]).squeeze(1)
    locs = [i for i, t in enumerate(script) if tok.loc_id(0) <= t <= tok.loc_id(999)]
    assert r.scores[0] == pytest.approx(math.exp(float(lp[locs].mean())), rel=1e-4)
    assert 0 < r.scores[0] < 1
    body = [i for i, t in enumerate(script) if t not in (tok.bos_id, tok.eos_id)]
    assert r.score == pytest.approx(math.exp(float(lp[body].mean())), rel=1e-4)
    # "label_loc": label and location tokens together
    r_all = predictor.predict(scripted, im, "od", max_new_tokens=20, score_mode="label_loc")
    assert r_all.scores[0] == pytest.approx(math.exp(float(lp[body].mean())), rel=1e-4)


# --------------------------------------------------------------------------------------------------- classify


def _label_loglik(florence, im, task, region, label):
    """log p(<label tokens>) + log p(end) by a full uncached forward, one label at a time."""
    tok, model = florence.tokenizer, florence.model
    size = im.size
    t = fiore.tasks.get(task)
    prompt = t.prompt(region=region, image_size=size) if t.inputs == "region" else t.prompt()
    ids, mask = florence.processor.prompt_ids([prompt])
    target = tok.encode(label)
    dec = torch.tensor([[2, tok.bos_id, *target]])
    with torch.no_grad():
        logp = torch.log_softmax(model(florence.processor.pixel_values([im]), ids, dec, mask), -1)[0]
    total = sum(float(logp[i + 1, x]) for i, x in enumerate(target))
    enders = [tok.eos_id, *range(tok.loc_id(0), tok.loc_id(999) + 1)]
    return total + float(torch.logsumexp(logp[len(target) + 1, enders], 0))


@pytest.mark.parametrize("task, region", [("classify", None), ("region_to_category", (10, 5, 60, 50)),
                                          ("region_to_category", None)])  # fmt: skip
def test_classify_matches_per_label_likelihoods(florence, task, region):
    im = image(11)
    labels = ["cat", "dog", "red ball", "small green square", "car"]
    r = predictor.classify(florence, im, labels, region=region, task=task)
    assert isinstance(r, Label) and r.task == task
    want = {lab: _label_loglik(florence, im, task, region if region else (0, 0, *im.size), lab) for lab in labels}
    z = torch.logsumexp(torch.tensor(list(want.values()), dtype=torch.float64), 0)
    probs = {lab: math.exp(v - float(z)) for lab, v in want.items()}
    assert [lab for lab, _ in r.ranking] == sorted(labels, key=lambda lab: -probs[lab])
    for lab, p in r.ranking:
        assert p == pytest.approx(probs[lab], rel=1e-3, abs=1e-6)
    assert r.label == r.ranking[0][0] and r.score == pytest.approx(r.ranking[0][1])
    assert sum(p for _, p in r.ranking) == pytest.approx(1.0)


def test_classify_follows_the_model(florence, tok):
    """A model scripted to say "dog" ranks dog first with high probability; chunks of many labels agree."""
    script = tok.encode("<s>dog</s>")
    scripted = Holder(Scripted(florence.model, script, margin=(8.0,)), florence.config, tok)
    labels = ["cat", "dog", "car"] + [f"{a} {b}" for a in WORDS[:7] for b in WORDS[7:13]]  # > one chunk
    r = predictor.classify(scripted, image(12), labels)
    assert r.label == "dog" and r.score > 0.9 and len(r.ranking) == len(labels)


def test_classify_region_changes_the_answer(florence):
    im = image(13)
    a = predictor.classify(florence, im, ["cat", "dog", "car"], region=(0, 0, 20, 20))
    b = predictor.classify(florence, im, ["cat", "dog", "car"], region=(40, 30, 80, 60))
    assert dict(a.ranking) != pytest.approx(dict(b.ranking))


# ----------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_are_named(florence):
    im = image(0)
    with pytest.raises(TaskInputError):
        predictor.predict(florence, im, "caption_to_phrase_grounding")
    with pytest.raises(TaskInputError):
        predictor.predict(florence, im, "od", text="cars")
    with pytest.raises(TypeError, match="num_beam"):
        predictor.predict(florence, im, "caption", num_beam=3)
    with pytest.raises(ValueError, match="list of 2"):
        predictor.predict(florence, [im, im], "caption_to_phrase_grounding", text=["a", "b", "c"])
    with pytest.raises(TaskInputError, match="unknown task"):
        predictor.run(florence, im, ["caption", "detect everything"])
    with pytest.raises(ValueError, match="twice"):
        predictor.run(florence, im, ["od", "<OD>"])
    with pytest.raises(ValueError, match="no images"):
        predictor.predict(florence, [], "caption")
    with pytest.raises(ValueError, match="at least one"):
        predictor.classify(florence, im, [])
    with pytest.raises(ValueError, match="distinct"):
        predictor.classify(florence, im, ["cat", "cat"])
    with pytest.raises(ValueError, match="classify"):
        predictor.classify(florence, im, ["cat"], task="od")
    with pytest.raises(ValueError, match="'<'"):
        predictor.classify(florence, im, ["<loc_1>"])
    with pytest.raises(ValueError, match="score_mode"):
        predictor.predict(florence, im, "od", score_mode="mean")


def test_florence_methods_bind_the_predictor(florence, tok):
    import fiore

    f = fiore.Florence(florence.model, florence.config, tokenizer=tok)
    im = image(14)
    assert _summary(f.predict(im, "od", max_new_tokens=5)) == _summary(
        predictor.predict(florence, im, "od", max_new_tokens=5)
    )
    both = f.run(im, ["caption", "od"], max_new_tokens=5)
    assert _summary(both["od"]) == _summary(predictor.predict(florence, im, "od", max_new_tokens=5))
    assert dict(f.classify(im, ["cat", "dog"]).ranking) == pytest.approx(
        dict(predictor.classify(florence, im, ["cat", "dog"]).ranking)
    )


def test_ids_beyond_the_tokenizer_are_dropped_with_a_warning(tok):
    """Native checkpoints have embedding rows past the tokenizer (padding); generating one must not crash."""
    config = micro_config(tok.vocab_size + 8)
    torch.manual_seed(1)
    model = FlorenceModel(config).eval()
    script = [tok.bos_id, *tok.encode("red"), tok.vocab_size + 3, *tok.encode(" ball"), tok.eos_id]
    holder = Holder(Scripted(model, script, margin=(3.0,)), config, tok)
    r = predictor.predict(holder, image(15), "caption", max_new_tokens=10)
    assert r.text == "red ball" and not r.truncated
    assert any("outside the tokenizer" in w for w in r.warnings)


def test_budgets_fit_the_decoder_positions(florence):
    positions = florence.config.text.max_position_embeddings  # 256 in the micro config; od's default is 1024
    with pytest.raises(ValueError, match="decoder positions"):
        predictor.predict(florence, image(0), "caption", max_new_tokens=positions + 1)
    with pytest.raises(ValueError, match="num_beams"):
        predictor.predict(florence, image(0), "caption", num_beams=0)
    rows = []
    real = predictor.generate

    def spy(model, hidden, mask, config):
        rows.append(list(config.max_new_tokens))
        return real(model, hidden, mask, config)

    predictor.generate = spy
    try:
        predictor.run(florence, image(0), ["caption", "od"], max_new_tokens={"caption": 3}, min_new_tokens=0)
    finally:
        predictor.generate = real
    assert sorted(rows[0]) == [3, positions]  # od's 1024 capped at the model's positions, all of them usable
