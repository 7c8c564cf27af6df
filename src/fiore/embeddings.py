"""Image and text embeddings from the image-text heads (Florence v1's use of the contrastive model).

    embed_images(florence, images)               -> (N, D) unit vectors
    embed_texts(florence, texts)                 -> (M, D) unit vectors
    zero_shot(florence, image, ["cat", "dog"])   -> Label ranked by cosine similarity to "a photo of a {label}."
    search(florence, "a red star", paths)        -> [(path, similarity), ...] best first

Only models trained with a contrastive phase have the heads (`config.contrastive_dim > 0`); official Florence-2
checkpoints do not, and say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fiore.results import Label

IMAGE_BATCH = 16  # images per vision-tower call


def _check_heads(florence) -> None:
    if florence.model.contrastive is None:
        raise ValueError(
            f"{florence.source or 'this model'} has no image-text heads (contrastive_dim = 0): embeddings, zero-shot "
            "and search need a model trained with a contrastive phase, such as fiore's default model"
        )


@torch.inference_mode()
def embed_images(florence, images) -> torch.Tensor:
    """Images (paths, bytes, PIL; one or a list) -> (N, D) float32 unit vectors on the CPU."""
    _check_heads(florence)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("embed_images needs at least one image")
    model, out = florence.model, []
    for i in range(0, len(images), IMAGE_BATCH):
        pixels = florence.processor.pixel_values(images[i : i + IMAGE_BATCH])
        out.append(model.embed_image(model.encode_image(pixels)).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def embed_texts(florence, texts: str | Sequence[str]) -> torch.Tensor:
    """Texts -> (M, D) float32 unit vectors on the CPU (the text encoder alone, no image)."""
    _check_heads(florence)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError(f"embed_texts needs non-empty strings, got {texts!r}")
    ids, mask = florence.processor.prompt_ids(texts)
    model = florence.model
    return model.embed_text(ids.to(model.device), mask.to(model.device)).float().cpu()


def zero_shot(florence, image, labels: Sequence[str], template: str | None = None) -> Label:
    """Rank `labels` for `image` by the cosine similarity of its embedding to each label's text embedding.

    template: how a label becomes a text (default: the one the model was trained with, `contrastive_template`).
    `score` and `ranking` are softmax probabilities over the candidates at the model's learned temperature.
    """
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise ValueError("zero_shot needs at least one candidate label")
    if len(set(labels)) != len(labels):
        raise ValueError(f"candidate labels must be distinct, got {labels}")
    template = template or florence.config.contrastive_template
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the label goes, got {template!r}")
    image_embedding = embed_images(florence, [image])  # (1, D)
    text_embeddings = embed_texts(florence, [template.format(label) for label in labels])  # (K, D)
    scale = float(florence.model.contrastive.scale().detach())
    probs = torch.softmax(scale * (image_embedding @ text_embeddings.t())[0].double(), 0).tolist()
    ranking = sorted(zip(labels, probs, strict=True), key=lambda x: -x[1])
    return Label(ranking[0][0], task="zero_shot", score=ranking[0][1], ranking=ranking)


def search(florence, query: str, images: Sequence, top_k: int | None = None) -> list[tuple[object, float]]:
    """Rank `images` by cosine similarity to the text `query`; -> [(image, similarity), ...], best first."""
    images = list(images)
    if not images:
        raise ValueError("search needs at least one image")
    sims = (embed_images(florence, images) @ embed_texts(florence, [query]).t())[:, 0].tolist()
    ranked = sorted(zip(images, sims, strict=True), key=lambda x: -x[1])
    return ranked[:top_k] if top_k else ranked
