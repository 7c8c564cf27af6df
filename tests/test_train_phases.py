"""Training in phases (image-level with the contrastive loss, then region-level), resume across a phase boundary,
and the guard that notices a model that does not use its images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fiore
from fiore.checkpoint import CONTRASTIVE_FILE
from fiore.train import checkpointing
from fiore.train.config import ConfigError, load_config
from fiore.train.evaluation import ImageRelianceGuard
from fiore.train.loop import train
from fiore.train.mixture import ContrastiveTexts

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
PHASES = [
    {"name": "image", "end": 0.5, "tasks": {"caption": 1.0, "classify": 1.0}, "contrastive": 1.0},
    {"name": "region", "end": 1.0, "tasks": {"od": 1.0, "region_to_category": 1.0}, "contrastive": 0.0},
]


def phased(out_dir: Path, **overrides):
    base = {
        "train.out_dir": str(out_dir),
        "model.contrastive_dim": 16,
        "phases": PHASES,
        "contrastive.texts": ["label"],
    }
    return load_config(SMOKE, {**base, **overrides})


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_phases_switch_tasks_and_the_contrastive_loss(tmp_path):
    final = train(phased(tmp_path, **{"optim.steps": 4}))
    steps = {r["step"]: set(r["task_loss"]) for r in records(tmp_path) if "task_loss" in r}
    assert all(steps[s] <= {"caption", "classify", "contrastive"} for s in (1, 2))
    assert all("contrastive" in steps[s] for s in (1, 2))
    assert all(steps[s] <= {"od", "region_to_category"} and steps[s] for s in (3, 4))
    assert [r for r in records(tmp_path) if "phase" in r] == [{"step": 2, "phase": "region"}]
    assert (final / CONTRASTIVE_FILE).is_file()
    florence = fiore.load(final)
    assert florence.model.contrastive is not None
    emb = florence.embed_texts(["a photo of a noise.", "a red star"])
    assert emb.shape == (2, 16)


def test_resume_across_a_phase_boundary_is_bit_identical(tmp_path):
    over = {"optim.steps": 6, "train.checkpoint_every": 2}
    train(phased(tmp_path / "a", **over))

    def crash(step, model):
        if step == 4:  # steps 1-3 are phase "image", 4-6 "region": the crash comes after the first region step
            raise KeyboardInterrupt

    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(phased(b, **{**over, "train.checkpoint_every": 3}), callback=crash)
    assert checkpointing.latest(b / "checkpoints").name == "step_3"  # the last step of phase "image"
    train(phased(b, **over), resume=True)
    for name in ("model.safetensors", CONTRASTIVE_FILE):
        wa, wb = load_file(tmp_path / "a" / "final" / name), load_file(b / "final" / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    assert [r["loss"] for r in records(tmp_path / "a") if "loss" in r] == [r["loss"] for r in records(b) if "loss" in r]


def test_phase_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="last must be 1.0"):
        phased(tmp_path, phases=[{"name": "a", "end": 0.5}])
    with pytest.raises(ConfigError, match="rise strictly"):
        phased(tmp_path, phases=[{"end": 0.6}, {"end": 0.4}, {"end": 1.0}])
    with pytest.raises(ConfigError, match="unknown keys"):
        phased(tmp_path, phases=[{"end": 1.0, "step": 3}])
    with pytest.raises(ConfigError, match="unknown source"):
        phased(tmp_path, **{"contrastive.texts": ["title"]})
    with pytest.raises(ValueError, match="contrastive_dim"):
        train(phased(tmp_path, **{"model.contrastive_dim": 0, "optim.steps": 2}))


def test_label_aware_groups_follow_the_texts():
    from fiore.tokenizer import Tokenizer

    class Tok:
        bos_id, eos_id, pad_id = 0, 2, 1
        frame = Tokenizer.frame  # the real framing, on these ids

        def encode(self, text):
            return [10 + len(w) for w in text.split()]

    ids, mask, group = ContrastiveTexts(["label"], "a {} scene", Tok()).batch(["x", "y y", "x", None])
    assert group.tolist() == [0, 1, 0, -1]
    assert mask.sum(1).tolist() == [3, 4, 3, 1]


def test_object_texts_name_an_object_of_the_image():
    import random

    from fiore.data.synthetic import make_sample

    texts = ContrastiveTexts(["object"], "unused {}", tokenizer=None)
    samples = [s for s in (make_sample(0, i) for i in range(20)) if len(s.objects) > 1]
    for s in samples:
        drawn = {texts.pick(s, random.Random(k)) for k in range(40)}
        assert drawn == {o.label for o in s.objects}  # every object's name, and nothing else
    empty = make_sample(0, 0)
    empty.objects = []
    assert texts.pick(empty, random.Random(0)) is None  # no object: no text (left out of the loss)
    with pytest.raises(ConfigError, match="unknown source 'objects'"):
        load_config(SMOKE, {"contrastive.texts": ["objects"]})


def test_image_reliance_is_recorded_and_the_guard_fires_on_constant_images(tmp_path, monkeypatch):
    from fiore.processor import Processor

    real = Processor.pixel_values
    monkeypatch.setattr(Processor, "pixel_values", lambda self, images: torch.zeros_like(real(self, images)))
    over = {"optim.steps": 4, "optim.warmup_steps": 1, "train.val_every": 2}
    with pytest.warns(UserWarning, match="not using the image"):
        train(phased(tmp_path, **over))
    checks = [r for r in records(tmp_path) if "image_reliance" in r]
    assert [r["step"] for r in checks] == [2, 4]
    assert all(r["image_reliance"] == 0.0 and r["blind_warning"] for r in checks)


def test_image_reliance_is_positive_where_images_differ(tmp_path):
    train(phased(tmp_path, **{"optim.steps": 2, "train.val_every": 2}))
    (check,) = [r for r in records(tmp_path) if "image_reliance" in r]
    # swapping images changes the held-out loss (of an untrained model, by a little, in either direction)
    assert check["image_reliance"] != 0.0
    assert set(check["task_image_reliance"]) == set(check["val_task_loss"])


def test_guard_stays_quiet_before_warmup_and_for_a_model_that_sees():
    guard = ImageRelianceGuard(after_step=10)
    for record in ({"step": 5, "image_reliance": 0.0}, {"step": 20, "image_reliance": 0.8}):
        guard.check(record)
        assert "blind_warning" not in record
    assert guard.warnings == 0 and guard.summary() == " img +0.800"


def test_a_phase_can_keep_task_gradients_out_of_the_vision_tower():
    from test_train import _loss_inputs, _smoke_model

    from fiore.train.loss import MultiTaskLoss

    def tower_grad(vision_from_tasks, with_texts):
        model = _smoke_model()
        if with_texts:
            model.contrastive = __import__("fiore").model.contrastive.ContrastiveHeads(64, 8)
        loss = MultiTaskLoss(model, [1.0, 1.0], contrastive=1.0 if with_texts else 0.0)
        loss.vision_from_tasks = vision_from_tasks
        x = list(_loss_inputs(500))
        if with_texts:
            x += [torch.tensor([[0, 5, 2], [0, 6, 2]]), torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 1])]
        loss(*x)[0].backward()
        grads = [p.grad for p in model.vision_tower.parameters()]
        return sum(0.0 if g is None else float(g.abs().sum()) for g in grads)

    assert tower_grad(True, False) > 0
    assert tower_grad(False, False) == 0.0  # the task losses alone: nothing reaches the tower
    assert tower_grad(False, True) > 0  # the contrastive loss still trains it


def test_lr_scale_gives_a_part_its_own_learning_rate(tmp_path):
    from test_train import _smoke_model

    from fiore.train.optim import make_optimizer

    model = _smoke_model()
    config = phased(tmp_path, **{"optim.lr_scale": {"vision_tower": 0.5}})
    opt = make_optimizer(model, config)
    tower = {id(p) for p in model.vision_tower.parameters()}
    for group in opt.param_groups:
        in_tower = {id(p) in tower for p in group["params"]}
        assert in_tower == {group["lr_scale"] == 0.5}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="match no trainable parameter"):
        make_optimizer(model, phased(tmp_path, **{"optim.lr_scale": {"model.nothing.": 2.0}}))
    with pytest.raises(ConfigError, match="lr_scale"):
        phased(tmp_path, **{"optim.lr_scale": {"vision_tower": 0}})


def test_named_parts_cover_the_documented_parameters():
    """Each part of docs/training.md's table, found through the model's modules, is exactly the parameters named
    there; the tied embedding belongs to "embeddings" (and "language_model") only."""
    from test_train import _smoke_model

    from fiore.train.parts import freeze, model_parts

    model = _smoke_model()
    names = {id(p): n for n, p in model.named_parameters()}
    tied = "model.language_model.shared.weight"
    tower, projector = "model.vision_tower.", "model.multi_modal_projector."
    expected = {
        "vision_tower": lambda n: n.startswith(tower),
        "projector": lambda n: n.startswith(projector),
        "vision": lambda n: n.startswith((tower, projector)),
        "embeddings": lambda n: n == tied,
        "encoder": lambda n: n.startswith("model.language_model.encoder."),
        "decoder": lambda n: n.startswith("model.language_model.decoder."),
        "language_model": lambda n: n.startswith("model.language_model."),
    }
    parts = model_parts(model)
    assert set(parts) == set(expected)
    for part, rule in expected.items():
        got = {names[id(p)] for p in parts[part].parameters()}
        assert got == {n for n in names.values() if rule(n)}, part
        assert got, part
    assert freeze(model, ["model.vision_tower.convs.0"]) and not any(
        p.requires_grad for n, p in model.named_parameters() if n.startswith("model.vision_tower.convs.0")
    )
    with pytest.raises(ValueError, match="freeze: 'nowhere' matches no parameter"):
        freeze(model, ["nowhere"])
