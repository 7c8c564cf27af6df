"""fiore's Florence-2 against transformers' native Florence2 (random weights), plus padding, cache, dtypes and
gradient checkpointing on the tiny preset."""

from __future__ import annotations

import copy

import pytest
import torch
from florence_oracle import NATIVE_VOCAB, fiore_greedy, hf_inputs, hf_model, prompt_ids

import fiore
from fiore.config import preset
from fiore.model import DecoderCache, FlorenceModel

pytest.importorskip("transformers", reason="transformers is the numerical oracle (dev extra)")

TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=["none", "all"])
def pair(request, tmp_path_factory):
    """(transformers model, fiore.Florence loaded from its save_pretrained directory) for the tiny preset: with the
    plain modules, and with every inference strategy (`fiore.model.inference`) forced on."""
    config = preset("tiny").replace(text={"vocab_size": NATIVE_VOCAB})
    hf = hf_model(config)
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    florence = fiore.load(path, strategies=request.param)
    from fiore.model import kernels

    expected = 5 if kernels.ONEDNN else 2  # the oneDNN strategies need a oneDNN build
    assert len(florence.model.inference_strategies) == (0 if request.param == "none" else expected)
    return hf, florence


@pytest.fixture(scope="module")
def model():
    """A fiore tiny model with its own (BART-style, std 0.02) init: logits at the scale of a real model (~4)."""
    torch.manual_seed(0)
    return FlorenceModel(preset("tiny").replace(text={"vocab_size": NATIVE_VOCAB})).eval()


def compare(hf, model, pixel_values, prompt, dec_len=6):
    with torch.no_grad():
        feats_hf = hf.model.get_image_features(pixel_values).pooler_output
        feats = model.encode_image(pixel_values)
        assert max_diff(feats, feats_hf) < TOL
        ids, mask = hf_inputs(prompt, feats.shape[1])
        dec = prompt_ids(prompt.shape[0], dec_len, NATIVE_VOCAB, seed=7)
        dec[:, 0] = 2
        out = hf(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, decoder_input_ids=dec)
        hidden, enc_mask = model.encode(feats, prompt)
        assert enc_mask.all() and enc_mask.shape == ids.shape
        assert max_diff(hidden, out.encoder_last_hidden_state) < TOL
        logits = model(pixel_values, prompt, dec)
        assert logits.dtype == torch.float32
        assert max_diff(logits, out.logits) < TOL
    return feats


def test_tiny_matches_transformers(pair):
    hf, florence = pair
    assert florence.config.vision.window_size == 8  # read from the native config, not defaulted
    torch.manual_seed(0)
    feats = compare(hf, florence.model, torch.randn(2, 3, 256, 256), prompt_ids(2, 8, NATIVE_VOCAB))
    assert feats.shape == (2, 1 + 8 * 8, 256)


@pytest.mark.parametrize("size", [(256, 256), (224, 320)])
def test_vision_tower_equals_transformers_in_float64(pair, monkeypatch, size):
    """The same maths, not only close numbers: in float64 rounding vanishes, so any layout or slicing mistake shows.

    The plain modules (what training runs, gradients included) and the inference strategy of sliced vision with a
    tiny SLICE_BYTES (stage 0 in many slices: channel attention accumulated slice by slice, window attention in
    bands of window rows, the MLP in row slices) are both checked.
    """
    from fiore.model import inference

    monkeypatch.setattr(inference, "SLICE_BYTES", 64 << 10)
    hf, florence = pair
    hf64 = copy.deepcopy(hf).double()
    model64 = FlorenceModel(florence.config).eval()  # the plain modules, whatever the fixture prepared
    model64.load_state_dict(florence.model.state_dict())
    model64.double()
    sliced64 = copy.deepcopy(model64)
    for stage in sliced64.vision_tower.blocks:  # the strategy's classes (prepare_for_inference skips float64)
        for block in stage:
            block.spatial_block.__class__ = inference.SlicedSpatialBlock
            block.channel_block.__class__ = inference.SlicedChannelBlock
    torch.manual_seed(3)
    pixel_values = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        want = hf64.model.get_image_features(pixel_values).pooler_output
        with torch.inference_mode():
            sliced = sliced64.encode_image(pixel_values)
    whole = model64.encode_image(pixel_values)  # autograd on: the plain modules, as training runs them
    assert max_diff(sliced, want) < 1e-9
    assert max_diff(whole.detach(), want) < 1e-9
    # And the training path's gradients (its attention and head splitting differ from inference's).
    weights = torch.randn_like(whole)
    (whole * weights).sum().backward()
    (hf64.model.get_image_features(pixel_values).pooler_output * weights).sum().backward()
    ours = dict(model64.vision_tower.named_parameters())
    theirs = dict(hf64.model.vision_tower.named_parameters())
    assert set(ours) == set(theirs)
    assert max(max_diff(ours[n].grad, theirs[n].grad) / theirs[n].grad.abs().max().item() for n in ours) < 1e-8


