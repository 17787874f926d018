"""The benchmark's own arithmetic: paired time ratios, the matmul floors, memory in the timing
process; Liger's loss and its stand-in against our fused head."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.benchmarks import main_stopped_while_profiling
from tests.helpers.losses import count_teacher_projections, matmul_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import loss_bench  # noqa: E402


def test_paired_time_ratio_pairs_rounds():
    # round 2 was slow for both cases: the paired ratio ignores it, the ratio of medians does not
    a, b = [2.0, 20.0, 2.2], [1.0, 10.0, 1.0]
    assert loss_bench.paired_time_ratio(a, b) == pytest.approx(2.0)
    assert loss_bench.paired_time_ratio(a, b[:2]) == pytest.approx(2.2 / 5.5)


@pytest.mark.parametrize("impl,chunk", [("matmul_floor", None), ("matmul_floor", 48),
                                        ("matmul_floor_unchunked", None)])
def test_matmul_floor_is_four_projection_matmuls(impl, chunk):
    """The floor step does the student's and the teacher's projections and the student's two
    backward matmuls, 4 x 2 N V D flops (teacher width D_T for its own), and nothing else;
    unchunked, in four calls."""
    from torch.utils.flop_counter import FlopCounterMode

    n, v, d = 1024 + 96, 300, 16
    inputs = loss_bench.make_inputs(n, v, d, torch.float32, "cpu")
    step = loss_bench.make_step(impl, "none", *inputs, fused_chunk=chunk)
    assert matmul_flops(step) == 4 * 2 * n * v * d
    if impl == "matmul_floor_unchunked":
        with FlopCounterMode(display=False) as counter:
            step()
        assert sum(counter.get_flop_counts()["Global"].values()) == 4 * 2 * n * v * d
        assert set(counter.get_flop_counts()["Global"]) == {torch.ops.aten.mm}


def test_memory_in_the_timing_process_counts_the_step_buffers():
    """``measure_times(memory=True)`` on a CPU: the unchunked floor's peak is its two live
    ``[N, V]`` products (the student's, kept, and the teacher's) plus at most its two gradient
    products; a case that is not available has no figure."""
    n, v, d = 512, 700, 24
    got = loss_bench.measure_times([("matmul_floor_unchunked", "none"),
                                    ("liger_fused_jsd_ce", "forward_kl")],
                                   (n, v, d, "fp32"), "cpu", warmup=0, repeats=1, memory=True,
                                   liger_stand_in=True)
    peak = got["matmul_floor_unchunked/none"]["peak_mib"] * 2**20
    assert 2 * n * v * 4 <= peak <= (2 * n * v + n * d + v * d) * 4, peak
    assert got["liger_fused_jsd_ce/forward_kl"]["peak_mib"] >= n * v * 4 / 2**20


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
    assert loss_bench.parse_case("matmul_floor_unchunked/none") == ("matmul_floor_unchunked",
                                                                     "none")
    assert loss_bench.parse_case("liger_fused_jsd/forward_kl") == ("liger_fused_jsd", "forward_kl")
    for impl in ("liger_fused_jsd", "liger_fused_jsd_ce"):
        with pytest.raises(ValueError, match=r"DIVERGENCE one of \['forward_kl'\], got 'liger"):
            loss_bench.parse_case(f"{impl}/tad")
    with pytest.raises(ValueError, match="got 'fused'"):
        loss_bench.parse_case("fused")


def test_recipe_head_case_runs_the_gpu_configs_settings():
    """``fused_step_recipe`` is the head with the GPU configs' settings (Qwen2.5's and Gemma2's
    alike), compiled, whatever ``--fused-chunk`` says: one chunk of ``loss_chunk_size`` here
    (two student projections of N rows for the forward and one gradient product; no second
    chunk)."""
    import yaml

    from tad_torchtune.schema import DISTILL

    root = Path(__file__).resolve().parents[2] / "configs"
    qwen, gemma = (yaml.safe_load((root / f"{name}.yaml").read_text())
                   for name in ("qwen2_5_3b_to_half", "gemma2_9b_to_third"))
    keys = ("loss_chunk_size", "fused_teacher_cache_mib", "fused_float32_weight_grad")
    assert {k: qwen[k] for k in keys} == {k: gemma[k] for k in keys} == {
        "loss_chunk_size": 1024, "fused_teacher_cache_mib": None,
        "fused_float32_weight_grad": False}
    assert loss_bench.RECIPE_HEAD == {"chunk_size": 1024, "compile_chunks": True,
                                      "teacher_cache_mib": None, "float32_weight_grad": False}
    loss_bench.set_compile_backend("eager")
    try:
        n = DISTILL["loss_chunk_size"].default
        inputs = loss_bench.make_inputs(n, 40, 8, torch.float32, "cpu")
        calls = []
        from torch.utils._python_dispatch import TorchDispatchMode

        class Rows(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default):
                    calls.append(args[-2].shape[0] if func is torch.ops.aten.addmm_.default
                                 else args[0].shape[0])
                return func(*args, **(kwargs or {}))

        step = loss_bench.make_step("fused_step_recipe", "forward_kl", *inputs, fused_chunk=16)
        with Rows():
            step()
        assert calls and set(calls) <= {n, 40}, calls  # chunks of n rows, never 16
    finally:
        loss_bench.set_compile_backend("inductor")
    assert torch.compile is loss_bench._TORCH_COMPILE


def test_liger_cases_without_liger_kernel_are_unavailable_or_a_stand_in(monkeypatch):
    """Without liger-kernel a Liger case is a row with the reason and no time, next to cases
    that ran; with ``liger_stand_in`` it runs ``LigerStandIn`` and says so."""
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # import fails
    cases = [("liger_fused_jsd_ce", "forward_kl"), ("matmul_floor", "none")]
    got = loss_bench.measure_times(cases, (64, 50, 8, "fp32"), "cpu", warmup=0, repeats=2)
    liger = got["liger_fused_jsd_ce/forward_kl"]
    assert liger["ms"] is None and liger["times_ms"] == [] and liger["unavailable"]
    assert "liger-kernel does not import" in liger["note"]
    assert got["matmul_floor/none"]["ms"] > 0 and len(got["matmul_floor/none"]["times_ms"]) == 2
    memory = loss_bench.measure_memory("liger_fused_jsd_ce", "forward_kl", (64, 50, 8, "fp32"),
                                       "cpu")
    assert memory == {"peak_mib": None, "note": liger["note"]}
    got = loss_bench.measure_times(cases, (64, 50, 8, "fp32"), "cpu", warmup=0, repeats=2,
                                   liger_stand_in=True)
    liger = got["liger_fused_jsd_ce/forward_kl"]
    assert liger["ms"] > 0 and liger["stand_in"] and "stand-in" in liger["note"]
    assert "stand_in" not in got["matmul_floor/none"]


def liger_case(seed: int = 0):
    """Rows of 33 tokens (the first 3 ignored) of a 123-word vocabulary, teacher width 12."""
    gen = torch.Generator().manual_seed(seed)
    n, v, d, d_t = 66, 123, 8, 12
    h_s = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w_s = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    h_t = torch.randn(n, d_t, generator=gen, dtype=torch.float64) * 1.5
    w_t = torch.randn(v, d_t, generator=gen, dtype=torch.float64) / d_t**0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[:3] = labels[33:36] = -100
    return h_s, w_s, h_t, w_t, labels


def grads_of(loss_fn, h_s, w_s, h_t, w_t, labels):
    h_s, w_s = (x.clone().requires_grad_(True) for x in (h_s, w_s))
    loss = loss_fn(h_s, w_s, h_t, w_t, labels)
    loss.backward()
    return loss.detach(), h_s.grad, w_s.grad


@pytest.mark.parametrize("ce", [True, False])
def test_liger_stand_in_is_our_fused_head(ce):
    """``LigerStandIn`` (CE + forward KL, or forward KL alone) is our fused head's CE + forward
    KL over the valid tokens, value and gradients, in float64."""
    from tad_torchtune.losses import ForwardKLLoss
    from tad_torchtune.losses.fused import fused_head

    case = liger_case()

    def ours(h_s, w_s, h_t, w_t, labels):
        out = fused_head(h_s, w_s, labels, divergence=ForwardKLLoss(), teacher_hidden=h_t,
                         teacher_weight=w_t, ce_weight=float(ce), compute_ce=ce)
        return out.objective / out.num_tokens

    stand_in = loss_bench.LigerStandIn(weight_hard_loss=float(ce), weight_soft_loss=1.0)
    for got, want in zip(grads_of(stand_in, *case), grads_of(ours, *case)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ce", [True, False])
def test_liger_on_cpu_is_its_stand_in(ce):
    """Where liger-kernel is installed (not in CI: its wheel requires triton), its chunked loss
    runs on a CPU and computes what ``LigerStandIn`` computes, value and gradients (float64
    inputs; Liger's CE and its loss sums are float32: float32 tolerances)."""
    pytest.importorskip("liger_kernel.chunked_loss")
    case = liger_case(1)
    liger = loss_bench.liger_jsd_loss("cpu", ce=ce, compiled=False)
    stand_in = loss_bench.LigerStandIn(weight_hard_loss=float(ce), weight_soft_loss=1.0)
    (loss, *grads), (want_loss, *want_grads) = grads_of(liger, *case), grads_of(stand_in, *case)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_recipe_head_variants_change_one_setting_each(monkeypatch):
    """The variants that check the GPU configs' head settings change one each: the schema's
    default teacher cache, the float32 weight-gradient sum, half and twice the chunk. The
    recipe's head
    projects the teacher once per chunk of 1024 rows, where a cache too small for a chunk
    projects it twice, and the double chunk once per 2048 rows where a row of the batch (the
    teacher projections kept) holds 2048 tokens (no chunk crosses a row). On such a row the
    recipe's head projects each chunk once, and a cache of one chunk's projections one of the
    two again."""
    from tad_torchtune.schema import DISTILL

    head = loss_bench.RECIPE_HEAD
    assert loss_bench.FUSED_OPTIONS["fused_step_recipe_default_cache"] == {
        **head, "teacher_cache_mib": DISTILL["fused_teacher_cache_mib"].default}
    assert loss_bench.FUSED_OPTIONS["fused_step_recipe_fp32_wgrad"] == {
        **head, "float32_weight_grad": True}
    assert loss_bench.FUSED_OPTIONS["fused_step_recipe_half_chunk"] == {
        **head, "chunk_size": 512}
    assert loss_bench.FUSED_OPTIONS["fused_step_recipe_double_chunk"] == {
        **head, "chunk_size": 2048}
    assert loss_bench.FUSED_OPTIONS["fused_step_recipe_chunk_cache"] == {
        **head, "teacher_cache_mib": loss_bench.ONE_CHUNK}
    loss_bench.set_compile_backend("eager")
    try:
        n = 2 * head["chunk_size"]  # two rows of 1024 tokens, a chunk each
        inputs = loss_bench.make_inputs(n, 40, 8, torch.float32, "cpu")
        for case, cache_mib, projections in (
                ("fused_step_recipe", None, [1024, 1024]), ("fused_step_probe", 0, [1024] * 4),
                ("fused_step_recipe_half_chunk", None, [512] * 4),
                ("fused_step_recipe_double_chunk", None, [2048]),
                ("fused_step_recipe", None, [1024, 1024]),
                ("fused_step_recipe_chunk_cache", None, [1024, 1024, 1024])):
            if case.endswith("double_chunk"):  # from here on, one row of 2048 tokens
                monkeypatch.setattr(loss_bench, "ROW_TOKENS", 2048)
                inputs = loss_bench.make_inputs(n, 40, 8, torch.float32, "cpu")
                assert inputs[0].shape[:2] == (1, 2048)
            with monkeypatch.context() as patch:
                rows = count_teacher_projections(patch, inputs[3])
                patch.setitem(loss_bench.FUSED_OPTIONS, "fused_step_probe",
                              {**head, "teacher_cache_mib": cache_mib})
                loss_bench.make_step(case, "tad", *inputs)()
            assert rows == projections, (case, rows)
    finally:
        loss_bench.set_compile_backend("inductor")


@pytest.mark.parametrize("module", ["loss_bench", "recipe_bench", "cache_fidelity"])
def test_benchmarks_import_the_installed_project(module):
    """Where the project is installed (the GPU check installs its wheel; CI, editable), a
    benchmark imports it, not the checkout: the checkout's ``tad_torchtune/`` has no
    ``configs`` subpackage (only an install maps ``configs/`` there), so the recipe benchmark's
    GPU pairs, which read their shipped configs, failed with the checkout first on the path."""
    root = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path.insert(0, {str(root / 'benchmarks')!r}); import {module}; "
            f"assert {str(root)!r} not in sys.path, sys.path; "
            "from tad_torchtune.cli import shipped_configs; assert shipped_configs()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_row_length_below_one_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, str(Path(loss_bench.__file__)), "--row-tokens", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "loss_bench.py: error: argument --row-tokens: must be >= 1, got 0")


def test_profile_needs_the_timing_process_and_measured_cases():
    """``--profile`` is refused in one line where the times come from a subprocess (CPU peak
    RSS) and for a case that is not measured."""
    script = str(Path(loss_bench.__file__))
    for extra, message in (
            ([], "argument --profile: on a CPU it needs --cpu-memory allocations (the profile "
                 "is taken in the timing process)"),
            (["--cpu-memory", "allocations", "--profile", "matmul_floor/none", "fused/tad"],
             "argument --profile: fused/tad must be among the measured cases: "
             "matmul_floor/none")):
        proc = subprocess.run(
            [sys.executable, script, "--device", "cpu", "--cases", "matmul_floor/none",
             *(extra or ["--profile"])], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"loss_bench.py: error: {message}"


def test_profiled_rows_carry_where_their_step_s_time_goes(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(Path(loss_bench.__file__)), "--device", "cpu", "--shapes",
         "512,300,32,fp32", "--cases", "matmul_floor/none", "fused_step/forward_kl",
         "--row-tokens", "256", "--warmup", "1", "--repeats", "1", "--cpu-memory",
         "allocations", "--profile", "matmul_floor/none", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert "profile" not in rows["fused_step"]
    profile = rows["matmul_floor"]["profile"]
    # the chunked floor: four products per chunk of default_chunk_size tokens, nothing else
    chunks = -(-512 // loss_bench.default_chunk_size(512, 300, 32, "cpu"))
    matmuls = sum(x["calls"] for x in profile["top"] if x["kind"] == "matmul")
    assert matmuls == 4 * chunks, profile["top"]


def test_rows_are_saved_before_their_cases_are_profiled(tmp_path, monkeypatch):
    """A run stopped while profiling (the GPU check's step cap) keeps the rows it measured."""
    out = tmp_path / "rows.json"
    main_stopped_while_profiling(loss_bench, [
        "loss_bench.py", "--device", "cpu", "--shapes", "256,100,16,fp32", "--cases",
        "matmul_floor/none", "fused_step/forward_kl", "--row-tokens", "128", "--warmup", "0",
        "--repeats", "1", "--cpu-memory", "allocations", "--profile", "--json", str(out)],
        monkeypatch)
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["ms"] > 0, "profile" in r) for r in rows] == [
        ("matmul_floor", True, False), ("fused_step", True, False)]
