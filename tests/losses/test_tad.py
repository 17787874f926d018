"""TAD (``losses/tad.py``) against its float64 reference and the paper: the value and gradient
over K, beta, the temperature and per-document normalisers, ``KL = D_KL1 + alphaT D_KL2``, the
gradient of eq. 6, the diagnostics, the bound on the tail weight, underflowing and empty tails,
and its arguments."""

import math

import pytest
import torch

from tad_torchtune.losses import ForwardKLLoss, TADLoss
from tad_torchtune.losses.engine import logits_teacher_pass
from tad_torchtune.losses.kl import forward_kl_chunk
from tad_torchtune.losses.tad import tad_chunk
from tad_torchtune.losses.terms import teacher_top_k
from tests.helpers.losses import (
    IGNORE,
    LOSS_TOL,
    B,
    T,
    V,
    assert_matches_reference,
    chunked,
    documents_of,
    finite_loss_and_grad,
    flat_inputs,
    loss_and_grad,
    make_inputs,
    reference_loss_and_grad,
)
from tests.losses import reference as ref


@pytest.mark.parametrize("dtype,atol,rtol", LOSS_TOL)
@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 5.0])
def test_tad_matches_reference(dtype, atol, rtol, k, beta):
    assert_matches_reference(
        chunked(TADLoss(k=k, beta=beta), 50), ref.tad, dtype, atol, rtol, seed=k, k=k, beta=beta
    )