def test_non_square_input_matches_transformers(pair):
    hf, florence = pair
    torch.manual_seed(1)
    # 128x192 -> 4x6 feature cells; window 8 pads the small maps, exercising the window padding path too.
    feats = compare(hf, florence.model, torch.randn(1, 3, 128, 192), prompt_ids(1, 5, NATIVE_VOCAB))
    assert feats.shape == (1, 1 + 4 * 6, 256)


def test_feature_map_beyond_position_table_is_rejected(pair):
    _, florence = pair
    with pytest.raises(ValueError, match="position table"):
        florence.model.encode_image(torch.randn(1, 3, 32, 32 * 51))


def test_greedy_tokens_match_transformers(pair):
    hf, florence = pair
    torch.manual_seed(2)
    pixel_values, prompt = torch.randn(2, 3, 128, 128), prompt_ids(2, 9, NATIVE_VOCAB, seed=3)
    ids, mask = hf_inputs(prompt, 17)
    with torch.no_grad():
        # min_new_tokens keeps EOS out (random weights would stop at once); the 31st token is transformers'
        # forced EOS, so 30 generated tokens are compared.
        ref = hf.generate(
            input_ids=ids, pixel_values=pixel_values, attention_mask=mask, max_new_tokens=31, min_new_tokens=31
        )
    ours = fiore_greedy(florence.model, pixel_values, prompt, steps=30)
    assert torch.equal(ours, ref[:, :31])


def test_padded_batch_rows_equal_rows_alone(model):
    m = model
    torch.manual_seed(3)
    pixel_values = torch.randn(2, 3, 128, 128)
    long, short = prompt_ids(1, 10, NATIVE_VOCAB, seed=4), prompt_ids(1, 6, NATIVE_VOCAB, seed=5)
    batch = torch.ones(2, 10, dtype=torch.long)  # pad id 1, right padding
    batch[0], batch[1, :6] = long[0], short[0]
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0], mask[1, :6] = 1, 1
    dec = prompt_ids(2, 7, NATIVE_VOCAB, seed=6)
    with torch.no_grad():
        both = m(pixel_values, batch, dec, attention_mask=mask)
        alone0 = m(pixel_values[:1], long, dec[:1])
        alone1 = m(pixel_values[1:], short, dec[1:])
        unmasked = m(pixel_values, batch, dec)
    assert max_diff(both[0], alone0[0]) < 1e-5
    assert max_diff(both[1], alone1[0]) < 1e-5
    assert max_diff(unmasked[1], alone1[0]) > 1e-3  # the mask is what makes row 1 independent of its padding


def test_cached_decoding_equals_full_decode(model):
    m = model
    torch.manual_seed(4)
    pixel_values, prompt = torch.randn(2, 3, 128, 128), prompt_ids(2, 8, NATIVE_VOCAB)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    dec = prompt_ids(2, 9, NATIVE_VOCAB, seed=8)
    with torch.no_grad():
        hidden, enc_mask = m.encode(m.encode_image(pixel_values), prompt, mask)
        full = m.logits(m.decode(dec, hidden, enc_mask))
        cache = m.new_cache(hidden, enc_mask, max_length=12)
        assert isinstance(cache, DecoderCache) and cache.length == 0 and cache.max_length == 12
        prefix = m.logits(m.decode(dec[:, :3], None, None, cache))  # a multi-token step first
        steps = [m.logits(m.decode(dec[:, i : i + 1], None, None, cache)) for i in range(3, 9)]
        assert cache.length == 9
        with pytest.raises(ValueError, match="cache is full"):
            m.decode(torch.ones(2, 4, dtype=torch.long), None, None, cache)
    assert max_diff(torch.cat([prefix, *steps], dim=1), full) < 1e-5


