"""Divergences from a teacher cache (top-M ids and log-probabilities plus one bucket) against
float64 references of the same bucketed formulas, and against the online losses."""

import pytest
import torch

from tad_torchtune.losses import DRKLLoss, ForwardKLLoss, ReverseKLLoss, TADLoss
from tad_torchtune.losses.cached import TeacherTopM, teacher_top_m
from tad_torchtune.losses.fused import fused_head
from tests.losses import reference as ref
from tests.losses.test_divergences import (
    IGNORE,
    B,
    T,
    V,
    loss_and_grad,
    make_inputs,
    reference_loss_and_grad,
)


def sharp_inputs(seed, dtype=torch.float64, **kw):
    """make_inputs with tokens of different sharpness (tail masses that differ)."""
    student, teacher, labels = make_inputs(seed, dtype, **kw)
    scale = torch.rand(*teacher.shape[:-1], 1, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).mul(5.0).add(0.5)
    return student, (teacher * scale).to(dtype), labels


CASES = {
    "forward_kl": (lambda k: ForwardKLLoss(chunk_size=20), lambda s, t, y, k, m:
                   ref.forward_kl_cached(s, t, y, m)),
    "reverse_kl": (lambda k: ReverseKLLoss(chunk_size=20), lambda s, t, y, k, m:
                   ref.reverse_kl_cached(s, t, y, m)),
    "tad": (lambda k: TADLoss(k=k, beta=2.0, chunk_size=20), lambda s, t, y, k, m:
            ref.tad_cached(s, t, y, k, m, 2.0)),
    "drkl": (lambda k: DRKLLoss(gamma=1.7, chunk_size=20), lambda s, t, y, k, m:
             ref.drkl_cached(s, t, y, m, 1.7)),
}


def cached_loss_and_grad(div, student, teacher, labels, m):
    cache = teacher_top_m(teacher, labels, m, temperature=div.temperature)
    return loss_and_grad(lambda s, t, y: div.sum_and_count_cached(s, cache, y).mean(),
                         student, teacher, labels)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("k,m", [(1, 1), (1, 16), (10, 10), (10, 40)])
