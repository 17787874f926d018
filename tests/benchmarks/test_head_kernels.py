"""benchmarks/head_kernels.py: its op counter on a known sequence, and its table at a tiny chunk
against the bytes any implementation must move and the eager op-by-op bytes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import head_kernels  # noqa: E402


def test_op_counter_counts_the_big_tensors_of_each_op_and_skips_matmuls_and_views():
    x = torch.randn(8, 100)
    w = torch.randn(100, 100)
    counter = head_kernels._CountOps(big=400)
    with counter:
        y = x.exp()  # reads x, writes y: 2 buffers
        y.t()  # a view: nothing moves
        y @ w  # a matmul: not element-wise work
        y.mul_(2.0)  # reads and writes y
        y.sum(-1)  # reads y; its (8,) output is small
    buffer = 8 * 100 * 4
    assert [(op, b / buffer) for op, b, _ in counter.ops] == [
        ("aten.exp.default", 2.0), ("aten.mul_.Tensor", 2.0), ("aten.sum.dim_IntList", 1.0)]


@pytest.mark.slow
@pytest.mark.parametrize("options,names", [
    ((), ["tad", "forward_kl", "ce"]),
    (("--cache", "sampled", "--dtype", "bfloat16", "--divergences", "tad"), ["tad"]),
])
def test_table_at_a_tiny_chunk(tmp_path, options, names):
    """In a process of its own (the head's compiled function must be made by the measurement):
    every count present, at least the bytes a chunk must move, and inductor's kernels moving at
    most what the same function moves op by op; from a cache in bf16 too."""
    out = tmp_path / "head_kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "head_kernels.py"),
                           "--chunk", "32", "--vocab", "256", "--hidden", "8", "--json", str(out),
                           *options], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["divergence"] for r in rows] == names
    for r in rows:
        c, e = r["compiled"], r["eager"]
        reads_teacher = r["divergence"] != "ce" and r["cache"] == "none"
        assert r["min_passes"] == (3 if reads_teacher else 2) * (0.5 if options else 1.0)
        assert c["kernels"] >= 1 and c["loops"] >= c["kernels"] > c["external"] >= 0, r
        for passes in (c["passes"], c["loop_passes"], e["passes"], r["compiled_head_passes"]):
            assert passes >= r["min_passes"], r
        assert c["bytes"] <= e["compiled_fn_bytes"], r  # fusion never moves more
        assert e["ops"] == e["compiled_fn_ops"] + e["outside_ops"] == len(e["op_list"])
        assert r["compiled_head_passes"] == pytest.approx(
            c["loop_passes"] + e["outside_passes"])
    assert all(f"| {name} |" in proc.stdout for name in names)