def test_fused_decoder_qkv_is_the_three_projections_and_follows_loaded_weights(model, tmp_path):
    """The fused decoder strategy: q/k/v parameters are views of one weight (no copy), loading new weights writes
    through to it, and the state dict keeps the checkpoint's keys as tensors of their own."""
    from fiore.model.inference import FusedDecoderLayer, prepare_for_inference

    fused = prepare_for_inference(copy.deepcopy(model), ["fused_decoder"])
    layer = fused.language_model.decoder.layers[0]
    assert isinstance(layer, FusedDecoderLayer) and fused.inference_strategies == ("fused_decoder",)
    attn = layer.self_attn
    assert attn.q_proj.weight.data_ptr() == layer.fused_qkv.weight.data_ptr()  # a view, not a copy
    assert set(fused.state_dict()) == set(model.state_dict()) and len(list(fused.parameters())) == len(
        list(model.parameters())
    )
    x = torch.randn(2, 3, attn.q_proj.in_features)
    with torch.no_grad():
        separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        assert max_diff(layer.fused_qkv(x), separate) < 1e-6
        state = {k: v * 2 if "self_attn.k_proj" in k else v for k, v in model.state_dict().items()}
        fused.load_state_dict(state)
        assert max_diff(layer.fused_qkv(x)[..., attn.q_proj.in_features : 2 * attn.q_proj.in_features],
                        attn.k_proj(x)) < 1e-6  # fmt: skip
    saved = fused.state_dict()
    q = next(v for k, v in saved.items() if k.endswith("decoder.layers.0.self_attn.q_proj.weight"))
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()  # its own memory: safetensors can save it


def test_cache_select_reorders_and_expands_rows(model):
    m = model
    torch.manual_seed(5)
    pixel_values, prompt = torch.randn(2, 3, 128, 128), prompt_ids(2, 8, NATIVE_VOCAB)
    dec = prompt_ids(2, 5, NATIVE_VOCAB, seed=9)
    with torch.no_grad():
        hidden, enc_mask = m.encode(m.encode_image(pixel_values), prompt)
        full = m.logits(m.decode(dec, hidden, enc_mask))
        cache = m.new_cache(hidden, enc_mask, max_length=8)
        m.decode(dec[:, :3], None, None, cache)
        index = torch.tensor([1, 0, 1])  # swap rows and duplicate one (beam search / many tasks per prefill)
        assert cache.select(index) is cache and cache.batch_size == 3 and cache.length == 3
        rest = m.logits(m.decode(dec[index, 3:], None, None, cache))
    assert max_diff(rest, full[index, 3:]) < 1e-5


def test_encoder_output_is_reusable_for_many_prompts_via_select(pair):
    """One prefill per image, then rows expanded to N tasks: logits equal per-row decoding."""
    _, florence = pair
    m = florence.model
    torch.manual_seed(6)
    pixel_values, prompt = torch.randn(1, 3, 128, 128), prompt_ids(1, 6, NATIVE_VOCAB)
    with torch.no_grad():
        hidden, enc_mask = m.encode(m.encode_image(pixel_values), prompt)
        cache = m.new_cache(hidden, enc_mask, max_length=4).select(torch.zeros(3, dtype=torch.long))
        dec = torch.tensor([[2], [0], [5]])
        many = m.logits(m.decode(dec, None, None, cache))
        one = m.logits(m.decode(dec, hidden.expand(3, -1, -1), enc_mask.expand(3, -1)))
    # logits of scale ~15; the cached rows go through few-row kernels (oneDNN), the full pass may not: rounding only
    assert max_diff(many, one) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(pair, dtype):
    _, florence = pair
    m32 = florence.model
    m = FlorenceModel(m32.config)
    m.load_state_dict(m32.state_dict())
    m = m.to(dtype).eval()
    assert m.lm_head.weight is m.language_model.shared.weight
    torch.manual_seed(7)
    pixel_values, prompt, dec = torch.randn(1, 3, 128, 128), prompt_ids(1, 8, NATIVE_VOCAB), prompt_ids(1, 4, 999)
    with torch.no_grad():
        ref = m32(pixel_values, prompt, dec)
        out = m(pixel_values, prompt, dec)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # Low precision: only a loose agreement is meaningful (bf16 has ~3 significant digits).
    assert max_diff(out, ref) < 0.05 * ref.abs().max().item() + 0.1


def test_gradient_checkpointing_gives_equal_gradients():
    torch.manual_seed(0)
    config = preset("tiny").replace(text={"vocab_size": 1000})
    model = FlorenceModel(config).train()  # train mode: dropout and drop-path active, RNG replayed on recompute
    pixel_values = torch.randn(2, 3, 64, 64)
    prompt, dec = prompt_ids(2, 6, 1000), prompt_ids(2, 5, 1000, seed=2)

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        torch.manual_seed(123)
        logits = model(pixel_values, prompt, dec)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), dec.roll(-1, 1).flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt)
    assert all(g.abs().sum() > 0 for n, g in plain.items() if "vision_tower" in n and "weight" in n)
    worst = max(max_diff(plain[n], ckpt[n]) for n in plain)
    assert worst < 1e-5


