"""Inputs and runners shared by the loss tests (``tests/losses/``, ``tests/test_head.py``,
``tests/test_cuda.py``, ``tests/benchmarks/``): random logits and hidden states of a deliberately
odd shape, a loss and its gradient by autograd, the fused head against the unfused losses on
materialised logits, and a matmul flop count. The float64 references themselves live in
``tests/losses/reference.py``."""

import torch

from tad_torchtune.losses import DIVERGENCES, DRKLLoss, TADLoss
from tad_torchtune.losses.ce import chunked_cross_entropy
from tad_torchtune.losses.fused import fused_divergence, fused_head

B, T, D, D_T, V = 3, 47, 16, 24, 123  # deliberately odd: N = 141 tokens, prime-ish sizes
IGNORE = -100

# ------------------------------------------------------------------------ logits (unfused path)

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
    """``(student [b, t, v], teacher [b, t, v], labels [b, t])``; with ``masked`` a masked prompt
    in row 0 and masked padding in row 1."""
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
    """``loss_fn(student, teacher, labels)`` and its gradient w.r.t. ``student``."""
    s = student.clone().requires_grad_(True)
    value = loss_fn(s, teacher, labels)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


def reference_loss_and_grad(ref_fn, student, teacher, labels, **kw):
    """A float64 reference's value and gradient on the same inputs."""
    s = student.double().requires_grad_(True)
    value = ref_fn(s, teacher.double(), labels, **kw)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


def assert_matches_reference(loss_fn, ref_fn, dtype, atol, rtol, seed=0, **ref_kw):
    """``loss_fn``'s value (float32) and gradient (in ``dtype``) against ``ref_fn`` in float64,
    the gradient within ``GRAD_TOL[dtype]``."""
    student, teacher, labels = make_inputs(seed, dtype)
    value, grad = loss_and_grad(loss_fn, student, teacher, labels)
    ref_value, ref_grad = reference_loss_and_grad(ref_fn, student, teacher, labels, **ref_kw)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, atol=atol, rtol=rtol)
    g_atol, g_rtol = GRAD_TOL[dtype]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, atol=g_atol, rtol=g_rtol)


def finite_loss_and_grad(loss_fn, s, t, labels):
    """``loss_and_grad``, asserting that the value and every gradient entry are finite."""
    value, grad = loss_and_grad(loss_fn, s, t, labels)
    assert torch.isfinite(value), value
    assert torch.isfinite(grad).all()
    return value, grad


def flat_inputs(seed=0, n=64, v=V, dtype=torch.float64):
    """One chunk ``(s [n, v], t [n, v], labels [n])`` for the per-chunk functions."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen, dtype=dtype) * 2,
            torch.randn(n, v, generator=gen, dtype=dtype) * 2,
            torch.randint(0, v, (n,), generator=gen))


def documents_of(b, t, seed):
    """Document ids per row: every row cut at random places into 1 to 4 documents."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, t, dtype=torch.long)
    for r in range(b):
        cuts = sorted(torch.randperm(t - 1, generator=g)[: r + 1].add(1).tolist())
        for c in cuts:
            ids[r, c:] += 1
    return ids


# ------------------------------------------------------------- hidden states (the fused path)

#: every registered divergence with its defaults (TAD: K=10, beta=2), plus variants: name ->
#: constructor taking keyword arguments (``temperature=...``)
DIVERGENCE_CASES = {
    **DIVERGENCES,
    "tad_k1": lambda **kw: TADLoss(k=1, beta=2.0, **kw),
    "drkl_gamma2.5": lambda **kw: DRKLLoss(gamma=2.5, **kw),
}

# (dtype, atol, rtol) of fused vs unfused in the SAME dtype; atol is RELATIVE TO THE LARGEST
# ENTRY of the expected tensor: float32 gradients of both paths carry ~1e-6 of that much
# cancellation error on their small entries (each path is that far from float64, too).
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


def make_case(seed, dtype=torch.float32, b=B, t=T, v=V, v_t=None, masked=True):
    """``(h_s [b, t, D], w_s [v, D], h_t [b, t, D_T], w_t [v_t or v, D_T], labels [b, t])``."""
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, t, D, generator=gen).to(dtype)
    w_s = (torch.randn(v, D, generator=gen) * 0.6).to(dtype)
    h_t = torch.randn(b, t, D_T, generator=gen).to(dtype)
    w_t = (torch.randn(v_t or v, D_T, generator=gen) * 0.6).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    if masked:
        labels[0, :7] = IGNORE  # a masked prompt
        labels[min(1, b - 1), -5:] = IGNORE  # masked padding
    return h_s, w_s, h_t, w_t, labels


def softcap(z, cap):
    return z if cap is None else torch.tanh(z / cap) * cap


def unfused(div, h_s, w_s, h_t, w_t, labels, s_cap=None, t_cap=None):
    """Materialise the logits, as the recipe's unfused path does, and backprop."""
    h_s = h_s.detach().clone().requires_grad_(True)
    w_s = w_s.detach().clone().requires_grad_(True)
    out = div.sum_and_count(softcap(h_s @ w_s.T, s_cap), softcap(h_t @ w_t.T, t_cap), labels)
    out.total.backward()
    return out, h_s.grad, w_s.grad


