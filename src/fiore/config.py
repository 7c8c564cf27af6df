"""Model configuration: dataclasses for the vision tower, the language model and the whole model, plus presets.

Field names reuse the vocabulary of the sources (timm's DaViT kwargs, BART's config) so that mapping the official
config.json files needs no renaming beyond the few spelled out in `fiore.checkpoint`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    """DaViT vision tower and the image projector that turns its last feature map into text-width tokens."""

    in_chans: int = 3
    embed_dims: tuple[int, ...] = (128, 256, 512, 1024)
    depths: tuple[int, ...] = (1, 1, 9, 1)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)  # spatial window attention
    num_groups: tuple[int, ...] = (4, 8, 16, 32)  # channel group attention
    patch_size: tuple[int, ...] = (7, 3, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2, 2)
    patch_padding: tuple[int, ...] = (3, 1, 1, 1)
    patch_prenorm: tuple[bool, ...] = (False, True, True, True)
    window_size: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    projection_dim: int = 768  # = text d_model
    max_position_embeddings: int = 50  # learned 2-D table: at most 50x50 feature cells
    max_temporal_embeddings: int = 100


@dataclass
class TextConfig:
    """BART-style post-LN encoder-decoder."""

    vocab_size: int = 51289
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    max_position_embeddings: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    activation_function: str = "gelu"
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_size: tuple[int, int] = (768, 768)  # (height, width) the processor resizes to
    # Native (transformers) checkpoints reserve an `<image>` token id; None for Microsoft's original format.
    image_token_id: int | None = None
    # Image-text alignment heads (fiore.model.contrastive); 0 = none, as in the official checkpoints.
    contrastive_dim: int = 0
    # How a class name becomes a text for the heads (training with label texts, zero-shot classification).
    contrastive_template: str = "a photo of a {}."

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        d = dict(d)
        vision = build(VisionConfig, d.pop("vision", {}))
        text = build(TextConfig, d.pop("text", {}))
        if "image_size" in d:
            d["image_size"] = tuple(d["image_size"])
        return cls(vision=vision, text=text, **d)

    def replace(self, **changes) -> ModelConfig:
        """A copy with `vision`/`text` given as dicts of field changes, other fields as values."""
        vision = dataclasses.replace(self.vision, **changes.pop("vision", {}))
        text = dataclasses.replace(self.text, **changes.pop("text", {}))
        return dataclasses.replace(self, vision=vision, text=text, **changes)


def _tiny() -> ModelConfig:
    # Window 8 divides every stage map at 256x256 (64, 32, 16, 8): no window padding, no wasted work.
    return ModelConfig(
        vision=VisionConfig(
            embed_dims=(32, 64, 128, 256),
            depths=(1, 1, 2, 1),
            num_heads=(1, 2, 4, 8),
            num_groups=(1, 2, 4, 8),
            window_size=8,
            projection_dim=256,
        ),
        text=TextConfig(
            d_model=256,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=1024,
            decoder_ffn_dim=1024,
        ),
        image_size=(256, 256),
    )


def _base() -> ModelConfig:
    return ModelConfig()


def _large() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            embed_dims=(256, 512, 1024, 2048),
            num_heads=(8, 16, 32, 64),
            num_groups=(8, 16, 32, 64),
            projection_dim=1024,
        ),
        text=TextConfig(
            d_model=1024,
            encoder_layers=12,
            decoder_layers=12,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=4096,
            decoder_ffn_dim=4096,
            max_position_embeddings=4096,
        ),
    )


PRESETS = {"tiny": _tiny, "base": _base, "large": _large}


def preset(name: str) -> ModelConfig:
    """A fresh config for a named preset (`tiny`, `base`, `large`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
