"""Build the shipped default model from a finished `fiore train configs/default_model.toml` run.

    python scripts/default_model.py package runs/default_model     # final weights (fp16) -> src/fiore/default_model
    python scripts/default_model.py curve runs/default_model       # metrics.jsonl -> training_curve.png (loss,
                                                                   # held-out metrics, image reliance)
    python scripts/default_model.py tables REPORT.json [...]       # eval report(s) -> Markdown rows for the card
    python scripts/default_model.py variance [MODEL_DIR]           # how much image tokens differ between images,
                                                                   # entering and leaving the text encoder
    python scripts/default_model.py probe [MODEL_DIR]              # what the image tokens encode: linear probes
                                                                   # vs. a fresh tower of the same config

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
    reliance = [r for r in records if "image_reliance" in r]
    phases = [r for r in records if "phase" in r]
    fig, (ax_loss, ax_eval, ax_img) = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax in (ax_loss, ax_eval, ax_img):
        for p in phases:  # phase boundaries
            ax.axvline(p["step"], color="grey", ls=":", lw=1)
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
    if reliance:
        steps = [r["step"] for r in reliance]
        ax_img.plot(steps, [r["image_reliance"] for r in reliance], "o-", color="black", label="all tasks", ms=3)
        for task in ("classify", "vqa", "caption", "od", "contrastive"):
            pts = [(r["step"], r["task_image_reliance"][task]) for r in reliance if task in r["task_image_reliance"]]
            if pts:
                ax_img.plot(*zip(*pts, strict=True), ".-", label=task, lw=1)
        ax_img.axhline(0.0, color="grey", lw=0.5)
        ax_img.set(xlabel="step", ylabel="nats / token", title="image reliance: held-out loss, images swapped - real")
        ax_img.legend(fontsize=7)
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


def _between_image_share(x: torch.Tensor) -> float:
    """x (B, N, d) image tokens: the between-group share of their variance, groups = images (the variance of each
    image's mean token over the variance of all tokens). 0: every image gives the same tokens on average."""
    overall = (x - x.mean((0, 1), keepdim=True)).pow(2).sum(-1).mean()
    between = (x.mean(1) - x.mean((0, 1))).pow(2).sum(-1).mean()
    return float(between / overall)


@torch.no_grad()
def variance(model_dir: str | None = None, n: int = 64) -> None:
    from fiore.data.synthetic import make_sample

    florence = fiore.load(model_dir)
    model = florence.model
    pixels = florence.processor.pixel_values([make_sample(3000, i).image for i in range(n)])
    features = model.encode_image(pixels)
    ids, mask = florence.processor.prompt_ids([fiore.tasks.get("classify").prompt()] * n)
    hidden, _ = model.encode(features, ids, mask)
    N = features.shape[1]
    print(f"between-image share of the image tokens' variance ({n} images of seed 3000, <CLASSIFY> prompt):")
    print(f"  entering the text encoder: {_between_image_share(features):.3f}")
    print(f"  leaving it:                {_between_image_share(hidden[:, :N]):.3f}")


def _probe_features(model, processor, samples) -> torch.Tensor:
    """Image tokens entering the text encoder -> (n, 3d): the pooled token, the spatial tokens' mean and max (the
    max keeps "is there a star somewhere", which a mean dilutes)."""
    out = []
    for i in range(0, len(samples), 32):
        x = model.encode_image(processor.pixel_values([s.image for s in samples[i : i + 32]]))
        out.append(torch.cat([x[:, 0], x[:, 1:].mean(1), x[:, 1:].amax(1)], -1))
    return torch.cat(out).float()


def _linear_probe(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Multinomial logistic regression (standardised features, L2, full-batch L-BFGS) -> held-out accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(train_x), train_y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float((head(test_x).argmax(1) == test_y).float().mean())


@torch.no_grad()
def probe(model_dir: str | None = None, n_train: int = 1000, n_test: int = 500) -> None:
    """Does the tower encode what the tasks ask (background kind, object count, which shapes are present)? Linear
    probes on the shipped model's image tokens and on a fresh tower of the same config (fiore's init, seed 0);
    train images from seed 4000, held-out from seed 3000; each probe's majority-class rate beside it."""
    from fiore.data import lexicon
    from fiore.data.synthetic import make_sample
    from fiore.model import FlorenceModel

    florence = fiore.load(model_dir)
    torch.manual_seed(0)
    fresh = FlorenceModel(florence.config).eval()
    train = [make_sample(4000, i) for i in range(n_train)]
    test = [make_sample(3000, i) for i in range(n_test)]
    kinds, shapes = list(lexicon.BACKGROUNDS), sorted({o.label for s in train + test for o in s.objects})
    targets = {"background kind": (lambda s: kinds.index(s.label), len(kinds))}
    most_objects = max(len(s.objects) for s in train + test)
    targets["object count"] = (lambda s: len(s.objects), most_objects + 1)
    for shape in shapes:
        targets[f"has a {shape}"] = (lambda s, shape=shape: int(any(o.label == shape for o in s.objects)), 2)
    feats = {
        name: (_probe_features(m, florence.processor, train), _probe_features(m, florence.processor, test))
        for name, m in (("trained", florence.model), ("fresh", fresh))
    }
    print(f"linear probes on the image tokens ({n_train} train images of seed 4000, {n_test} held-out of seed 3000)")
    print("| target | majority | fresh tower | trained tower |")
    print("|---|---:|---:|---:|")
    shape_rows = []
    for name, (fn, classes) in targets.items():
        train_y, test_y = torch.tensor([fn(s) for s in train]), torch.tensor([fn(s) for s in test])
        majority = float((test_y == train_y.bincount(minlength=classes).argmax()).float().mean())
        accs = [_linear_probe(feats[m][0], train_y, feats[m][1], test_y, classes) for m in ("fresh", "trained")]
        row = (name, majority, *accs)
        if name.startswith("has a"):
            shape_rows.append(row[1:])
        else:
            print("| {} | {:.3f} | {:.3f} | {:.3f} |".format(*row))
    mean = [sum(col) / len(col) for col in zip(*shape_rows, strict=True)]
    print("| has a <shape> (mean over {} shapes) | {:.3f} | {:.3f} | {:.3f} |".format(len(shape_rows), *mean))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    commands = {"package": package, "curve": curve, "tables": tables, "variance": variance, "probe": probe}
    commands[command](*args)
