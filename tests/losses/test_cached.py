"""Divergences from a teacher cache: the bucket cache (top-M ids and log-probabilities plus one
bucket) against float64 references of the same bucketed formulas and the online losses; the
sampled cache (top-K plus draws from the tail) unbiased for the online loss and gradient."""

import pytest
import torch

from tad_torchtune.errors import ConfigError
from tad_torchtune.losses import (
    CacheSpec,
    DivergenceUse,
    DRKLLoss,
    ForwardKLLoss,
    ReverseKLLoss,
    TADLoss,
)
from tad_torchtune.losses.cached import (
    TeacherTopM,
    counter_uniform,
    teacher_sampled,
    teacher_top_m,
)
from tad_torchtune.losses.fused import fused_head
from tad_torchtune.losses.terms import finished
from tests.losses import reference as ref
from tests.helpers.losses import (
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
    "forward_kl": (lambda k: ForwardKLLoss(), lambda s, t, y, k, m:
                   ref.forward_kl_cached(s, t, y, m)),
    "reverse_kl": (lambda k: ReverseKLLoss(), lambda s, t, y, k, m:
                   ref.reverse_kl_cached(s, t, y, m)),
    "tad": (lambda k: TADLoss(k=k, beta=2.0), lambda s, t, y, k, m:
            ref.tad_cached(s, t, y, k, m, 2.0)),
    "drkl": (lambda k: DRKLLoss(gamma=1.7), lambda s, t, y, k, m:
             ref.drkl_cached(s, t, y, m, 1.7)),
}


