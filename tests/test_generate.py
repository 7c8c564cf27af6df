"""Decoding loop tests against a small fake decoder (no weights), with transformers' `generate` as the oracle.

The fake is a recurrent toy with the `fiore.model` decoding contract: its next-token logits depend on the whole
prefix and on a per-row "image" summary, so cache handling, row reordering and batching mistakes change the output.
The oracle runs transformers' own greedy / beam / processors on the same logits (a decoder-only shell whose
forward returns the fake's teacher-forced logits), so the semantics we claim to match are checked, not restated.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fiore.generate import GenerationConfig, Sequence, generate

START, EOS, PAD = 2, 2, 1


class FakeCache:
    def __init__(self, state, summary, encoder_mask, max_length):
        self.state, self.summary, self.encoder_mask = state, summary, encoder_mask
        self.max_length, self.length = max_length, 0

    def select(self, index):
        c = FakeCache(self.state[index], self.summary[index], self.encoder_mask[index], self.max_length)
        c.length = self.length
        return c

    def reorder(self, index):
        """Self-attention part only (as DecoderCache.reorder): misuse across items leaves wrong summaries."""
        self.state = self.state[index]
        return self


class FakeDecoder:
    """state_t = tanh(E[tok_t] + A state_{t-1} + summary); logits = W state + eos bias (+ ramp * position).

    The hidden output carries the position as an extra channel so that `logits` can raise EOS with length.
    """

    def __init__(self, vocab=11, d=6, seed=0, eos_bias=0.0, scale=3.0, eos_ramp=0.0):
        g = torch.Generator().manual_seed(seed)
        self.E = torch.randn(vocab, d, generator=g)
        self.A = torch.randn(d, d, generator=g) * 0.6
        self.W = torch.randn(d, vocab, generator=g) * scale
        self.bias = torch.zeros(vocab)
        self.bias[EOS] = eos_bias
        self.d, self.V, self.eos_ramp = d, vocab, eos_ramp  # eos_ramp: EOS grows likelier with position
        self.decode_calls = 0

    def summarize(self, encoder_hidden, encoder_mask):
        m = encoder_mask.float().unsqueeze(-1)
        return (encoder_hidden[..., : self.d] * m).sum(1) / m.sum(1)

    def new_cache(self, encoder_hidden, encoder_mask, max_length):
        B = encoder_hidden.shape[0]
        return FakeCache(torch.zeros(B, self.d), self.summarize(encoder_hidden, encoder_mask), encoder_mask, max_length)

    def decode(self, ids, encoder_hidden, encoder_mask, cache=None):
        self.decode_calls += 1
        start = 0 if cache is None else cache.length
        if cache is None:
            state, summary = torch.zeros(ids.shape[0], self.d), self.summarize(encoder_hidden, encoder_mask)
        else:
            assert ids.shape[0] == cache.state.shape[0] == encoder_hidden.shape[0], "rows out of sync with cache"
            assert cache.length + ids.shape[1] <= cache.max_length, "cache overflow"
            state, summary = cache.state, cache.summary
        out = []
        for t in range(ids.shape[1]):
            state = torch.tanh(self.E[ids[:, t]] + state @ self.A + summary)
            out.append(torch.cat([state, torch.full((ids.shape[0], 1), float(start + t))], 1))
        if cache is not None:
            cache.state, cache.length = state, cache.length + ids.shape[1]
        return torch.stack(out, 1)

    def logits(self, hidden):
        out = hidden[..., : self.d] @ self.W + self.bias
        out[..., EOS] += self.eos_ramp * hidden[..., self.d]
        return out.float()


def encoded(B, N=5, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, d, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):  # padded encoder rows, like prompts of different lengths
        mask[b, N - (b % 3) :] = False
    return h, mask


# ----------------------------------------------------------------------------------------------- HF oracle shell


def hf_generate(fake: FakeDecoder, h, mask, **kwargs):
    """transformers' generate over the fake's logits: full-prefix forwards (no cache), one row context per item."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (dev dependency)")
    from transformers.modeling_outputs import CausalLMOutput

    summary = fake.summarize(h, mask)
    num_beams = kwargs.get("num_beams", 1)

    class Shell(transformers.GPT2LMHeadModel):
        def forward(self, input_ids=None, **_):
            rows = torch.arange(input_ids.shape[0]) // num_beams
            state, out = torch.zeros(input_ids.shape[0], fake.d), []
            for t in range(input_ids.shape[1]):
                state = torch.tanh(fake.E[input_ids[:, t]] + state @ fake.A + summary[rows])
                out.append(torch.cat([state, torch.full((input_ids.shape[0], 1), float(t))], 1))
            return CausalLMOutput(logits=fake.logits(torch.stack(out, 1)))

    cfg = transformers.GPT2Config(vocab_size=fake.V, n_embd=4, n_layer=1, n_head=1, n_positions=256)
    shell = Shell(cfg).eval()
    gen = transformers.GenerationConfig(
        eos_token_id=EOS, pad_token_id=PAD, bos_token_id=0, use_cache=False, do_sample=False, **kwargs
    )
    start = torch.full((h.shape[0], 1), START)
    with torch.no_grad():
        out = shell.generate(start, attention_mask=torch.ones_like(start), generation_config=gen)
    seqs = []
    for row in out[:, 1:].tolist():  # strip decoder start; cut at the first EOS, drop padding
        seqs.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return seqs


