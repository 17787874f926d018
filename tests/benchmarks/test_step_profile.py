"""benchmarks/step_profile.py: a CPU step's profile, a failing step's (the reading of kernels:
tests/test_profiling.py)."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import step_profile  # noqa: E402
from step_profile import profile_step  # noqa: E402


def test_a_cpu_step_s_profile_finds_its_matmul():
    a = torch.randn(768, 768, requires_grad=True)
    b = torch.randn(768, 768)

    def step():
        for _ in range(4):
            (a @ b).sum().backward()

    step()
    got = profile_step(step, "cpu")
    assert got["device"] == "cpu" and got["kernels"] >= 8
    assert 0 < got["busy_ms"] <= got["wall_ms"]
    # 8 products of 768^3 against sums and fills of 768^2: the matmuls are most of the time
    assert got["kinds_ms"]["matmul"] > 0.5 * got["busy_ms"]
    assert got["top"][0]["kind"] == "matmul"
    assert sum(x["calls"] for x in got["top"] if x["kind"] == "matmul") == 8


def test_a_failing_step_gives_its_error_not_an_exception():
    def step():
        raise RuntimeError("no CUPTI")

    got = profile_step(step, "cpu")
    assert got == {"error": "RuntimeError: no CUPTI"}
    assert step_profile.describe(got) == "not profiled (RuntimeError: no CUPTI)"


def test_past_the_deadline_nothing_is_profiled_or_run(monkeypatch):
    ran = []
    monkeypatch.setenv(step_profile.DEADLINE_ENV, str(time.time() - 1))
    got = profile_step(lambda: ran.append(1), "cpu")
    assert ran == [] and got == {
        "error": "not run: past GPU_CHECK_STEP_DEADLINE, the step's cap is near"}
    monkeypatch.setenv(step_profile.DEADLINE_ENV, str(time.time() + 600))
    assert profile_step(lambda: ran.append(1), "cpu")["kernels"] == 0 and ran == [1]
