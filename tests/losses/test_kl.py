"""Forward and reverse KL (``losses/kl.py``) against their float64 references, in float32 and
bf16, at two temperatures."""

import pytest

from tad_torchtune.losses import ForwardKLLoss, ReverseKLLoss
from tests.helpers.losses import LOSS_TOL, assert_matches_reference, chunked
from tests.losses import reference as ref


@pytest.mark.parametrize("dtype,atol,rtol", LOSS_TOL)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_reference(dtype, atol, rtol, temperature):
    assert_matches_reference(
        chunked(ForwardKLLoss(temperature=temperature), 50), ref.forward_kl, dtype, atol, rtol,
        temperature=temperature,
    )


@pytest.mark.parametrize("dtype,atol,rtol", LOSS_TOL)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_matches_reference(dtype, atol, rtol, temperature):
    assert_matches_reference(
        chunked(ReverseKLLoss(temperature=temperature), 50), ref.reverse_kl, dtype, atol, rtol,
        temperature=temperature,
    )