def cached_loss_and_grad(div, student, teacher, labels, m):
    cache = teacher_top_m(teacher, labels, m, temperature=div.temperature)
    return loss_and_grad(lambda s, t, y: div.sum_and_count(s, cache, y, chunk_size=20).mean(),
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
    cached = div.sum_and_count(student, teacher_top_m(teacher, labels, m), labels)
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
    value = div.sum_and_count(s, bad, labels, chunk_size=20).mean()
    value.backward()
    expected, _ = cached_loss_and_grad(div, student, teacher, labels, 8)
    torch.testing.assert_close(value.detach(), expected, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(s.grad).all() and not s.grad[ignored].any()
    s.grad = None
    zero = div.sum_and_count(s, bad, torch.full_like(labels, IGNORE)).mean()
    zero.backward()
    assert float(zero.detach()) == 0.0 and not s.grad.any()


def test_k_above_top_m_is_refused_naming_both():
    student, teacher, labels = sharp_inputs(36)
    with pytest.raises(ValueError, match=r"k=10 exceeds the teacher cache's top_m=8"):
        TADLoss(k=10).sum_and_count(student, teacher_top_m(teacher, labels, 8), labels)


@pytest.mark.parametrize("name,compile_chunks", [(name, False) for name in sorted(CASES)]
                         + [pytest.param("drkl", True, marks=pytest.mark.slow)])
def test_fused_head_from_the_cache_equals_unfused(name, compile_chunks):
    """The fused head reads the student's LSE and its logits at the cached ids only: no teacher
    projection; CE + cached divergence equal their unfused values and gradients (eagerly, and
    through inductor)."""
    from tests.helpers.losses import make_case

    torch._dynamo.reset()
    make_div, _ = CASES[name]
    h_s, w_s, h_t, w_t, labels = make_case(37, torch.float64)
    assert_fused_from_cache_equals_unfused(make_div(5), teacher_top_m(h_t @ w_t.T, labels, 20),
                                           h_s, w_s, labels, compile_chunks=compile_chunks)


@pytest.mark.parametrize("kind,compile_chunks", [
    ("top_m", False), ("sampled", False), pytest.param("sampled", True, marks=pytest.mark.slow)])
def test_fused_head_from_a_cache_with_a_student_softcap(kind, compile_chunks):
    """A soft-capped student (Gemma2's) from either cache, CE + TAD at kd_weight 2 with ignored
    positions: the cap's derivative, the weight and the row mask reach the gradient at the
    cached ids as everywhere else (the closed forms write those entries apart: ``SparseGrad``)."""
    from tests.helpers.losses import make_case

    torch._dynamo.reset()
    h_s, w_s, h_t, w_t, labels = make_case(41, torch.float64)
    logits = h_t @ w_t.T
    cache = (teacher_top_m(logits, labels, 20) if kind == "top_m" else
             teacher_sampled(logits, 10, 6, seed=2, blocks=torch.arange(h_t.shape[0])))
    assert (labels == IGNORE).any()
    assert_fused_from_cache_equals_unfused(TADLoss(k=5), cache, h_s, w_s * 4, labels,
                                           student_softcap=3.0, compile_chunks=compile_chunks)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_fused_head_from_the_cache_at_a_temperature(ce_weight):
    """At temperature 2 the CE is not folded into the closed form: the divergence's gradient
    (a ``SparseGrad``) is finished at ``kd_weight / tau`` alone, or first, for the CE to be
    added to it; with a soft-capped student, both equal the unfused path."""
    from tests.helpers.losses import make_case

    h_s, w_s, h_t, w_t, labels = make_case(42, torch.float64)
    div = TADLoss(k=5, temperature=2.0)
    cache = teacher_top_m(h_t @ w_t.T, labels, 20, temperature=2.0)
    assert_fused_from_cache_equals_unfused(div, cache, h_s, w_s * 4, labels, ce_weight=ce_weight,
                                           kd_weight=3.0, student_softcap=3.0)


@pytest.mark.parametrize("mode", ["eager", "traced"])
@pytest.mark.parametrize("ce_weight", [None, 0.6])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bucket_gradient_equals_autograd(name, ce_weight, mode):
    """The bucket adapter's gradient (autograd on the M + 1 outcomes, then ``bucket_grad``)
    against autograd through its chunk function over the whole ``[n, V]`` logits, labels inside
    and outside the cached ids; eagerly and as ``torch.compile`` traces it."""
    make_div, _ = CASES[name]
    div = make_div(4)
    student, teacher, labels = sharp_inputs(47)
    ids = teacher_top_m(teacher, labels, 12).ids
    labels = labels.clone()
    labels.view(-1)[::3] = torch.where(labels.view(-1)[::3] != IGNORE,
                                       ids.reshape(-1, 12)[::3, 5], IGNORE)
    cache = teacher_top_m(teacher, labels, 12)  # every third label among the cached ids
    valid = (labels != IGNORE).reshape(-1)
    y = torch.where(valid, labels.reshape(-1), 0)
    inputs = cache.chunk_inputs(div, valid, (1, y.shape[0]))
    among = (cache.ids.reshape(-1, 12) == y.unsqueeze(-1)).any(-1)[valid]
    assert 0.2 < among.float().mean() < 0.8  # both kinds of label
    assert_chunk_grad_equals_autograd(cache, div, student.reshape(y.shape[0], -1), y, inputs,
                                      ce_weight, mode)


def with_finished_grad(fn):
    """A cache adapter's ``chunk_grad_fn`` whose gradient is one tensor (``terms.finished``), as
    the fused head's compiled chunk function returns it (a ``SparseGrad`` holds a function:
    ``torch.compile`` cannot return one)."""

    def grad_fn(*args, **kwargs):
        out = fn(*args, **kwargs)
        return (*out[:2], finished(out[2]), *out[3:])

    return grad_fn


def assert_chunk_grad_equals_autograd(cache, div, s, y, inputs, ce_weight, mode):
    """The cache adapter's ``chunk_grad_fn`` (eagerly, or as ``torch.compile`` traces it:
    AOTAutograd's graph of the whole function, run without code generation) against autograd
    of its ``chunk_fn`` plus torch's CE: value, diagnostics, gradient and the CE."""
    s_ = s.clone().requires_grad_(True)
    value, stats = cache.chunk_fn(div)(s_, y, *inputs)
    objective = value if ce_weight is None else value + ce_weight * torch.nn.functional.cross_entropy(
        s_, y, reduction="none")
    (grad,) = torch.autograd.grad(objective.sum(), s_)
    fn = with_finished_grad(cache.chunk_grad_fn(div))
    if mode == "traced":
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
    out = fn(s, y, *inputs, ce_weight=ce_weight)
    torch.testing.assert_close(out[0], value.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out[2], grad, atol=1e-12, rtol=1e-9)
    for key in stats:
        torch.testing.assert_close(out[1][key], stats[key].detach(), atol=1e-12, rtol=1e-10)
    if ce_weight is not None:
        ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
        torch.testing.assert_close(out[3], ce, atol=1e-12, rtol=1e-10)


def assert_fused_from_cache_equals_unfused(div, cache, h_s, w_s, labels, ce_weight=0.5,
                                           kd_weight=2.0, **head_kwargs):
    """CE + the divergence from ``cache``: the fused head's values, diagnostics and gradients
    equal those of the unfused path on the materialised student logits (soft-capped with
    ``student_softcap``)."""
    from tad_torchtune.losses.ce import chunked_cross_entropy

    hs, ws = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s))
    logits = hs @ ws.T
    cap = head_kwargs.get("student_softcap")
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    ce, _ = chunked_cross_entropy(logits, labels)
    kd = div.sum_and_count(logits, cache, labels)
    (ce_weight * ce + kd_weight * kd.total).backward()
    hf, wf = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s))
    out = fused_head(hf, wf, labels, divergence=div, teacher_cache=cache, ce_weight=ce_weight,
                     kd_weight=kd_weight, chunk_size=13, compute_ce=True, **head_kwargs)
    out.objective.backward()
    torch.testing.assert_close(out.kd.total, kd.total.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.ce, ce.detach(), atol=1e-10, rtol=1e-10)
    for key in kd.stats:
        torch.testing.assert_close(out.kd.stats[key], kd.stats[key], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(hf.grad, hs.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(wf.grad, ws.grad, atol=1e-10, rtol=1e-9)


def test_a_step_from_the_cache_projects_no_teacher():
    """CE + cached TAD: the student's projection and its two gradient products, 3 x 2 N V D."""
    from tests.helpers.losses import D, make_case, matmul_flops

    h_s, w_s, h_t, w_t, labels = make_case(38)
    cache = teacher_top_m(h_t @ w_t.T, labels, 16)
    hs, ws = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s))

    def step():
        fused_head(hs, ws, labels, divergence=TADLoss(k=10), teacher_cache=cache,
                   chunk_size=12).objective.backward()

    assert matmul_flops(step) == 3 * 2 * B * T * V * D


