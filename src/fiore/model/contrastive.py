"""Image-text alignment heads (Florence v1 / UniCL): the image-level pretraining objective and zero-shot use.

An image embedding is the projector's pooled token (the first image token: the spatial mean of DaViT's last map,
projected and normalised) through `image_projection`; a text embedding is the text encoder run on the text alone,
mean-pooled over its tokens, through `text_projection`. Both are L2-normalised; their cosine similarities times a
learned temperature `exp(logit_scale)` are the logits of a symmetric InfoNCE loss.

The heads are not part of Florence-2's architecture: checkpoints keep them in a file of their own
(`contrastive.safetensors`, see `fiore.checkpoint`), so transformers' loader reads the rest unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# CLIP's choices: the temperature starts at 0.07 and exp(logit_scale) is capped at 100 (it otherwise runs away).
INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = math.log(100.0)


class ContrastiveHeads(nn.Module):
    def __init__(self, d_model: int, dim: int):
        super().__init__()
        self.image_projection = nn.Linear(d_model, dim, bias=False)
        self.text_projection = nn.Linear(d_model, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INITIAL_TEMPERATURE)))

    def embed_image(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, N, d) image tokens (projector output) -> (B, dim) unit vectors, from the pooled first token."""
        return F.normalize(self.image_projection(image_features[:, 0]), dim=-1)

    def embed_text(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) text-encoder states, (B, T) mask -> (B, dim) unit vectors (mean over real tokens)."""
        m = attention_mask.to(text_hidden.dtype).unsqueeze(-1)
        pooled = (text_hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def unicl_loss(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with UniCL's label-aware targets.

    image_embeddings, text_embeddings: (B, D) unit vectors, row i of each from the same pair; scale: the
    temperature's inverse; groups: (B,) ids, equal where two pairs share a text (the same class prompt), which
    makes every such pair a positive of the others: the target of row i is uniform over {j : groups[j] ==
    groups[i]}. With all groups distinct this is CLIP's loss.
    """
    logits = scale * image_embeddings @ text_embeddings.t()  # (B, B): image i vs text j
    positives = (groups[:, None] == groups[None, :]).to(logits.dtype)
    targets = positives / positives.sum(1, keepdim=True)  # symmetric positives: the same targets both ways
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2
