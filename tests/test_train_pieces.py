"""Unit tests of the training pieces that need no model: config parsing, mixture rows/batches, loss normalisation,
schedule, atomic checkpoints. Small fakes stand in for tasks and the tokenizer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fiore.model import kernels
from fiore.model.kernels import token_cross_entropy
from fiore.tokenizer import Tokenizer
from fiore.train import checkpointing
from fiore.train.config import ConfigError, TrainConfig, load_config, parse_override
from fiore.train.mixture import (
    IGNORE_INDEX,
    Mixture,
    MixtureDataset,
    collate,
    combine,
)
from fiore.train.optim import Schedule

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ config


def test_shipped_configs_parse():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.tasks and cfg.optim.steps >= 1, path


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\npreset = "tiny"\n[optim]\nstesp = 3\n')
    with pytest.raises(ConfigError, match="stesp"):
        load_config(p)
    p.write_text('[model]\npreset = "tiny"\n[train]\nprecision = "fp16"\n')
    with pytest.raises(ConfigError, match="precision"):
        load_config(p)
    p.write_text('[model]\npreset = "tiny"\ncheckpoint = "x"\n')
    with pytest.raises(ConfigError, match="not both"):
        load_config(p)
    p.write_text("[tasks]\nod = -1\n")
    with pytest.raises(ConfigError, match="od"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_config_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\npreset = "tiny"\n[model.text]\ndropout = 0.0\n[tasks]\nod = 2.0\ncaption = 1\n')
    cfg = load_config(p, dict([parse_override("optim.steps=7"), parse_override("train.out_dir=/tmp/x")]))
    assert cfg.optim.steps == 7 and cfg.train.out_dir == "/tmp/x"
    assert cfg.model.text == {"dropout": 0.0} and cfg.tasks == {"od": 2.0, "caption": 1.0}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        cfg.replace({"steps": 3})


# ------------------------------------------------------------------------------------------------ mixture


@dataclass
class FakeExample:
    text: str | None
    region: tuple | None
    target: str


class FakeTask:
    def __init__(self, name: str, n_examples: int):
        self.name, self.n = name, n_examples

    def examples(self, sample):
        n = sample.image_id
        return [FakeExample(text=f"{self.name}{i}", region=None, target=f"t{n}{i}") for i in range(self.n)]

    def prompt(self, text=None, region=None, image_size=None):
        return f"<{self.name}>{text}"

    def target(self, example, image_size):
        return example.target * 3


class FakeTokenizer:
    bos_id, pad_id, eos_id = 0, 1, 2
    frame = Tokenizer.frame  # the real framing, on these ids

    def encode(self, text):
        return [10 + ord(c) % 50 for c in text]


@dataclass
class FakeSample:
    image_id: int
    size: tuple = (32, 24)

    def read_image(self):
        return self.image_id


def fake_mixture(k=2, tasks=None):
    tasks = tasks or {"a": 1.0, "b": 3.0, "c": 1.0, "none": 5.0}
    lookup = {"a": FakeTask("a", 2), "b": FakeTask("b", 1), "c": FakeTask("c", 3), "none": FakeTask("none", 0)}
    return Mixture(tasks, FakeTokenizer(), tasks_per_image=k, max_target_tokens=20, task_lookup=lookup.__getitem__)


def test_rows_draw_distinct_tasks_with_examples_by_weight():
    mix = fake_mixture(k=2)
    counts = [0, 0, 0, 0]
    for i in range(600):
        rows = mix.rows(FakeSample(i), random.Random(i))
        assert len(rows) == 2 and len({r.task for r in rows}) == 2
        for r in rows:
            counts[r.task] += 1
    assert counts[3] == 0  # a task without examples is never drawn, whatever its weight
    assert counts[1] > counts[0] and counts[1] > counts[2]  # weight 3 beats weight 1
    assert mix.rows(FakeSample(5), random.Random(9)) == mix.rows(FakeSample(5), random.Random(9))


def test_row_layout_matches_florence_generation():
    mix = fake_mixture()
    row = mix.row(0, FakeExample("x", None, "ab"), (32, 24))
    tok = FakeTokenizer()
    assert row.input_ids == [0, *tok.encode("<a>x"), 2]
    assert row.labels == [0, *tok.encode("ababab"), 2]
    long = mix.row(0, FakeExample("x", None, "z" * 30), (32, 24))
    assert len(long.labels) == 20 and long.labels[-1] != 2  # truncated: no </s>


def test_collate_shifts_labels_and_pads():
    mix = fake_mixture(k=3)
    rows = [mix.rows(FakeSample(i), random.Random(i)) for i in range(3)]
    batch = collate(torch.zeros(3, 3, 8, 8), rows, pad_id=1, decoder_start_id=2)
    R = sum(len(r) for r in rows)
    assert batch.num_rows == R and batch.image_index.tolist() == [b for b, rs in enumerate(rows) for _ in rs]
    flat = [r for rs in rows for r in rs]
    for i, r in enumerate(flat):
        n = len(r.labels)
        assert batch.labels[i, :n].tolist() == r.labels and (batch.labels[i, n:] == IGNORE_INDEX).all()
        assert batch.decoder_input_ids[i, :n].tolist() == [2, *r.labels[:-1]]
        assert batch.attention_mask[i].sum() == len(r.input_ids)
        assert batch.input_ids[i, : len(r.input_ids)].tolist() == r.input_ids
        assert (batch.input_ids[i, len(r.input_ids) :] == 1).all()
        assert batch.task_index[i] == r.task


def test_dataset_is_a_function_of_the_index_and_splits_ranks():
    mix = fake_mixture()

    def pixels(images):
        return torch.tensor(images, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)

    class Stream:  # position -> sample, as fiore.data.sources.Stream
        def __getitem__(self, i):
            return FakeSample(i)

    make = Stream()
    single = MixtureDataset(mix, make, pixels, seed=0, images_per_batch=4)
    r0 = MixtureDataset(mix, make, pixels, seed=0, images_per_batch=2, rank=0, world_size=2)
    r1 = MixtureDataset(mix, make, pixels, seed=0, images_per_batch=2, rank=1, world_size=2)
    assert single.indices(3) == r0.indices(3) + r1.indices(3)  # same global samples per micro-step
    a, b = single[5], single[5]
    assert torch.equal(a.labels, b.labels) and torch.equal(a.pixel_values, b.pixel_values)
    assert a.pixel_values[:, 0, 0, 0].tolist() == [20.0, 21.0, 22.0, 23.0]


def test_loss_normalisation_is_weighted_mean_of_per_task_token_means():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX], [3, 4, 5, 6], [0, IGNORE_INDEX, IGNORE_INDEX, -100]])
    task_index = torch.tensor([0, 2, 0])
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 7), labels.view(-1), reduction="none").view(3, 4)
    valid = labels != IGNORE_INDEX
    s = torch.zeros(3).index_add_(0, task_index, (ce * valid).sum(1))
    n = torch.zeros(3).index_add_(0, task_index, valid.sum(1).float())
    l0 = (ce[0, :2].sum() + ce[2, 0]) / 3
    l2 = ce[1].mean()
    assert n.tolist() == [3, 0, 4]
    w = torch.tensor([1.0, 5.0, 3.0])  # task 1 absent: its weight drops out
    torch.testing.assert_close(combine(s, n, w), (1 * l0 + 3 * l2) / 4)


def test_token_cross_entropy_matches_torch_values_and_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(9, 50) * 4).requires_grad_()
    targets = torch.randint(0, 50, (9,))
    weights = torch.rand(9)
    ours = token_cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    small = logits.detach()[:3, :8].double().requires_grad_()
    assert torch.autograd.gradcheck(token_cross_entropy, (small, targets[:3] % 8))


def test_token_cross_entropy_overwriting_logits_gives_the_same_gradient_once(monkeypatch):
    monkeypatch.setattr(kernels, "_CE_SLICE_BYTES", 3 * 300 * 4)  # 3-row slices: 14 of them, the last one short
    torch.manual_seed(0)
    leaf = (torch.randn(40, 300) * 4).requires_grad_()
    targets = torch.randint(0, 300, (40,))
    weights = torch.rand(40)
    ref = torch.nn.functional.cross_entropy(leaf, targets, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), leaf)
    logits = leaf * 1.0  # an intermediate the loss owns, like the LM head's output
    ours = token_cross_entropy(logits, targets, overwrite_logits=True)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), leaf, retain_graph=True)
    torch.testing.assert_close(g_ours, g_ref)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad((ours * weights).sum(), leaf)  # the saved logits now hold the gradient
    with pytest.raises(ValueError, match="leaf"):
        token_cross_entropy(leaf, targets, overwrite_logits=True)


# ------------------------------------------------------------------------------------------------ schedule, ckpt


def test_schedule_warmup_then_cosine():
    s = Schedule(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0) and s(9) == pytest.approx(0.55) and s(14) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(4, 20))


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    root = tmp_path / "ckpt"
    assert checkpointing.latest(root) is None

    def write_model(d):
        (d / "model.safetensors").write_bytes(b"x")

    for step in (2, 4, 6):
        checkpointing.save(root, step, write_model, {"step": step, "t": torch.arange(3)}, keep=2)
    assert sorted(checkpointing.steps(root)) == [4, 6]
    assert checkpointing.latest(root).name == "step_6"
    assert checkpointing.load_state(root / "step_6")["step"] == 6
    assert not list(root.glob(".*tmp"))

    def crash(d):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpointing.save(root, 8, crash, {"step": 8})
    assert checkpointing.latest(root).name == "step_6" and 8 not in checkpointing.steps(root)


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    import numpy as np

    np.random.seed(3)
    state = checkpointing.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), torch.rand(2), np.random.rand())
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    checkpointing.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), torch.rand(2), np.random.rand())
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_evaluation_budgets_follow_the_longest_held_out_target():
    import fiore
    from fiore.data.synthetic import make_sample
    from fiore.train.evaluation import generation_budgets

    tok = fiore.load().tokenizer
    samples = [make_sample(5, i) for i in range(4)]
    budgets = generation_budgets(samples, ["classify", "od", "ocr"], tok, cap=60)
    od = fiore.tasks.get("od")
    longest_od = max(len(tok.encode(od.target(e, s.size))) for s in samples for e in od.examples(s))
    assert budgets["od"] == min(60, longest_od + 8)
    assert budgets["classify"] <= 8 + 3  # one class name
    assert generation_budgets(samples, ["od"], tok, cap=10) == {"od": 10}
