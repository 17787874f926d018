"""benchmarks/gpu_check.sh in its dry mode (CPU, stand-in sizes: every step, option and file of
the GPU run), a run whose steps get no time, and the summary's verdicts on recorded figures."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tad_torchtune import profiling

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import head_kernels  # noqa: E402

DRY_SHAPES = ["2048,1000,64,fp32", "2048,1536,96,fp32"]
DRY_ARCHS = ["tiny_qwen2", "tiny_gemma2"]
GPU_SHAPES = ["8192,151936,2048,bf16", "8192,256000,3584,bf16"]
CASES = {("fused_step_recipe", "tad"), ("fused_step_recipe", "forward_kl"), ("fused_step", "tad"),
         ("fused_step_recipe_default_cache", "tad"), ("fused_step_recipe_fp32_wgrad", "tad"),
         ("fused_step_recipe_chunk_cache", "tad"),
         ("matmul_floor_unchunked", "none"), ("liger_fused_jsd_ce", "forward_kl")}
#: the targets of issue 19, by name: the summary must name exactly these, dry or not
TARGET_NAMES = {f"{name} ({shape})" for shape in GPU_SHAPES for name in (
    "vs Liger time", "vs Liger memory", "CE + forward KL vs Liger time", "unchunked floor")} | {
    "vs transformers + Liger (qwen2_5_3b_half)", "MFU (qwen2_5_3b_half)",
    "vs transformers + Liger (gemma2_9b_third_short)"}
STEPS = ["imports", "loss", "recipe_qwen2_5_3b_half", "recipe_gemma2_9b_third_short", "pytest",
         "pytest_recipe", "loss_chunk"]
#: the loss cases profiled (one step each): the targets' cases
PROFILED = {("fused_step_recipe", "tad"), ("fused_step_recipe", "forward_kl"),
            ("matmul_floor_unchunked", "none"), ("liger_fused_jsd_ce", "forward_kl")}
#: the optional step's cases: the recipe's head at loss_chunk_size and at twice it
CHUNK_CASES = {("fused_step_recipe", "tad"), ("fused_step_recipe_half_chunk", "tad"),
               ("fused_step_recipe_double_chunk", "tad")}
LIGER_INSTALLED = importlib.util.find_spec("liger_kernel") is not None


def run_script(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    start = time.monotonic()
    proc = run_script(["--dry-run", str(out)])
    return proc, out, time.monotonic() - start


def paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


@pytest.mark.slow
def test_dry_run_writes_every_result(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.log", "inductor_code", "loss_bench.json", "loss_chunk.json", "pytest_cuda.xml",
        "pytest_cuda_recipe.xml", "recipe_bench_tiny_gemma2.json", "recipe_bench_tiny_qwen2.json",
        "summary.json"]
    assert not list((out / "inductor_code").iterdir())  # Dynamo's eager backend: no code
    assert seconds < 150, seconds  # about 60-80 s on the 2-core development machine
    log = (out / "gpu_check.log").read_text()
    assert "check complete" in log and log.strip().endswith(proc.stdout.strip().splitlines()[-1])

    rows = json.loads((out / "loss_bench.json").read_text())
    assert sorted((r["impl"], r["divergence"], f"{r['N']},{r['V']},{r['D']},{r['dtype']}")
                  for r in rows) == sorted((*c, s) for c in CASES for s in DRY_SHAPES)
    # one row of 2048 tokens at each stand-in shape: the recipe head runs its first chunk (1024)
    # in halves while the second is kept, as on the GPU's rows
    assert {r["row_tokens"] for r in rows} == {2048}
    for step in ("loss", "loss_chunk"):  # on a GPU: rows of the configs' max_seq_len
        (line,) = [ln for ln in log.splitlines() if ln.startswith(f"== {step} (at most")]
        assert " --row-tokens 2048 " in line, line
    for r in rows:  # every case ran, Liger's too (a stand-in where it is not installed)
        assert r["ms"] > 0 and len(r["times_ms"]) == 2 and r["peak_mib"] > 0, r
        stand_in = r["impl"] == "liger_fused_jsd_ce" and not LIGER_INSTALLED
        assert r["stand_in"] == stand_in and ("stand-in" in r["note"]) == stand_in, r
        # the targets' cases profiled once more, after the timed steps
        assert ("profile" in r) == ((r["impl"], r["divergence"]) in PROFILED), r["impl"]
        if "profile" in r:
            p = r["profile"]
            assert p["device"] == "cpu" and p["kernels"] > 0 and p["busy_ms"] > 0, p
            assert set(p["kinds_ms"]) == {k for k, _ in profiling.KINDS} | {"other"}
        if r["impl"] == "matmul_floor_unchunked":  # four products and nothing else
            assert r["profile"]["kinds_ms"]["matmul"] > 0.9 * r["profile"]["busy_ms"], r

    recipes = {}
    for arch, loops in zip(DRY_ARCHS, (["recipe", "minimal", "peer", "peer_eager"],
                                       ["recipe", "peer"])):
        (row,) = json.loads((out / f"recipe_bench_{arch}.json").read_text())["rows"]
        recipes[arch] = row
        assert (row["arch"], row["variant"], row["seq"], row["batch"]) == (
            arch, "fused_compiled", 64, 2)
        assert list(row["loops"]) == loops
        tokens = row["batch"] * (row["seq"] - 1)
        recipe_times = row["loops"]["recipe"]["step_times"]
        for name, loop in row["loops"].items():
            assert len(loop["step_times"]) == 2
            assert loop["tokens_per_second"] == pytest.approx(
                tokens / statistics.median(loop["step_times"]))
            if name != "recipe":
                assert row[f"recipe_over_{name}"] == pytest.approx(
                    paired(loop["step_times"], recipe_times))
        assert row["peer"]["attention"] == ("eager" if arch == "tiny_gemma2" else "sdpa")
        assert list(row["profiles"]) == loops  # one profiled step of each loop
        for name, p in row["profiles"].items():
            assert p["kernels"] > 0 and p["kinds_ms"]["matmul"] > 0, (name, p)
            assert f"profile recipe_bench {arch} {name}: device busy " in log
        gap = json.loads((out / "summary.json").read_text())["recipe_gaps"][arch]
        ms = {n: 1e3 * row["loops"][n]["step_seconds"] for n in ("recipe", "peer")}
        assert gap["step_ms"] == pytest.approx(ms["recipe"] - ms["peer"])
        assert gap["idle_ms"] == pytest.approx(
            (ms["recipe"] - row["profiles"]["recipe"]["busy_ms"])
            - (ms["peer"] - row["profiles"]["peer"]["busy_ms"]))
        assert gap["kinds_ms"] == pytest.approx({
            k: v - row["profiles"]["peer"]["kinds_ms"][k]
            for k, v in row["profiles"]["recipe"]["kinds_ms"].items()})
        assert f"profiled gap recipe_bench {arch}: recipe against the compiled peer" in log
        assert ("LigerStandIn" in row["peer"]["loss"]) == (not LIGER_INSTALLED)

    # collected and skipped on a CPU: every test of tests/test_cuda.py, none run; the recipe's
    # in a run of its own
    recipe_only = gpu_check.read_junit([out / "pytest_cuda_recipe.xml"])
    assert recipe_only["tests"] == recipe_only["skipped"] == 1, recipe_only
    tests = gpu_check.read_junit([out / "pytest_cuda.xml", out / "pytest_cuda_recipe.xml"])
    assert tests["tests"] >= 20 and tests["skipped"] == tests["tests"], tests
    assert tests["failures"] == tests["errors"] == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["complete"] and summary["problems"] == []
    assert summary["recipe_head"] == {"config": "qwen2_5_3b_to_half", "options": {
        "chunk_size": 1024, "compile_chunks": True, "teacher_cache_mib": None,
        "float32_weight_grad": False}}
    assert "the recipe's head (fused_step_recipe): qwen2_5_3b_to_half's settings, " in log
    assert summary["head_code"] == {"chunk": 1024, "errors": [], "shapes": {}}
    assert "inductor's code: none recorded (Dynamo's eager backend)" in log
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["ok"] for s in summary["steps"])
    assert summary["tests"] == tests
    targets = {t["name"]: t for t in summary["targets"]}
    assert set(targets) == TARGET_NAMES
    assert all(t["value"] is not None and t["met"] is None for t in targets.values())
    for gpu_shape, shape in zip(GPU_SHAPES, DRY_SHAPES):  # the figures, recomputed from the rows
        got = {f"{r['impl']}/{r['divergence']}": r for r in rows
               if f"{r['N']},{r['V']},{r['D']},{r['dtype']}" == shape}
        head, liger = got["fused_step_recipe/tad"], got["liger_fused_jsd_ce/forward_kl"]
        t = targets[f"vs Liger time ({gpu_shape})"]
        assert t["where"].startswith(shape) and t["stand_in"] == (not LIGER_INSTALLED)
        assert t["value"] == pytest.approx(paired(head["times_ms"], liger["times_ms"]))
        assert targets[f"vs Liger memory ({gpu_shape})"]["value"] == pytest.approx(
            head["peak_mib"] / liger["peak_mib"])
        assert targets[f"CE + forward KL vs Liger time ({gpu_shape})"]["value"] == pytest.approx(
            paired(got["fused_step_recipe/forward_kl"]["times_ms"], liger["times_ms"]))
        assert targets[f"unchunked floor ({gpu_shape})"]["value"] == pytest.approx(
            paired(head["times_ms"], got["matmul_floor_unchunked/none"]["times_ms"]))
        variants = summary["loss"][shape]["variants"]  # the configs' defaults: not targets
        assert sorted(variants) == sorted(gpu_check.HEAD_VARIANTS[:3])
        for case, x in variants.items():
            assert x["time_vs_recipe"] == pytest.approx(paired(got[case]["times_ms"],
                                                               head["times_ms"]))
            assert x["memory_vs_liger"] == pytest.approx(got[case]["peak_mib"]
                                                         / liger["peak_mib"])
        assert f"recipe head variants ({shape}; " in log
        # the optional step: the head at twice the chunk, against the head in its own process
        chunk_rows = {f"{r['impl']}/{r['divergence']}": r for r in json.loads(
            (out / "loss_chunk.json").read_text()) if
            f"{r['N']},{r['V']},{r['D']},{r['dtype']}" == shape}
        assert {tuple(c.split("/")) for c in chunk_rows} == CHUNK_CASES
        assert all(len(r["times_ms"]) == 2 and r["peak_mib"] > 0 for r in chunk_rows.values())
        variants = summary["chunk"][shape]["variants"]
        assert sorted(variants) == sorted(gpu_check.CHUNK_VARIANTS)
        assert summary["chunk"][shape]["peak_mib"] == {
            c: r["peak_mib"] for c, r in chunk_rows.items()}
        assert f"loss_chunk ({shape}, rows of 2048 tokens): fused_step_recipe/tad " in log
        assert summary["chunk"][shape]["memory_vs_liger"] == pytest.approx({
            c: r["peak_mib"] / liger["peak_mib"] for c, r in chunk_rows.items()})
        for case, x in variants.items():
            assert x["time_vs_recipe"] == pytest.approx(paired(
                chunk_rows[case]["times_ms"], chunk_rows["fused_step_recipe/tad"]["times_ms"]))
            assert x["memory_vs_recipe"] == pytest.approx(
                chunk_rows[case]["peak_mib"] / chunk_rows["fused_step_recipe/tad"]["peak_mib"])
        assert f"recipe head at half loss_chunk_size ({shape}; " in log
        assert f"recipe head at twice loss_chunk_size ({shape}; " in log
        assert f"item 5 ({shape}; not a target): " in log
        assert summary["loss"][shape]["profiles"] == {
            c: r["profile"] for c, r in got.items() if "profile" in r}
        for case in sorted(map("/".join, PROFILED)):
            assert f"profile loss ({shape}) {case}: device busy " in log
        for head in ("fused_step_recipe/tad", "fused_step_recipe/forward_kl"):
            gap = summary["profile_gaps"][shape][head]
            assert gap["step_ms"] == pytest.approx(got[head]["ms"] - liger["ms"])
            assert gap["matmul_vs_floor"] == pytest.approx(
                got[head]["profile"]["kinds_ms"]["matmul"]
                / got["matmul_floor_unchunked/none"]["profile"]["kinds_ms"]["matmul"])
            assert f"profiled gap ({shape}) {head}: matmul time " in log
    qwen, gemma = recipes["tiny_qwen2"], recipes["tiny_gemma2"]
    assert targets["vs transformers + Liger (qwen2_5_3b_half)"]["value"] == qwen[
        "recipe_over_peer"]
    assert targets["MFU (qwen2_5_3b_half)"]["value"] == qwen["loops"]["recipe"]["mfu"] > 0
    assert targets["vs transformers + Liger (gemma2_9b_third_short)"]["value"] == gemma[
        "recipe_over_peer"]


def test_steps_without_time_are_recorded_and_fail_the_check(tmp_path):
    """A budget of 0 s: no step starts, each is recorded as not run, the summary still runs,
    names what is missing, and the script exits non-zero."""
    out = tmp_path / "out"
    proc = run_script(["--dry-run", str(out)], GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["rc"], s["ok"]) for s in summary["steps"]] == [
        (name, 200, False) for name in STEPS]
    assert [s["name"] for s in summary["steps"] if s["optional"]] == ["loss_chunk"]
    assert not summary["complete"]
    assert "step loss_chunk not run (time budget spent)" not in summary["problems"]
    assert "step loss not run (time budget spent)" in summary["problems"]
    assert "no pytest_cuda*.xml" in summary["problems"]
    assert {p for p in summary["problems"] if p.startswith("no figure")} == {
        f"no figure for target: {name}" for name in TARGET_NAMES}
    assert "CHECK INCOMPLETE" in proc.stdout


def test_profiles_stop_before_a_step_s_cap(tmp_path):
    """The loss step alone, its profiles told to stop 1000 s before its cap: the rows are
    measured and saved, each profile says it did not run (the deadline the script gives each
    step reaches the benchmark), and the step is ok."""
    out = tmp_path / "out"
    proc = run_script(["--dry-run", str(out)], GPU_CHECK_ONLY="loss",
                      GPU_CHECK_PROFILE_MARGIN_S="1000")
    steps = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["loss"]["ok"], proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = json.loads((out / "loss_bench.json").read_text())
    profiled = [r for r in rows if "profile" in r]
    assert len(profiled) == len(PROFILED) * len(DRY_SHAPES)
    assert all(r["ms"] > 0 for r in rows)
    assert {r["profile"].get("error") for r in profiled} == {
        "not run: past GPU_CHECK_STEP_DEADLINE, the step's cap is near"}
    assert "profile loss (2048,1000,64,fp32) fused_step_recipe/tad: not profiled (not run: " \
        in proc.stdout


# ----------------------------------------------------------------------------- the verdicts


def loss_row(shape, case, times, peak_mib, stand_in=False):
    n, v, d, dtype = shape.split(",")
    impl, divergence = case.split("/")
    return dict(impl=impl, divergence=divergence, N=int(n), V=int(v), D=int(d), dtype=dtype,
                ms=statistics.median(times), times_ms=times, peak_mib=peak_mib,
                note="stand-in" if stand_in else "", stand_in=stand_in)


def write_run(out: Path, *, head: float, head_fkl: float, memory: float, peer: float,
              mfu: float, skipped: int = 0, stand_in: bool = False):
    """A GPU run's files: per target shape, Liger at 100 ms in rounds 1 and 3 and 200 ms in a
    slow round 2 that every case shares (paired ratios ignore it), the floor at 50 ms, the
    head at ``head`` times Liger's time and ``memory`` times its memory; the recipe at ``peer``
    times the compiled peer's speed and at MFU ``mfu``."""
    out.mkdir()
    rows = []
    for shape in GPU_SHAPES:
        slow = [1.0, 2.0, 1.0]
        rows += [loss_row(shape, "liger_fused_jsd_ce/forward_kl", [100 * x for x in slow],
                          1000.0, stand_in),
                 loss_row(shape, "matmul_floor_unchunked/none", [50 * x for x in slow], 500.0),
                 loss_row(shape, "fused_step_recipe/tad", [100 * head * x for x in slow],
                          1000.0 * memory),
                 loss_row(shape, "fused_step_recipe/forward_kl",
                          [100 * head_fkl * x for x in slow], 900.0)]
    (out / "loss_bench.json").write_text(json.dumps(rows))
    for arch in ("qwen2_5_3b_half", "gemma2_9b_third_short"):
        loops = {"recipe": {"tokens_per_second": 1000.0 * peer, "mfu": mfu,
                            "peak_memory_gib": 30.0},
                 "peer": {"tokens_per_second": 1000.0, "mfu": mfu / peer, "peak_memory_gib": 28.0}}
        (out / f"recipe_bench_{arch}.json").write_text(json.dumps({"rows": [dict(
            arch=arch, variant="fused_compiled", device="cuda:0", seq=2048, batch=4, loops=loops,
            recipe_over_peer=peer, peer={"loss": "liger-kernel 0.8.5 LigerFusedLinearJSDLoss",
                                         "transformers": "5.17.0", "attention": "sdpa"})]}))
    (out / "pytest_cuda.xml").write_text(
        f'<testsuites><testsuite name="pytest" tests="10" failures="0" errors="0" '
        f'skipped="{skipped}"/></testsuites>')
    steps = out / "steps.tsv"
    steps.write_text("loss\t0\t90\t130\t0\nrecipe_qwen2_5_3b_half\t0\t100\t120\t0\n")
    return gpu_check.read_steps(steps)