def test_shared_embedding_trains_with_sparse_rows_but_leaves_a_dense_gradient():
    torch.manual_seed(0)
    config = preset("tiny").replace(text={"vocab_size": 1000, "dropout": 0.0, "attention_dropout": 0.0,
                                          "activation_dropout": 0.0}, vision={"drop_path_rate": 0.0})  # fmt: skip
    model = FlorenceModel(config).train()
    shared = model.language_model.shared
    pixel_values = torch.randn(2, 3, 64, 64)
    prompt, dec = prompt_ids(2, 6, 1000), prompt_ids(2, 5, 1000, seed=2)

    def shared_grad(sparse_rows: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        shared.train(sparse_rows)  # eval mode: the plain dense embedding gradient (no dropout to differ here)
        logits = model(pixel_values, prompt, dec)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), dec.roll(-1, 1).flatten()).backward()
        return shared.weight.grad

    dense, sparse = shared_grad(False), shared_grad(True)
    (rows,) = torch.autograd.grad(shared(prompt).sum(), shared.weight)
    assert rows.is_sparse  # training lookups give sparse rows; accumulated with the LM head's they are dense
    assert not sparse.is_sparse
    assert max_diff(sparse, dense) < 1e-6
    assert dense[prompt[0, 1]].abs().sum() > 0  # looked-up rows really get the embedding's share
    # Without the LM head in the graph the accumulated gradient would be sparse; the tied weight still gets a
    # dense one, which fused AdamW accepts.
    model.zero_grad(set_to_none=True)
    shared(prompt).square().sum().backward()
    assert not shared.weight.grad.is_sparse and shared.weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW([shared.weight], fused=True)
    opt.step()


def test_tied_head_weight_gives_the_same_gradients_and_adds_embedding_rows_in_place():
    from torch.profiler import profile

    torch.manual_seed(0)
    V = 1000
    config = preset("tiny").replace(text={"vocab_size": V, "dropout": 0.0, "attention_dropout": 0.0,
                                          "activation_dropout": 0.0}, vision={"drop_path_rate": 0.0})  # fmt: skip
    model = FlorenceModel(config).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    prompt, dec = prompt_ids(2, 6, V), prompt_ids(2, 5, V, seed=2)

    targets = dec.roll(-1, 1)

    def grads(late_head: bool) -> tuple[dict[str, torch.Tensor], list]:
        model.zero_grad(set_to_none=True)
        features = model.encode_image(pixel_values)
        if late_head:  # the training forward: only target tokens, the head's gradient arranged to come last
            rows = [torch.arange(2)]
            logits = model.target_logits(features, prompt, None, dec, torch.ones_like(dec, dtype=torch.bool), rows)
        else:
            hidden, mask = model.encode(features, prompt)
            logits = model.logits(model.decode(dec, hidden, mask)).flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, targets.flatten())
        with profile(record_shapes=True) as prof:
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, prof.events()

    plain, _ = grads(False)
    late, events = grads(True)
    assert plain.keys() == late.keys()
    for name in plain:
        assert max_diff(late[name], plain[name]) < 1e-6, name
    # The tied weight's gradient pieces (two sparse lookups, one dense head) are summed with no (V, d) copy (what
    # an out-of-place dense + sparse add makes): the dense one arrives last and the rows are added to it in place.
    shape = [V, config.text.d_model]
    assert not [e for e in events if e.name == "aten::copy_" and e.input_shapes and e.input_shapes[0] == shape]
    assert any(e.name == "aten::add_" and e.input_shapes and e.input_shapes[0] == shape for e in events)

    # The same training forward without gradients, or with the head frozen, gives the plain logits.
    features = model.encode_image(pixel_values)
    hidden, mask = model.encode(features, prompt)
    want = model.logits(model.decode(dec, hidden, mask)).flatten(0, 1).detach()
    every_token = torch.ones_like(dec, dtype=torch.bool)
    with torch.no_grad():
        assert max_diff(model.target_logits(features, prompt, None, dec, every_token, [torch.arange(2)]), want) < 1e-5
    model.lm_head.weight.requires_grad_(False)
    frozen = model.target_logits(features, prompt, None, dec, every_token, [torch.arange(2)])
    assert max_diff(frozen.detach(), want) < 1e-5