# ----------------------------------------------------------------------------- the sampled cache


SB, ST, SV = 2, 9, 60  # small: hundreds of cache seeds per test


def sampled_case(seed=40):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(SB, ST, SV, generator=gen, dtype=torch.float64) * 1.5
    scale = torch.rand(SB, ST, 1, generator=gen, dtype=torch.float64) * 2 + 0.5
    teacher = torch.randn(SB, ST, SV, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, SV, (SB, ST), generator=gen)
    labels[0, :2] = IGNORE
    return student, teacher, labels


def sampled_entries(teacher, top_m, samples, seed, temperature=1.0):
    return teacher_sampled(teacher, top_m, samples, seed=seed, blocks=torch.arange(SB) + 7,
                           temperature=temperature)


SAMPLED = {"tad_k3": lambda: TADLoss(k=3, beta=2.0), "tad_k6": lambda: TADLoss(k=6, beta=0.5),
           "forward_kl": lambda: ForwardKLLoss()}


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_the_sampled_cache_is_unbiased_for_the_loss_and_its_gradient(name):
    """Over many cache seeds the mean of the sampled loss, and of its gradient projected on 16
    random directions, equals the online (exact) one within 6 standard errors of the mean; the
    gradient on the teacher's top-K ids does not depend on the draws and equals it exactly."""
    div = SAMPLED[name]()
    student, teacher, labels = sampled_case()
    online, online_grad = loss_and_grad(div, student, teacher, labels)
    values, grads = [], []
    for seed in range(600):
        cache = sampled_entries(teacher, 6, 3, seed)
        v, g = loss_and_grad(lambda s, t, y: div.sum_and_count(s, cache, y).mean(), student,
                             teacher, labels)
        values.append(v)
        grads.append(g)
    values, grads = torch.stack(values), torch.stack(grads)
    n = values.shape[0]
    bound = 6 * values.std() / n ** 0.5
    assert abs(float(values.mean() - online)) < float(bound), (values.mean(), online, bound)
    directions = torch.randn(16, online_grad.numel(), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1))
    proj = grads.reshape(n, -1) @ directions.T  # (n, 16)
    err = (proj.mean(0) - directions @ online_grad.reshape(-1)).abs()
    assert (err < 6 * proj.std(0) / n ** 0.5).all(), (err / (proj.std(0) / n ** 0.5)).max()
    k = div.top_k or 6
    top = teacher.topk(k, -1).indices
    torch.testing.assert_close(grads.gather(-1, top.expand(n, *top.shape)),
                               online_grad.gather(-1, top).expand(n, *top.shape), atol=1e-13,
                               rtol=1e-9)
    assert values.std() > 0 and (proj.std(0) > 0).all()  # the test saw sampling noise


