"""Forgetting with and without replay: fine-tune a checkpoint on one task from a dataset on disk, evaluate every
other task before and after (docs/training.md, "Fine-tune on your own data").

    python benchmarks/forgetting.py --out runs/forgetting            # the shipped model, od, ~25 min on 2 cores
    python benchmarks/forgetting.py --out runs/forgetting-classes --task classify --relabel --replay caption

Writes TRAIN/ and VAL/ with `fiore synth` (seeds never used by the default model's training), evaluates the
starting model, fine-tunes it on `--task` alone (configs/finetune.toml) without and with [data.replay] of
`--replay` tasks, evaluates both, and prints the table as markdown (also OUT/forgetting.md). `--relabel` renames
the four background classes in both sets (a user's own label set for `classify`: noise -> star, stripes -> circle,
solid -> square, gradient -> triangle, words the shipped tokenizer knows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


NEW_NAMES = {"noise": "star", "stripes": "circle", "solid": "square", "gradient": "triangle"}


def relabel(directory: Path, names: dict[str, str] = NEW_NAMES) -> None:
    """Rename the classes in a fiore dataset's JSONL (a user's own label set)."""
    path = directory / "fiore.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if r.get("label"):
            r["label"] = names[r["label"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/forgetting")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--task", default="od")
    ap.add_argument("--replay", default="caption,classify", help="input-free tasks the start model replays")
    ap.add_argument("--replay-weight", type=float, default=0.5)
    ap.add_argument("--eval", default="od,classify,vqa,caption,region_to_category", help="tasks evaluated")
    ap.add_argument("--train-images", type=int, default=320)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--relabel", action="store_true", help="rename the classes (a new label set to learn)")
    args = ap.parse_args()

    import fiore
    from fiore.data.readers import read_dataset
    from fiore.data.synthetic import write_dataset
    from fiore.eval.runner import evaluate
    from fiore.train.config import load_config
    from fiore.train.loop import train

    out = Path(args.out)
    train_dir, val_dir = out / "data" / "train", out / "data" / "val"
    if not train_dir.exists():
        write_dataset(train_dir, args.train_images, seed=7001)
        write_dataset(val_dir, args.val_images, seed=7002)
        if args.relabel:
            for directory in (train_dir, val_dir):
                relabel(directory)
    val = read_dataset(val_dir)
    tasks = args.eval.split(",")

    def scores(model_dir: str | None) -> dict[str, float]:
        florence = fiore.load(model_dir)
        return evaluate(florence, val, tasks, progress=False).headline()

    rows = {"start": scores(None if args.checkpoint == "default" else args.checkpoint)}
    runs = {"fine-tuned": None, "fine-tuned + replay": args.replay.split(",")}
    for name, replay in runs.items():
        run_dir = out / name.replace(" ", "").replace("+", "_")
        overrides = {
            "model.checkpoint": args.checkpoint,
            "data.train": [{"path": str(train_dir)}],
            "data.val": [{"path": str(val_dir)}],
            "tasks": {args.task: 1.0},
            "optim.epochs": args.epochs,
            "optim.lr": args.lr,
            "train.out_dir": str(run_dir),
            "train.eval_tasks": [args.task],
            "train.threads": args.threads,
            "train.progress": False,
        }
        if replay:
            overrides.update({"data.replay": {"tasks": replay, "weight": args.replay_weight}})
        final = run_dir / "final"
        if not final.exists():
            train(load_config(ROOT / "configs" / "finetune.toml", overrides))
        steps = json.loads((run_dir / "train_config.json").read_text())["optim"]["steps"]
        rows[f"{name} ({steps} steps)"] = scores(str(final))

    keys = list(rows["start"])
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [
        f"| {name} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys) + " |" for name, r in rows.items()
    ]
    table = "\n".join(lines)
    print(table)
    (out / "forgetting.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
