"""benchmarks/gpu_check.sh in its dry mode (CPU, tiny shapes: every step and file of the GPU run),
a run whose steps get no time, and the summary's verdicts on recorded figures."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

DRY_SHAPE = "256,1000,64,fp32"
DRY_CASES = {("fused", "tad"), ("fused", "forward_kl"), ("fused_step", "tad"),
             ("fused_step_bf16_wgrad", "tad"), ("matmul_floor", "none"),
             ("liger_fused_jsd", "forward_kl")}


def run_script(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    start = time.monotonic()
    proc = run_script(["--dry-run", str(out)])
    return proc, out, time.monotonic() - start


@pytest.mark.slow
def test_dry_run_writes_every_result(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.log", "loss_bench_256x1000x64.json", "pytest_cuda.xml",
        "pytest_cuda_recipe.xml", "recipe_bench.json", "summary.json"]
    assert seconds < 120, seconds
    log = (out / "gpu_check.log").read_text()
    assert "check complete" in log and log.strip().endswith(proc.stdout.strip().splitlines()[-1])

    rows = json.loads((out / "loss_bench_256x1000x64.json").read_text())
    assert {(r["impl"], r["divergence"]) for r in rows} == DRY_CASES
    for r in rows:
        assert (r["N"], r["V"], r["D"], r["dtype"]) == (256, 1000, 64, "fp32")
        if r["impl"] == "liger_fused_jsd":  # needs CUDA: a row with the reason, no figures
            assert r["ms"] is None and r["peak_mib"] is None and "CUDA" in r["note"], r
        else:
            assert r["ms"] > 0 and len(r["times_ms"]) == 2 and r["note"] == "", r
            assert isinstance(r["peak_mib"], float), r

    (recipe,) = json.loads((out / "recipe_bench.json").read_text())["rows"]
    assert (recipe["arch"], recipe["variant"], recipe["seq"], recipe["batch"]) == (
        "demo", "fused", 64, 2)
    assert recipe["recipe_tokens_per_second"] > 0 and recipe["minimal_tokens_per_second"] > 0

    # collected and skipped on a CPU: every test of tests/test_cuda.py, none run; the recipe's
    # in a run of its own
    recipe_only = gpu_check.read_junit([out / "pytest_cuda_recipe.xml"])
    assert recipe_only["tests"] == recipe_only["skipped"] == 1, recipe_only
    tests = gpu_check.read_junit([out / "pytest_cuda.xml", out / "pytest_cuda_recipe.xml"])
    assert tests["tests"] >= 20 and tests["skipped"] == tests["tests"], tests
    assert tests["failures"] == tests["errors"] == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["complete"] and summary["problems"] == []
    assert [s["name"] for s in summary["steps"]] == [
        "imports", "pytest", "pytest_recipe", "loss_1000", "recipe"]
    assert all(s["ok"] for s in summary["steps"])
    assert summary["tests"] == tests
    figures = summary["loss"][DRY_SHAPE]
    assert figures["head_over_floor"] > 0 and figures["fused_tad_over_fused_forward_kl"] > 0
    assert figures["liger_over_fused_forward_kl_time"] is None
    assert "CUDA" in figures["notes"]["liger_fused_jsd/forward_kl"]
    targets = {t["name"]: t for t in summary["targets"]}
    assert targets["recipe tokens/s"]["value"] == recipe["recipe_tokens_per_second"]
    assert targets["fused TAD head / matmul floor time"]["value"] == figures["head_over_floor"]
    assert all(t["value"] is not None and t["met"] is None for t in targets.values())


def test_steps_without_time_are_recorded_and_fail_the_check(tmp_path):
    """A budget of 0 s: no step starts, each is recorded as not run, the summary still runs,
    names what is missing, and the script exits non-zero."""
    out = tmp_path / "out"
    proc = run_script(["--dry-run", str(out)], GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["rc"], s["ok"]) for s in summary["steps"]] == [
        (name, 200, False) for name in ("imports", "pytest", "pytest_recipe", "loss_1000",
                                        "recipe")]
    assert not summary["complete"]
    assert "no pytest_cuda*.xml" in summary["problems"]
    assert "no figure for target: recipe tokens/s" in summary["problems"]
    assert "CHECK INCOMPLETE" in proc.stdout


# ----------------------------------------------------------------------------- the verdicts


def loss_row(impl, divergence, times, peak_mib, note=""):
    return dict(impl=impl, divergence=divergence, N=8192, V=256000, D=3584, dtype="bf16",
                ms=sorted(times)[len(times) // 2] if times else None, times_ms=times,
                peak_mib=peak_mib, note=note)


GRADIENTS_MIB = (256000 + 8192) * 3584 * 2 / 2**20  # bf16 [V, D] and [N, D]


def write_run(out: Path, *, head_times, head_peak, tokens_per_second, skipped=0):
    out.mkdir()
    rows = [loss_row("matmul_floor", "none", [100.0, 200.0, 100.0], 1000.0),
            loss_row("fused_step", "tad", head_times, head_peak),
            loss_row("fused", "forward_kl", [120.0, 240.0, 120.0], 2000.0),
            loss_row("liger_fused_jsd", "forward_kl", [180.0, 360.0, 180.0], 3000.0)]
    (out / "loss_bench_8192x256000x3584.json").write_text(json.dumps(rows))
    (out / "recipe_bench.json").write_text(json.dumps({"rows": [dict(
        arch="qwen2_5_3b_half", variant="fused_compiled", device="cuda:0", seq=2048, batch=4,
        recipe_tokens_per_second=tokens_per_second, mfu=0.4)]}))
    (out / "pytest_cuda.xml").write_text(
        f'<testsuites><testsuite name="pytest" tests="10" failures="0" errors="0" '
        f'skipped="{skipped}"/></testsuites>')
    steps = out / "steps.tsv"
    steps.write_text("pytest\t0\t50\t120\nrecipe\t0\t90\t170\n")
    return gpu_check.read_steps(steps)


def verdicts(summary):
    return {t["name"]: (t["value"], t["met"]) for t in summary["targets"]}


def test_targets_met_and_missed_at_their_limits(tmp_path):
    shape = "8192,256000,3584,bf16"
    # paired rounds: 1.5, 1.5, 1.5 (the slow middle round shared by both cases)
    steps = write_run(tmp_path / "met", head_times=[150.0, 300.0, 150.0],
                      head_peak=GRADIENTS_MIB + 2048.0, tokens_per_second=30_000.0)
    s = gpu_check.summarize(tmp_path / "met", steps, shape, dry_run=False)
    assert s["complete"], s["problems"]
    got = verdicts(s)
    assert got["recipe tokens/s"] == (30_000.0, True)
    assert got["fused TAD head / matmul floor time"] == (pytest.approx(1.5), True)
    assert got["fused TAD head memory beyond the gradients"] == (pytest.approx(2048.0), True)
    assert s["loss"][shape]["liger_over_fused_forward_kl_time"] == pytest.approx(1.5)
    assert s["loss"][shape]["liger_over_fused_forward_kl_memory"] == pytest.approx(1.5)

    steps = write_run(tmp_path / "missed", head_times=[151.0, 302.0, 151.0],
                      head_peak=GRADIENTS_MIB + 2049.0, tokens_per_second=29_999.0)
    s = gpu_check.summarize(tmp_path / "missed", steps, shape, dry_run=False)
    assert s["complete"]  # missed targets are results, not an incomplete check
    assert [met for _, met in verdicts(s).values()] == [False, False, False]


def test_a_skipped_cuda_test_makes_a_gpu_run_incomplete(tmp_path):
    steps = write_run(tmp_path / "run", head_times=[1.0], head_peak=1.0, tokens_per_second=1.0,
                      skipped=1)
    s = gpu_check.summarize(tmp_path / "run", steps, "8192,256000,3584,bf16", dry_run=False)
    assert s["problems"] == ["1 CUDA tests skipped on a GPU run"]
    assert gpu_check.summarize(tmp_path / "run", steps, "8192,256000,3584,bf16",
                               dry_run=True)["complete"]


def test_read_steps_marks_timeouts(tmp_path):
    path = tmp_path / "steps.tsv"
    path.write_text("a\t0\t3\t60\nb\t124\t60\t60\nc\t137\t70\t60\nd\t1\t2\t60\n")
    assert [(s["ok"], s["timed_out"]) for s in gpu_check.read_steps(path)] == [
        (True, False), (False, True), (False, True), (False, False)]


def test_installed_project_is_this_checkout():
    """The test environment's project (an editable install in CI) is this checkout, file for
    file, so check-install passes here."""
    assert gpu_check.installed_differences() == []


def test_a_checkout_that_differs_from_the_installed_project_is_named(tmp_path):
    """A checkout edited after its wheel was built (here: a copy of this one with an edited
    recipe and a new module) is named file by file."""
    import shutil

    for folder in ("tad_torchtune", "configs", "recipes"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (tmp_path / "recipes" / "tad_distill.py").write_text("# edited after the build\n")
    (tmp_path / "tad_torchtune" / "losses" / "new.py").write_text("")
    assert sorted(gpu_check.installed_differences(tmp_path)) == [
        "recipes/tad_distill.py: differs", "tad_torchtune/losses/new.py: missing"]
