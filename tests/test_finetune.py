"""Fine-tuning on data from disk: dataset directories and Florence-2 JSONL as sources, the held-out split, epochs
and the best checkpoint, replay, LoRA (merged into a plain checkpoint), bad data found before the first step,
exact resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference_files import TOKENIZER_DIR
from safetensors.torch import load_file
from typer.testing import CliRunner

import fiore
import fiore.data.synthetic
from fiore.cli import app
from fiore.data.check import check_samples
from fiore.data.readers import DatasetError, read_dataset, read_florence2_jsonl
from fiore.data.sources import ListSource, SourceSpec, Stream, SyntheticSource, hold_out, read_source
from fiore.data.synthetic import make_sample, write_dataset
from fiore.train.config import ConfigError, load_config
from fiore.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from forgetting import relabel  # noqa: E402  (the benchmark's relabelling: a user's own class names)

SMOKE = ROOT / "configs" / "smoke.toml"
FINETUNE = ROOT / "configs" / "finetune.toml"


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def florence2_jsonl(directory: Path, n: int, seed: int, tasks=("od", "caption")) -> Path:
    """A Roboflow/maestro-style export: images beside annotations.jsonl, one line per (image, task)."""
    directory.mkdir(parents=True)
    lines = []
    for i in range(n):
        s = make_sample(seed, i)
        s.image.save(directory / f"{i}.png")
        for name in tasks:
            task = fiore.tasks.get(name)
            for e in task.examples(s):
                given = e.text or (task.region_tokens(e.region, s.size) if e.region else "")
                lines.append({"image": f"{i}.png", "prefix": task.token + given, "suffix": task.target(e, s.size)})
    (directory / "annotations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return directory


# ---------------------------------------------------------------------------------------------------- sources


def test_stream_epochs_visit_each_example_once_and_mix_by_weight():
    items = ListSource([make_sample(3, i) for i in range(10)], "ten")
    stream = Stream([items], [1.0], seed=0)
    assert stream.epoch_length == 10 and stream.steps_for(3, 4) == 8
    for epoch in range(3):
        ids = [stream[epoch * 10 + k].image_id for k in range(10)]
        assert sorted(ids) == list(range(10))  # every example once per epoch
    assert [stream[k].image_id for k in range(10)] != [stream[10 + k].image_id for k in range(10)]  # reshuffled
    assert [stream[k].image_id for k in range(25)] == [Stream([items], [1.0], seed=0)[k].image_id for k in range(25)]

    extra = ListSource([make_sample(4, i) for i in range(6)], "six")
    mixed = Stream([items, extra], [1.0, 0.5], seed=0, primary=1)  # "six" is a secondary source (replay-like)
    assert mixed.counts == [10, 5] and mixed.epoch_length == 15
    first = [mixed[k] for k in range(15)]
    assert sorted(s.image_id for s in first if s in items.samples) == list(range(10))
    assert sum(s in extra.samples for s in first) == 5

    synthetic = Stream([SyntheticSource(5)], [1.0], seed=0)  # alone: the generator's own stream, endless
    assert not synthetic.finite and synthetic[7] == make_sample(5, 7)
    with pytest.raises(ValueError, match="epochs"):
        synthetic.steps_for(1, 4)


def test_hold_out_is_seeded_and_disjoint():
    source = ListSource([make_sample(3, i) for i in range(20)], "twenty")
    train_a, val_a = hold_out(source, 0.2, seed=0)
    train_b, val_b = hold_out(source, 0.2, seed=0)
    assert [s.image_id for s in val_a.samples] == [s.image_id for s in val_b.samples] and val_a.size == 4
    assert {s.image_id for s in train_a.samples}.isdisjoint(s.image_id for s in val_a.samples)
    assert train_a.size + val_a.size == 20
    assert [s.image_id for s in hold_out(source, 0.2, seed=1)[1].samples] != [s.image_id for s in val_a.samples]


def test_source_kinds_come_from_the_path(tmp_path):
    jsonl = florence2_jsonl(tmp_path / "f2", 2, seed=1)
    write_dataset(tmp_path / "coco", 16, seed=1)
    assert SourceSpec(path=str(tmp_path / "coco")).resolved_kind() == "dataset"
    assert SourceSpec(path=str(jsonl)).resolved_kind() == "florence2"
    assert SourceSpec(path=str(jsonl / "annotations.jsonl")).resolved_kind() == "florence2"
    assert read_source(SourceSpec(path=str(tmp_path / "coco"))).size == 16
    assert read_source(SourceSpec(path=str(jsonl))).size == 2


# ---------------------------------------------------------------------------------------------------- targets


def test_every_task_target_round_trips_and_florence2_pairs_train_verbatim(tmp_path):
    """Serialized target -> parse -> serialize gives the same string for every task (so the parsed result is the
    same at loc-token precision); region answers carry the region's echo; JSONL suffixes are trained verbatim."""
    from fiore.tasks.locations import box_to_tokens

    seen = set()
    for i in range(6):
        s = make_sample(21, i)
        for task in fiore.tasks.all():
            for e in task.examples(s):
                target = task.target(e, s.size)
                back = task.parse("</s><s>" + target + "</s>", s.size)
                assert back.warnings == [], (task.name, back.warnings)
                again = task.serialize(back, s.size)
                if task.echoes_region:
                    assert target.endswith(box_to_tokens(e.region, s.size)), task.name
                    again += task.region_tokens(e.region, s.size)
                assert again == target, task.name
                seen.add(task.name)
    assert seen == set(fiore.tasks.names()) - {"more_detailed_caption"} or seen == set(fiore.tasks.names())

    directory = florence2_jsonl(tmp_path / "f2", 3, seed=2, tasks=("od", "region_to_category", "ocr_with_region"))
    lines = [json.loads(x) for x in (directory / "annotations.jsonl").read_text().splitlines()]
    samples = read_florence2_jsonl(directory)
    assert len(samples) == 3 and sum(len(s.pairs) for s in samples) == len(lines)
    for s in samples:
        mine = [x for x in lines if x["image"] == s.image_id]
        assert len(mine) == len(s.pairs)
        for pair, line in zip(s.pairs, mine, strict=True):
            task = fiore.tasks.get(pair.task)
            examples = task.examples(s)
            (example,) = [e for e in examples if e.raw_target == pair.target and e.region == (pair.input or None)]
            assert task.target(example, s.size) == line["suffix"]  # exactly the file's string
            assert task.token + task.prompt(text=example.text, region=example.region, image_size=s.size)
            assert pair.input == line["prefix"][len(task.token) :]
            assert example.target is not None  # parsed: evaluation scores JSONL data too


