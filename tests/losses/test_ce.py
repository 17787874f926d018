"""The chunked cross-entropy (materialised logits) and the fused head's CE (hidden states)
against torch's own cross-entropy on the whole batch."""

import pytest
import torch
import torch.nn.functional as F

from tad_torchtune.losses.ce import chunked_cross_entropy, linear_cross_entropy

IGNORE = -100


def make_case(dtype, b=3, t=47, d=16, v=123):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(b, t, d, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :9] = IGNORE
    labels[2, -4:] = IGNORE
    return hidden, weight, labels


def reference(hidden, weight, labels, softcap=None):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logits = h @ w.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    total = F.cross_entropy(logits.reshape(-1, w.shape[0]), labels.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    total.backward()
    return total.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 10, None])
def test_chunked_cross_entropy_matches_torch(chunk_size):
    hidden, weight, labels = make_case(torch.float32)
    ref_total, ref_gh, _ = reference(hidden, weight, labels)
    h = hidden.clone().requires_grad_(True)
    total, count = chunked_cross_entropy(h @ weight.T, labels, chunk_size=chunk_size)
    total.backward()
    assert int(count) == int((labels != IGNORE).sum())
    torch.testing.assert_close(total.double(), ref_total, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(h.grad.double(), ref_gh, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-4),
                                             (torch.float64, 1e-10, 1e-10)])
def test_linear_cross_entropy_matches_torch(softcap, dtype, atol, rtol):
    hidden, weight, labels = make_case(dtype)
    ref_total, ref_gh, ref_gw = reference(hidden, weight, labels, softcap)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    total, count = linear_cross_entropy(h, w, labels, softcap=softcap, chunk_size=16)
    total.backward()
    assert int(count) == int((labels != IGNORE).sum())
    torch.testing.assert_close(total.double(), ref_total, atol=atol * 100, rtol=rtol)
    torch.testing.assert_close(h.grad.double(), ref_gh, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), ref_gw, atol=atol, rtol=rtol)


def test_all_ignored_is_zero_with_zero_gradient():
    hidden, weight, labels = make_case(torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    total, count = linear_cross_entropy(h, w, torch.full_like(labels, IGNORE), chunk_size=16)
    total.backward()
    assert float(total.detach()) == 0.0 and int(count) == 0
    assert not h.grad.any() and not w.grad.any()
