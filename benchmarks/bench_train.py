"""Training-step speed: fiore vs transformers' Florence2ForConditionalGeneration, same tiny config, one process.

One step = forward with 30-token labels + cross-entropy, backward, AdamW step, zero_grad; train mode (dropout on),
batch 16, 256x256 images (the shipped model's input size), an 8-token prompt. Both models get the same config,
vocabulary 51328 (the official native size), and run interleaved (A B A B ...) so machine load hits both alike;
the median of `--repeats` steps is reported. fiore's step is the one `fiore train` runs (`MultiTaskLoss`: one
vision encoding per image, only real label tokens reach the LM head). Also reported: fiore with the small
vocabulary a from-scratch run gets, and fiore with K=4 task rows sharing each image's encoding.

    python benchmarks/bench_train.py [--repeats 5] [--threads 2] [--allocator default|keep|both]

--allocator keep runs the whole process with `fiore.train.memory.keep_freed_memory()` (what `fiore train` does;
it speeds up both sides, so the ratio is measured with both under the same allocator); `both` runs the benchmark
twice, in two child processes, and prints both tables.

Prints one line per variant and `ratio fiore/transformers` (target <= 0.8): the ratio of the two medians, then
the median of the per-round ratios (each fiore step over the transformers step just before it), which drifts of
the machine's speed during the run affect less.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fiore.config import preset
from fiore.model import FlorenceModel
from fiore.train.loss import MultiTaskLoss

IMAGE_TOKEN_ID = 51289
NATIVE_VOCAB = 51328
B, PROMPT, LABELS = 16, 8, 30


def hf_model(config):
    import transformers

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
    cfg = transformers.Florence2Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)
    return transformers.Florence2ForConditionalGeneration(cfg).train()


def make_inputs(vocab: int, num_image_tokens: int, rows_per_image: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    R = B * rows_per_image
    pixel_values = torch.randn(B, 3, 256, 256, generator=g)
    prompt = torch.randint(4, min(vocab, IMAGE_TOKEN_ID), (R, PROMPT), generator=g)
    prompt[:, 0], prompt[:, -1] = 0, 2
    labels = torch.randint(4, min(vocab, IMAGE_TOKEN_ID), (R, LABELS), generator=g)
    labels[:, 0], labels[:, -1] = 0, 2
    decoder_input_ids = torch.cat([torch.full((R, 1), 2), labels[:, :-1]], dim=1)
    hf_ids = torch.cat([torch.full((R, num_image_tokens), IMAGE_TOKEN_ID), prompt], dim=1)
    return {
        "pixel_values": pixel_values,
        "image_index": torch.arange(B).repeat_interleave(rows_per_image),
        "input_ids": prompt,
        "attention_mask": torch.ones_like(prompt, dtype=torch.bool),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "task_index": torch.zeros(R, dtype=torch.long),
        "hf_input_ids": hf_ids,
    }


class FioreStep:
    def __init__(self, vocab: int, rows_per_image: int = 1):
        config = preset("tiny").replace(text={"vocab_size": vocab})
        torch.manual_seed(0)
        self.model = FlorenceModel(config).train()
        self.loss = MultiTaskLoss(self.model, [1.0]).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        n = 1 + (256 // 32) ** 2
        self.x = make_inputs(vocab, n, rows_per_image)
        self.rows = B * rows_per_image

    def __call__(self) -> float:
        x = self.x
        loss, _, _ = self.loss(
            x["pixel_values"],
            x["image_index"],
            x["input_ids"],
            x["attention_mask"],
            x["decoder_input_ids"],
            x["labels"],
            x["task_index"],
        )
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class HFStep:
    def __init__(self, vocab: int):
        config = preset("tiny").replace(text={"vocab_size": vocab})
        torch.manual_seed(0)
        self.model = hf_model(config)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.x = make_inputs(vocab, 1 + (256 // 32) ** 2)
        self.rows = B

    def __call__(self) -> float:
        x = self.x
        out = self.model(
            input_ids=x["hf_input_ids"],
            pixel_values=x["pixel_values"],
            attention_mask=torch.ones_like(x["hf_input_ids"]),
            labels=x["labels"],
        )
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--small-vocab", type=int, default=3026, help="vocabulary of a from-scratch fiore model")
    ap.add_argument("--allocator", choices=["default", "keep", "both"], default="both")
    args = ap.parse_args()
    if args.allocator == "both":
        import subprocess
        import sys

        for mode in ("default", "keep"):  # argparse keeps the last --allocator given
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--allocator", mode], check=True)
        return
    if args.allocator == "keep":
        from fiore.train.memory import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory() is not available here (needs Linux/glibc)")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {
        "transformers (vocab 51328)": HFStep(NATIVE_VOCAB),
        "fiore (vocab 51328)": FioreStep(NATIVE_VOCAB),
        f"fiore (vocab {args.small_vocab})": FioreStep(args.small_vocab),
        f"fiore (vocab {args.small_vocab}, 4 rows/image)": FioreStep(args.small_vocab, rows_per_image=4),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up
        step()
    for _ in range(args.repeats):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    print(f"training step, batch {B} images 256x256, {LABELS}-token labels, AdamW, {torch.get_num_threads()} threads, "
          f"allocator: {args.allocator}")  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        rows = variants[name].rows
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:44s} {t:7.3f} s/step  ({spread})  {B / t:6.1f} images/s  {rows / t:6.1f} rows/s")
    hf, ours = med["transformers (vocab 51328)"], med["fiore (vocab 51328)"]
    print(f"ratio fiore/transformers (same config, vocab 51328): {ours / hf:.3f}  (target <= 0.8)")
    # Each fiore step against the transformers step just before it: drifts of the machine's speed over a run
    # (+-20% within minutes here) cancel out of this one.
    pairs = zip(times["fiore (vocab 51328)"], times["transformers (vocab 51328)"], strict=True)
    print(f"  the same, median of per-round ratios: {statistics.median(f / h for f, h in pairs):.3f}")
    small = med[f"fiore (vocab {args.small_vocab})"]
    print(f"ratio fiore small vocab/transformers: {small / hf:.3f}")


if __name__ == "__main__":
    main()
