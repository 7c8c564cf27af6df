"""BART-style post-LN encoder-decoder with learned positions (offset 2) and one shared token embedding.

Names follow transformers' `BartModel` (`shared`, `encoder.layers.{i}.self_attn.q_proj`, ...). `encoder.embed_tokens`
and `decoder.embed_tokens` are the `shared` module itself, so state dicts list the tied keys exactly as native
checkpoints do while the optimizer sees one parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fiore.config import TextConfig
from fiore.model.cache import DecoderCache
from fiore.model.kernels import dropout

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact erf GELU, as BART's "gelu"
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation_function {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class LearnedPositions(nn.Embedding):
    """BART's learned positions: row `position + 2` (the first two rows are a legacy of fairseq's padding offset)."""

    OFFSET = 2

    def __init__(self, max_positions: int, dim: int):
        super().__init__(max_positions + self.OFFSET, dim)
        self.max_positions = max_positions

    def first(self, length: int) -> torch.Tensor:
        """(length,) positions 0 .. length-1 of a whole sequence, checked against `max_positions`."""
        if length > self.max_positions:
            raise ValueError(f"sequence of {length} tokens exceeds max_position_embeddings={self.max_positions}")
        return torch.arange(length, device=self.weight.device)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(t,) positions -> (t, d) embeddings."""
        return super().forward(positions + self.OFFSET)


class Attention(nn.Module):
    """Multi-head attention (self or cross) on `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, hd)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d) -> keys, values (B, H, S, hd)."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x (B, T, d) attends to k, v (B, H, S, hd); mask broadcastable to (B, H, T, S), True = attend."""
        q = self._heads(self.q_proj(x))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        B, H, T, hd = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * hd))


class _FFN(nn.Module):
    """Post-LN feed-forward tail shared by encoder and decoder layers: x = LN(x + fc2(act(fc1 x)))."""

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = dropout(self.act(self.fc1(x)), self.activation_dropout, self.training)
        h = dropout(self.fc2(h), self.dropout, self.training)
        return self.final_layer_norm(x + h)


class EncoderLayer(_FFN):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.encoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(cfg.activation_function)
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), mask (B, 1, 1, T) bool."""
        k, v = self.self_attn.kv(x)
        h = dropout(self.self_attn(x, k, v, mask), self.dropout, self.training)
        x = self._ffn(self.self_attn_layer_norm(x + h))
        if x.dtype == torch.float16:
            # Same overflow guard as BART: fp16 activations can reach inf in post-LN residual streams.
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class DecoderLayer(_FFN):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.decoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(cfg.activation_function)
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def forward(
        self,
        x: torch.Tensor,
        encoder_hidden: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        cache: DecoderCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, t, d); encoder_mask (B, 1, 1, N) bool. With a cache, K/V come from (and are written to) it."""
        k, v = self.self_attn.kv(x)
        if cache is None:
            h = self.self_attn(x, k, v, is_causal=True)
            ck, cv = self.encoder_attn.kv(encoder_hidden)
        else:
            k, v = cache.update(layer, k, v)
            h = self.self_attn(x, k, v, mask=cache.causal_mask(x.shape[1]))
            ck, cv = cache.cross_k[layer], cache.cross_v[layer]
        x = self.self_attn_layer_norm(x + dropout(h, self.dropout, self.training))
        h = self.encoder_attn(x, ck, cv, encoder_mask)
        x = self.encoder_attn_layer_norm(x + dropout(h, self.dropout, self.training))
        return self._ffn(x)


class SharedEmbedding(nn.Embedding):
    """The token embedding tied to the LM head; its gradient is sparse (the looked-up rows only).

    Why: dense embedding gradients zero-fill and add two more (V, d) tensors a step (docs/performance.md). The sparse
    rows are summed with the LM head's dense gradient in place when that one arrives last and fresh, which
    `FlorenceModel.target_logits` arranges (see `kernels.late_alias`). Were the LM head left out of a graph, the
    weight would end up with a sparse gradient, which optimizers such as fused AdamW refuse: a hook turns that back
    into a dense one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Module.to() and load_state_dict keep this Parameter object, so the hook stays with the weight.
        self.weight.register_post_accumulate_grad_hook(_densify_grad)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # sparse=True in the call, not as the module's `sparse` flag: DDP would then expect a sparse gradient, and
        # the tied head's dense gradient is what arrives.
        return F.embedding(input_ids, self.weight, self.padding_idx, sparse=True)


def _densify_grad(param: torch.Tensor) -> None:
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


class _Stack(nn.Module):
    """Token embedding (shared) + learned positions + layernorm_embedding, then the layers."""

    def __init__(self, cfg: TextConfig, shared: nn.Embedding, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = shared
        self.embed_positions = LearnedPositions(cfg.max_position_embeddings, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model)
        self.layers = nn.ModuleList(layers)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.dropout = cfg.dropout
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) scaled token embeddings (no positions)."""
        x = self.embed_tokens(input_ids)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def _start(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Add the position embeddings (of `positions`, default 0 .. T-1) and the embedding layer norm."""
        if positions is None:
            positions = self.embed_positions.first(x.shape[1])
        x = x + self.embed_positions(positions).to(x.dtype)
        return dropout(self.layernorm_embedding(x), self.dropout, self.training)

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and torch.is_grad_enabled()


class Encoder(_Stack):
    def __init__(self, cfg: TextConfig, shared: nn.Embedding):
        super().__init__(cfg, shared, [EncoderLayer(cfg) for _ in range(cfg.encoder_layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) input embeddings (image tokens + prompt tokens), mask (B, T) bool -> (B, T, d)."""
        x = self._start(x)
        mask4 = mask[:, None, None, :]
        for layer in self.layers:
            x = checkpoint(layer, x, mask4, use_reentrant=False) if self._checkpointing() else layer(x, mask4)
        return x


class Decoder(_Stack):
    def __init__(self, cfg: TextConfig, shared: nn.Embedding):
        super().__init__(cfg, shared, [DecoderLayer(cfg) for _ in range(cfg.decoder_layers)])

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, t), encoder_hidden (B, N, d), encoder_mask (B, N) bool or None (all) -> (B, t, d)."""
        return self.from_embeddings(self.embed(input_ids), encoder_hidden, encoder_mask, cache)

    def from_embeddings(
        self,
        embeddings: torch.Tensor,
        encoder_hidden: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """`forward` from token embeddings (B, t, d) (what `embed` returns): the ONNX export feeds embeddings."""
        x = self._start(embeddings, None if cache is None else cache.positions(embeddings.shape[1]))
        mask4 = None if encoder_mask is None else encoder_mask[:, None, None, :]
        for i, layer in enumerate(self.layers):
            if cache is None and self._checkpointing():
                x = checkpoint(layer, x, encoder_hidden, mask4, use_reentrant=False)
            else:
                x = layer(x, encoder_hidden, mask4, cache, i)
        if cache is not None:
            cache.advance(embeddings.shape[1])
        return x


class LanguageModel(nn.Module):
    """`shared` token embedding + encoder + decoder (BartModel's layout)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.shared = SharedEmbedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.encoder = Encoder(cfg, self.shared)
        self.decoder = Decoder(cfg, self.shared)
