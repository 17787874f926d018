"""The hidden-state cosine loss (``losses/hidden.py``): gradcheck, masking, the value against a
naive loop and the width error."""

import pytest
import torch

from tad_torchtune.losses import HiddenCosineLoss
from tests.helpers.losses import IGNORE


def test_gradcheck_hidden_cosine():
    gen = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.ones(2, 5, dtype=torch.long)
    labels[1, 2] = IGNORE
    assert torch.autograd.gradcheck(lambda x: HiddenCosineLoss()(x, ht, labels), (hs,))


def test_hidden_cosine_masking_and_value():
    gen = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    labels = torch.zeros(2, 6, dtype=torch.long)
    labels[0, 0] = IGNORE
    expected = torch.stack([
        1 - torch.dot(hs[b, i], ht[b, i]) / (hs[b, i].norm() * ht[b, i].norm())
        for b in range(2) for i in range(6) if labels[b, i] != IGNORE
    ]).mean()
    hs2 = hs.clone()
    hs2[0, 0] = float("nan")
    torch.testing.assert_close(HiddenCosineLoss()(hs2, ht, labels), expected, atol=1e-6, rtol=1e-6)
    assert HiddenCosineLoss()(hs, hs * 3.0, labels).abs().item() < 1e-6
    with pytest.raises(ValueError, match="hidden widths differ: student 8, teacher 4"):
        HiddenCosineLoss()(hs, ht[..., :4], labels)