def fused(div, h_s, w_s, h_t, w_t, labels, **kw):
    """``fused_divergence`` backpropagated: ``(output, grad_h_s, grad_w_s)``."""
    h_s = h_s.detach().clone().requires_grad_(True)
    w_s = w_s.detach().clone().requires_grad_(True)
    out = fused_divergence(div, h_s, w_s, h_t, w_t, labels, **kw)
    out.total.backward()
    return out, h_s.grad, w_s.grad


def assert_same(a, b, dtype):
    """Two ``(output, grad_h, grad_w)`` within ``TOL[dtype]`` scaled by ``b``'s largest entry."""
    (out_a, gh_a, gw_a), (out_b, gh_b, gw_b) = a, b
    atol, rtol = TOL[dtype]

    def close(x, y):
        torch.testing.assert_close(x, y, atol=atol * float(y.detach().abs().max()), rtol=rtol)

    close(out_a.total, out_b.total)
    assert int(out_a.num_tokens) == int(out_b.num_tokens)
    assert sorted(out_a.stats) == sorted(out_b.stats)
    for k in out_a.stats:
        close(out_a.stats[k], out_b.stats[k])
    close(gh_a, gh_b)
    close(gw_a, gw_b)


def bf16_reference(div, h_s, w_s, h_t, w_t, labels):
    """float64 math on the SAME bf16 logits, chained to the hidden states and weight in float64:
    ``(output, grad_h, grad_w)``."""
    z = (h_s @ w_s.T).double().requires_grad_(True)  # the bf16 logits, exactly
    ref = div.sum_and_count(z, (h_t @ w_t.T).double(), labels)
    (g_z,) = torch.autograd.grad(ref.total, z)
    return ref, g_z @ w_s.double(), g_z.reshape(-1, V).T @ h_s.double().reshape(-1, D)


def head(div, h_s, w_s, h_t, w_t, labels, **kw):
    """The fused head (CE + divergence from one student projection), backpropagated."""
    h_s = h_s.detach().clone().requires_grad_(True)
    w_s = w_s.detach().clone().requires_grad_(True)
    out = fused_head(h_s, w_s, labels, divergence=div, teacher_hidden=h_t, teacher_weight=w_t,
                     **kw)
    out.objective.backward()
    return out, h_s.grad, w_s.grad


def unfused_head(div, h_s, w_s, h_t, w_t, labels, ce_weight, kd_weight, s_cap=None, t_cap=None):
    """CE and the divergence on materialised logits (the reference), backpropagated."""
    h_s = h_s.detach().clone().requires_grad_(True)
    w_s = w_s.detach().clone().requires_grad_(True)
    logits = softcap(h_s @ w_s.T, s_cap)
    ce, n = chunked_cross_entropy(logits, labels, chunk_size=50)
    objective = ce_weight * ce
    kd = None
    if div is not None:
        kd = div.sum_and_count(logits, softcap(h_t @ w_t.T, t_cap), labels)
        objective = objective + kd_weight * kd.total
    objective.backward()
    return objective, ce, kd, n, h_s.grad, w_s.grad


def assert_head_equals(out, gh, gw, ref, dtype, stats=True):
    """The fused head's result and gradients against ``unfused_head``'s ``ref``, each within
    ``TOL[dtype]`` scaled by the reference's largest entry (and the diagnostics with ``stats``)."""
    ref_obj, ref_ce, ref_kd, ref_n, ref_gh, ref_gw = ref
    atol, rtol = TOL[dtype]

    def close(x, y):
        torch.testing.assert_close(x, y, atol=atol * float(y.detach().abs().max()), rtol=rtol)

    close(out.objective, ref_obj.detach())
    close(out.ce, ref_ce.detach())
    assert int(out.num_tokens) == int(ref_n)
    if ref_kd is not None:
        close(out.kd.total, ref_kd.total.detach())
        for k in ref_kd.stats if stats else ():
            close(out.kd.stats[k], ref_kd.stats[k])
    close(gh, ref_gh)
    close(gw, ref_gw)


def matmul_flops(fn) -> int:
    """Flops of the matrix products ``fn()`` runs (torch's FlopCounterMode, taught the in-place
    ``addmm_`` that accumulates the weight gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_inplace(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    mapping = {torch.ops.aten.addmm_: addmm_inplace}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def count_projections(monkeypatch, through) -> list[int]:
    """Patch F.linear to count the projections through a weight ``w`` where ``through(w)``: the
    rows of each, appended to the returned list."""
    calls = []
    linear = torch.nn.functional.linear

    def counting(x, w, *args):
        if through(w):
            calls.append(x.shape[0])
        return linear(x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    return calls


def count_teacher_projections(monkeypatch, w_t: torch.Tensor) -> list[int]:
    """``count_projections`` through the teacher weight ``w_t`` itself."""
    return count_projections(monkeypatch, lambda w: w.data_ptr() == w_t.data_ptr())
