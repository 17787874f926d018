import math

import pytest
import torch

from tad_torchtune.losses import (
    DIVERGENCES,
    DRKLLoss,
    ForwardKLLoss,
    HiddenCosineLoss,
    ReverseKLLoss,
    TADLoss,
    align_teacher_vocab,
)
from tad_torchtune.losses.drkl import drkl_parts
from tad_torchtune.losses.engine import logits_teacher_pass
from tad_torchtune.losses.kl import forward_kl_chunk, reverse_kl_chunk
from tad_torchtune.losses.tad import tad_chunk
from tad_torchtune.losses.terms import teacher_top_k
from tests.losses import reference as ref

B, T, V = 3, 47, 123  # deliberately odd shape
IGNORE = -100

# (dtype, atol, rtol) for the loss value and for the gradient w.r.t. the student logits.
# bf16 inputs are compared with a float64 reference on the SAME bf16 values: the loss is computed
# in float32, the gradient comes back in bf16 (8 bits of mantissa: relative error 2**-8).
LOSS_TOL = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-5)]
GRAD_TOL = {torch.float32: (1e-7, 1e-4), torch.bfloat16: (1e-7, 8e-3)}


def distinct_teacher(gen: torch.Generator, b=B, t=T, v=V) -> torch.Tensor:
    """Teacher logits with distinct values per row (multiples of 1/16, exact in bf16), so that
    the top-K set is unambiguous in every dtype."""
    rows = [torch.randperm(v, generator=gen) for _ in range(b * t)]
    return ((torch.stack(rows).float() - v / 2) / 16).reshape(b, t, v)


def make_inputs(seed: int, dtype: torch.dtype, b=B, t=T, v=V, masked=True):
    gen = torch.Generator().manual_seed(seed)
    teacher = distinct_teacher(gen, b, t, v).to(dtype)
    student = (torch.randn(b, t, v, generator=gen) * 1.5).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    if masked:
        labels[0, :7] = IGNORE  # a masked prompt
        labels[1, -5:] = IGNORE  # masked padding
    return student, teacher, labels


def chunked(div, chunk_size):
    """``div``'s mean loss walked in chunks of ``chunk_size`` tokens (the engine's argument)."""
    return lambda s, t, y: div.sum_and_count(s, t, y, chunk_size=chunk_size).mean()


def loss_and_grad(loss_fn, student, teacher, labels):
    s = student.clone().requires_grad_(True)
    value = loss_fn(s, teacher, labels)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


def reference_loss_and_grad(ref_fn, student, teacher, labels, **kw):
    s = student.double().requires_grad_(True)
    value = ref_fn(s, teacher.double(), labels, **kw)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


def assert_matches_reference(loss_fn, ref_fn, dtype, atol, rtol, seed=0, **ref_kw):
    student, teacher, labels = make_inputs(seed, dtype)
    value, grad = loss_and_grad(loss_fn, student, teacher, labels)
    ref_value, ref_grad = reference_loss_and_grad(ref_fn, student, teacher, labels, **ref_kw)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, atol=atol, rtol=rtol)
    g_atol, g_rtol = GRAD_TOL[dtype]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, atol=g_atol, rtol=g_rtol)


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


@pytest.mark.parametrize("dtype,atol,rtol", LOSS_TOL)
@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_drkl_matches_reference(dtype, atol, rtol, gamma):
    assert_matches_reference(
        chunked(DRKLLoss(gamma=gamma), 50), ref.drkl, dtype, atol, rtol, gamma=gamma
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 13, 141, 1000])
def test_chunk_size_does_not_change_value_or_grad(chunk_size):
    student, teacher, labels = make_inputs(3, torch.float32)
    base_v, base_g = loss_and_grad(chunked(TADLoss(k=5), None), student, teacher, labels)
    v, g = loss_and_grad(chunked(TADLoss(k=5), chunk_size), student, teacher, labels)
    torch.testing.assert_close(v, base_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, base_g, atol=1e-9, rtol=1e-6)


# ----------------------------------------------------------------------------- identities


def _flat(seed=0, n=64, v=V, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen, dtype=dtype) * 2,
            torch.randn(n, v, generator=gen, dtype=dtype) * 2,
            torch.randint(0, v, (n,), generator=gen))


@pytest.mark.parametrize("k", [1, 5, 10, 50])
def test_kl_equals_dkl1_plus_alpha_dkl2(k):
    s, t, y = _flat()
    kl, _ = forward_kl_chunk(s, t, y)
    idx, lse, lse_tail = teacher_top_k(t, k)
    ones = torch.ones_like(lse)
    _, stats = tad_chunk(s, t, y, idx, lse, lse_tail, ones, ones)
    torch.testing.assert_close(kl, stats["dkl1"] + stats["tail_mass"] * stats["dkl2"],
                               atol=1e-12, rtol=1e-10)
    # and with weight alphaT the per-token TAD value IS the KL
    value, _ = tad_chunk(s, t, y, idx, lse, lse_tail, stats["tail_mass"], ones)
    torch.testing.assert_close(value, kl, atol=1e-12, rtol=1e-10)