def test_cached_losses_match_the_bucketed_reference(name, k, m):
    make_div, reference = CASES[name]
    student, teacher, labels = sharp_inputs(31)
    value, grad = cached_loss_and_grad(make_div(k), student, teacher, labels, m)
    ref_value, ref_grad = reference_loss_and_grad(
        lambda s, t, y: reference(s, t, y, k, m), student, teacher, labels)
    torch.testing.assert_close(value, ref_value, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_with_one_id_in_the_bucket_the_cache_is_exact(name):
    make_div, _ = CASES[name]
    div = make_div(10)
    student, teacher, labels = sharp_inputs(32)
    value, grad = cached_loss_and_grad(div, student, teacher, labels, V - 1)
    online, online_grad = loss_and_grad(div, student, teacher, labels)
    torch.testing.assert_close(value, online, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, online_grad, atol=1e-13, rtol=1e-9)
    # a smaller M is a lower bound of the online value (merging outcomes lowers a KL)
    if name != "tad":  # TAD reweights its tail term per row
        smaller, _ = cached_loss_and_grad(div, student, teacher, labels, 8)
        assert float(smaller) < float(online)


@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("m", [10, 17, 64])
def test_tad_dkl1_and_tail_mass_are_exact_for_every_m(k, m):
    student, teacher, labels = sharp_inputs(33)
    div = TADLoss(k=k)
    online = div.sum_and_count(student, teacher, labels)
    cached = div.sum_and_count_cached(student, teacher_top_m(teacher, labels, m), labels)
    for stat in ("dkl1", "tail_mass", "abar"):
        torch.testing.assert_close(cached.stats[stat], online.stats[stat], atol=1e-11, rtol=1e-11)
    if m < V - 1 and k < m:  # the tail term is the approximate part
        assert not torch.allclose(cached.stats["dkl2"], online.stats["dkl2"], rtol=1e-6)


def test_temperature_and_float32():
    student, teacher, labels = sharp_inputs(34, torch.float32)
    div = TADLoss(k=4, temperature=2.0)
    value, grad = cached_loss_and_grad(div, student, teacher, labels, 12)
    ref_value, ref_grad = reference_loss_and_grad(
        lambda s, t, y: ref.tad_cached(s, t, y, 4, 12, 2.0, temperature=2.0), student, teacher,
        labels)
    torch.testing.assert_close(value.double(), ref_value, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ignored_positions_hold_garbage_and_all_ignored_is_zero(name):
    make_div, _ = CASES[name]
    div = make_div(3)
    student, teacher, labels = sharp_inputs(35)
    cache = teacher_top_m(teacher, labels, 8)
    ignored = labels == IGNORE
    bad = TeacherTopM(torch.where(ignored[..., None], 0, cache.ids),
                      cache.logp.masked_fill(ignored[..., None], float("nan")),
                      cache.log_rest.masked_fill(ignored, float("inf")),
                      cache.label_logp.masked_fill(ignored, float("nan")))
    s = student.clone().requires_grad_(True)
    value = div.sum_and_count_cached(s, bad, labels).mean()
    value.backward()
    expected, _ = cached_loss_and_grad(div, student, teacher, labels, 8)
    torch.testing.assert_close(value.detach(), expected, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(s.grad).all() and not s.grad[ignored].any()
    s.grad = None
    zero = div.sum_and_count_cached(s, bad, torch.full_like(labels, IGNORE)).mean()
    zero.backward()
    assert float(zero.detach()) == 0.0 and not s.grad.any()


def test_k_above_top_m_is_refused_naming_both():
    student, teacher, labels = sharp_inputs(36)
    with pytest.raises(ValueError, match=r"k=10 exceeds the teacher cache's top_m=8"):
        TADLoss(k=10).sum_and_count_cached(student, teacher_top_m(teacher, labels, 8), labels)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_head_from_the_cache_equals_unfused(name):
    """The fused head reads the student's LSE and its logits at the cached ids only: no teacher
    projection; CE + cached divergence equal their unfused values and gradients."""
    from tad_torchtune.losses.ce import chunked_cross_entropy
    from tests.losses.test_fused import make_case

    make_div, _ = CASES[name]
    div = make_div(5)
    h_s, w_s, h_t, w_t, labels = make_case(37, torch.float64)
    cache = teacher_top_m(h_t @ w_t.T, labels, 20)
    hs, ws = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s))
    logits = hs @ ws.T
    ce, _ = chunked_cross_entropy(logits, labels)
    kd = div.sum_and_count_cached(logits, cache, labels)
    (0.5 * ce + 2.0 * kd.total).backward()
    hf, wf = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s))
    out = fused_head(hf, wf, labels, divergence=div, teacher_cache=cache, ce_weight=0.5,
                     kd_weight=2.0, chunk_size=13)
    out.objective.backward()
    torch.testing.assert_close(out.kd.total, kd.total.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.ce, ce.detach(), atol=1e-10, rtol=1e-10)
    for key in kd.stats:
        torch.testing.assert_close(out.kd.stats[key], kd.stats[key], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(hf.grad, hs.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(wf.grad, ws.grad, atol=1e-10, rtol=1e-9)


def test_a_step_from_the_cache_projects_no_teacher():
    """CE + cached TAD: the student's projection and its two gradient products, 3 x 2 N V D."""
    from tests.losses.test_fused import D, make_case, matmul_flops

    h_s, w_s, h_t, w_t, labels = make_case(38)
    cache = teacher_top_m(h_t @ w_t.T, labels, 16)
    hs, ws = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s))

    def step():
        fused_head(hs, ws, labels, divergence=TADLoss(k=10), teacher_cache=cache,
                   chunk_size=12).objective.backward()

    assert matmul_flops(step) == 3 * 2 * B * T * V * D
