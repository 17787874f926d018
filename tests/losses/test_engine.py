"""The loss engine (``losses/engine.py``): the chunk iterator changes neither a loss nor its
gradient, whatever the chunk size."""

import pytest
import torch

from tad_torchtune.losses import TADLoss
from tests.helpers.losses import chunked, loss_and_grad, make_inputs


@pytest.mark.parametrize("chunk_size", [None, 1, 13, 141, 1000])
def test_chunk_size_does_not_change_value_or_grad(chunk_size):
    student, teacher, labels = make_inputs(3, torch.float32)
    base_v, base_g = loss_and_grad(chunked(TADLoss(k=5), None), student, teacher, labels)
    v, g = loss_and_grad(chunked(TADLoss(k=5), chunk_size), student, teacher, labels)
    torch.testing.assert_close(v, base_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, base_g, atol=1e-9, rtol=1e-6)