def summarize(out: Path, steps, dry_run: bool = False):
    return gpu_check.summarize(out, steps, GPU_SHAPES, list(gpu_check.RECIPE_TARGETS),
                               dry_run=dry_run)


def verdicts(summary):
    return {t["name"]: (t["value"], t["met"]) for t in summary["targets"]}


def test_targets_met_and_missed_at_their_limits(tmp_path):
    steps = write_run(tmp_path / "met", head=1.15, head_fkl=1.0, memory=1.0, peer=1.10, mfu=0.5)
    s = summarize(tmp_path / "met", steps)
    assert s["complete"], s["problems"]
    got = verdicts(s)
    assert set(got) == TARGET_NAMES
    for shape in GPU_SHAPES:
        assert got[f"vs Liger time ({shape})"] == (pytest.approx(1.15), True)
        assert got[f"vs Liger memory ({shape})"] == (pytest.approx(1.0), True)
        assert got[f"CE + forward KL vs Liger time ({shape})"] == (pytest.approx(1.0), True)
        assert got[f"unchunked floor ({shape})"] == (pytest.approx(2.3), False)  # 115 / 50 ms
    assert got["vs transformers + Liger (qwen2_5_3b_half)"] == (1.10, True)
    assert got["MFU (qwen2_5_3b_half)"] == (0.5, True)
    assert got["vs transformers + Liger (gemma2_9b_third_short)"] == (1.10, True)

    steps = write_run(tmp_path / "missed", head=1.16, head_fkl=1.01, memory=1.01, peer=1.04,
                      mfu=0.49)
    s = summarize(tmp_path / "missed", steps)
    assert s["complete"]  # missed targets are results, not an incomplete check
    assert [met for _, met in verdicts(s).values()] == [False] * len(TARGET_NAMES)

    steps = write_run(tmp_path / "fast", head=0.7, head_fkl=0.5, memory=0.5, peer=1.2, mfu=0.6)
    got = verdicts(summarize(tmp_path / "fast", steps))
    assert got["unchunked floor (8192,256000,3584,bf16)"] == (pytest.approx(1.4), True)
    assert all(met for _, met in got.values())


