"""Test helpers: transformers' native Florence2 as the numerical oracle (tests only; src/ never imports transformers).

The HF config is written out here field by field from fiore's ModelConfig, independently of
`fiore.checkpoint.native_config`, so a mistake in one does not hide a mistake in the other.
"""

from __future__ import annotations

import re

import torch

from fiore.config import ModelConfig

IMAGE_TOKEN_ID = 51289
NATIVE_VOCAB = 51328


def hf_config(config: ModelConfig):
    """transformers' Florence2Config for a fiore ModelConfig."""
    transformers = __import__("transformers")
    v, t = config.vision, config.text
    vision = dict(
        embed_dim=list(v.embed_dims),
        depths=list(v.depths),
        num_heads=list(v.num_heads),
        num_groups=list(v.num_groups),
        window_size=v.window_size,
        projection_dim=v.projection_dim,
        drop_path_rate=v.drop_path_rate,
        max_position_embeddings=v.max_position_embeddings,
        max_temporal_embeddings=v.max_temporal_embeddings,
    )
    text = transformers.BartConfig(
        vocab_size=t.vocab_size,
        d_model=t.d_model,
        encoder_layers=t.encoder_layers,
        decoder_layers=t.decoder_layers,
        encoder_attention_heads=t.encoder_attention_heads,
        decoder_attention_heads=t.decoder_attention_heads,
        encoder_ffn_dim=t.encoder_ffn_dim,
        decoder_ffn_dim=t.decoder_ffn_dim,
        max_position_embeddings=t.max_position_embeddings,
        dropout=t.dropout,
        attention_dropout=t.attention_dropout,
        activation_dropout=t.activation_dropout,
    ).to_dict()
    return transformers.Florence2Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)


def hf_model(config: ModelConfig, seed: int = 0):
    """A random-weight transformers Florence2ForConditionalGeneration in eval mode."""
    transformers = __import__("transformers")
    torch.manual_seed(seed)
    model = transformers.Florence2ForConditionalGeneration(hf_config(config)).eval()
    with torch.no_grad():
        # Weights at unit-gain scale (1/sqrt(fan_in)) rather than the default 0.02 give varied, non-degenerate greedy
        # sequences; random LayerNorm affines and biases make a swapped or skipped norm/bias visible.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.ndim >= 2:
                fan_in = p[0].numel() if "shared" not in name and "embed" not in name else 10
                p.normal_(0.0, fan_in**-0.5)
    return model


def prompt_ids(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    """Random prompt tokens `<s> ... </s>` avoiding special and `<image>` ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, min(vocab, IMAGE_TOKEN_ID), (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return ids


def hf_inputs(prompt: torch.Tensor, num_image_tokens: int, mask: torch.Tensor | None = None):
    """Native input_ids: `<image>` placeholders in front of the prompt; the mask gets ones for them."""
    B = prompt.shape[0]
    ids = torch.cat([torch.full((B, num_image_tokens), IMAGE_TOKEN_ID), prompt], dim=1)
    if mask is None:
        mask = torch.ones_like(prompt)
    return ids, torch.cat([torch.ones(B, num_image_tokens, dtype=mask.dtype), mask], dim=1)


# Native -> Microsoft original key names, written as plain string edits (the inverse of fiore's regex table).
def native_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        k = key
        if k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model.") :]
        elif k.startswith("model.multi_modal_projector."):
            k = k[len("model.multi_modal_projector.") :]
            k = k.replace("image_position_embed.", "image_pos_embed.")
            if k == "image_projection.weight":
                k, tensor = "image_projection", tensor.t().contiguous()
        elif k.startswith("model.vision_tower."):
            k = k[len("model.") :]
            k = re.sub(r"convs\.(\d+)\.conv\.", r"convs.\1.proj.", k)
            k = re.sub(r"\.conv([12])\.", r".conv\1.fn.dw.", k)
            attn = "window_attn" if "spatial_block" in k else "channel_attn"
            k = k.replace(".norm1.", f".{attn}.norm.").replace(f".{attn}.qkv", f".{attn}.fn.qkv")
            k = k.replace(f".{attn}.proj", f".{attn}.fn.proj")
            k = k.replace(".norm2.", ".ffn.norm.").replace(".ffn.fc", ".ffn.fn.net.fc")
        out[k] = tensor
    out["language_model.final_logits_bias"] = torch.zeros(1, state_dict["lm_head.weight"].shape[0])
    return out


def original_config(config: ModelConfig) -> dict:
    """A config.json in Microsoft's original layout (as in microsoft/Florence-2-large)."""
    v, t = config.vision, config.text
    return {
        "model_type": "florence2",
        "projection_dim": v.projection_dim,
        "vocab_size": t.vocab_size,
        "text_config": {
            "vocab_size": t.vocab_size,
            "d_model": t.d_model,
            "encoder_layers": t.encoder_layers,
            "decoder_layers": t.decoder_layers,
            "encoder_attention_heads": t.encoder_attention_heads,
            "decoder_attention_heads": t.decoder_attention_heads,
            "encoder_ffn_dim": t.encoder_ffn_dim,
            "decoder_ffn_dim": t.decoder_ffn_dim,
            "max_position_embeddings": t.max_position_embeddings,
            "normalize_before": False,
            "add_final_layer_norm": False,
            "scale_embedding": False,
        },
        "vision_config": {
            "model_type": "davit",
            "drop_path_rate": 0.1,
            "patch_size": list(v.patch_size),
            "patch_stride": list(v.patch_stride),
            "patch_padding": list(v.patch_padding),
            "patch_prenorm": list(v.patch_prenorm),
            "dim_embed": list(v.embed_dims),
            "num_heads": list(v.num_heads),
            "num_groups": list(v.num_groups),
            "depths": list(v.depths),
            "window_size": v.window_size,
            "projection_dim": v.projection_dim,
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": v.max_temporal_embeddings},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": v.max_position_embeddings},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
    }


@torch.no_grad()
def fiore_greedy(model, pixel_values, prompt, steps: int, start_id: int = 2, suppress: int = 2) -> torch.Tensor:
    """Greedy decoding with fiore's KV cache: (B, 1 + steps) ids starting with the decoder start token.

    Token `suppress` (EOS) is never chosen, so random-weight models run the full length (HF: suppress_tokens).
    """
    return greedy_from(model, *model.encode(model.encode_image(pixel_values), prompt), steps, start_id, suppress)


@torch.no_grad()
def greedy_from(model, hidden, mask, steps: int, start_id: int = 2, suppress: int = 2) -> torch.Tensor:
    """`fiore_greedy` from an encoder output (B, N, d) and mask (B, N)."""
    cache = model.new_cache(hidden, mask, max_length=steps + 1)
    ids = torch.full((hidden.shape[0], 1), start_id)
    for _ in range(steps):
        logits = model.logits(model.decode(ids[:, -1:], None, None, cache))
        logits[..., suppress] = float("-inf")
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
