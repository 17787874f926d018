"""``benchmarks/wgrad_error.py``: its emulated sums against identities (one chunk: both ways are
one rounding; no bf16 gradient is nearer the exact one than the exact one rounded) and against
the fused head's own bf16 accumulation (``_accumulate_weight_grad``)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import wgrad_error  # noqa: E402

from tad_torchtune.losses.fused import _accumulate_weight_grad  # noqa: E402

FLOOR = "exact, rounded to bf16 once"


def test_one_chunk_per_micro_batch_sums_alike():
    """One chunk per micro-batch, 1 / tokens a power of two: both ways round the same product
    once, so their errors are equal."""
    got = wgrad_error.step_errors(vocab=300, hidden=16, chunk=64, chunks=1, micro_batches=2)
    assert got["float32"] == got["bf16"]


def test_no_way_beats_the_exact_gradient_rounded_once():
    """Rounding to nearest gives each entry the nearest bf16 value: every way's error is at
    least the floor's. Many chunks in one micro-batch: the float32 sum is the floor's rounding
    (its float32 error is far below a bf16 step) and the bf16 sum's 16 roundings are not."""
    got = wgrad_error.step_errors(vocab=500, hidden=32, chunk=64, chunks=16, micro_batches=1)
    floor = got[FLOOR]["relative_error"]
    assert all(x["relative_error"] >= floor for x in got.values())
    assert got["float32"]["relative_error"] <= 1.01 * floor
    assert got["bf16"]["relative_error"] > 1.3 * floor, got


def test_the_bf16_way_is_the_heads_own_accumulation():
    """The emulated bf16 sum (float32 product, running sum rounded to bf16) is what the fused
    head's bf16 ``grad_w.addmm_`` gives, entry for entry within one bf16 step."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(400, 24, generator=gen)
    zipf = 1.0 / torch.arange(1, 401, dtype=torch.float64)
    head = torch.zeros(400, 24, dtype=torch.bfloat16)
    emulated = torch.zeros(400, 24, dtype=torch.bfloat16)
    for _ in range(6):
        g, h = wgrad_error.make_chunk(gen, w, 48, 3.0, zipf)
        _accumulate_weight_grad(head, g, h)
        emulated = (emulated.float() + g.float().T @ h.float()).bfloat16()
    step = emulated.float().abs() * 2**-7 + 1e-30
    assert ((head.float() - emulated.float()).abs() <= step).all()
    assert (head == emulated).float().mean() > 0.9
