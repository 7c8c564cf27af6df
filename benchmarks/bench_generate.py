"""fiore vs transformers generation speed on a random-weight model (default: base preset), same weights, same inputs.

    python benchmarks/bench_generate.py [--preset base] [--repeats 3] [--threads 2] [--tokenizer DIR]

Builds a random-weight model, saves it once, and loads that checkpoint into transformers' Florence2 and into fiore.
For every case it first checks that both produce the same tokens (fiore's ids recorded through its public API), then
times interleaved runs in this process (median of --repeats, alternating which side goes first). fp32, 768x768,
exactly 100 new tokens (min_new_tokens = max_new_tokens = 100, transformers' native forced EOS on both sides).

    (a) vision encoding of one image          transformers get_image_features   | fiore model.encode_image
    (b) greedy, one image                     generate                          | Florence.predict
    (c) beam search (3), one image            generate(num_beams=3)             | Florence.predict(num_beams=3)
    (d) greedy, batch of 4 images             generate on a batch               | Florence.predict([4 images])
    (e) six tasks on one image                six generate calls                | one Florence.run

int8: fiore with `quantize="int8"` (every linear in int8) runs cases (b) and (d) too, timed in the same rounds; its
tokens are compared with transformers' fp32 ones (agreement printed: int8 rounding may change a near-tie). Ratios
`qb=` and `qd=` are fiore int8 / transformers fp32.

bf16: fiore loaded with `dtype=torch.bfloat16` (the opt-in half-precision path; `--dtype bfloat16` on the CLI) runs
cases (b) and (d) as well: ratios `bb=` and `bd=` against transformers fp32, token agreement printed. Whether bf16
pays on a CPU depends on its bf16 instructions (AMX or AVX512-BF16, else it is emulated); the first line prints the
CPU model and which of those flags it has.

Peak RSS: each side in a fresh child process (its model only), peak reset after loading (`clear_refs`), then one
run of every generation case. Last line: `ratios: a=.. b=.. c=.. d=.. e=.. qb=.. qd=.. bb=.. bd=.. rss=..` (fiore /
transformers).
Needs a Florence-2 tokenizer (official files; `--tokenizer`) for the prompts and fiore's text outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NEW_TOKENS = 100
NATIVE_VOCAB, IMAGE_TOKEN_ID = 51328, 51289
SIX_TASKS = ["caption", "detailed_caption", "ocr", "od", "dense_region_caption", "region_proposal"]
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "florence2-tokenizer"
CASES = "abcde"
VARIANT_CASES = "bd"  # the cases the int8 and bf16 variants run
VARIANTS = {"int8": "q", "bf16": "b"}  # fiore variants timed beside fp32, and their ratio prefixes


# -- setup ------------------------------------------------------------------------------------------------------


def build_checkpoint(preset: str, tokenizer_dir: Path, out: Path) -> None:
    """A random-weight native checkpoint (+ tokenizer files) in `out`."""
    from fiore.checkpoint import save_checkpoint
    from fiore.config import preset as get_preset
    from fiore.model import FlorenceModel
    from fiore.tokenizer import Tokenizer

    config = get_preset(preset).replace(text={"vocab_size": NATIVE_VOCAB}, image_token_id=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    model = FlorenceModel(config).eval()
    with torch.no_grad():  # as the test oracle: random norm affines and biases, so nothing is trivially zero
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(model, config, out, tokenizer=Tokenizer.from_dir(tokenizer_dir))


def load_side(side: str, path: Path):
    if side in ("fiore", "int8", "bf16"):
        import fiore

        dtype = torch.bfloat16 if side == "bf16" else torch.float32
        return fiore.load(path, quantize="int8" if side == "int8" else None, dtype=dtype)
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.Florence2ForConditionalGeneration.from_pretrained(path).eval()


def images(n: int, size: int = 768) -> list[Image.Image]:
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def processor_for(path: Path):
    """fiore's processor for the checkpoint (tokenizer + image size), without loading any weights."""
    from fiore.checkpoint import read_config
    from fiore.processor import Processor
    from fiore.tokenizer import Tokenizer

    return Processor(Tokenizer.from_dir(path), read_config(path).image_size)


