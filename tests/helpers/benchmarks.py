"""Running a benchmark's ``main()`` in the test process."""

import sys

import pytest
import torch


def main_stopped_while_profiling(module, argv: list[str], monkeypatch) -> None:
    """``module.main()`` on ``argv``, its ``profile_step`` raising as a kill would (the GPU
    check's step cap): returns once ``main`` raised it. What ``main`` sets for the process
    (``torch.compile``, ``loss_bench.ROW_TOKENS``) is restored after the test. ``benchmarks/``
    must be on ``sys.path`` (the benchmarks' tests put it there)."""
    import loss_bench

    def stopped(step, device):
        raise KeyboardInterrupt  # what a kill leaves undone

    monkeypatch.setattr(module, "profile_step", stopped)
    monkeypatch.setattr(torch, "compile", torch.compile)
    monkeypatch.setattr(loss_bench, "ROW_TOKENS", loss_bench.ROW_TOKENS)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        module.main()