# ---------------------------------------------------------------------------------------------------- training


def test_finetune_the_shipped_model_on_a_directory_read_through_files(tmp_path, monkeypatch):
    """New class names for the background kinds (words the shipped tokenizer knows): the loop reads the dataset
    files (the generator is never called), the loss falls, the held-out loss falls and the held-out accuracy
    rises from the start model's; evaluations run at each epoch end and OUT/best holds the best one."""
    from fiore.eval.runner import evaluate

    for name, n, seed in (("train", 48, 11), ("val", 16, 12)):
        write_dataset(tmp_path / name, n, seed=seed)
        relabel(tmp_path / name)  # noise -> star, stripes -> circle, solid -> square, gradient -> triangle
    val = read_dataset(tmp_path / "val")
    start = evaluate(fiore.load(), val, ["classify"], progress=False).headline()["classify/top1"]

    def no_generator(*args, **kwargs):
        raise AssertionError("the training loop called the synthetic generator")

    monkeypatch.setattr(fiore.data.synthetic, "make_sample", no_generator)
    cfg = load_config(FINETUNE, {
        "data.train": [{"path": str(tmp_path / "train")}], "data.val": [{"path": str(tmp_path / "val")}],
        "tasks": {"classify": 1.0}, "optim.epochs": 2, "optim.lr": 1e-3, "optim.warmup_steps": 2,
        "train.out_dir": str(tmp_path / "run"), "train.eval_tasks": ["classify"], "train.log_every": 3,
        "train.progress": False, "data.num_workers": 0,
    })  # fmt: skip
    final = train(cfg)
    rs = records(tmp_path / "run")
    assert rs[0]["steps"] == 12 and "48" in rs[0]["data"]  # 2 epochs of 48 images at batch 8
    losses = [r["loss"] for r in rs if "loss" in r]
    assert losses[-1] < losses[0] / 2, losses
    evals = [r for r in rs if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]  # each epoch end
    assert evals[-1]["val_loss"] <= evals[0]["val_loss"] + 0.02
    assert start < 0.1 and evals[-1]["eval"]["classify/top1"] >= start + 0.2, (start, evals)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["metric"] == "val_loss" and best["value"] == min(r["val_loss"] for r in evals)
    assert fiore.load(tmp_path / "run" / "best").config == fiore.load(final).config