def ours(fake, h, mask, **kwargs):
    return generate(fake, h, mask, GenerationConfig(**kwargs))


# --------------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("seed", range(4))
def test_greedy_matches_transformers(seed):
    fake = FakeDecoder(seed=seed, eos_bias=-1.0, eos_ramp=0.7)
    h, mask = encoded(4, seed=seed)
    got = ours(fake, h, mask, max_new_tokens=12)
    want = hf_generate(fake, h, mask, max_new_tokens=12)
    assert [s.ids for s in got] == want
    assert len({len(s.ids) for s in got}) >= 2, "rows should stop at different steps"


def test_greedy_is_argmax_of_uncached_decode():
    fake = FakeDecoder(seed=3, eos_bias=-20.0)  # never ends: exercises the limit
    h, mask = encoded(3)
    got = ours(fake, h, mask, max_new_tokens=8)
    for b, seq in enumerate(got):
        prefix = [START]
        for tok, lp in zip(seq.ids, seq.token_logprobs, strict=True):
            logits = fake.logits(fake.decode(torch.tensor([prefix]), h[b : b + 1], mask[b : b + 1]))[0, -1]
            assert tok == int(logits.argmax())
            assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[tok]), abs=1e-5)
            prefix.append(tok)
        assert seq.truncated and len(seq.ids) == 8
        assert seq.score == pytest.approx(sum(seq.token_logprobs) / 8)


def test_batch_rows_independent_of_batch_and_per_row_limits():
    fake = FakeDecoder(seed=5, eos_bias=0.5)
    h, mask = encoded(5, seed=2)
    limits = [3, 9, 1, 14, 6]
    batch = ours(fake, h, mask, max_new_tokens=limits)
    for b in range(5):
        alone = ours(fake, h[b : b + 1], mask[b : b + 1], max_new_tokens=limits[b])[0]
        assert batch[b].ids == alone.ids
        assert batch[b].token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-5)
        assert len(batch[b].ids) <= limits[b]
        assert batch[b].truncated == (batch[b].ids[-1] != EOS)


def test_truncation_reported_never_silent():
    fake = FakeDecoder(seed=0, eos_bias=-50.0)
    h, mask = encoded(2)
    for beams in (1, 3):
        seqs = ours(fake, h, mask, max_new_tokens=5, num_beams=beams)
        assert all(s.truncated and len(s.ids) == 5 for s in seqs)
    ended = ours(FakeDecoder(seed=0, eos_bias=50.0), h, mask, max_new_tokens=5)
    assert all(s.ids == [EOS] and not s.truncated for s in ended)
    # forced EOS at the limit still says truncated: the model did not choose to stop
    forced = ours(fake, h, mask, max_new_tokens=5, forced_eos_token_id=EOS)
    assert all(s.ids[-1] == EOS and s.truncated and len(s.ids) == 5 for s in forced)


def test_processors_match_transformers():
    fake = FakeDecoder(seed=7, vocab=9, eos_bias=0.8)
    h, mask = encoded(3, seed=4)
    opts = dict(max_new_tokens=10, min_new_tokens=4, no_repeat_ngram_size=2)
    opts.update(forced_bos_token_id=0, forced_eos_token_id=EOS)
    got = ours(fake, h, mask, **opts)
    want = hf_generate(fake, h, mask, **opts)
    assert [s.ids for s in got] == want
    for s in got:
        assert s.ids[0] == 0 and len(s.ids) >= 4
        full = [START, *s.ids]
        pairs = list(zip(full, full[1:], strict=False))
        assert len(pairs) == len(set(pairs)), "a bigram repeated despite no_repeat_ngram_size=2"


# ----------------------------------------------------------------------------------------------------------- beam


