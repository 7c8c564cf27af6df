"""Image-text heads: the UniCL loss against a direct computation, label-aware targets, embeddings, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from fiore.checkpoint import CONTRASTIVE_FILE, load_model, save_checkpoint
from fiore.config import preset
from fiore.model import FlorenceModel
from fiore.model.contrastive import unicl_loss


def _direct_loss(u, v, scale, groups):
    """Row by row, as the UniCL paper writes it: -1/|P(i)| sum_{k in P(i)} log softmax_k, both directions."""
    B = len(groups)
    total = 0.0
    for direction in (u @ v.t(), v @ u.t()):
        for i in range(B):
            positives = [k for k in range(B) if groups[k] == groups[i]]
            row = [scale * float(direction[i, j]) for j in range(B)]
            lse = math.log(sum(math.exp(x) for x in row))
            total += -sum(row[k] - lse for k in positives) / len(positives) / B
    return total / 2


def test_unicl_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    v = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    groups = [0, 1, 0, 3, 1, 5]  # pairs 0/2 and 1/4 share a text
    got = unicl_loss(u, v, torch.tensor(7.0, dtype=torch.float64), torch.tensor(groups))
    assert float(got) == pytest.approx(_direct_loss(u, v, 7.0, groups), rel=1e-10)


def test_distinct_texts_give_clip_loss_and_shared_texts_are_positives():
    g = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    v = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    logits = 5.0 * u @ v.t()
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    got = unicl_loss(u, v, torch.tensor(5.0), torch.arange(4))
    torch.testing.assert_close(got, clip)
    # Images 0 and 1 share a class text. CLIP's targets lower the similarity of image 1 to text 0 (another pair's
    # text); UniCL's label-aware targets raise it, since that text names image 1's class too.
    for groups, sign in (([0, 0, 2], -1.0), ([0, 1, 2], 1.0)):
        sims = torch.tensor([[0.9, 0.5, 0.1], [0.5, 0.9, 0.1], [0.1, 0.1, 0.9]], requires_grad=True)
        # identity image embeddings make images @ texts.T the similarity matrix itself
        unicl_loss(torch.eye(3), sims.t(), torch.tensor(5.0), torch.tensor(groups)).backward()
        assert sign * float(sims.grad[1, 0]) > 0.01, (groups, sims.grad)


def _model(dim=32):
    torch.manual_seed(0)
    return FlorenceModel(preset("tiny").replace(contrastive_dim=dim, text={"vocab_size": 1100}))


def test_embeddings_are_unit_vectors_and_text_embedding_ignores_padding():
    model = _model().eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        e = model.embed_image(model.encode_image(pixels))
        ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
        mask = ids != 1
        t = model.embed_text(ids, mask)
        alone = model.embed_text(ids[:1, :4])
    assert e.shape == (2, 32) and t.shape == (2, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(t[:1], alone, atol=1e-5, rtol=1e-5)


def test_models_without_heads_say_so():
    model = FlorenceModel(preset("tiny").replace(text={"vocab_size": 1100}))
    with pytest.raises(ValueError, match="no image-text heads"):
        model.embed_text(torch.tensor([[0, 2]]))


def test_heads_are_saved_in_their_own_file_and_reloaded(tmp_path):
    model = _model()
    with torch.no_grad():
        model.contrastive.logit_scale.fill_(3.25)
    save_checkpoint(model, model.config, tmp_path)
    from safetensors.torch import load_file

    main = load_file(str(tmp_path / "model.safetensors"))
    heads = load_file(str(tmp_path / CONTRASTIVE_FILE))
    assert not any("contrastive" in k for k in main)
    assert set(heads) == {"image_projection.weight", "text_projection.weight", "logit_scale"}
    loaded, config = load_model(tmp_path)
    assert config.contrastive_dim == 32
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    # without the heads' file the checkpoint no longer matches its config: strict loading names the keys
    (tmp_path / CONTRASTIVE_FILE).unlink()
    from fiore.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="contrastive.text_projection.weight"):
        load_model(tmp_path)


def test_a_checkpoint_with_heads_loads_in_transformers_unchanged(tmp_path):
    """The heads live in their own file, so transformers' loader reads model.safetensors alone: no missing or
    unexpected keys, and the same logits as fiore's model."""
    import transformers

    model = _model().eval()
    save_checkpoint(model, model.config, tmp_path)
    hf, info = transformers.Florence2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64, generator=g)
    prompt = torch.randint(4, 1100, (1, 6), generator=g)
    dec = torch.randint(4, 1100, (1, 4), generator=g)
    with torch.no_grad():
        ours = model(pixels, prompt, dec)
        feats = hf.model.get_image_features(pixels).pooler_output
        out = hf(inputs_embeds=torch.cat([feats, hf.get_input_embeddings()(prompt)], dim=1), decoder_input_ids=dec)
    assert (out.logits - ours).abs().max() < 1e-4