class Inputs:
    """Identical inputs for both sides: PIL images for fiore, pixel values + `<image>`*N + prompt ids for HF."""

    def __init__(self, proc, tasks_module):
        self.one, self.four = images(1), images(4)
        h, w = proc.image_size
        image_tokens = 1 + (h // 32) * (w // 32)  # pooled token + one per 32x32 patch
        self.px1, self.px4 = proc.pixel_values(self.one), proc.pixel_values(self.four)
        self.hf_prompt: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in SIX_TASKS:
            ids, _ = proc.prompt_ids([tasks_module.get(name).prompt()])
            full = torch.cat([torch.full((1, image_tokens), IMAGE_TOKEN_ID), ids], 1)
            self.hf_prompt[name] = (full, torch.ones_like(full))


# -- the cases --------------------------------------------------------------------------------------------------

EXACT = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
FIORE_EXACT = dict(EXACT, forced_bos_token_id=None, forced_eos_token_id=2)  # transformers' native settings


def hf_case(hf, inp: Inputs, case: str):
    """-> a callable returning generated ids per row (list of lists, decoder start dropped), or features for (a)."""

    def gen(px, task, batch=1, **kw):
        ids, mask = inp.hf_prompt[task]
        ids, mask = ids.expand(batch, -1), mask.expand(batch, -1)
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **EXACT, **kw)
        return out[:, 1:].tolist()

    with torch.inference_mode():
        if case == "a":
            return lambda: hf.model.get_image_features(inp.px1).pooler_output
        if case == "b":
            return lambda: gen(inp.px1, "caption")
        if case == "c":
            return lambda: gen(inp.px1, "caption", num_beams=3)
        if case == "d":
            return lambda: gen(inp.px4, "caption", batch=4)
        return lambda: [gen(inp.px1, t)[0] for t in SIX_TASKS]


def fiore_case(florence, inp: Inputs, case: str):
    if case == "a":
        return lambda: florence.model.encode_image(inp.px1)
    if case == "b":
        return lambda: florence.predict(inp.one[0], "caption", **FIORE_EXACT)
    if case == "c":
        return lambda: florence.predict(inp.one[0], "caption", num_beams=3, **FIORE_EXACT)
    if case == "d":
        return lambda: florence.predict(inp.four, "caption", **FIORE_EXACT)
    return lambda: florence.run(inp.one[0], SIX_TASKS, **FIORE_EXACT)


def recorded_ids(call) -> list[list[int]]:
    """Run a fiore API call and return the token ids its generate calls produced, in row order."""
    import fiore.predictor as predictor

    real, seen = predictor.generate, []

    def spy(*a, **k):
        seqs = real(*a, **k)
        seen.extend(s.ids for s in seqs)
        return seqs

    predictor.generate = spy
    try:
        call()
    finally:
        predictor.generate = real
    return seen


def agreement(got: list[list[int]], want: list[list[int]]) -> str:
    if got == want:
        return "tokens identical"
    same = sum(g == w for a, b in zip(got, want, strict=False) for g, w in zip(a, b, strict=False))
    total = sum(len(w) for w in want)
    return f"{same / total:.0%} of tokens equal{first_difference(got, want)}"


def first_difference(got: list[list[int]], want: list[list[int]]) -> str:
    if len(got) != len(want):
        return f" ({len(got)} rows vs {len(want)})"
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        for i in range(max(len(g), len(w))):
            if i >= len(g) or i >= len(w) or g[i] != w[i]:
                return f" (row {r}, first at token {i})"
    return ""