def test_a_biased_estimate_fails_the_unbiasedness_bound():
    """The bound above can fail: the plug-in estimate of the tail term (the empirical
    distribution of the draws in place of pt) is biased, and the same check catches it."""
    student, teacher, labels = sampled_case()
    online = float(ForwardKLLoss()(student, teacher, labels))
    valid = labels != IGNORE
    values = []
    for seed in range(300):
        cache = sampled_entries(teacher, 6, 3, seed)
        p = torch.softmax(teacher, -1)
        q = torch.softmax(student, -1)
        top = cache.ids
        kl_top = (p.gather(-1, top) * (p.gather(-1, top) / q.gather(-1, top)).log()).sum(-1)
        counts = torch.zeros_like(p).scatter_add_(-1, cache.draws, torch.ones_like(
            cache.draws, dtype=p.dtype)) / cache.draws.shape[-1]
        alpha = cache.log_tail.exp()
        pt_hat = counts * alpha.unsqueeze(-1)
        qt = q.scatter(-1, top, 0.0)
        plug_in = torch.where(pt_hat > 0, pt_hat * (pt_hat / qt).log(), 0.0).sum(-1)
        values.append(float((kl_top + plug_in)[valid].mean()))
    values = torch.tensor(values, dtype=torch.float64)
    assert abs(float(values.mean()) - online) > 6 * float(values.std()) / len(values) ** 0.5