@pytest.mark.parametrize(
    "opts",
    [
        dict(num_beams=3),
        dict(num_beams=3, length_penalty=2.0),
        dict(num_beams=2, early_stopping=True, length_penalty=0.5),
        dict(num_beams=4, early_stopping="never", no_repeat_ngram_size=3),
        dict(num_beams=3, early_stopping=True, no_repeat_ngram_size=2, forced_bos_token_id=0),
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_beam_matches_transformers(opts, seed):
    fake = FakeDecoder(seed=seed, vocab=13, eos_bias=-2.0, eos_ramp=0.5 + 0.25 * seed, scale=2.0)
    h, mask = encoded(4, seed=seed + 10)
    got = ours(fake, h, mask, max_new_tokens=12, **opts)
    want = hf_generate(fake, h, mask, max_new_tokens=12, **opts)
    assert [s.ids for s in got] == want
    BEAM_LENGTHS.update(len(s.ids) for s in got)


BEAM_LENGTHS: set[int] = set()


def test_beam_cases_cover_early_ends():
    """The parametrised beam cases above must include hypotheses that ended early, at several lengths."""
    if not BEAM_LENGTHS:
        for seed in range(3):
            test_beam_matches_transformers(dict(num_beams=3), seed)
    assert len({n for n in BEAM_LENGTHS if n < 12}) >= 3


def test_beam_token_logprobs_follow_final_beam():
    fake = FakeDecoder(seed=2, vocab=10, eos_bias=0.5)
    h, mask = encoded(2)
    for s, b in zip(ours(fake, h, mask, max_new_tokens=7, num_beams=3), range(2), strict=True):
        seq = [START, *s.ids]
        logits = fake.logits(fake.decode(torch.tensor([seq[:-1]]), h[b : b + 1], mask[b : b + 1]))[0]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)
        assert s.token_logprobs == pytest.approx(want.tolist(), abs=1e-5)


def test_wide_beam_finds_exact_optimum():
    """With enough beams nothing is pruned: "never" early stopping must return the best-scoring sequence."""
    V, L, lp = 4, 4, 1.0
    fake = FakeDecoder(seed=11, vocab=V, eos_bias=0.5)
    h, mask = encoded(1)
    best, best_score = None, -math.inf
    for n in range(1, L + 1):
        for body in itertools.product([t for t in range(V) if t != EOS], repeat=n - 1):
            for last in range(V):
                seq = [*body, last]
                if n < L and last != EOS:
                    continue  # unfinished sequences only count at the length limit
                ids = torch.tensor([[START, *seq[:-1]]])
                logp = torch.log_softmax(fake.logits(fake.decode(ids, h, mask))[0], -1)
                total = float(logp.gather(1, torch.tensor(seq)[:, None]).sum())
                if total / n**lp > best_score:
                    best, best_score = seq, total / n**lp
    got = ours(fake, h, mask, max_new_tokens=L, num_beams=(V - 1) ** (L - 1), early_stopping="never")[0]
    assert got.ids == best


# ------------------------------------------------------------------------------------------------------- sampling


def test_sampling_reproducible_with_generator_and_respects_top_k():
    fake = FakeDecoder(seed=4, vocab=15, eos_bias=-3.0, scale=1.0)
    h, mask = encoded(4)

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return [s.ids for s in ours(fake, h, mask, max_new_tokens=10, do_sample=True, generator=g, **kw)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    # top_k=1 and a tiny top_p both collapse to greedy
    greedy = [s.ids for s in ours(fake, h, mask, max_new_tokens=10)]
    assert run(3, top_k=1) == greedy
    assert run(4, top_p=1e-6) == greedy
    # low temperature sharpens towards greedy; the chosen tokens always lie in the top-k set
    g = torch.Generator().manual_seed(9)
    seqs = ours(fake, h, mask, max_new_tokens=10, do_sample=True, generator=g, top_k=3, temperature=0.7)
    for b, s in enumerate(seqs):
        prefix = [START]
        for tok in s.ids:
            logits = fake.logits(fake.decode(torch.tensor([prefix]), h[b : b + 1], mask[b : b + 1]))[0, -1]
            assert tok in torch.topk(logits, 3).indices.tolist()
            prefix.append(tok)


def test_sampling_distribution_matches_softmax():
    """First-token frequencies over many samples follow softmax(logits / T)."""
    fake = FakeDecoder(seed=6, vocab=5, eos_bias=0.0, scale=0.8)
    h, mask = encoded(1)
    n = 4000
    hb, mb = h.expand(n, -1, -1), mask.expand(n, -1)
    g = torch.Generator().manual_seed(0)
    seqs = ours(fake, hb, mb, max_new_tokens=1, do_sample=True, generator=g, temperature=1.5)
    counts = torch.bincount(torch.tensor([s.ids[0] for s in seqs]), minlength=5).float() / n
    logits = fake.logits(fake.decode(torch.tensor([[START]]), h, mask))[0, -1]
    want = torch.softmax(logits / 1.5, -1)
    assert torch.allclose(counts, want, atol=0.03)


# ------------------------------------------------------------------------------------------------------ contract


def test_decode_runs_one_step_per_token_and_cache_sized_to_limit():
    fake = FakeDecoder(seed=1, eos_bias=-50.0)
    h, mask = encoded(2)
    fake.decode_calls = 0
    ours(fake, h, mask, max_new_tokens=6)
    assert fake.decode_calls == 6  # no re-decoding of the prefix


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=[3, 4]), "entries"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, do_sample=True), "sampling"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(no_repeat_ngram_size=-1), "no_repeat"),
    ],
)
def test_bad_options_are_named(bad, match):
    fake = FakeDecoder()
    h, mask = encoded(3)
    with pytest.raises(ValueError, match=match):
        ours(fake, h, mask, **bad)


def test_sequence_fields():
    fake = FakeDecoder(seed=0, eos_bias=2.0)
    h, mask = encoded(1)
    (s,) = ours(fake, h, mask, max_new_tokens=20)
    assert isinstance(s, Sequence)
    assert len(s.ids) == len(s.token_logprobs) and all(lp <= 0 for lp in s.token_logprobs)
    assert s.ids[-1] == EOS and not s.truncated
    assert 0 < math.exp(s.score) <= 1
