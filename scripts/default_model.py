"""Build the shipped default model from a finished `fiore train configs/default_model.toml` run.

    python scripts/default_model.py package runs/default_model     # final weights (fp16) -> src/fiore/default_model
    python scripts/default_model.py curve runs/default_model       # metrics.jsonl -> training_curve.png
    python scripts/default_model.py tables REPORT.json [...]       # eval report(s) -> Markdown rows for the card

Weights are stored in fp16 to stay well under the package-size budget; `fiore.load()` casts them to float32, and the
card's numbers are measured on exactly these stored weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

import fiore

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "fiore" / "default_model"


def package(run_dir: str) -> None:
    florence = fiore.load(Path(run_dir) / "final", dtype=torch.float16)
    tmp = PACKAGE_DIR.with_name(".default_model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    florence.save(tmp)
    for keep in ("MODEL_CARD.md", "training_curve.png"):  # written separately; survive a re-package
        if (PACKAGE_DIR / keep).exists():
            shutil.copy2(PACKAGE_DIR / keep, tmp / keep)
    shutil.rmtree(PACKAGE_DIR, ignore_errors=True)
    tmp.replace(PACKAGE_DIR)
    size = sum(f.stat().st_size for f in PACKAGE_DIR.iterdir()) / 2**20
    print(f"packaged {run_dir}/final -> {PACKAGE_DIR} ({size:.1f} MiB)")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def curve(run_dir: str, out: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records(Path(run_dir))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(*zip(*train, strict=True), label="train loss (weighted task mixture)", lw=1)
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="held-out loss (seed 1000)", ms=3)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    if evals:
        keys = sorted({k for _, e in evals for k in e if not k.endswith("/errors")})
        for k in keys:
            pts = [(s, e[k]) for s, e in evals if e.get(k) is not None]
            if pts:
                ax_eval.plot(*zip(*pts, strict=True), "o-", label=k, ms=3)
        ax_eval.set(xlabel="step", ylabel="metric", title="held-out metrics (16 images, seed 1000)")
        ax_eval.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) if out else PACKAGE_DIR / "training_curve.png"
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str) and v.startswith("skipped"):
        return "skipped"  # METEOR without Java, SPICE without CoreNLP: the reason is in the report itself
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def tables(*reports: str) -> None:
    """One Markdown row per task: samples, examples, errors, truncated, and every metric."""
    print("| task | examples | errors | truncated | metrics |")
    print("|---|---|---|---|---|")
    for report in reports:
        for name, t in json.loads(Path(report).read_text())["tasks"].items():
            metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in t["metrics"].items() if not isinstance(v, dict))
            print(f"| {name} | {t['examples']} | {t['errors']} | {t.get('truncated', 0)} | {metrics} |")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"package": package, "curve": curve, "tables": tables}[command](*args)