def test_a_tail_of_one_id_is_exact_from_one_draw():
    student, teacher, labels = sampled_case(41)
    top = teacher.topk(5, -1).indices
    lone = teacher.topk(6, -1).indices[..., 5:]
    keep = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, top, True)
    keep.scatter_(-1, lone, True)
    teacher = teacher.masked_fill(~keep, float("-inf"))  # rank 6 is the whole rest
    for div in (TADLoss(k=3), TADLoss(k=5), ForwardKLLoss()):
        cache = sampled_entries(teacher, 5, 1, seed=0)
        assert torch.equal(cache.draws[..., 0], lone[..., 0]) and (cache.entropy == 0).all()
        value, grad = loss_and_grad(lambda s, t, y: div.sum_and_count(s, cache, y).mean(),
                                    student, teacher, labels)
        online, online_grad = loss_and_grad(div, student, teacher, labels)
        torch.testing.assert_close(value, online, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(grad, online_grad, atol=1e-13, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_sampled_tad_exact_parts_equal_online(k):
    student, teacher, labels = sampled_case(42)
    div = TADLoss(k=k)
    online = div.sum_and_count(student, teacher, labels)
    for seed in (0, 1):
        cached = div.sum_and_count(student, sampled_entries(teacher, 8, 4, seed), labels)
        for stat in ("dkl1", "tail_mass", "abar"):
            torch.testing.assert_close(cached.stats[stat], online.stats[stat], atol=1e-11,
                                       rtol=1e-11)


@pytest.mark.parametrize("mode", ["eager", "traced"])
@pytest.mark.parametrize("name", sorted(SAMPLED))
@pytest.mark.parametrize("ce_weight", [None, 0.7])
def test_sampled_closed_form_gradient_equals_autograd(name, ce_weight, mode):
    """The closed form against autograd of the cache's chunk function: as run eagerly, and as
    ``torch.compile`` traces it (its branch without ``[n, V]`` scatters; AOTAutograd's graph
    run without code generation)."""
    div = SAMPLED[name]()
    student, teacher, labels = sampled_case(43)
    cache = sampled_entries(teacher, 6, 5, seed=3)
    valid = (labels != IGNORE).reshape(-1)
    inputs = cache.chunk_inputs(div, valid, (SB, ST))
    y = torch.where(valid, labels.reshape(-1), 0)
    assert_chunk_grad_equals_autograd(cache, div, student.reshape(-1, SV), y, inputs, ce_weight,
                                      mode)


def test_traced_sampled_gradient_scatters_once():
    """What ``torch.compile`` traces of the sampled closed form, finished, holds one scatter
    (each sparse id's total written over the dense gradient) where the eager form runs five."""
    div = SAMPLED["tad_k3"]()
    student, teacher, labels = sampled_case(43)
    cache = sampled_entries(teacher, 6, 5, seed=3)
    valid = (labels != IGNORE).reshape(-1)
    inputs = cache.chunk_inputs(div, valid, (SB, ST))
    y = torch.where(valid, labels.reshape(-1), 0)
    seen = []

    def recording(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(with_finished_grad(cache.chunk_grad_fn(div)), backend=recording,
                  fullgraph=True)(student.reshape(-1, SV), y, *inputs, ce_weight=0.5)
    assert [op for op in seen if "scatter" in op] == ["scatter_"], seen


@pytest.mark.parametrize("name,compile_chunks", [(name, False) for name in sorted(SAMPLED)]
                         + [pytest.param("tad_k3", True, marks=pytest.mark.slow)])
def test_fused_head_from_the_sampled_cache_equals_unfused(name, compile_chunks):
    """Eagerly, and through inductor (``compile: true``: the traced closed form)."""
    from tests.helpers.losses import make_case

    torch._dynamo.reset()
    h_s, w_s, h_t, w_t, labels = make_case(44, torch.float64)
    cache = teacher_sampled(h_t @ w_t.T, 10, 6, seed=5, blocks=torch.arange(h_t.shape[0]))
    assert_fused_from_cache_equals_unfused(SAMPLED[name](), cache, h_s, w_s, labels,
                                           compile_chunks=compile_chunks)


def test_sampled_cache_at_a_temperature_is_that_of_the_tempered_teacher():
    student, teacher, labels = sampled_case(45)
    div = ForwardKLLoss(temperature=2.0)
    cache = sampled_entries(teacher, 5, 1, seed=0, temperature=2.0)
    plain = sampled_entries(teacher / 2.0, 5, 1, seed=0)
    for a, b in zip(cache.tensors(), plain.tensors()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    value = div.sum_and_count(student, cache, labels).mean()
    assert torch.isfinite(value)


def test_draws_are_sorted_ids_of_the_tail_and_reproducible():
    _, teacher, _ = sampled_case(46)
    a = sampled_entries(teacher, 4, 16, seed=9)
    b = sampled_entries(teacher, 4, 16, seed=9)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert (a.draws[..., 1:] >= a.draws[..., :-1]).all()
    assert not (a.draws.unsqueeze(-1) == a.ids.unsqueeze(-2)).any()  # never a top id
    c = sampled_entries(teacher, 4, 16, seed=10)
    assert not torch.equal(a.draws, c.draws)
    # the log-probabilities and masses are those of the teacher's softmax
    logp = torch.log_softmax(teacher, -1)
    torch.testing.assert_close(a.logp, logp.gather(-1, a.ids), atol=1e-12, rtol=1e-12)
    rest = logp.scatter(-1, a.ids, float("-inf"))
    torch.testing.assert_close(a.log_tail, rest.logsumexp(-1), atol=1e-12, rtol=1e-12)
    pt = (rest - rest.logsumexp(-1, keepdim=True)).exp()
    entropy = -(pt * torch.where(pt > 0, pt.log(), 0.0)).sum(-1)
    torch.testing.assert_close(a.entropy, entropy, atol=1e-12, rtol=1e-10)


def test_counter_uniform_depends_on_its_counter_only():
    blocks, positions = torch.arange(300), torch.arange(128)
    u = counter_uniform(3, blocks, positions)
    assert u.shape == (300, 128) and (u >= 0).all() and (u < 1).all()
    assert torch.equal(u[17:19], counter_uniform(3, blocks[17:19], positions))
    assert torch.equal(u[:, 5:9], counter_uniform(3, blocks, positions[5:9]))
    assert not torch.equal(u, counter_uniform(4, blocks, positions))
    # uniform: the empirical CDF of 38400 values within the Kolmogorov-Smirnov 0.1% bound
    values = u.flatten().sort().values
    ecdf = torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()
    assert float((ecdf - values).abs().max()) < 1.95 / values.numel() ** 0.5


@pytest.mark.parametrize("div,message", [
    (ReverseKLLoss(), r"kd_loss._component_: ReverseKLLoss cannot be estimated from a sampled "
                      r"teacher cache \(cache_mode=sampled"),
    (DRKLLoss(), r"kd_loss._component_: DRKLLoss cannot be estimated"),
    (TADLoss(k=12), r"kd_loss.k: k=12 exceeds the teacher cache's top_m=10"),
])
def test_what_a_sampled_cache_cannot_serve_is_refused_in_one_line(div, message):
    use = DivergenceUse(vocab_size=100, cache=CacheSpec("sampled", 10, 1.0))
    with pytest.raises(ConfigError, match=message):
        div.validate(use)
    ForwardKLLoss().validate(use)
    TADLoss(k=10).validate(use)


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_a_float32_sampled_cache_serves_float64_logits(name):
    """The cache's values (float32 here, float16 on disk) read in the logits' dtype: a float64
    student (as references run) gets what the same cache's values in float64 give, within the
    float32 precision of the tail weight, computed in the cache's dtype either way."""
    import dataclasses

    from tests.helpers.losses import make_case

    h_s, w_s, h_t, w_t, labels = make_case(46, torch.float64)
    cache32 = teacher_sampled((h_t @ w_t.T).float(), 10, 6, seed=5,
                              blocks=torch.arange(h_t.shape[0]))
    cache64 = dataclasses.replace(cache32, **{
        f: getattr(cache32, f).double() for f in ("logp", "log_tail", "entropy")})
    assert cache32.logp.dtype == torch.float32
    outs = []
    for cache in (cache32, cache64):
        h = h_s.detach().requires_grad_(True)
        out = fused_head(h, w_s, labels, divergence=SAMPLED[name](), teacher_cache=cache,
                         compute_ce=True)
        out.objective.backward()
        outs.append((out.objective.detach(), h.grad))
    for a, b in zip(*outs):  # the tail weight is the cache's float32 math either way
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
