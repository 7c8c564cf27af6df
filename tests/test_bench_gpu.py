"""benchmarks/bench_gpu.py on the CPU, a few tokens of the tiny layout: the script a lent GPU runs is checked here
first (its loading, cases, token comparison and report), so the device's minutes go to measuring."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from reference_files import TOKENIZER_DIR, needs_tokenizer_files

pytest.importorskip("transformers", reason="transformers is the benchmark's reference side (dev dependency)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


@needs_tokenizer_files
def test_bench_gpu_runs_every_side_on_the_cpu_with_transformers_tokens(capsys):
    argv = ["--device", "cpu", "--dtype", "float32", "--presets", "tiny", "--batches", "1,2", "--tasks", "od"]
    results = bench_gpu.main([*argv, "--new-tokens", "6", "--repeats", "1", "--tokenizer", str(TOKENIZER_DIR)])
    assert set(results) == {("tiny", "od", 1), ("tiny", "od", 2)}
    for result in results.values():
        assert set(result["images_per_s"]) == set(bench_gpu.SIDES)
        # float32 on the CPU: both fiore sides (plain and compiled, static cache) decode transformers' tokens
        assert result["agreement"] == {"fiore": "tokens identical", "fiore+compiled": "tokens identical"}
    out = capsys.readouterr().out
    assert "tiny  od       batch  2:" in out and "targets: not measured" in out