def test_a_florence2_jsonl_dataset_trains(tmp_path):
    directory = florence2_jsonl(tmp_path / "f2", 12, seed=5)
    over = {
        "train.out_dir": str(tmp_path / "run"), "data.train": [{"path": str(directory)}], "tasks": {"od": 1.0},
        "optim.steps": 8, "train.eval_every": -1, "train.val_every": 4, "train.eval_samples": 0,
    }  # fmt: skip
    with pytest.warns(UserWarning, match="caption"):  # lines of a task the mixture does not train are reported
        train(load_config(SMOKE, over))
    rs = records(tmp_path / "run")
    losses = [r["loss"] for r in rs if "loss" in r]
    assert set(rs[1]["task_loss"]) == {"od"} and losses[-1] < losses[0] - 0.5, losses
    val = [r for r in rs if "val_loss" in r]
    assert val and set(val[-1]["val_task_loss"]) == {"od"}


def test_replay_labels_the_training_images_once_and_trains_them(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 10, seed=6)
    over = {
        "data.train": [{"path": str(data)}], "data.replay": {"tasks": ["caption", "classify"], "weight": 0.5},
        "tasks": {"od": 1.0}, "optim.steps": 2, "optim.epochs": 0, "train.eval_every": -1, "train.best_metric": "",
        "train.progress": False, "data.num_workers": 0,
    }  # fmt: skip
    train(load_config(FINETUNE, {**over, "train.out_dir": str(tmp_path / "a")}))
    (cache,) = (tmp_path / "a" / "replay").glob("replay-*.jsonl")
    answers = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(answers) == 2 * 9 and {a["prefix"] for a in answers} == {"<CAPTION>", "<CLASSIFY>"}  # 9 train images
    rs = records(tmp_path / "a")
    assert "replay" in rs[0]["data"]
    assert {"od", "caption", "classify"} <= set().union(*(r["task_loss"] for r in rs if "loss" in r))
    # the cache is reused: a second run with the same start and images labels nothing
    shutil.copytree(tmp_path / "a" / "replay", tmp_path / "b" / "replay")
    mtime = cache.stat().st_mtime_ns
    train(load_config(FINETUNE, {**over, "train.out_dir": str(tmp_path / "b")}))
    assert (tmp_path / "b" / "replay" / cache.name).stat().st_mtime_ns == mtime