def test_gradient_checkpointing_wraps_davit_blocks_and_text_layers(monkeypatch):
    import fiore.model.davit as davit
    import fiore.model.text as text

    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        return fn(*args)

    monkeypatch.setattr(davit, "checkpoint", spy)
    monkeypatch.setattr(text, "checkpoint", spy)
    config = preset("tiny").replace(text={"vocab_size": 100})
    model = FlorenceModel(config)
    model.set_gradient_checkpointing(True)
    model(torch.randn(1, 3, 64, 64), torch.tensor([[0, 5, 2]]), torch.tensor([[2, 7]])).sum().backward()
    assert calls.count("Block") == sum(config.vision.depths)
    assert calls.count("EncoderLayer") == config.text.encoder_layers
    assert calls.count("DecoderLayer") == config.text.decoder_layers
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64), torch.tensor([[0, 5, 2]]), torch.tensor([[2, 7]]))
    assert calls == []  # nothing to save memory for without gradients


def test_bad_inputs_raise_clear_errors():
    model = FlorenceModel(preset("tiny").replace(text={"vocab_size": 100})).eval()
    with pytest.raises(ValueError, match="pixel_values"):
        model.encode_image(torch.randn(3, 64, 64))
    feats = model.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode(feats, torch.tensor([[0, 5, 2]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.new_cache(*model.encode(feats, torch.tensor([[0, 5, 2]])), max_length=5000)


def test_missing_encoder_mask_means_attend_everything(model):
    m = model
    torch.manual_seed(8)
    with torch.no_grad():
        hidden, mask = m.encode(m.encode_image(torch.randn(1, 3, 64, 64)), prompt_ids(1, 5, NATIVE_VOCAB))
        dec = torch.tensor([[2, 0, 9]])
        full = m.logits(m.decode(dec, hidden, mask))
        assert torch.equal(m.logits(m.decode(dec, hidden, None)), full)
        cache = m.new_cache(hidden, None, max_length=3)
        assert cache.encoder_mask.all() and cache.encoder_mask.shape == mask.shape
        assert max_diff(m.logits(m.decode(dec, None, None, cache)), full) < 1e-5


def test_split_heads_gradient():
    from fiore.model.davit import split_heads

    qkv = torch.randn(2, 5, 3 * 6, dtype=torch.float64, requires_grad=True)
    q, k, v = split_heads(qkv, 2)
    assert q.shape == (2, 2, 5, 3) and q.is_contiguous()
    assert torch.equal(k[1, 0, 4], qkv[1, 4, 6:9].detach())  # k is the second third, head 0 its first 3 channels
    assert torch.autograd.gradcheck(lambda t: split_heads(t, 2), (qkv,))
    assert torch.autograd.gradcheck(lambda t: split_heads(t, 3)[1], (qkv,))  # unused outputs get zero gradient


def test_window_heads_split_and_merge():
    from fiore.model.davit import merge_window_heads, split_window_heads

    # (B, H, W, 3C) = (2, 4, 6, 3 * 4): windows of 2x2, 2 heads of 2 channels.
    qkv = torch.randn(2, 4, 6, 12, dtype=torch.float64, requires_grad=True)
    q, k, v = split_window_heads(qkv, 2, 2)
    assert q.shape == (2 * 2 * 3, 2, 4, 2) and v.is_contiguous()
    # Window 4 = image 0, window row 1, window column 1; its token 3 = pixel (3, 3); head 1 = channels 2:4 of a part.
    assert torch.equal(k[4, 1, 3], qkv[0, 3, 3, 4 + 2 : 4 + 4].detach())
    assert torch.equal(merge_window_heads(v, 2, 4, 6, 2), qkv[..., 8:].detach())  # merge undoes the split
    assert torch.autograd.gradcheck(lambda t: split_window_heads(t, 2, 2), (qkv,))
    assert torch.autograd.gradcheck(lambda t: split_window_heads(t, 1, 2)[2], (qkv,))


def test_drop_path_residual_equals_adding_the_dropped_branch():
    from fiore.model.davit import DropPath

    drop = DropPath(0.5).train()
    x, branch = torch.randn(64, 3, 3, 4), torch.randn(64, 3, 3, 4)
    torch.manual_seed(0)
    got = drop.residual(x, branch)
    torch.manual_seed(0)
    want = x + drop(branch)  # same random draws, so the same samples dropped
    assert torch.allclose(got, want, atol=1e-6)
    kept = (got - x).flatten(1).abs().sum(1) > 0
    assert 10 < int(kept.sum()) < 54  # whole samples dropped, about half of them
    assert torch.allclose((got - x)[kept], 2 * branch[kept], atol=1e-6)
    assert torch.equal(drop.eval().residual(x, branch), x + branch)
