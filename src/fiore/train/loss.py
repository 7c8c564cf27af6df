"""The training forward and loss of every task at once: `MultiTaskLoss` (loss = sum_t lambda_t L_t / sum_t lambda_t
over the tasks present, plus the image-text contrastive loss when a phase asks for it).

Step anatomy (one micro-batch of B images and R >= B rows, see `fiore.train.mixture`):

    features = model.encode_image(pixel_values)            (B, N, d)   each image encoded once
    features = features[image_index]                        (R, N, d)   shared by the image's K task rows
    logits = model.target_logits(features, ...)             only real label tokens reach the LM head
    loss = sum_t lambda_t L_t / sum_t lambda_t              (tasks present in the micro-batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn

from fiore.model.contrastive import unicl_loss
from fiore.model.kernels import token_cross_entropy
from fiore.train.mixture import IGNORE_INDEX, Batch, combine
from fiore.train.parts import frozen_modules, vision_frozen


class MultiTaskLoss(nn.Module):
    """The whole training forward as one module, so DDP's forward hook sees it. Returns (loss, loss_sum, tokens).

    Target lengths vary a lot (a class name vs. a paragraph or a polygon), so rows are sorted by label length and
    decoded in up to `decode_groups` groups (as many as pay off, see `length_groups`), each padded only to its own
    longest row; only real label tokens reach the
    LM head. Same loss as one padded pass, a fraction of the decoder work.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: list[float],
        precision: str = "fp32",
        decode_groups: int = 4,
        frozen_parts: Sequence[str] = (),
        contrastive: float = 0.0,
    ):
        super().__init__()
        self.model = model
        # Wholly frozen parts stay in eval mode while training (no dropout / drop-path): fixed feature extractors.
        # A plain list: these modules are registered under `model` already.
        self.eval_modules = frozen_modules(model, list(frozen_parts))
        # lambda_t of each task, then of the contrastive loss; `set_weights` changes them at a phase boundary
        self.register_buffer("weights", torch.tensor([*weights, contrastive], dtype=torch.float32), persistent=False)
        self.precision = precision
        self.decode_groups = decode_groups
        # Set per phase by the loop: False = the task rows read the image tokens detached (no task gradient into
        # the vision tower and projector); the contrastive loss, if any, still trains them.
        self.vision_from_tasks = True

    def set_weights(self, weights: Sequence[float], contrastive: float = 0.0) -> None:
        self.weights.copy_(torch.tensor([*weights, contrastive], dtype=torch.float32))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.eval_modules:
                module.eval()
        return self

    def autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(
        self,
        pixel_values,
        image_index,
        input_ids,
        attention_mask,
        decoder_input_ids,
        labels,
        task_index,
        text_ids=None,
        text_mask=None,
        text_group=None,
    ):
        """-> (loss, loss_sum (K+1,), tokens (K+1,)): K tasks, then the contrastive loss (its "tokens" = 1 when
        the batch had image-text pairs, else 0, so `combine` leaves it out)."""
        model = self.model
        valid = labels != IGNORE_INDEX  # (R, T)
        lengths = valid.sum(1)  # (R,)
        order = lengths.argsort(stable=True)
        groups = length_groups(lengths[order].tolist(), self.decode_groups)
        with self.autocast(pixel_values.device):
            no_grad = not torch.is_grad_enabled() or vision_frozen(model)
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                image_features = model.encode_image(pixel_values)  # (B, N, d)
            task_features = image_features if self.vision_from_tasks else image_features.detach()
            features = task_features.index_select(0, image_index)  # (R, N, d)
            row_groups = order.split(groups)
            logits = model.target_logits(features, input_ids, attention_mask, decoder_input_ids, valid, row_groups)
            # the same tokens in the same order as the logits: group by group, row-major
            targets = torch.cat([labels[rows][valid[rows]] for rows in row_groups])
            token_task = torch.cat([task_index[rows, None].expand_as(valid[rows])[valid[rows]] for rows in row_groups])
            contrastive = None
            if text_ids is not None and bool((text_group >= 0).any()):
                keep = text_group >= 0
                images = model.embed_image(image_features[keep])
                texts = model.embed_text(text_ids[keep], text_mask[keep])
                contrastive = unicl_loss(images.float(), texts.float(), model.contrastive.scale(), text_group[keep])
        ce = token_cross_entropy(logits.float(), targets, overwrite_logits=True)  # only this loss reads them
        K = self.weights.numel()  # tasks + 1: the contrastive loss is the last entry
        loss_sum = torch.zeros(K, dtype=ce.dtype, device=ce.device).index_add(0, token_task, ce)
        tokens = torch.zeros(K, dtype=ce.dtype, device=ce.device).index_add_(0, token_task, torch.ones_like(ce))
        if contrastive is not None:
            loss_sum = torch.cat([loss_sum[:-1], contrastive.reshape(1)])
            tokens[-1] = 1.0
        return combine(loss_sum, tokens, self.weights), loss_sum.detach(), tokens


def length_groups(sorted_lengths: list[int], max_groups: int, overhead: float = 0.1) -> list[int]:
    """Sizes of consecutive groups of length-sorted rows to decode separately.

    Each group pads to its own longest row. Tries 1..max_groups near-equal groups and takes the fewest whose padded
    token count is within `overhead` (per extra group) of the best: one more decoder call only when it saves work.
    """
    R = len(sorted_lengths)
    best = None
    for g in range(1, min(max_groups, R) + 1):
        sizes = [R // g + (i < R % g) for i in range(g)]
        ends = [sum(sizes[: i + 1]) for i in range(g)]
        padded = sum(n * sorted_lengths[e - 1] for n, e in zip(sizes, ends, strict=True))
        cost = padded * (1 + overhead * (g - 1))
        if best is None or cost < best[0]:
            best = (cost, sizes)
    return best[1]


def forward_batch(module: nn.Module, batch: Batch):
    """`module(...)` (a MultiTaskLoss, or DDP around one) on a `Batch` -> (loss, loss_sum, tokens)."""
    return module(
        batch.pixel_values,
        batch.image_index,
        batch.input_ids,
        batch.attention_mask,
        batch.decoder_input_ids,
        batch.labels,
        batch.task_index,
        batch.text_ids,
        batch.text_mask,
        batch.text_group,
    )