def test_lora_resume_is_exact_and_saves_a_plain_checkpoint(tmp_path):
    pytest.importorskip("peft", reason="LoRA is the finetune extra")
    base = train(load_config(SMOKE, {"train.out_dir": str(tmp_path / "base"), "optim.steps": 1}))
    data = tmp_path / "data"
    write_dataset(data, 12, seed=8)
    over = {
        "model.preset": None, "model.checkpoint": str(base), "data.train": [{"path": str(data)}],
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "optim.steps": 5, "train.checkpoint_every": 2,
        "data.augment": ["color", "crop"],  # seeded by stream position: replayed identically on resume
        "train.eval_every": -1, "optim.lr": 1e-2,
    }  # fmt: skip
    train(load_config(SMOKE, {**over, "train.out_dir": str(tmp_path / "a")}))

    def crash(step, model):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(SMOKE, {**over, "train.out_dir": str(tmp_path / "b")}), callback=crash)
    assert (tmp_path / "b" / "checkpoints" / "step_2" / "adapter.safetensors").is_file()
    train(load_config(SMOKE, {**over, "train.out_dir": str(tmp_path / "b")}), resume=True)

    wa, wb = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    assert wa.keys() == wb.keys() and not any("lora" in k or "base_layer" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = load_file(Path(base) / "model.safetensors")
    changed = [k for k in wa if not torch.equal(wa[k], w0[k])]
    assert changed and all(".language_model." in k and k.endswith("_proj.weight") or "fc" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)  # only the adapted layers moved


@pytest.mark.slow
def test_lora_on_an_original_format_base_checkpoint_loads_in_transformers(tmp_path):
    """A random-weight checkpoint of the base layout in Microsoft's original keys, fine-tuned with LoRA a few steps
    and saved: transformers loads it and gives fiore's logits."""
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle (dev extra)")
    pytest.importorskip("peft", reason="LoRA is the finetune extra")
    from florence_oracle import NATIVE_VOCAB, hf_inputs, native_to_original, original_config, prompt_ids
    from safetensors.torch import save_file

    from fiore.config import preset
    from fiore.model import SHARED_KEY, FlorenceModel

    tokenizer_dir = TOKENIZER_DIR
    config = preset("base").replace(text={"vocab_size": NATIVE_VOCAB}, image_size=(192, 192))
    torch.manual_seed(0)
    model = FlorenceModel(config)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        sd[f"model.language_model.{alias}"] = sd[SHARED_KEY].clone()
    sd["lm_head.weight"] = sd[SHARED_KEY].clone()
    start = tmp_path / "original"
    start.mkdir()
    save_file(native_to_original(sd), str(start / "model.safetensors"))
    (start / "config.json").write_text(json.dumps(original_config(config)))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, start / f.name)
    del model, sd

    data = tmp_path / "data"
    write_dataset(data, 4, seed=9)
    cfg = load_config(FINETUNE, {
        "model.checkpoint": str(start), "model.image_size": [192, 192], "data.train": [{"path": str(data)}],
        "data.val_fraction": 0.25, "tasks": {"od": 1.0, "caption": 1.0}, "lora": {"r": 4}, "optim.steps": 2,
        "optim.epochs": 0, "optim.batch_size": 2, "optim.lr": 1e-2, "train.eval_every": -1, "train.best_metric": "",
        "train.max_target_tokens": 64, "train.out_dir": str(tmp_path / "run"), "train.progress": False,
    })  # fmt: skip
    final = train(cfg)
    ours = fiore.load(final).model
    before = fiore.load(start).model.state_dict()
    moved = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    del before
    assert moved and all(".language_model." in k and k.endswith(("proj.weight", "fc1.weight", "fc2.weight"))
                         for k in moved), sorted(moved)[:5]  # the adapters, merged; nothing else  # fmt: skip
    hf = transformers.Florence2ForConditionalGeneration.from_pretrained(final).eval()
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 192, 192)
    prompt, decoder = prompt_ids(1, 7, NATIVE_VOCAB), prompt_ids(1, 5, NATIVE_VOCAB, seed=2)
    decoder[:, 0] = 2
    with torch.no_grad():
        expected = ours(pixels, prompt, decoder)
        ids, mask = hf_inputs(prompt, ours.encode_image(pixels).shape[1])
        got = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, decoder_input_ids=decoder).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- bad data