def test_rkl_decomposition():
    s, t, y = _flat(1)
    rkl, _ = reverse_kl_chunk(s, t, y)
    kl_bin, kl_nt, q_y = drkl_parts(s, t, y)
    torch.testing.assert_close(rkl, kl_bin + (1 - q_y) * kl_nt, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "loss_fn",
    [ForwardKLLoss(), ReverseKLLoss(), TADLoss(k=1), TADLoss(k=10, beta=5.0), DRKLLoss(gamma=2.0)],
    ids=["fkl", "rkl", "tad1", "tad10", "drkl"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_when_student_equals_teacher(loss_fn, dtype):
    _, teacher, labels = make_inputs(4, dtype)
    assert abs(float(loss_fn(teacher.clone(), teacher, labels))) < 1e-6
    shifted = (teacher.float() + 3.0).to(dtype)  # a constant shift changes no distribution
    assert abs(float(loss_fn(shifted, teacher, labels))) < 1e-6


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


# ----------------------------------------------------------------------------- gradcheck


# Every registered divergence (a new one is tested here without editing this file), with the
# arguments these small shapes need where its defaults would not do.
_SMALL = {"tad": {"k": 3, "beta": 2.0}, "drkl": {"gamma": 1.5}}
ALL_DIVERGENCES = {
    name: (lambda cls=cls, kw=_SMALL.get(name, {}): chunked(cls(**kw), 4))
    for name, cls in DIVERGENCES.items()
}


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_gradcheck(name):
    loss_fn = ALL_DIVERGENCES[name]()
    student, teacher, labels = make_inputs(6, torch.float64, b=2, t=5, v=11)
    labels[0, 1] = labels[1, 4] = IGNORE
    s = student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, teacher, labels), (s,))


def test_gradcheck_hidden_cosine():
    gen = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.ones(2, 5, dtype=torch.long)
    labels[1, 2] = IGNORE
    assert torch.autograd.gradcheck(lambda x: HiddenCosineLoss()(x, ht, labels), (hs,))


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_all_ignored_gives_zero_and_zero_grad(name):
    student, teacher, labels = make_inputs(7, torch.float32)
    labels = torch.full_like(labels, IGNORE)
    value, grad = loss_and_grad(ALL_DIVERGENCES[name](), student, teacher, labels)
    assert value.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf"), 1e4])
def test_ignored_positions_cannot_leak(name, garbage):
    student, teacher, labels = make_inputs(8, torch.float32)
    loss_fn = ALL_DIVERGENCES[name]()
    v0, g0 = loss_and_grad(loss_fn, student, teacher, labels)
    ignored = labels == IGNORE
    s2, t2 = student.clone(), teacher.clone()
    s2[ignored] = garbage
    t2[ignored] = -garbage if garbage == garbage else garbage
    v1, g1 = loss_and_grad(loss_fn, s2, t2, labels)
    assert torch.equal(v0, v1)
    assert torch.equal(g0, g1)
    assert torch.count_nonzero(g1[ignored]) == 0


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


# ----------------------------------------------------------------------------- extremes


