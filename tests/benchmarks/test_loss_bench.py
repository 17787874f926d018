"""The benchmark's own arithmetic: paired time ratios and the matmul floor."""

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.losses import matmul_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import loss_bench  # noqa: E402


def test_paired_time_ratio_pairs_rounds():
    # round 2 was slow for both cases: the paired ratio ignores it, the ratio of medians does not
    a, b = [2.0, 20.0, 2.2], [1.0, 10.0, 1.0]
    assert loss_bench.paired_time_ratio(a, b) == pytest.approx(2.0)
    assert loss_bench.paired_time_ratio(a, b[:2]) == pytest.approx(2.2 / 5.5)


@pytest.mark.parametrize("chunk", [None, 48])
def test_matmul_floor_is_four_projection_matmuls(chunk):
    """The floor step does the student's and the teacher's projections and the student's two
    backward matmuls, 4 x 2 N V D flops (teacher width D_T for its own), and nothing else."""
    n, v, d = 1024 + 96, 300, 16
    inputs = loss_bench.make_inputs(n, v, d, torch.float32, "cpu")
    step = loss_bench.make_step("matmul_floor", "none", *inputs, fused_chunk=chunk)
    assert matmul_flops(step) == 4 * 2 * n * v * d


def test_beyond_gradients_subtracts_the_gradients_in_the_inputs_dtype():
    row = dict(peak_mib=300.0, N=2048, V=32000, D=512, dtype="fp32")
    assert loss_bench.beyond_gradients(row) == pytest.approx(300.0 - 62.5 - 4.0)
    row.update(dtype="bf16")
    assert loss_bench.beyond_gradients(row) == pytest.approx(300.0 - 31.25 - 2.0)
    assert loss_bench.beyond_gradients(dict(row, peak_mib=None)) is None


def test_peak_allocations_leave_out_a_matmul_workspace_and_count_its_output():
    """What a matmul kernel allocates and frees inside the op (oneDNN's packed bf16 operands on
    an AMX CPU: the memory tests counted 32.8 buffers there, 4.8 elsewhere) is not the loss's
    memory; the op's output is. A ``record_function`` named like the op stands in for a kernel
    with a workspace, so this holds on every CPU."""
    from torch.profiler import record_function

    mib = 2**20
    kept = []

    def step(workspace_mib: int):
        with record_function("aten::mm"):
            scratch = torch.empty(workspace_mib * mib, dtype=torch.uint8)
            out = torch.empty(mib, dtype=torch.uint8)  # the product, kept
            del scratch
        kept.append(out)
        tmp = torch.empty(2 * mib, dtype=torch.uint8)  # the caller's own buffer: counted
        del tmp

    plain = loss_bench.peak_allocated_bytes(lambda: step(0))
    assert plain == 3 * mib  # the kept output and the caller's buffer, live together
    assert loss_bench.peak_allocated_bytes(lambda: step(64)) == plain

    def outside(workspace_mib: int):  # the same buffer outside a matmul counts in full
        scratch = torch.empty(workspace_mib * mib, dtype=torch.uint8)
        del scratch

    assert loss_bench.peak_allocated_bytes(lambda: outside(64)) == 64 * mib


def test_cases_parse_and_name_what_is_accepted():
    assert loss_bench.parse_case("fused_step/tad") == ("fused_step", "tad")
    assert loss_bench.parse_case("matmul_floor/none") == ("matmul_floor", "none")
    assert loss_bench.parse_case("liger_fused_jsd/forward_kl") == ("liger_fused_jsd", "forward_kl")
    with pytest.raises(ValueError, match=r"DIVERGENCE one of \['forward_kl'\], got 'liger"):
        loss_bench.parse_case("liger_fused_jsd/tad")
    with pytest.raises(ValueError, match="got 'fused'"):
        loss_bench.parse_case("fused")


def test_liger_case_on_cpu_is_reported_unavailable_not_run():
    """On a CPU the Liger case is a row with the reason and no time, next to cases that ran."""
    got = loss_bench.measure_times([("liger_fused_jsd", "forward_kl"), ("matmul_floor", "none")],
                                   (64, 50, 8, "fp32"), "cpu", warmup=0, repeats=2)
    liger = got["liger_fused_jsd/forward_kl"]
    assert liger["ms"] is None and liger["times_ms"] == [] and liger["unavailable"]
    assert "CUDA only" in liger["note"]
    assert got["matmul_floor/none"]["ms"] > 0 and len(got["matmul_floor/none"]["times_ms"]) == 2
    memory = loss_bench.measure_memory("liger_fused_jsd", "forward_kl", (64, 50, 8, "fp32"), "cpu")
    assert memory == {"peak_mib": None, "note": liger["note"]}
