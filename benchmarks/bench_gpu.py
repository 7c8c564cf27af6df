"""fiore vs transformers on a GPU in half precision: images/s and ms per token, same weights, same inputs, one run.

    python benchmarks/bench_gpu.py                        # base and large layouts, bf16, batch 1 / 8 / 32, od + caption
    python benchmarks/bench_gpu.py --presets base --batches 8 --tasks od

For each preset a random-weight checkpoint is built once (bench_generate's `build_checkpoint`: Florence-2's
vocabulary and image-token id, the official tokenizer files) and loaded into transformers' Florence2 and into fiore
twice: with fiore's plain modules (`strategies="none"`) and with the decode strategies (`static_cache` +
`compiled_decode`: a static KV cache and a `torch.compile` decode step, CUDA graphs on a GPU;
fiore.model.inference). Every side decodes exactly `--new-tokens` tokens greedily (min = max new tokens,
transformers' native forced EOS on both), so ms per token is the whole call's time (vision encoding included: an
upper bound on the decode step's) over that count.

Per (preset, task, batch): each side runs once untimed (compilation and graph capture happen there and are printed
separately), then `--repeats` timed rounds interleaved across sides (median; the device is synchronised around
each call). The tokens of every fiore side are compared with transformers': "tokens identical", or the share of
equal tokens where half-precision rounding flips a near-tie (the ids come from fiore's public API, recorded at its
generate call). Last lines: the issue's targets (od at batch 8, base: fiore images/s >= 3x transformers';
batch-1 greedy <= 2 ms per token), each with the number measured and whether it is met.

`--device cpu --dtype float32 --presets tiny` runs the same code on the CPU (tests/test_bench_gpu.py does, with a
few tokens): the script is checked before a GPU is lent to run it.
Needs the dev extra (transformers) and a Florence-2 tokenizer (`--tokenizer`, default the official files).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import (  # noqa: E402  (a sibling script, not a package)
    DEFAULT_TOKENIZER,
    IMAGE_TOKEN_ID,
    agreement,
    build_checkpoint,
    images,
    processor_for,
    recorded_ids,
)

DECODE_STRATEGIES = "static_cache,compiled_decode"
SIDES = ("transformers", "fiore", "fiore+compiled")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_sides(path: Path, device: str, dtype: torch.dtype) -> dict:
    import transformers

    import fiore

    transformers.logging.set_verbosity_error()
    hf = transformers.Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    return {
        "transformers": hf,
        "fiore": fiore.load(path, device=device, dtype=dtype, strategies="none"),
        "fiore+compiled": fiore.load(path, device=device, dtype=dtype, strategies=DECODE_STRATEGIES),
    }


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Case:
    """One (task, batch): the same images for every side, as PIL images (fiore) and pixel values + prompt ids
    (transformers)."""

    def __init__(self, path: Path, task: str, batch: int, new_tokens: int, device: str, dtype: torch.dtype):
        import fiore.tasks

        proc = processor_for(path)
        self.task, self.batch, self.new_tokens = task, batch, new_tokens
        self.images = images(batch)
        h, w = proc.image_size
        prompt, _ = proc.prompt_ids([fiore.tasks.get(task).prompt()])
        ids = torch.cat([torch.full((1, 1 + (h // 32) * (w // 32)), IMAGE_TOKEN_ID), prompt], 1).expand(batch, -1)
        self.hf_inputs = {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": proc.pixel_values(self.images).to(device, dtype),
        }

    def call(self, side: str, model):
        """A callable that decodes the case on one side and returns the generated ids per row."""
        exact = {"max_new_tokens": self.new_tokens, "min_new_tokens": self.new_tokens}
        if side == "transformers":

            def hf():
                with torch.inference_mode():
                    out = model.generate(**self.hf_inputs, do_sample=False, **exact)
                return out[:, 1:].tolist()

            return hf
        options = {**exact, "forced_bos_token_id": None, "forced_eos_token_id": 2}  # transformers' native settings
        rows = {"max_rows": self.batch, "image_batch": self.batch}
        return lambda: recorded_ids(lambda: model.predict(self.images, self.task, **options, **rows))


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_case(sides: dict, case: Case, repeats: int, device: str) -> dict:
    calls = {side: case.call(side, model) for side, model in sides.items()}
    first, tokens = {}, {}
    for side, call in calls.items():  # untimed: compilation, graph capture, allocator warm-up
        start = time.perf_counter()
        tokens[side] = call()
        synchronize(device)
        first[side] = time.perf_counter() - start
    times = {side: [] for side in calls}
    for r in range(repeats):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for side in order:
            times[side].append(timed(calls[side], device))
    seconds = {side: statistics.median(ts) for side, ts in times.items()}
    return {
        "seconds": seconds,
        "first": first,
        "images_per_s": {side: case.batch / s for side, s in seconds.items()},
        "ms_per_token": {side: 1000 * s / case.new_tokens for side, s in seconds.items()},
        "agreement": {s: agreement(tokens[s], tokens["transformers"]) for s in calls if s != "transformers"},
    }


def report(preset: str, case: Case, result: dict) -> str:
    hf_rate = result["images_per_s"]["transformers"]
    parts = [f"{preset:5s} {case.task:8s} batch {case.batch:2d}:"]
    for side in SIDES:
        rate, ms = result["images_per_s"][side], result["ms_per_token"][side]
        ratio = "" if side == "transformers" else f" ({rate / hf_rate:.2f}x)"
        parts.append(f"{side} {rate:.2f} img/s {ms:.2f} ms/token{ratio}")
    line = " | ".join(parts)
    firsts = ", ".join(f"{side} {s:.1f} s" for side, s in result["first"].items())
    agree = ", ".join(f"{side}: {a}" for side, a in result["agreement"].items())
    return f"{line}\n      first call (compile/capture): {firsts}; vs transformers: {agree}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="base,large")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tasks", default="od,caption")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    args = ap.parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    if torch.device(device).type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}", flush=True)
    else:
        print(f"device: {device}, torch {torch.__version__}, {args.dtype}", flush=True)
    results = {}
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / preset
            build_checkpoint(preset, args.tokenizer, path)
            sides = load_sides(path, device, dtype)
            for task in args.tasks.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    case = Case(path, task, batch, args.new_tokens, device, dtype)
                    result = bench_case(sides, case, args.repeats, device)
                    results[(preset, task, batch)] = result
                    print(report(preset, case, result), flush=True)
            del sides
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    print(targets(results))
    return results


def targets(results: dict) -> str:
    """The issue's two GPU targets, from whatever of them this run measured."""
    lines = []
    od8 = results.get(("base", "od", 8))
    if od8:
        best = max(od8["images_per_s"][s] for s in ("fiore", "fiore+compiled"))
        ratio = best / od8["images_per_s"]["transformers"]
        lines.append(f"target od, base, batch 8: fiore {ratio:.2f}x transformers' images/s (>= 3: {ratio >= 3})")
    ones = [r for (preset, _, batch), r in results.items() if preset == "base" and batch == 1]
    if ones:
        ms = min(min(r["ms_per_token"][s] for s in ("fiore", "fiore+compiled")) for r in ones)
        lines.append(f"target batch-1 greedy, base: {ms:.2f} ms per token (<= 2: {ms <= 2})")
    return "\n".join(lines) or "targets: not measured in this run (they need --presets base with batch 8 / 1)"


if __name__ == "__main__":
    main()
