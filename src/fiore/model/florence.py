"""Florence-2: DaViT -> projector -> [image tokens; prompt tokens] -> BART encoder -> decoder -> tied LM head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fiore.config import ModelConfig
from fiore.model.cache import DecoderCache
from fiore.model.contrastive import ContrastiveHeads
from fiore.model.davit import DaViT
from fiore.model.kernels import late_alias, tied_logits
from fiore.model.projector import Projector, sinusoid_table
from fiore.model.text import LanguageModel

SHARED_KEY = "model.language_model.shared.weight"
# State-dict keys that are the shared token embedding under another name (tied weights).
TIED_KEYS = (
    "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight",
    "lm_head.weight",
)


class Parts(nn.Module):
    """Holds the three parts under the names that give transformers-native keys (`model.vision_tower.*`, ...)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.vision_tower = DaViT(config.vision)
        self.multi_modal_projector = Projector(config.vision)
        self.language_model = LanguageModel(config.text)


class FlorenceModel(nn.Module):
    """The whole model. `input_ids` are prompt tokens only; image tokens are placed in front of them here."""

    quantized: str | None = None  # set by `fiore.model.inference.prepare_for_inference` ("int8": linears are int8)

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vision.projection_dim != config.text.d_model:
            raise ValueError(
                f"vision.projection_dim ({config.vision.projection_dim}) must equal "
                f"text.d_model ({config.text.d_model})"
            )
        self.config = config
        self.model = Parts(config)
        self.lm_head = nn.Linear(config.text.d_model, config.text.vocab_size, bias=False)
        self.contrastive = (
            ContrastiveHeads(config.text.d_model, config.contrastive_dim) if config.contrastive_dim > 0 else None
        )
        self.init_weights()

    # -- parts -----------------------------------------------------------------------------------------------------

    @property
    def vision_tower(self) -> DaViT:
        return self.model.vision_tower

    @property
    def projector(self) -> Projector:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> LanguageModel:
        return self.model.language_model

    def tie_weights(self) -> None:
        """Make the LM head use the shared token embedding (needed again after `load_state_dict(assign=True)`)."""
        self.lm_head.weight = self.language_model.shared.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Init for training from scratch: N(0, std) linears and embeddings (BART, and timm's DaViT for its
        linears), zero biases, unit LayerNorms; convolutions keep PyTorch's fan-in init, as timm's DaViT does.

        Why the convolutions differ: N(0, 0.02) patch and position convs leave the tiny DaViT nearly linear at init
        (what reaches the pooled token is little more than mean colour), and a background classifier on it stayed
        at chance for 300 steps; with fan-in convs the same run learns (docs/training.md, "A vision tower that
        learns").
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m.weight.device.type != "meta":
                    m.reset_parameters()
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        shared = self.language_model.shared
        if shared.padding_idx is not None:
            shared.weight[shared.padding_idx].zero_()
        buf = self.projector.visual_temporal_embed.pos_idx_to_embed
        if buf.device.type != "meta":
            buf.copy_(sinusoid_table(*buf.shape))
        self.tie_weights()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute DaViT blocks and text layers in the backward pass instead of storing their activations."""
        self.vision_tower.gradient_checkpointing = enabled
        self.language_model.encoder.gradient_checkpointing = enabled
        self.language_model.decoder.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.shared.weight.device

    # -- the contract used by generation, training and evaluation ----------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, N, d) image tokens, N = 1 + (H/32)(W/32)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.vision.in_chans:
            raise ValueError(
                f"pixel_values must be (B, {self.config.vision.in_chans}, H, W), got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.projector(self.vision_tower(x))

    def encode(
        self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_features (B, N, d), input_ids (B, T) prompt tokens, attention_mask (B, T) (1/True = real token)
        -> encoder hidden (B, N+T, d) and mask (B, N+T) bool. Image tokens come first and are always attended."""
        if input_ids.ndim != 2 or input_ids.shape[0] != image_features.shape[0]:
            raise ValueError(
                f"input_ids must be (B, T) with B={image_features.shape[0]} images, got {tuple(input_ids.shape)}"
            )
        lm = self.language_model
        text = lm.encoder.embed(input_ids)
        x = torch.cat([image_features.to(text.dtype), text], dim=1)
        B, N = image_features.shape[:2]
        image_mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        if attention_mask is None:
            text_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
                )
            text_mask = attention_mask.to(torch.bool)
        mask = torch.cat([image_mask, text_mask.to(x.device)], dim=1)
        return lm.encoder(x, mask), mask

    def _heads(self) -> ContrastiveHeads:
        if self.contrastive is None:
            raise ValueError(
                "this model has no image-text heads (config.contrastive_dim = 0): official Florence-2 checkpoints "
                "have none; train them with a contrastive phase (docs/training.md)"
            )
        return self.contrastive

    def embed_image(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, N, d) image tokens from `encode_image` -> (B, contrastive_dim) unit image embeddings."""
        return self._heads().embed_image(image_features)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) text tokens (`<s> text </s>`, right-padded) -> (B, contrastive_dim) unit text embeddings: the
        text encoder run on the text alone (no image tokens), mean-pooled."""
        heads = self._heads()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        encoder = self.language_model.encoder
        mask = attention_mask.to(torch.bool)
        hidden = encoder(encoder.embed(input_ids), mask)
        return heads.embed_text(hidden, mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """decoder_input_ids (B, t) -> hidden (B, t, d).

        Without a cache: a full causal pass over `decoder_input_ids` (training, scoring). With a cache: the tokens
        continue at position `cache.length`, their K/V are appended to the cache, and the cache's cross-attention
        K/V and `cache.encoder_mask` are used, so `encoder_hidden`/`encoder_mask` may be None. A None
        `encoder_mask` without a cache means every encoder position is attended.
        """
        if cache is None:
            if encoder_hidden is None:
                raise ValueError("decode without a cache needs encoder_hidden")
            return self.language_model.decoder(decoder_input_ids, encoder_hidden, encoder_mask)
        if decoder_input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"decoder_input_ids has {decoder_input_ids.shape[0]} rows, cache {cache.batch_size}")
        return self.cached_step(decoder_input_ids, cache)

    def cached_step(self, decoder_input_ids: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """The decoder over `cache` (the step `fiore.model.inference`'s compiled_decode strategy replaces)."""
        return self.language_model.decoder(decoder_input_ids, None, cache.attention_mask, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., V) float32 logits from the tied LM head."""
        return self.lm_head(hidden).float()

    def target_logits(
        self,
        image_features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        target_mask: torch.Tensor,
        row_groups: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """The training forward of R rows from their image features (R, N, d): float32 logits (n, V) of the target
        tokens only (`target_mask` (R, t), True on each row's left-aligned target). Rows are decoded in `row_groups`
        (index tensors), each padded only to its own longest target; tokens come group by group, row-major.

        The tied weight's gradient is arranged here (see `fiore.model.kernels.late_alias`): the LM head's use of the
        weight is recorded before any token is embedded, so its dense gradient arrives after the embeddings' sparse
        rows and they are added to it in place."""
        head = late_alias(self.lm_head.weight)  # before any token is embedded
        hidden, mask = self.encode(image_features, input_ids, attention_mask)
        states = []
        for rows in row_groups:
            keep = target_mask[rows]
            T = int(keep.sum(1).max())
            states.append(self.decode(decoder_input_ids[rows, :T], hidden[rows], mask[rows])[keep[:, :T]])
        return tied_logits(torch.cat(states), head).float()

    @torch.no_grad()
    def new_cache(
        self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor | None, max_length: int
    ) -> DecoderCache:
        """Allocate self-attention buffers for `max_length` decoder tokens and compute every layer's cross K/V once.

        encoder_hidden (B, N, d), encoder_mask (B, N) bool or None (= attend to all N).
        """
        limit = self.config.text.max_position_embeddings
        if not 0 < max_length <= limit:
            raise ValueError(f"max_length must be in 1..{limit} (max_position_embeddings), got {max_length}")
        B = encoder_hidden.shape[0]
        self_k, self_v, cross_k, cross_v = [], [], [], []
        for layer in self.language_model.decoder.layers:
            attn = layer.self_attn
            shape = (B, attn.num_heads, max_length, self.config.text.d_model // attn.num_heads)
            self_k.append(encoder_hidden.new_zeros(shape))
            self_v.append(encoder_hidden.new_zeros(shape))
            k, v = layer.encoder_attn.kv(encoder_hidden)
            # Contiguous (B, H, N, hd): SDPA reads strided K/V at about half speed, every step.
            cross_k.append(k.contiguous())
            cross_v.append(v.contiguous())
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_hidden.shape[:2], dtype=torch.bool, device=encoder_hidden.device)
        return DecoderCache(self_k, self_v, cross_k, cross_v, encoder_mask.to(torch.bool))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pixel_values (B, 3, H, W), input_ids (B, T) prompt, decoder_input_ids (B, t) -> logits (B, t, V) float32."""
        encoder_hidden, encoder_mask = self.encode(self.encode_image(pixel_values), input_ids, attention_mask)
        return self.logits(self.decode(decoder_input_ids, encoder_hidden, encoder_mask))
