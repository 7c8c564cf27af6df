"""Few-row matmuls (decoder steps): `F.linear` (MKL) vs fiore's `Linear` (oneDNN, blocked weights for 2+ rows).

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 15] [--narrow]

Shapes of the base model's decoder (768 -> 768, 768 -> 3072, 3072 -> 768) and LM head (768 -> 51289), 1, 3 and 4
rows. Caches are flushed before every call (a decoder step streams ~350 MB of weights, so nothing stays cached);
the best of --repeats is reported as GB/s of weight read. Last line: a whole base decoder step (b=1 and b=4) with
fiore's kernels vs with `F.linear`, best of --repeats.

--narrow instead times the tiny preset's DaViT linears at batch 16, 256x256 (stages 0-2: 32-128 channels over
65536-4096 tokens) in training (forward + backward) and inference, `F.linear` vs `Linear`, medians of interleaved
runs: the measurement behind `kernels.NARROW`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fiore.config import preset
from fiore.model import FlorenceModel, kernels
from fiore.model.kernels import Linear

SHAPES = [(768, 768), (3072, 768), (768, 3072), (51289, 768)]  # (out, in)


def best_of(fn, repeats: int, flush: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(repeats):
        flush.add_(1.0)  # 64 MB written: evicts the weight from every cache level
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decoder_step_ms(model: FlorenceModel, batch: int, repeats: int) -> float:
    enc = torch.randn(batch, 590, model.config.text.d_model)
    ids = torch.full((batch, 1), 2)
    best = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(enc, None, 16)
        model.logits(model.decode(ids, None, None, cache))  # first step: packs weights where needed
        t = time.perf_counter()
        for _ in range(8):
            model.logits(model.decode(ids, None, None, cache))
        best = min(best, (time.perf_counter() - t) / 8)
    return best * 1e3


def narrow_table(repeats: int) -> None:
    """Training and inference time of narrow DaViT linears: F.linear (MKL) vs Linear (oneDNN at <= NARROW)."""
    from fiore.train.memory import keep_freed_memory

    keep_freed_memory()  # page faults of fresh 32 MB outputs would otherwise dominate both sides
    print(f"# {torch.get_num_threads()} threads; kernels.NARROW = {kernels.NARROW}; ms, median of {repeats}")
    print("| tokens | in -> out | train F.linear | train Linear | ratio | infer F.linear | infer Linear | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens, dim in ((65536, 32), (16384, 64), (4096, 128)):
        for in_f, out_f in ((dim, 3 * dim), (dim, dim), (dim, 4 * dim), (4 * dim, dim)):
            layer = Linear(in_f, out_f)
            x = torch.randn(16, tokens // 16, in_f, requires_grad=True)
            grad = torch.randn(16, tokens // 16, out_f)
            cases = {
                "train F.linear": lambda: F.linear(x, layer.weight, layer.bias).backward(grad),  # noqa: B023
                "train Linear": lambda: layer(x).backward(grad),  # noqa: B023
                "infer F.linear": lambda: F.linear(x.detach(), layer.weight, layer.bias),  # noqa: B023
                "infer Linear": lambda: layer(x.detach()),  # noqa: B023
            }
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(repeats):
                for name, fn in cases.items():
                    with torch.set_grad_enabled(name.startswith("train")):
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
                    x.grad = layer.weight.grad = layer.bias.grad = None
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {tokens} | {in_f} -> {out_f} | {ms['train F.linear']:.2f} | {ms['train Linear']:.2f} | "
                  f"{ms['train Linear'] / ms['train F.linear']:.2f} | {ms['infer F.linear']:.2f} | "
                  f"{ms['infer Linear']:.2f} | {ms['infer Linear'] / ms['infer F.linear']:.2f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--narrow", action="store_true", help="narrow DaViT linears, training and inference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.narrow:
        narrow_table(args.repeats)
        return
    flush = torch.zeros(16 << 20)
    print(f"# oneDNN linear available: {kernels.ONEDNN}; {torch.get_num_threads()} threads; GB/s of weight read")
    print("| out x in | rows | F.linear | fiore Linear | speed-up |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            layer = Linear(in_f, out_f)
            gb = layer.weight.numel() * 4 / 1e9
            for rows in (1, 3, 4):
                x = torch.randn(rows, in_f)
                layer(x)  # packs for rows > 1
                ref = best_of(lambda: F.linear(x, layer.weight, layer.bias), args.repeats, flush)  # noqa: B023
                ours = best_of(lambda: layer(x), args.repeats, flush)  # noqa: B023
                print(f"| {out_f} x {in_f} | {rows} | {gb / ref:.1f} | {gb / ours:.1f} | {ref / ours:.2f} |")
        model = FlorenceModel(preset("base")).eval()
        steps = {}
        for batch in (1, 4):
            fast = decoder_step_ms(model, batch, args.repeats // 3 or 1)
            kernels.ONEDNN = False
            plain = decoder_step_ms(model, batch, args.repeats // 3 or 1)
            kernels.ONEDNN = True
            steps[batch] = (plain, fast)
    print()
    print("base decoder step + LM head: " + ", ".join(
        f"b={b} F.linear {p:.1f} ms, fiore {f:.1f} ms ({p / f:.2f}x)" for b, (p, f) in steps.items()))  # fmt: skip


if __name__ == "__main__":
    main()
