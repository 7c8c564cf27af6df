"""`fiore train` end to end on a very small model (configs/smoke.toml): the loss falls, freezing really freezes,
an interrupted-and-resumed run ends bit-identical to an unbroken one, and DDP ranks stay identical."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import fiore
from fiore.train import checkpointing
from fiore.train.config import load_config, parse_override
from fiore.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


def smoke(out_dir: Path, **overrides):
    return load_config(SMOKE, {"train.out_dir": str(out_dir), **overrides})


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_loss_falls_and_final_model_loads(tmp_path):
    evals = {"train.eval_every": 4, "train.eval_samples": 2, "train.eval_tasks": ["classify", "od"]}
    final = train(smoke(tmp_path, **{"optim.steps": 8}, **evals))
    losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    # held-out loss + the eval runner at step 4 and at the end; the full report is saved
    evaluated = [r for r in records(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [4, 8]
    assert evaluated[1]["val_loss"] < evaluated[0]["val_loss"]
    assert any(k.startswith("classify/") for k in evaluated[1]["eval"])
    assert (tmp_path / "eval" / "report.json").is_file()
    florence = fiore.load(final)
    assert florence.tokenizer.vocab_size == florence.config.text.vocab_size
    assert florence.config.image_size == (64, 64)
    assert checkpointing.latest(tmp_path / "checkpoints").name == "step_8"
    with pytest.raises(FileExistsError, match="--resume"):  # never silently overwrite a run
        train(smoke(tmp_path, **{"optim.steps": 8}))


def test_finetune_with_frozen_parts_leaves_them_bit_identical(tmp_path):
    base = train(smoke(tmp_path / "base", **{"optim.steps": 1}))
    cfg = load_config(SMOKE, {"train.out_dir": str(tmp_path / "ft"), "optim.steps": 3, "train.checkpoint_every": 3})
    cfg.model.preset, cfg.model.checkpoint = None, str(base)
    cfg.train.freeze = ["vision_tower", "encoder"]
    modes = []
    final = train(cfg, callback=lambda step, model: modes.append((model.vision_tower.training, model.training)))
    assert modes == [(False, True)] * 3  # the frozen tower runs in eval mode (no drop-path), the rest trains

    before = fiore.load(base).model
    after = fiore.load(final).model
    frozen = trainable = 0
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters(), strict=True):
        if name.startswith(("model.vision_tower.", "model.language_model.encoder.")) and "embed_tokens" not in name:
            assert torch.equal(p0, p1), f"frozen {name} changed"
            frozen += 1
        elif not torch.equal(p0, p1):
            trainable += 1
    assert frozen > 10 and trainable > 10

    state = checkpointing.load_state(tmp_path / "ft" / "checkpoints" / "step_3")["optimizer"]
    n_trainable = sum(
        1
        for n, _ in after.named_parameters()
        if not n.startswith(("model.vision_tower.", "model.language_model.encoder.")) or "embed_tokens" in n
    )
    assert len(state["state"]) == n_trainable  # frozen parameters hold no optimizer state
    assert sum(len(g["params"]) for g in state["param_groups"]) == n_trainable


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path):
    # Dropout and drop-path on, so the RNG streams matter; the resumed run loads data in a worker process.
    over = {
        "optim.steps": 6,
        "train.checkpoint_every": 2,
        "model.text": {"dropout": 0.1, "max_position_embeddings": 256},
        "model.vision": {"drop_path_rate": 0.2},
    }
    a = tmp_path / "a"
    train(smoke(a, **over))

    b = tmp_path / "b"

    def crash(step, model):
        if step == 5:  # after the step-4 checkpoint: step 5 is lost and must be replayed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(smoke(b, **over), callback=crash)
    assert checkpointing.latest(b / "checkpoints").name == "step_4"
    train(smoke(b, **over, **{"data.num_workers": 1}), resume=True)

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps_b = [r["step"] for r in records(b) if "loss" in r]
    assert steps_b == list(range(1, 7))  # the lost step's record was dropped and written again once
    assert [r["loss"] for r in records(a) if "loss" in r] == [r["loss"] for r in records(b) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["synthetic", "dataset"])
def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, source):
    """2 ranks x grad_accum 2 read the same 4 micro-batches per step as 1 process x grad_accum 4, rank r taking
    micro-batches r and r+2: the ranks stay identical, and the run equals the single process's (which it could not
    if the ranks read the same samples)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = {"synthetic": "29517", "dataset": "29518"}[source]
    data = []
    if source == "dataset":  # read from disk: each rank takes its own shard of the shuffled stream
        from fiore.data.synthetic import write_dataset

        write_dataset(tmp_path / "data", 24, seed=4)
        data = ["--data", str(tmp_path / "data")]
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "fiore.cli", "train", str(SMOKE), "--set", f"train.out_dir={ddp_dir}", "--set", "optim.steps=3",
           "--set", "optim.grad_accum=2", *data]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [r["param_sha256"] for r in records(ddp_dir) if "param_sha256" in r]
    assert len(sums) == 1 and len(sums[0]) == 2 and sums[0][0] == sums[0][1]
    assert [r["step"] for r in records(ddp_dir) if "loss" in r] == [1, 2, 3]

    single = {"optim.steps": 3, "optim.grad_accum": 4}
    if source == "dataset":
        single["data.train"] = [{"path": str(tmp_path / "data")}]
    train(smoke(single_dir, **single))
    ddp_losses = [r["task_loss"] for r in records(ddp_dir) if "loss" in r]
    single_losses = [r["task_loss"] for r in records(single_dir) if "loss" in r]
    assert [sorted(d) for d in ddp_losses] == [sorted(d) for d in single_losses]
    for d, s in zip(ddp_losses, single_losses, strict=True):
        assert all(abs(d[k] - s[k]) <= 2e-4 for k in d), (d, s)  # logged to 4 decimals
    ddp_weights = load_file(ddp_dir / "final" / "model.safetensors")
    single_weights = load_file(single_dir / "final" / "model.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    for key in ddp_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-3, atol=1e-4, msg=key)


def test_ranks_read_disjoint_shards_that_together_are_the_single_process_batches():
    from fiore.train.mixture import MixtureDataset

    def positions(rank: int, world_size: int, micro_batches: int) -> list[list[int]]:
        ds = MixtureDataset([], samples=None, pixel_values=None, seed=0, images_per_batch=3, rank=rank,
                            world_size=world_size)  # fmt: skip
        return [ds.indices(k) for k in range(micro_batches)]

    rank0, rank1 = positions(0, 2, 4), positions(1, 2, 4)
    assert not set(sum(rank0, [])) & set(sum(rank1, []))
    # global micro-batch m of a 2-process run = micro-batches 2m and 2m + 1 of one process
    single = positions(0, 1, 8)
    assert [rank0[m] + rank1[m] for m in range(4)] == [single[2 * m] + single[2 * m + 1] for m in range(4)]


def _loss_inputs(vocab: int, lengths=(4, 7, 7, 7), B: int = 2, size: int = 64):
    """Rows of 2 tasks over B images; row r's target is lengths[r] tokens, the rest padding (-100)."""
    g = torch.Generator().manual_seed(0)
    R = len(lengths)
    labels = torch.randint(4, vocab, (R, max(lengths)), generator=g)
    for row, n in enumerate(lengths):
        labels[row, n:] = -100
    return (
        torch.randn(B, 3, size, size, generator=g),
        torch.arange(B).repeat_interleave(R // B),
        torch.randint(4, vocab, (R, 5), generator=g),
        torch.ones(R, 5, dtype=torch.bool),
        torch.cat([torch.full((R, 1), 2), labels[:, :-1].clamp_min(1)], dim=1),
        labels,
        torch.arange(R) % 2,
    )


def _smoke_model():
    from fiore.config import preset
    from fiore.model import FlorenceModel

    m = load_config(SMOKE).model
    cfg = preset("tiny").replace(text={**m.text, "vocab_size": 500}, vision=dict(m.vision), image_size=m.image_size)
    torch.manual_seed(0)
    return FlorenceModel(cfg).eval()  # eval: no dropout, so differently batched forwards are comparable


def _reference_loss(model, x, weights):
    """The multi-task loss written plainly: one padded forward per row, F.cross_entropy per task, sum_t w_t L_t /
    sum_t w_t."""
    pixel_values, image_index, input_ids, attention_mask, decoder_input_ids, labels, task_index = x
    logits = model(pixel_values[image_index], input_ids, decoder_input_ids, attention_mask)
    per_task = [
        F.cross_entropy(logits[task_index == t].flatten(0, 1), labels[task_index == t].flatten(), ignore_index=-100)
        for t in range(len(weights))
    ]
    w = torch.tensor(weights)
    return (w * torch.stack(per_task)).sum() / w.sum()


def test_length_groups_split_only_where_it_saves_decoder_work():
    from fiore.train.loss import length_groups

    assert length_groups([3] * 8, 4) == [8]  # equal lengths: nothing to save
    assert length_groups([2, 2, 2, 2, 30, 30, 30, 30], 4) == [4, 4]  # two lengths: two groups, not four
    assert length_groups([2, 2, 2, 2, 30, 30, 30, 30], 1) == [8]  # never more than asked
    # 3 groups pad to 3*3 + 3*6 + 2*40 = 107 tokens (x1.2 for two extra calls) against 4 groups' 104 (x1.3)
    assert length_groups([1, 2, 3, 4, 5, 6, 7, 40], 4) == [3, 3, 2]
    assert length_groups([4, 7, 7, 7], 3) == [4]


def test_grouped_decoding_and_gradient_checkpointing_give_the_plain_loss_and_gradients():
    from fiore.train.loss import MultiTaskLoss, length_groups

    weights = [1.0, 2.0]
    x = _loss_inputs(500, lengths=(2, 20, 3, 12, 5, 9), B=2)
    assert len(length_groups(sorted([2, 20, 3, 12, 5, 9]), 3)) == 3  # "grouped" really decodes 3 groups

    model = _smoke_model()
    reference = _reference_loss(model, x, weights)
    reference.backward()
    reference_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    for ckpt, groups in ((False, 1), (True, 1), (False, 3), (True, 3)):
        model = _smoke_model()
        model.set_gradient_checkpointing(ckpt)
        loss, loss_sum, tokens = MultiTaskLoss(model, weights, decode_groups=groups)(*x)
        loss.backward()
        assert tokens.tolist() == [2 + 3 + 5, 20 + 12 + 9, 0]  # real label tokens per task (+ no contrastive)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(grads, reference_grads, rtol=1e-4, atol=1e-6)


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtype of every matmul-like aten op (linear, mm, bmm, convolution, attention)."""

    def __init__(self):
        super().__init__()
        self.dtypes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(k in name for k in ("mm", "linear", "convolution", "attention")):
            self.dtypes[next(a.dtype for a in args if isinstance(a, torch.Tensor))] += 1
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_step_runs_its_matmuls_in_bf16_and_matches_fp32():
    from fiore.train.loss import MultiTaskLoss

    x = _loss_inputs(500, lengths=(2, 20, 3, 12, 5, 9))
    results = {}
    for precision in ("fp32", "bf16"):
        model = _smoke_model()
        with _MatmulDtypes() as seen:
            loss, _, _ = MultiTaskLoss(model, [1.0, 1.0], precision=precision)(*x)
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[precision] = (loss.detach(), grads, seen.dtypes)
    (loss32, grads32, dtypes32), (loss16, grads16, dtypes16) = results["fp32"], results["bf16"]
    assert set(dtypes32) == {torch.float32}
    assert set(dtypes16) == {torch.bfloat16} and sum(dtypes16.values()) >= 100, dtypes16  # forward and backward
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)  # bf16 keeps 8 bits of mantissa
    assert torch.isfinite(grads16).all()
    assert F.cosine_similarity(grads16, grads32, dim=0) > 0.99


@pytest.mark.slow
def test_cli_resume_with_checkpointing_bf16_and_val_every_through_the_whole_loop(tmp_path, monkeypatch):
    """`fiore train --resume` after a crash ends bit-identical to an unbroken run, with gradient checkpointing and
    bf16 autocast on and a held-out loss every 3 steps; the checkpointed blocks and bf16 matmuls really ran."""
    from typer.testing import CliRunner

    import fiore.cli
    from fiore.model import davit, text

    calls = collections.Counter()
    for module in (davit, text):
        real = module.checkpoint

        def counted(fn, *args, _real=real, _name=module.__name__, **kwargs):
            calls[_name] += 1
            return _real(fn, *args, **kwargs)

        monkeypatch.setattr(module, "checkpoint", counted)
    sets = {"optim.steps": "6", "train.checkpoint_every": "2", "train.val_every": "3", "train.precision": "bf16",
            "train.gradient_checkpointing": "true"}  # fmt: skip

    def cli(out: Path, *extra: str):
        args = ["train", str(SMOKE), "--set", f"train.out_dir={out}"]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        result = CliRunner().invoke(fiore.cli.app, [*args, *extra])
        assert result.exit_code == 0, result.output
        return result

    a, b = tmp_path / "a", tmp_path / "b"
    with _MatmulDtypes() as seen:
        cli(a)
    assert seen.dtypes[torch.bfloat16] > 10 * seen.dtypes[torch.float32], seen.dtypes  # autocast covered the run
    assert calls["fiore.model.davit"] > 0 and calls["fiore.model.text"] > 0

    def crash(step, model):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        over = dict(parse_override(f"{k}={v}") for k, v in sets.items())  # as the CLI reads them
        train(load_config(SMOKE, {"train.out_dir": str(b), **over}), callback=crash)
    assert checkpointing.latest(b / "checkpoints").name == "step_4"
    assert "final model" in cli(b, "--resume").output

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for run in (a, b):
        assert [r["step"] for r in records(run) if "val_loss" in r] == [3, 6]
        assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["val_loss"] for r in records(a) if "val_loss" in r] == [
        r["val_loss"] for r in records(b) if "val_loss" in r
    ]
