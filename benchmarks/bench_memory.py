"""Peak memory of one training step with and without gradient checkpointing (each case in a fresh process).

    python benchmarks/bench_memory.py                      # base, 768x768, batch 2 (~12 GiB without checkpointing)
    python benchmarks/bench_memory.py --preset tiny --size 256 --batch 16

Peak RSS is VmHWM, reset once the model and optimizer are built, so it includes the resident weights (as in
docs/reference measurements). CPU only: on CUDA use torch.cuda.max_memory_allocated instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_case(preset: str, size: int, batch: int, checkpointing: bool, label_len: int) -> dict:
    import torch

    from fiore.config import preset as get_preset
    from fiore.model import FlorenceModel

    torch.manual_seed(0)
    config = get_preset(preset)
    model = FlorenceModel(config).train()
    model.set_gradient_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = config.text.vocab_size
    pixel_values = torch.randn(batch, 3, size, size)
    input_ids = torch.randint(3, vocab, (batch, 8))
    labels = torch.randint(3, vocab, (batch, label_len))
    decoder_input_ids = torch.cat([torch.full((batch, 1), config.text.decoder_start_token_id), labels[:, :-1]], 1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure the step, not the build
    start = time.perf_counter()
    logits = model(pixel_values, input_ids, decoder_input_ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "checkpointing": checkpointing,
        "peak_mib": round(_vm_hwm_mib()),
        "step_s": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--size", type=int, default=768)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--label-len", type=int, default=30)
    p.add_argument("--case", choices=["off", "on"], help="internal: run one case in this process")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.preset, args.size, args.batch, args.case == "on", args.label_len)))
        return
    results = []
    for case in ("off", "on"):
        cmd = [sys.executable, __file__, "--case", case, "--preset", args.preset, "--size", str(args.size)]
        cmd += ["--batch", str(args.batch), "--label-len", str(args.label_len)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.preset} {args.size}x{args.size}, batch {args.batch}, one AdamW training step (fp32, CPU)")
    for r in results:
        state = "on " if r["checkpointing"] else "off"
        print(f"  gradient checkpointing {state}: peak RSS {r['peak_mib']:>6} MiB, step {r['step_s']:.1f} s")
    off, on = results[0]["peak_mib"], results[1]["peak_mib"]
    print(f"  peak with / without: {on / off:.2f}  ({off - on} MiB saved)")


if __name__ == "__main__":
    main()
