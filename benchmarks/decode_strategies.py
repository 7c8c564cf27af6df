"""The decode strategies (static cache, compiled decode step) against the calibrated CPU strategies, on this machine.

    python benchmarks/decode_strategies.py [--model DIR] [--tokens 64] [--repeats 5] [--compiled]

The shipped model (or --model) captions examples/scene.png with exactly --tokens new tokens, at batch 1 and 4, loaded
with: "auto" (what fiore.load picks here), auto + static_cache, the plain modules ("none"), static_cache alone and,
with --compiled, static_cache + compiled_decode (inductor on the CPU; the first call compiles, printed apart).
Interleaved runs, median of --repeats; ms per token is the call's time over the token count. Answers are checked
equal across sides first. Numbers: docs/performance.md ("The GPU path").
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from PIL import Image

import fiore

SCENE = Path(__file__).resolve().parents[1] / "examples" / "scene.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="also time static_cache + compiled_decode")
    args = ap.parse_args()
    image = Image.open(SCENE).convert("RGB")
    auto = fiore.load(args.model, strategies="auto")
    calibrated = ",".join(auto.model.inference_strategies)
    print(f"auto = {calibrated or '(none)'}")
    sides = {
        "auto": auto,
        "auto+static_cache": fiore.load(args.model, strategies=f"{calibrated},static_cache".strip(",")),
        "none": fiore.load(args.model, strategies="none"),
        "static_cache": fiore.load(args.model, strategies="static_cache"),
    }
    if args.compiled:
        sides["static_cache+compiled_decode"] = fiore.load(args.model, strategies="static_cache,compiled_decode")
    exact = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens}
    options = {**exact, "forced_bos_token_id": None, "forced_eos_token_id": 2}
    for batch in (1, 4):
        images = [image] * batch
        answers = {}
        for name, florence in sides.items():
            start = time.perf_counter()
            answers[name] = [r.text for r in florence.predict(images, "caption", **options)]
            if batch == 1 and name.endswith("compiled_decode"):
                print(f"{name}: first call {time.perf_counter() - start:.1f} s (compilation)")
        if len({tuple(a) for a in answers.values()}) != 1:
            raise SystemExit(f"answers differ across strategies: {answers}")
        times = {name: [] for name in sides}
        for r in range(args.repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                start = time.perf_counter()
                sides[name].predict(images, "caption", **options)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["auto"])
        cells = []
        for name, ts in times.items():
            median = statistics.median(ts)
            cells.append(f"{name} {1000 * median / args.tokens:.2f} ms/token ({median / base:.2f}x)")
        print(f"batch {batch}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
