"""The loss engine (``losses/engine.py``): the chunk iterator covers every token once, and
changes neither a loss nor its gradient, whatever the chunk size; the means over valid tokens."""

import pytest
import torch

from tad_torchtune.losses import TADLoss
from tad_torchtune.losses.engine import DivergenceOutput, chunk_slices
from tests.helpers.losses import chunked, loss_and_grad, make_inputs


@pytest.mark.parametrize("n,chunk_size,lengths", [
    (141, 64, [64, 64, 13]), (141, 47, [47, 47, 47]), (141, None, [141]), (141, 0, [141]),
    (141, 1000, [141]), (3, 1, [1, 1, 1]), (0, 8, []),
])
def test_chunk_slices_cover_every_token_once_in_order(n, chunk_size, lengths):
    slices = chunk_slices(n, chunk_size)
    assert [s.stop - s.start for s in slices] == lengths
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(n))


def test_means_over_valid_tokens_and_zero_without_any():
    """(The gradient of a loss with no valid token: ``tests/losses/test_base.py``.)"""
    out = DivergenceOutput(torch.tensor(0.0), torch.tensor(0), {"abar": torch.tensor(0.0)})
    assert float(out.mean()) == 0.0 and out.stat_means() == {"abar": 0.0}
    assert DivergenceOutput(torch.tensor(6.0), torch.tensor(4), {"x": torch.tensor(2.0)}
                            ).stat_means() == {"x": 0.5}


@pytest.mark.parametrize("chunk_size", [None, 1, 13, 141, 1000])
def test_chunk_size_does_not_change_value_or_grad(chunk_size):
    student, teacher, labels = make_inputs(3, torch.float32)
    base_v, base_g = loss_and_grad(chunked(TADLoss(k=5), None), student, teacher, labels)
    v, g = loss_and_grad(chunked(TADLoss(k=5), chunk_size), student, teacher, labels)
    torch.testing.assert_close(v, base_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, base_g, atol=1e-9, rtol=1e-6)
