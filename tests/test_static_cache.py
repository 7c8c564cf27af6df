"""The static decoder cache and the compiled decode step (fiore.model.inference's decode strategies, the GPU path's
building blocks): the same tokens as the dynamic cache, token for token, on the CPU; a compiled step that is traced
once per batch shape, not once per token."""

from __future__ import annotations

import math

import pytest
import torch

from fiore.config import preset
from fiore.generate import GenerationConfig, generate
from fiore.model import FlorenceModel
from fiore.model import inference as inf
from fiore.model.cache import DecoderCache, StaticDecoderCache

LOC_START = 100  # ids 100 .. 1099 play the location tokens for the sub-bin check (vocab 1200)


def crisp_model(strategies: str) -> FlorenceModel:
    """A tiny random model with wide weights (varied, confident tokens: no greedy near-ties), prepared."""
    torch.manual_seed(0)
    model = FlorenceModel(preset("tiny").replace(text={"vocab_size": 1200}, image_size=(64, 64))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_positions" not in name:
                p.normal_(0, 1.5 / math.sqrt(p.shape[1]))
    return inf.prepare_for_inference(model, strategies)


def encoded(batch: int = 3):
    torch.manual_seed(1)
    hidden = torch.randn(batch, 20, 256)
    mask = torch.ones(batch, 20, dtype=torch.bool)
    if batch > 1:
        mask[1, 14:] = False  # one padded row: the encoder mask is passed through
    return hidden, mask


CONFIGS = {
    "greedy, rows finishing at different steps": GenerationConfig(max_new_tokens=[6, 24, 15], eos_token_id=7),
    "beam search": GenerationConfig(max_new_tokens=[10, 18, 14], num_beams=3, eos_token_id=7),
    "sub-bin coordinates": GenerationConfig(max_new_tokens=16, loc_token_start=LOC_START, loc_window=2),
    "no-repeat 3-grams": GenerationConfig(max_new_tokens=20, no_repeat_ngram_size=3, eos_token_id=7),
}


def assert_same_sequences(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.ids == b.ids and a.truncated == b.truncated
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        if b.token_bins is not None:
            assert a.token_bins == pytest.approx(b.token_bins, abs=1e-3, nan_ok=True)  # bins: 0..999


@pytest.mark.parametrize("case", list(CONFIGS))
def test_static_cache_decodes_the_dynamic_caches_tokens(case):
    dynamic, static = crisp_model("none"), crisp_model("static_cache")
    assert static.inference_strategies == ("static_cache",)
    hidden, mask = encoded()
    assert isinstance(static.new_cache(hidden, mask, 4), StaticDecoderCache)
    want = generate(dynamic, hidden, mask, CONFIGS[case])
    got = generate(static, hidden, mask, CONFIGS[case])
    assert len({tuple(s.ids) for s in want}) == 3 and max(len(set(s.ids)) for s in want) > 3  # varied tokens
    assert_same_sequences(got, want)


def test_static_cache_logits_equal_the_dynamic_cache_and_reorder_keeps_addresses():
    model = crisp_model("none")
    hidden, mask = encoded()
    ids = torch.randint(3, 1200, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dynamic, static = model.new_cache(hidden, mask, 12), StaticDecoderCache.like(model.new_cache(hidden, mask, 12))
        assert type(dynamic) is DecoderCache
        outputs = []
        for cache in (dynamic, static):
            first = model.logits(model.decode(ids[:, :4], None, None, cache))  # a multi-token step first
            cache.reorder(torch.tensor([2, 0, 1]))  # a beam reorder (misused across items here: any rows will do)
            steps = [model.logits(model.decode(ids[:, i : i + 1], None, None, cache)) for i in range(4, 9)]
            outputs.append(torch.cat([first, *steps], 1))
        addresses = [t.data_ptr() for t in static.tensors()]
        static.reorder(torch.tensor([1, 1, 0]))
        assert [t.data_ptr() for t in static.tensors()] == addresses  # in place: a captured graph still sees them
    assert int(static.position) == 9 and dynamic.length == 9
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced (no inductor)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def test_compiled_decode_is_traced_once_per_batch_shape_and_decodes_the_same_tokens():
    torch._dynamo.reset()
    dynamic, compiled = crisp_model("none"), crisp_model("none")
    backend = CountingBackend()
    inf.compile_decode(compiled, backend=backend)
    hidden, mask = encoded(1)
    short, long = GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=40)
    assert_same_sequences(generate(compiled, hidden, mask, short), generate(dynamic, hidden, mask, short))
    traced = backend.graphs
    assert 1 <= traced <= 2  # the first step, and at most one more for a recompile on the static position
    assert_same_sequences(generate(compiled, hidden, mask, long), generate(dynamic, hidden, mask, long))
    assert backend.graphs == traced  # 40 more steps, one more call, the same cache length (64): nothing traced again
    assert [compiled.new_cache(hidden, mask, n).max_length for n in (40, 65)] == [64, 128]
    torch._dynamo.reset()


def test_decode_strategies_are_named_not_automatic_and_keep_the_state_dict():
    model = crisp_model("none")
    assert inf.resolve("all", model) == set(inf.STRATEGIES)  # "all" = the CPU strategies: no compiling by default
    assert inf.resolve("compiled_decode", model) == {"compiled_decode", "static_cache"}
    half = model.to(torch.bfloat16)
    assert inf.resolve("fused_decoder,static_cache", half) == {"static_cache"}  # CPU float32 strategies dropped
    assert inf.resolve("auto", half) == set()
    with pytest.raises(ValueError, match="unknown inference strategies.*compiled_decode"):
        inf.resolve("compile", model)
    with pytest.raises(ValueError, match="compiled_decode does not compile a quantize='int8' model"):
        inf.prepare_for_inference(FlorenceModel(preset("tiny")), "compiled_decode", quantize="int8")
    plain = crisp_model("none")
    static = crisp_model("static_cache,fused_decoder")
    assert static.inference_strategies == ("fused_decoder", "static_cache")
    assert set(static.state_dict()) == set(plain.state_dict())


@pytest.mark.slow
def test_inductor_compiled_decode_on_the_cpu_decodes_the_same_tokens():
    """The strategy as users get it (inductor; CUDA graphs are added on a GPU only)."""
    torch._dynamo.reset()
    dynamic, compiled = crisp_model("none"), crisp_model("compiled_decode")
    assert compiled.inference_strategies == ("static_cache", "compiled_decode")
    hidden, mask = encoded(1)
    config = GenerationConfig(max_new_tokens=12)
    assert_same_sequences(generate(compiled, hidden, mask, config), generate(dynamic, hidden, mask, config))
    torch._dynamo.reset()
