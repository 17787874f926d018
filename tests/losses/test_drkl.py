"""DRKL (``losses/drkl.py``) against its float64 reference, the exact decomposition of reverse KL
it rests on, and its argument."""

import pytest
import torch

from tad_torchtune.losses import DRKLLoss
from tad_torchtune.losses.drkl import drkl_parts
from tad_torchtune.losses.kl import reverse_kl_chunk
from tests.helpers.losses import LOSS_TOL, assert_matches_reference, chunked, flat_inputs
from tests.losses import reference as ref


@pytest.mark.parametrize("dtype,atol,rtol", LOSS_TOL)
@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_drkl_matches_reference(dtype, atol, rtol, gamma):
    assert_matches_reference(
        chunked(DRKLLoss(gamma=gamma), 50), ref.drkl, dtype, atol, rtol, gamma=gamma
    )


def test_rkl_decomposition():
    s, t, y = flat_inputs(1)
    rkl, _ = reverse_kl_chunk(s, t, y)
    kl_bin, kl_nt, q_y = drkl_parts(s, t, y)
    torch.testing.assert_close(rkl, kl_bin + (1 - q_y) * kl_nt, atol=1e-12, rtol=1e-10)


def test_bad_gamma():
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        DRKLLoss(gamma=0)