def bad_dataset(tmp_path: Path) -> Path:
    """A dataset dir with a corrupt image, a box outside its image, an empty caption; and a JSONL with an unknown
    task token, an empty suffix and a missing image."""
    d = tmp_path / "bad"
    write_dataset(d, 4, seed=3)
    instances = json.loads((d / "instances.json").read_text())
    first = instances["images"][0]
    (d / "images" / first["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ann = next(a for a in instances["annotations"] if a["image_id"] == instances["images"][1]["id"])
    ann["bbox"] = [10, 10, 5000, 20]
    (d / "instances.json").write_text(json.dumps(instances))
    return d


def test_bad_data_is_named_with_file_and_annotation(tmp_path):
    d = bad_dataset(tmp_path)
    problems = check_samples(read_dataset(d))
    text = "\n".join(map(str, problems))
    assert len({p.sample for p in problems}) == 2, text
    assert "corrupt" in text or "cannot be read" in text
    ann = next(p for p in problems if "outside" in p.what)
    assert "instances.json: annotation" in ann.where

    f2 = florence2_jsonl(tmp_path / "f2", 3, seed=1, tasks=("od",))
    lines = (f2 / "annotations.jsonl").read_text().splitlines()
    lines += [
        json.dumps({"image": "0.png", "prefix": "<DETECT>", "suffix": "car<loc_1><loc_2><loc_3><loc_4>"}),
        json.dumps({"image": "1.png", "prefix": "<CAPTION>", "suffix": " "}),
        json.dumps({"image": "gone.png", "prefix": "<CAPTION>", "suffix": "a cat"}),
        json.dumps({"image": "2.png", "prefix": "<OD>a car", "suffix": "car<loc_1><loc_2><loc_3><loc_4>"}),
    ]
    (f2 / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    problems = [str(p) for p in check_samples(read_florence2_jsonl(f2))]
    path = f2 / "annotations.jsonl"
    assert any(p.startswith(f"{path}:4: unknown task token <DETECT>") for p in problems), problems
    assert any(p.startswith(f"{path}:5: empty target") for p in problems), problems
    assert any(p.startswith(f"{path}:6") and "missing" in p for p in problems), problems
    assert any(p.startswith(f"{path}:7") and "takes no input" in p for p in problems), problems

    result = CliRunner().invoke(app, ["data", "check", str(f2)])
    assert result.exit_code == 1 and f"{path}:4: unknown task token <DETECT>" in result.output
    assert "4 problem(s) in 4 image(s)" in result.output
    ok = CliRunner().invoke(app, ["data", "check", str(tmp_path / "f2" / "0.png")])
    assert ok.exit_code == 1 and "error" in ok.output


def test_training_stops_on_bad_data_before_the_first_step_or_skips_it(tmp_path):
    d = bad_dataset(tmp_path)
    over = {"data.train": [{"path": str(d)}], "optim.steps": 2, "train.eval_every": -1, "data.val_fraction": 0.25}
    with pytest.raises(DatasetError, match=r"instances.json: annotation .* outside") as e:
        train(load_config(SMOKE, {**over, "train.out_dir": str(tmp_path / "a")}))
    assert "on_bad" in str(e.value) and "fiore data check" in str(e.value)
    assert not (tmp_path / "a").exists()  # nothing was built or written
    cli = CliRunner().invoke(app, ["train", str(SMOKE), "--data", str(d), "--set", f"train.out_dir={tmp_path / 'c'}"])
    assert cli.exit_code == 1 and "outside" in cli.output and "Traceback" not in cli.output
    train(load_config(SMOKE, {**over, "train.out_dir": str(tmp_path / "b"), "data.on_bad": "skip"}))
    first = records(tmp_path / "b")[0]
    assert list(first["skipped"].values()) == [2] and "2" in first["data"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[data\] kind is gone"):
        load_config(SMOKE, {"data.kind": "coco"})
    with pytest.raises(ConfigError, match="set \\[model\\] checkpoint"):
        load_config(SMOKE, {"data.replay": {"tasks": ["caption"], "weight": 0.5}})
    with pytest.raises(ConfigError, match="only input-free tasks"):
        load_config(SMOKE, {"model.preset": None, "model.checkpoint": "x", "data.replay": {"tasks": ["vqa"],
                                                                                         "weight": 1}})  # fmt: skip
    with pytest.raises(ConfigError, match="LoRA from a preset"):
        load_config(SMOKE, {"lora.r": 4})
    with pytest.raises(ConfigError, match="augment"):
        load_config(SMOKE, {"data.augment": ["flip"]})
    with pytest.raises(ValueError, match="best_metric 'od/recall'"):
        train(load_config(SMOKE, {"train.best_metric": "od/recall", "train.out_dir": str(tmp_path)}))


# ---------------------------------------------------------------------------------------------------- augment


def test_crop_moves_every_target_with_the_pixels():
    import random

    from fiore.data.augment import crop

    moved = 0
    for i in range(6):
        s = make_sample(31, i)
        out, image = crop(s, s.image, random.Random(i))
        assert out.size == image.size
        if out is s:
            continue
        moved += 1
        for a, b in zip(s.objects, out.objects, strict=True):  # the pixels inside each box are the same pixels
            box_a = tuple(round(v) for v in a.box)
            box_b = tuple(round(v) for v in b.box)
            assert Image.Image.tobytes(s.image.crop(box_a)) == Image.Image.tobytes(image.crop(box_b))
        for a, b in zip(s.texts, out.texts, strict=True):
            assert [round(x - y, 6) for x, y in zip(a.quad, b.quad, strict=True)][:2] == [
                round(a.box[0] - b.box[0], 6), round(a.box[1] - b.box[1], 6)]  # fmt: skip
        assert s.image.size != image.size
    assert moved >= 3