def _finite_loss_and_grad(loss_fn, s, t, labels):
    value, grad = loss_and_grad(loss_fn, s, t, labels)
    assert torch.isfinite(value), value
    assert torch.isfinite(grad).all()
    return value, grad


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite(name, dtype):
    student, teacher, labels = make_inputs(9, torch.float32)
    s = (student * 1e4 / student.abs().amax()).to(dtype)
    t = (teacher * 1e4 / teacher.abs().amax()).to(dtype)
    _finite_loss_and_grad(ALL_DIVERGENCES[name](), s, t, labels)


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_masked_vocabulary_entries(name):
    """-inf in both models at the same ids: probability 0, contributes 0 (same value as dropping
    those ids)."""
    student, teacher, labels = make_inputs(10, torch.float64)
    labels = torch.where(labels == IGNORE, labels, labels % 100)  # labels never masked ids
    s, t = student.clone(), teacher.clone()
    s[..., 100:] = float("-inf")
    t[..., 100:] = float("-inf")
    value, grad = _finite_loss_and_grad(ALL_DIVERGENCES[name](), s, t, labels)
    expected, expected_grad = loss_and_grad(
        ALL_DIVERGENCES[name](), student[..., :100], teacher[..., :100], labels
    )
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad[..., :100], expected_grad, atol=1e-12, rtol=1e-10)
    assert torch.count_nonzero(grad[..., 100:]) == 0


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_hot_teacher(name, dtype):
    student, _, labels = make_inputs(11, torch.float32)
    teacher = torch.zeros(B, T, V)
    teacher.scatter_(-1, torch.randint(0, V, (B, T, 1)), 1e4)
    _finite_loss_and_grad(ALL_DIVERGENCES[name](), student.to(dtype), teacher.to(dtype), labels)


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
    value, grad = _finite_loss_and_grad(TADLoss(k=1), student, teacher, labels)
    torch.testing.assert_close(value, ForwardKLLoss()(student, teacher, labels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tad_student_with_all_mass_on_teacher_top_k(dtype):
    student, teacher, labels = make_inputs(13, torch.float32)
    top = teacher.topk(10, -1).indices
    s = torch.zeros_like(student).scatter_(-1, top, 1e4)
    value, _ = _finite_loss_and_grad(TADLoss(k=10), s.to(dtype), teacher.to(dtype), labels)
    assert value > 100  # log(alphaT/alphaS) is huge: the bucket term must dominate, finitely


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: TADLoss(k=0), "k must be an integer >= 1"),
        (lambda: TADLoss(k=2.5), "k must be an integer >= 1"),
        (lambda: TADLoss(beta=0.0), "beta must be a number > 0"),
        (lambda: TADLoss(beta=-1), "beta must be a number > 0"),
        (lambda: ForwardKLLoss(temperature=0), "temperature must be a number > 0"),
        (lambda: ReverseKLLoss(temperature=-2.0), "temperature must be a number > 0"),
        (lambda: DRKLLoss(gamma=0), "gamma must be a number > 0"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_k_must_be_below_vocab_size_at_call_time():
    student, teacher, labels = make_inputs(14, torch.float32, v=10)
    with pytest.raises(ValueError, match="TADLoss.k: must be < the vocabulary size 10, got 10"):
        TADLoss(k=10)(student, teacher, labels)


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_mismatched_shapes_raise(name):
    student, teacher, labels = make_inputs(15, torch.float32)
    loss_fn = ALL_DIVERGENCES[name]()
    with pytest.raises(ValueError, match="teacher_logits shape"):
        loss_fn(student, teacher[:, :-1], labels)
    with pytest.raises(ValueError, match="labels shape"):
        loss_fn(student, teacher, labels[:, :-1])


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_vocab_mismatch_without_alignment_raises(name):
    student, teacher, labels = make_inputs(16, torch.float32)
    with pytest.raises(ValueError, match=r"teacher_logits shape \(3, 47, 123\) does not match "
                                         r"student_logits shape \(3, 47, 100\).*align_teacher_vocab"):
        ALL_DIVERGENCES[name]()(student[..., :100], teacher, labels % 100)


def test_align_teacher_vocab_is_a_view():
    t = torch.randn(2, 3, 152064)
    out = align_teacher_vocab(t, 151936, "truncate_teacher")
    assert out.shape[-1] == 151936 and out.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="teacher has 152064 logits, student has 151936"):
        align_teacher_vocab(t, 151936, "exact")


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


# ----------------------------------------------------------------------------- compile


# Inductor's cold C++ compile takes minutes per graph on a 2-core CPU, so the full compiler runs
# on TAD (the core loss); the others go through dynamo + AOT autograd (the same tracing, without
# code generation).
@pytest.mark.parametrize(
    "name,backend",
    [pytest.param("tad", "inductor", marks=pytest.mark.slow), ("tad", "aot_eager"),
     ("forward_kl", "aot_eager"), ("reverse_kl", "aot_eager"), ("drkl", "aot_eager")],
)
def test_compile_matches_eager(name, backend):
    torch._dynamo.reset()
    student, teacher, labels = make_inputs(20, torch.float32)
    loss_fn = ALL_DIVERGENCES[name]()
    eager_v, eager_g = loss_and_grad(loss_fn, student, teacher, labels)
    compiled = torch.compile(loss_fn, backend=backend)
    v, g = loss_and_grad(compiled, student, teacher, labels)
    torch.testing.assert_close(v, eager_v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, eager_g, atol=1e-8, rtol=1e-5)


# ----------------------------------------------------------------------------- documents


def documents_of(b, t, seed):
    """Document ids per row: every row cut at random places into 1 to 4 documents."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, t, dtype=torch.long)
    for r in range(b):
        cuts = sorted(torch.randperm(t - 1, generator=g)[: r + 1].add(1).tolist())
        for c in cuts:
            ids[r, c:] += 1
    return ids


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
