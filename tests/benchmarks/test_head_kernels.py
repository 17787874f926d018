"""benchmarks/head_kernels.py: its op counter on a known sequence, its reading of Triton kernels
on known ones, and its tables at a tiny chunk against the bytes any implementation must move and
the eager op-by-op bytes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import head_kernels  # noqa: E402

from tests.helpers.triton_code import TRITON_GRAPH, TRITON_GRAPH_DYNAMIC  # noqa: E402


def test_op_counter_counts_the_big_tensors_of_each_op_and_skips_matmuls_and_views():
    x = torch.randn(8, 100)
    w = torch.randn(100, 100)
    few, every = (torch.zeros(8, k, dtype=torch.long) for k in (3, 100))
    counter = head_kernels._CountOps(big=400)
    with counter:
        y = x.exp()  # reads x, writes y: 2 buffers
        y.t()  # a view: nothing moves
        y @ w  # a matmul: not element-wise work
        y.mul_(2.0)  # reads and writes y
        y.sum(-1)  # reads y; its (8,) output is small
        y.gather(-1, few)  # 24 entries of y: small
        y.gather(-1, every)  # the index, the entries read, the output
    buffer = 8 * 100 * 4
    assert [(op, b / buffer) for op, b, _ in counter.ops] == [
        ("aten.exp.default", 2.0), ("aten.mul_.Tensor", 2.0), ("aten.sum.dim_IntList", 1.0),
        ("aten.gather.default", 4.0)]  # the int64 index 2 buffers, the values read and written


def test_graph_traffic_reads_the_kernels_as_a_gpu_runs_them():
    """Each loop reads its inputs again; an address repeated within a loop counts once (a row's
    id read in every iteration, a ``[V]`` vector broadcast over rows); a load through a loaded
    index counts once per distinct value of what it depends on (the row's id: once per row);
    the library calls are listed in launch order."""
    kernels = head_kernels.graph_traffic(TRITON_GRAPH)
    assert [(k["kind"], k["name"]) for k in kernels] == [
        ("triton", "triton_red_fused_0"), ("extern", "torch.ops.aten.topk.default"),
        ("triton", "triton_poi_fused_1"), ("extern", "aten.scatter_reduce_.two")]
    red, poi = kernels[0], kernels[2]
    assert (red["xnumel"], red["rnumel"], red["loops"], red["persistent"]) == (4, 100, 2, False)
    # the row ids (4 x 8 bytes); the logits twice (2 x 400 x 2); the gather at the ids, 4 x 2
    assert red["read"] == 4 * 8 + 2 * 400 * 2 + 4 * 2
    assert red["written"] == 400 * 4 + 4 * 4
    assert (poi["xnumel"], poi["rnumel"], poi["loops"]) == (400, 0, 0)
    assert poi["read"] == 400 * 4 + 4 * 4 + 100 * 4 and poi["written"] == 400 * 2


INDIRECT_KERNEL = """
    triton_meta={'signature': {'in_ptr0': '*fp32', 'in_ptr1': '*i64', 'in_ptr2': '*i64', \
'out_ptr0': '*fp32', 'xnumel': 'i32', 'XBLOCK': 'constexpr'}, 'device': 'cuda'},
@triton.jit
def triton_poi_fused_0(in_ptr0, in_ptr1, in_ptr2, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 600
    xoffset = tl.program_id(0) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)[:]
    xmask = xindex < xnumel
    x1 = xindex // 100
    x2 = xindex
    tmp0 = tl.load(in_ptr1 + (x1), xmask, eviction_policy='evict_last')
    tmp1 = tl.full([1], 100, tl.int64)
    tmp2 = tmp0 + tmp1
    tmp3 = tl.where(tmp0 < 0, tmp2, tmp0)
    tmp4 = tl.load(in_ptr0 + (tmp3 + 100*x1), xmask, eviction_policy='evict_last')
    tmp5 = tl.load(in_ptr2 + (x2), xmask)
    tmp6 = tl.load(in_ptr0 + (tmp5), xmask)
    tmp7 = tl.sum(tmp4, 0)
    tmp8 = tl.load(in_ptr0 + (tmp7 + x1), xmask)
    tl.store(out_ptr0 + (x2), tmp4 + tmp6 + tmp8, xmask)
"""


def test_kernel_traffic_counts_an_indirect_access_by_what_its_address_depends_on():
    """Through a row's id (wrapped as inductor wraps negative ids): once per row, 6 x 4 bytes;
    through an id per element: once per element, 600 x 4; through a reduction's result: not
    known, once per element."""
    traffic = head_kernels.kernel_traffic(INDIRECT_KERNEL)
    ids = 6 * 8 + 600 * 8  # the row ids, the element ids
    assert traffic["read"] == ids + 6 * 4 + 600 * 4 + 600 * 4
    assert traffic["written"] == 600 * 4


def test_graph_traffic_reads_a_dynamic_graph_at_the_rows_given():
    """A graph of a dynamic row count, read for 4 rows, moves what the static graph of 4 rows
    moves; its sizes come from the launches and the ``call`` (a split sum over 2 parts of
    ``(1 + 4) // 2`` rows); without the rows it cannot be read."""
    static = head_kernels.graph_traffic(TRITON_GRAPH)
    dynamic = head_kernels.graph_traffic(TRITON_GRAPH_DYNAMIC, rows=4)
    assert dynamic[:4] == static
    split = dynamic[4]
    assert (split["name"], split["xnumel"], split["rnumel"], split["loops"]) == (
        "triton_red_fused_sum_2", 2, 2, 1)
    assert split["read"] == 4 * 4 and split["written"] == 2 * 4
    with pytest.raises(ValueError, match="dynamic size"):
        head_kernels.graph_traffic(TRITON_GRAPH_DYNAMIC)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="the triton package generates the GPU's code (the test extras')")
def test_triton_table_at_a_tiny_chunk(tmp_path):
    """What inductor generates for a GPU, read on this CPU: the CE reads a row of logits twice
    (its log-sum-exp in one loop, inductor's online softmax) and writes the gradient once; CE +
    TAD in two loops over the student's logits after the two of the teacher's split (its two
    ``topk`` library calls between them); CE + DRKL moves what CE + reverse KL moves (its
    non-target log ratio recomputed, not stored: ``gpu_inductor_options``); every figure at
    least the minimum."""
    out = tmp_path / "head_kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "head_kernels.py"),
                           "--backend", "triton", "--chunk", "16", "--vocab", "4096",
                           "--hidden", "8", "--dtype", "bfloat16", "--divergences", "tad", "ce",
                           "drkl", "reverse_kl",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["divergence"]: r for r in json.loads(out.read_text())}
    ce, tad = rows["ce"]["compiled"], rows["tad"]["compiled"]
    assert ce["loops"] == 2 and 1.5 <= ce["passes"] < 1.55, ce
    # the teacher's block maxima and tail, the student's tail log-sum-exp, the gradient; the
    # top-K set computed in each loop that reads it (3.8 passes with it stored as a bool mask)
    assert tad["external"] == 2 and tad["loops"] == 4 and 3.0 <= tad["passes"] < 3.5, tad
    drkl, rkl = rows["drkl"]["compiled"], rows["reverse_kl"]["compiled"]
    assert drkl["loops"] == rkl["loops"] == 3, (drkl, rkl)
    assert 3.5 <= rkl["passes"] < 3.55 and drkl["passes"] < rkl["passes"] + 0.05, (drkl, rkl)
    for r in rows.values():
        assert r["backend"] == "triton" and r["compiled"]["passes"] >= r["min_passes"]
    assert "Triton code for a GPU" in proc.stdout


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
