"""The inference strategies of `fiore.model.inference`, each against the plain module, on this machine.

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 15] [--preset base]

1. Few-row matmuls (decoder steps): `F.linear` (MKL) vs oneDNN (1 row on the weight as it is; 3-4 rows on the
   blocked copy), shapes of the base decoder (768 -> 768, 768 -> 3072, 3072 -> 768) and LM head (768 -> 51289).
   Caches are flushed before every call (a decoder step streams ~350 MB of weights); best of --repeats, GB/s of
   weight read.
2. A whole decoder step + LM head at batch 1 and 4, plain modules vs every decoder strategy (fused q/k/v and oneDNN).
3. What `calibrate` decides here, with the time it takes (the verdicts `fiore.load` uses; cached per machine).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from fiore.config import preset
from fiore.model import FlorenceModel, kernels
from fiore.model.inference import measure, prepare_for_inference, use_onednn

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
        model.logits(model.decode(ids, None, None, cache))
        t = time.perf_counter()
        for _ in range(8):
            model.logits(model.decode(ids, None, None, cache))
        best = min(best, (time.perf_counter() - t) / 8)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--preset", default="base")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flush = torch.zeros(16 << 20)
    print(f"# oneDNN linear available: {kernels.ONEDNN}; {torch.get_num_threads()} threads; GB/s of weight read")
    print("| out x in | rows | F.linear | oneDNN | speed-up |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        if kernels.ONEDNN:
            for out_f, in_f in SHAPES:
                layer = nn.Linear(in_f, out_f)
                gb = layer.weight.numel() * 4 / 1e9
                ref_layer = copy.deepcopy(layer)
                use_onednn(layer, one_row=True, rows=True, narrow=False)
                for rows in (1, 3, 4):
                    x = torch.randn(rows, in_f)
                    ref = best_of(lambda: F.linear(x, ref_layer.weight, ref_layer.bias), args.repeats, flush)  # noqa: B023
                    ours = best_of(lambda: layer(x), args.repeats, flush)  # noqa: B023
                    print(f"| {out_f} x {in_f} | {rows} | {gb / ref:.1f} | {gb / ours:.1f} | {ref / ours:.2f} |")
        torch.manual_seed(0)
        plain = FlorenceModel(preset(args.preset)).eval()
        fast = prepare_for_inference(copy.deepcopy(plain), ["fused_decoder", "onednn_one_row", "onednn_rows"])
        n = args.repeats // 3 or 1
        steps = {b: (decoder_step_ms(plain, b, n), decoder_step_ms(fast, b, n)) for b in (1, 4)}
    print()
    print(f"{args.preset} decoder step + LM head: " + ", ".join(
        f"b={b} plain {p:.1f} ms, strategies {f:.1f} ms ({p / f:.2f}x)" for b, (p, f) in steps.items()))  # fmt: skip
    start = time.perf_counter()
    verdicts = measure(plain)
    print(f"calibration here ({time.perf_counter() - start:.2f} s): {verdicts}")


if __name__ == "__main__":
    main()