def test_a_stand_in_figure_is_not_judged_and_makes_a_gpu_run_incomplete(tmp_path):
    steps = write_run(tmp_path / "run", head=1.0, head_fkl=1.0, memory=1.0, peer=1.2, mfu=0.6,
                      stand_in=True)
    s = summarize(tmp_path / "run", steps)
    liger = [t for t in s["targets"] if "Liger" in t["name"] and "transformers" not in t["name"]]
    assert len(liger) == 6 and all(t["stand_in"] and t["met"] is None for t in liger)
    assert sorted(s["problems"]) == sorted(f"target {t['name']} measured on a stand-in"
                                           for t in liger)
    assert summarize(tmp_path / "run", steps, dry_run=True)["complete"]


def test_a_skipped_cuda_test_makes_a_gpu_run_incomplete(tmp_path):
    steps = write_run(tmp_path / "run", head=1.0, head_fkl=1.0, memory=1.0, peer=1.2, mfu=0.6,
                      skipped=1)
    assert summarize(tmp_path / "run", steps)["problems"] == ["1 CUDA tests skipped on a GPU run"]
    assert summarize(tmp_path / "run", steps, dry_run=True)["complete"]


def test_the_chunk_step_out_of_time_leaves_the_check_complete(tmp_path, capsys):
    """The optional loss_chunk step timed out: no loss_chunk.json, nothing measured at twice
    the chunk, said so, and the check complete; a chunk file read against its own recipe head
    (not the loss step's: its rounds are not paired with them)."""
    out = tmp_path / "run"
    write_run(out, head=1.0, head_fkl=1.0, memory=1.0, peer=1.2, mfu=0.6)
    (out / "steps.tsv").write_text("loss\t0\t90\t130\t0\nloss_chunk\t124\t20\t20\t1\n")
    s = summarize(out, gpu_check.read_steps(out / "steps.tsv"))
    assert s["complete"] and s["chunk"] == {}, s["problems"]
    gpu_check.print_summary(s)
    assert ("recipe head at half and twice loss_chunk_size: not measured"
            in capsys.readouterr().out)

    shape = GPU_SHAPES[1]
    (out / "loss_chunk.json").write_text(json.dumps([
        loss_row(shape, "fused_step_recipe/tad", [10.0, 30.0, 10.0], 800.0),
        loss_row(shape, "fused_step_recipe_double_chunk/tad", [9.0, 33.0, 9.5], 1200.0)]))
    s = summarize(out, gpu_check.read_steps(out / "steps.tsv"))
    assert list(s["chunk"]) == [shape]
    double = s["chunk"][shape]["variants"]["fused_step_recipe_double_chunk/tad"]
    assert double["time_vs_recipe"] == pytest.approx(0.95)  # median of 0.9, 1.1, 0.95
    assert double["memory_vs_recipe"] == pytest.approx(1.5)
    assert s["chunk"][shape]["memory_vs_liger"] == pytest.approx(  # Liger's: 1000 MiB
        {"fused_step_recipe/tad": 0.8, "fused_step_recipe_double_chunk/tad": 1.2})
    assert "fused_step_recipe_double_chunk/tad" not in s["loss"][shape]["variants"]
    assert s["loss"][shape]["ms"]["fused_step_recipe/tad"] == 100.0  # the loss step's row