def test_tad_temperature_matches_reference():
    assert_matches_reference(
        chunked(TADLoss(k=5, beta=2.0, temperature=1.7), None), ref.tad, torch.float32,
        1e-5, 1e-5, k=5, beta=2.0, temperature=1.7,
    )


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("k", [1, 5, 10, 50])
def test_kl_equals_dkl1_plus_alpha_dkl2(k):
    s, t, y = flat_inputs()
    kl, _ = forward_kl_chunk(s, t, y)
    idx, lse, lse_tail = teacher_top_k(t, k)
    ones = torch.ones_like(lse)
    _, stats = tad_chunk(s, t, y, idx, lse, lse_tail, ones, ones)
    torch.testing.assert_close(kl, stats["dkl1"] + stats["tail_mass"] * stats["dkl2"],
                               atol=1e-12, rtol=1e-10)
    # and with weight alphaT the per-token TAD value IS the KL
    value, _ = tad_chunk(s, t, y, idx, lse, lse_tail, stats["tail_mass"], ones)
    torch.testing.assert_close(value, kl, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- TAD gradient


@pytest.mark.parametrize("k,beta", [(1, 2.0), (5, 0.5), (10, 5.0)])
def test_tad_gradient_is_equation_6(k, beta):
    student, teacher, labels = make_inputs(5, torch.float64)
    _, grad = loss_and_grad(TADLoss(k=k, beta=beta), student, teacher, labels)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    valid = labels != IGNORE
    n_valid = int(valid.sum())
    for b in range(B):
        tokens = valid[b].nonzero().flatten().tolist()
        top = teacher[b].topk(k, -1).indices  # (T, K)
        alpha_t = 1 - p[b].gather(-1, top).sum(-1)  # (T,)
        alpha_s = 1 - q[b].gather(-1, top).sum(-1)
        beta_x = beta / alpha_t[tokens].mean()
        expected = (q[b] - p[b]) + (beta_x - 1) * (
            q[b] * (alpha_t / alpha_s).unsqueeze(-1) - p[b]
        )  # eq. 6, valid on tail ids
        in_top = torch.zeros_like(p[b], dtype=torch.bool).scatter_(-1, top, True)
        expected = torch.where(in_top, q[b] - p[b], expected) / n_valid
        expected[~valid[b]] = 0
        torch.testing.assert_close(grad[b], expected, atol=1e-12, rtol=1e-9)


# ----------------------------------------------------------------------------- extremes


def test_tad_underflowing_tail_keeps_its_exact_weight():
    """Tail masses of exp(-2e4) underflow float32, but alphaT/abar is computed in log space: all
    tokens have the same tail mass, so every weight is exactly beta."""
    student, _, labels = make_inputs(12, torch.float32)
    teacher = torch.full((B, T, V), -1e4).scatter_(-1, torch.randint(0, V, (B, T, 1)), 1e4)
    out = TADLoss(k=1, beta=2.0).sum_and_count(student, teacher, labels)
    assert out.stats["tail_mass"] == 0 and out.stats["abar"] == 0  # underflowed as numbers
    torch.testing.assert_close(out.total, out.stats["dkl1"] + 2.0 * out.stats["dkl2"])


def test_tad_zero_tail_mass_has_no_tail_term():
    """A teacher with -inf outside its top-1: abar = 0 exactly, the tail term is 0 (not NaN) and
    TAD equals the KL."""
    student, _, labels = make_inputs(12, torch.float32)
    teacher = torch.full((B, T, V), float("-inf")).scatter_(-1, torch.randint(0, V, (B, T, 1)), 3.0)
    value, grad = finite_loss_and_grad(TADLoss(k=1), student, teacher, labels)
    torch.testing.assert_close(value, ForwardKLLoss()(student, teacher, labels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tad_student_with_all_mass_on_teacher_top_k(dtype):
    student, teacher, labels = make_inputs(13, torch.float32)
    top = teacher.topk(10, -1).indices
    s = torch.zeros_like(student).scatter_(-1, top, 1e4)
    value, _ = finite_loss_and_grad(TADLoss(k=10), s.to(dtype), teacher.to(dtype), labels)
    assert value > 100  # log(alphaT/alphaS) is huge: the bucket term must dominate, finitely


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: TADLoss(k=0), "k must be an integer >= 1"),
        (lambda: TADLoss(k=2.5), "k must be an integer >= 1"),
        (lambda: TADLoss(beta=0.0), "beta must be a finite number > 0, got 0.0"),
        (lambda: TADLoss(beta=-1), "beta must be a finite number > 0, got -1"),
        (lambda: TADLoss(beta=float("inf")), "beta must be a finite number > 0, got inf"),
        (lambda: TADLoss(beta=float("nan")), "beta must be a finite number > 0, got nan"),
        (lambda: TADLoss(beta="2"), "beta must be a finite number > 0, got '2'"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_k_must_be_below_vocab_size_at_call_time():
    student, teacher, labels = make_inputs(14, torch.float32, v=10)
    with pytest.raises(ValueError, match="TADLoss.k: must be < the vocabulary size 10, got 10"):
        TADLoss(k=10)(student, teacher, labels)


# ----------------------------------------------------------------------------- reduction API


def test_sum_and_count_and_diagnostics():
    student, teacher, labels = make_inputs(18, torch.float64)
    out = TADLoss(k=5, beta=2.0).sum_and_count(student, teacher, labels)
    valid = labels != IGNORE
    assert int(out.num_tokens) == int(valid.sum())
    torch.testing.assert_close(out.total / out.num_tokens, ref.tad(student, teacher, labels, 5, 2.0))
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    parts = [ref.tad_token_parts(p[b, i], q[b, i], 5) for b, i in valid.nonzero().tolist()]
    means = out.stat_means()
    assert math.isclose(means["dkl1"], float(sum(x["dkl1"] for x in parts)) / len(parts), rel_tol=1e-9)
    assert math.isclose(means["dkl2"], float(sum(x["dkl2"] for x in parts)) / len(parts), rel_tol=1e-9)
    assert math.isclose(means["tail_mass"], float(sum(x["alpha_t"] for x in parts)) / len(parts),
                        rel_tol=1e-9)
    row_abar = [float(sum(x["alpha_t"] for x, (b, _) in zip(parts, valid.nonzero().tolist()) if b == r))
                / int(valid[r].sum()) for r in range(B)]
    token_mean_abar = sum(row_abar[b] for b, _ in valid.nonzero().tolist()) / len(parts)
    assert math.isclose(means["abar"], token_mean_abar, rel_tol=1e-9)


def test_tad_weight_is_bounded_by_row_length():
    """alphaT/abar <= number of valid tokens of the row, even for one token with all the tail."""
    student, teacher, labels = make_inputs(19, torch.float64)
    teacher[0] = torch.full((T, V), -30.0).scatter_(-1, torch.zeros(T, 1, dtype=torch.long), 30.0)
    teacher[0, 20] = torch.randn(V)  # the only token of row 0 with a real tail
    loss = TADLoss(k=1, beta=1.0)
    weight = logits_teacher_pass(loss, teacher, labels)[3].reshape(labels.shape)
    n_row0 = int((labels[0] != IGNORE).sum())
    assert weight[0].max() <= n_row0 + 1e-9
    assert weight[0, 20] == pytest.approx(n_row0, rel=1e-6)


# ----------------------------------------------------------------------------- documents


@pytest.mark.parametrize("k,beta", [(1, 2.0), (5, 0.5)])
def test_tad_abar_per_document_matches_a_naive_reference(k, beta):
    student, teacher, labels = make_inputs(23, torch.float64)
    # tokens of different sharpness, so that the tail masses (and their means) differ
    teacher = teacher * torch.rand(B, T, 1, generator=torch.Generator().manual_seed(2),
                                   dtype=torch.float64).mul(6.0).add(0.5)
    docs = documents_of(B, T, 3)
    loss = TADLoss(k=k, beta=beta, abar_scope="document")
    value, grad = loss_and_grad(
        lambda s, t, y: loss.sum_and_count(s, t, y, document_ids=docs, chunk_size=20).mean(),
        student, teacher, labels)
    ref_value, ref_grad = reference_loss_and_grad(
        lambda s, t, y: ref.tad_per_document(s, t, y, docs, k, beta), student, teacher, labels)
    torch.testing.assert_close(value, ref_value, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-9)
    # per row it is another value: the documents really changed the normaliser
    row = chunked(TADLoss(k=k, beta=beta), 20)(student, teacher, labels)
    assert abs(float(row) - float(ref_value)) > 1e-4
    # row scope ignores document ids; one document per row is the row scope
    assert torch.equal(TADLoss(k=k, beta=beta).sum_and_count(
        student, teacher, labels, document_ids=docs).total, TADLoss(k=k, beta=beta).sum_and_count(
        student, teacher, labels).total)
    one = TADLoss(k=k, beta=beta, abar_scope="document").sum_and_count(
        student, teacher, labels, document_ids=torch.zeros_like(docs)).total
    torch.testing.assert_close(one, row * int((labels != IGNORE).sum()), atol=1e-10, rtol=1e-10)


def test_abar_scope_is_checked():
    with pytest.raises(ValueError, match=r"abar_scope must be one of \('row', 'document'\), got 'doc'"):
        TADLoss(abar_scope="doc")