def cpu_description() -> str:
    """The CPU's model name and which bf16/int8 instruction-set flags it reports (Linux /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")
    have = [f for f in wanted if f in flags]
    bf16 = "native bf16 (AMX/AVX512-BF16)" if {"amx_bf16", "avx512_bf16"} & flags else "no bf16 instructions"
    return f"{model}; flags: {' '.join(have) or 'none of ' + ' '.join(wanted)}; {bf16}"


def timed(fn) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - t


# -- peak RSS in a child process ------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(side: str, path: Path, threads: int, cases: str) -> None:
    torch.set_num_threads(threads)
    model = load_side(side, path)
    import fiore.tasks as tasks

    inp = Inputs(processor_for(path), tasks)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure inference, not loading
    base = peak_rss_mib()
    for case in cases:
        fn = hf_case(model, inp, case) if side == "hf" else fiore_case(model, inp, case)
        timed(fn)
    print(json.dumps({"side": side, "resident_after_load_mib": base, "peak_mib": peak_rss_mib()}))


def child_rss(side: str, path: Path, threads: int, cases: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--dir", str(path), "--threads", str(threads), "--cases", cases]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} RSS child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--child", choices=["fiore", "hf", *VARIANTS], help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dir, args.threads, args.cases)
    if not (args.tokenizer / "tokenizer.json").is_file() and not (args.tokenizer / "vocab.json").is_file():
        sys.exit(f"no Florence-2 tokenizer in {args.tokenizer}; pass --tokenizer DIR (tokenizer.json or vocab+merges)")
    torch.set_num_threads(args.threads)

    import fiore.tasks as tasks

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        path = Path(tmp)
        t0 = time.perf_counter()
        build_checkpoint(args.preset, args.tokenizer, path)
        hf, florence = load_side("hf", path), load_side("fiore", path)
        variants = {side: load_side(side, path) for side in VARIANTS}
        print(f"# {args.preset}: built and loaded all four in {time.perf_counter() - t0:.0f} s; {florence}")
        variant_cases = "".join(c for c in args.cases if c in VARIANT_CASES)
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, 768x768, {NEW_TOKENS} new tokens")
        print(f"# CPU: {cpu_description()}")
        inp = Inputs(processor_for(path), tasks)

        # token agreement (this is also the warm-up run of each case)
        agree = {}
        for case in args.cases:
            hf_fn, fi_fn = hf_case(hf, inp, case), fiore_case(florence, inp, case)
            with torch.inference_mode():
                want = hf_fn()
                if case == "a":
                    got = fi_fn()
                    agree[case] = f"max |diff| {float((got - want).abs().max()):.1e}"
                    print(f"# ({case}) {agree[case]}", flush=True)
                    continue
                got = recorded_ids(fi_fn)
            same = got == want
            agree[case] = "tokens identical" if same else "TOKENS DIFFER"
            if not same:
                agree[case] += first_difference(got, want)
            print(f"# ({case}) {agree[case]}", flush=True)
            if case in variant_cases:
                for side, prefix in VARIANTS.items():
                    with torch.inference_mode():
                        agree[prefix + case] = agreement(recorded_ids(fiore_case(variants[side], inp, case)), want)
                    print(f"# ({prefix}{case}) {side} vs transformers fp32: {agree[prefix + case]}", flush=True)

        times: dict[str, dict[str, list[float]]] = {
            c: {side: [] for side in ("hf", "fiore", *VARIANTS)} for c in args.cases
        }
        for rep in range(args.repeats):
            for case in args.cases:
                order = [("hf", hf_case(hf, inp, case)), ("fiore", fiore_case(florence, inp, case))]
                if case in variant_cases:
                    order += [(side, fiore_case(variants[side], inp, case)) for side in VARIANTS]
                for side, fn in order if rep % 2 == 0 else order[::-1]:
                    times[case][side].append(timed(fn))
                line = ", ".join(f"{side} {times[case][side][-1]:.2f} s" for side, _ in order)
                print(f"# rep {rep} ({case}) {line}", flush=True)
        del hf, florence, variants

        rss = None
        if not args.no_rss:
            gen_cases = "".join(c for c in args.cases if c != "a") or "a"
            rss = {side: child_rss(side, path, args.threads, gen_cases) for side in ("hf", "fiore", *VARIANTS)}

    names = {"a": "vision encoding", "b": "greedy, b=1", "c": "beam 3, b=1", "d": "greedy, batch 4",
             "e": "six tasks, one image"}  # fmt: skip
    print()
    print("| case | transformers (s) | fiore (s) | fiore / transformers | check |")
    print("|---|---|---|---|---|")
    ratios = {}
    for case in args.cases:
        h, f = statistics.median(times[case]["hf"]), statistics.median(times[case]["fiore"])
        ratios[case] = f / h
        print(f"| ({case}) {names[case]} | {h:.2f} | {f:.2f} | {f / h:.2f} | {agree[case]} |")
    for side, prefix in VARIANTS.items():
        for case in variant_cases:
            h, q = statistics.median(times[case]["hf"]), statistics.median(times[case][side])
            ratios[prefix + case] = q / h
            check = agree[prefix + case]
            print(f"| ({prefix}{case}) {names[case]}, fiore {side} | {h:.2f} | {q:.2f} | {q / h:.2f} | {check} |")
    if rss:
        h, f = rss["hf"]["peak_mib"], rss["fiore"]["peak_mib"]
        ratios["rss"] = f / h
        loaded = f"{rss['hf']['resident_after_load_mib']:.0f} / {rss['fiore']['resident_after_load_mib']:.0f}"
        print(f"| peak RSS (MiB), cases {gen_cases} | {h:.0f} | {f:.0f} | {f / h:.2f} | after load: {loaded} |")
        for side, prefix in VARIANTS.items():
            q = rss[side]["peak_mib"]
            ratios["rss_" + prefix] = q / h
            loaded = f"{rss[side]['resident_after_load_mib']:.0f}"
            print(f"| peak RSS (MiB), fiore {side} | {h:.0f} | {q:.0f} | {q / h:.2f} | after load: {loaded} |")
    print()
    print("ratios: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