def test_summary_takes_one_measured_shape_and_arch_per_target(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "summary",
                           str(tmp_path), "--steps", str(tmp_path / "none.tsv"),
                           "--loss-shapes", GPU_SHAPES[0], "--recipe-archs", "a", "b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--loss-shapes takes 2 shapes" in proc.stderr, proc.stderr


def test_profile_gaps_split_the_time_against_liger_by_kind():
    tad, fkl, liger, floor = gpu_check.HEAD_TAD, gpu_check.HEAD_FKL, gpu_check.LIGER, \
        gpu_check.FLOOR
    loss = {
        "a": {"ms": {tad: 50.0, fkl: 40.0, liger: 45.0, floor: 30.0}, "profiles": {
            tad: {"busy_ms": 48.0, "kinds_ms": {"matmul": 33.0, "inductor": 10.0, "other": 5.0}},
            liger: {"busy_ms": 44.0, "kinds_ms": {"matmul": 35.0, "inductor": 9.0, "other": 0.0}},
            floor: {"busy_ms": 30.0, "kinds_ms": {"matmul": 30.0}}}},
        "b": {"ms": {tad: 50.0, liger: 45.0}, "profiles": {}},  # nothing profiled
        "c": {"ms": {tad: 50.0, liger: 45.0}, "profiles": {  # the head alone, Liger's failed
            tad: {"busy_ms": 48.0, "kinds_ms": {"matmul": 33.0}},
            liger: {"error": "RuntimeError: no CUPTI"}}},
    }
    got = gpu_check.profile_gaps(loss)
    assert got == {
        "a": {tad: {"matmul_vs_floor": pytest.approx(1.1), "against": liger, "step_ms": 5.0,
                    "idle_ms": 1.0,  # (50 - 48) - (45 - 44)
                    "kinds_ms": {"matmul": -2.0, "inductor": 1.0, "other": 5.0}}},
        "c": {tad: {"matmul_vs_floor": None}},
    }


def test_head_code_sums_each_case_s_graphs_per_chunk(tmp_path):
    """The code a GPU run's loss step saves (``loss_bench.py --inductor-code``), summed per
    shape and case over its graphs, in passes of a 1024-row chunk; a file in a form this does
    not read is named, not fatal."""
    from tests.helpers.triton_code import TRITON_GRAPH

    folder = tmp_path / "inductor_code"
    folder.mkdir()
    for k in range(2):  # a case's two graphs (the teacher's split and the chunk, say)
        (folder / f"8192x256x64__fused_step_recipe__tad__00{k}.py").write_text(TRITON_GRAPH)
    (folder / "8192x256x64__liger_fused_jsd_ce__forward_kl__002.py").write_text(TRITON_GRAPH)
    (folder / "8192x256x64__fused_step_recipe__forward_kl__003.py").write_text("not code")
    code = gpu_check.head_code(folder)
    moved = sum(k.get("read", 0) + k.get("written", 0)
                for k in head_kernels.graph_traffic(TRITON_GRAPH))
    tad = code["shapes"]["8192,256,64"]["fused_step_recipe/tad"]
    liger = code["shapes"]["8192,256,64"]["liger_fused_jsd_ce/forward_kl"]
    assert (tad["graphs"], tad["kernels"], tad["external"]) == (2, 8, 4)
    assert tad["bytes"] == 2 * moved
    assert tad["passes"] == pytest.approx(2 * moved / (1024 * 256 * 4))
    assert (liger["graphs"], liger["bytes"]) == (1, moved)
    assert len(code["errors"]) == 1 and "forward_kl__003" in code["errors"][0]
    assert gpu_check.head_code(tmp_path / "absent") == {"chunk": 1024, "errors": [], "shapes": {}}


def test_read_steps_marks_timeouts_and_optional_steps(tmp_path):
    path = tmp_path / "steps.tsv"
    path.write_text("a\t0\t3\t60\t0\nb\t124\t60\t60\t0\nc\t137\t70\t60\t0\n"
                    "d\t1\t2\t60\t0\ne\t124\t30\t30\t1\nf\t200\t0\t0\t1\ng\t1\t5\t90\t1\n"
                    "h\t0\t5\t90\t1\n")
    steps = gpu_check.read_steps(path)
    assert [(s["ok"], s["timed_out"], s["optional"]) for s in steps] == [
        (True, False, False), (False, True, False), (False, True, False), (False, False, False),
        (False, True, True), (False, False, True), (False, False, True), (True, False, True)]
    # an optional step out of time or not run does not make the check incomplete; its own
    # failure does
    assert [gpu_check.step_problem(s) for s in steps] == [
        False, True, True, True, False, False, True, False]


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


def test_item_5_names_the_fastest_head_within_liger_memory(tmp_path, capsys):
    """Among the recipe's head and its variants (the loss step's, the loss_chunk step's: time
    paired against the recipe head of their own step), the fastest whose peak is within Liger's
    (1000 MiB here), with the configs' keys it changes; none where nothing fits."""
    out = tmp_path / "run"
    write_run(out, head=1.0, head_fkl=1.0, memory=1.1, peer=1.2, mfu=0.6)  # head: 1100 MiB
    slow = [1.0, 2.0, 1.0]
    qwen, gemma = GPU_SHAPES
    rows = json.loads((out / "loss_bench.json").read_text())
    for shape in GPU_SHAPES:
        rows += [loss_row(shape, "fused_step_recipe_chunk_cache/tad",
                          [105 * x for x in slow], 950.0),
                 loss_row(shape, "fused_step_recipe_default_cache/tad",
                          [120 * x for x in slow], 900.0),
                 loss_row(shape, "fused_step_recipe_fp32_wgrad/tad",
                          [95 * x for x in slow], 1200.0)]  # faster, over Liger's memory
    (out / "loss_bench.json").write_text(json.dumps(rows))
    (out / "loss_chunk.json").write_text(json.dumps([  # Qwen's shape only: the half chunk fits
        loss_row(qwen, "fused_step_recipe/tad", [50 * x for x in slow], 1100.0),
        loss_row(qwen, "fused_step_recipe_half_chunk/tad", [51 * x for x in slow], 900.0),
        loss_row(qwen, "fused_step_recipe_double_chunk/tad", [45 * x for x in slow], 1400.0)]))
    s = summarize(out, gpu_check.read_steps(out / "steps.tsv"))
    choice = s["head_choice"]
    assert choice[qwen]["case"] == "fused_step_recipe_half_chunk/tad"
    assert choice[qwen]["settings"] == {"loss_chunk_size": 512}
    assert choice[qwen]["time_vs_recipe"] == pytest.approx(1.02)
    assert choice[qwen]["memory_vs_liger"] == pytest.approx(0.9)
    assert choice[gemma]["case"] == "fused_step_recipe_chunk_cache/tad"
    # one chunk of 1024 Gemma2 teacher projections in bf16: 1024 x 256000 x 2 bytes
    assert choice[gemma]["settings"] == {"fused_teacher_cache_mib": pytest.approx(500.0)}
    gpu_check.print_summary(s)
    log = capsys.readouterr().out
    assert (f"item 5 ({gemma}; not a target): the fastest CE + TAD head within Liger's memory "
            "is fused_step_recipe_chunk_cache/tad, time 1.05x the recipe head's, memory 0.95x "
            "Liger's; the GPU configs' settings with fused_teacher_cache_mib: 500") in log

    write_run(tmp_path / "none", head=1.0, head_fkl=1.0, memory=1.1, peer=1.2, mfu=0.6)
    s = summarize(tmp_path / "none", gpu_check.read_steps(tmp_path / "none" / "steps.tsv"))
    assert s["head_choice"] == {qwen: None, gemma: None}
    write_run(tmp_path / "fits", head=1.0, head_fkl=1.0, memory=0.9, peer=1.2, mfu=0.6)
    s = summarize(tmp_path / "fits", gpu_check.read_steps(tmp_path / "fits" / "steps.tsv"))
    assert s["head_choice"][qwen] == {"case": "fused_step_recipe/tad", "settings": {},
                                      "time_vs_recipe": 1.0,
                                      "memory_vs_liger": pytest.approx(0.9)}
