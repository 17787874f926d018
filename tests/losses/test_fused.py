"""The fused path (hidden states + output weights in, loss and gradients out) against the unfused
divergences on materialised logits, and the closed-form chunk gradients against autograd."""

import functools
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from tad_torchtune.losses import DIVERGENCES as REGISTRY
from tad_torchtune.losses import ForwardKLLoss, TADLoss
from tad_torchtune.losses.ce import chunked_cross_entropy
from tad_torchtune.losses.engine import top_k_extras
from tad_torchtune.losses.fused import default_chunk_size, fused_divergence, fused_head
from tad_torchtune.losses.terms import teacher_top_k
from tests.helpers.losses import DIVERGENCE_CASES as DIVERGENCES
from tests.helpers.losses import (
    IGNORE,
    B,
    D,
    D_T,
    T,
    V,
    assert_head_equals,
    assert_same,
    count_projections,
    count_teacher_projections,
    bf16_reference,
    fused,
    head,
    make_case,
    matmul_flops,
    unfused,
    unfused_head,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from loss_bench import peak_allocated_bytes  # noqa: E402  (the benchmark's memory accounting)

@pytest.fixture(autouse=True)
def one_thread():
    """The shapes here are tiny: on a shared 2-core machine OpenMP's barrier waits between two
    threads cost far more than the work, so run single-threaded and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 13, 64, None])  # 141 tokens: never divisible
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_unfused(name, chunk_size, dtype):
    div = DIVERGENCES[name]()
    case = make_case(0, dtype)
    assert_same(fused(div, *case, chunk_size=chunk_size), unfused(div, *case), dtype)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_softcap_and_temperature(name):
    div = DIVERGENCES[name](temperature=2.0)
    case = make_case(1)
    assert_same(
        fused(div, *case, student_softcap=3.0, teacher_softcap=5.0, chunk_size=16),
        unfused(div, *case, s_cap=3.0, t_cap=5.0),
        torch.float32,
    )


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_autograd_fallback_equals_closed_form(name):
    """A divergence without ``chunk_grad_fn`` goes through autograd on ``chunk_fn``."""
    div = DIVERGENCES[name]()
    case = make_case(2, torch.float64)
    closed = fused(div, *case, chunk_size=20)
    div.chunk_grad_fn = None
    assert_same(fused(div, *case, chunk_size=20), closed, torch.float64)


def test_a_teacher_weight_over_another_vocabulary_is_refused():
    """The teacher's weight arrives aligned to the student's vocabulary (``TeacherHead``)."""
    case = make_case(3, v_t=V + 9)
    with pytest.raises(ValueError, match=r"teacher_weight has 132 rows, student_weight 123: "
                                         r"align a larger teacher vocabulary first"):
        fused_divergence(ForwardKLLoss(), *case)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_all_ignored_gives_zero_and_zero_grad(name):
    h_s, w_s, h_t, w_t, labels = make_case(4)
    out, g_h, g_w = fused(DIVERGENCES[name](), h_s, w_s, h_t, w_t, torch.full_like(labels, IGNORE))
    assert float(out.mean().detach()) == 0.0 and int(out.num_tokens) == 0
    assert not g_h.any() and not g_w.any()


def test_empty_batch():
    h_s, w_s, h_t, w_t, labels = make_case(4, b=1, t=0)
    out, g_h, g_w = fused(TADLoss(k=3), h_s, w_s, h_t, w_t, labels)
    assert float(out.total.detach()) == 0.0 and g_h.shape == h_s.shape and not g_w.any()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_ignored_tokens_do_not_count(name):
    """Changing the hidden states of ignored tokens changes nothing."""
    h_s, w_s, h_t, w_t, labels = make_case(5)
    div = DIVERGENCES[name]()
    a = fused(div, h_s, w_s, h_t, w_t, labels, chunk_size=16)
    ignored = (labels == IGNORE).unsqueeze(-1)
    h_s2 = torch.where(ignored, 50.0, h_s)
    h_t2 = torch.where(ignored, -50.0, h_t)
    b = fused(div, h_s2, w_s, h_t2, w_t, labels, chunk_size=16)
    assert_same(a, b, torch.float32)
    assert not a[1][ignored.squeeze(-1)].any()


@pytest.mark.parametrize("name", ["forward_kl", "tad"])
def test_bf16_weight_grad_summed_in_bf16(name):
    """``float32_weight_grad=False``: the loss and the hidden-state gradient are those of the
    float32 sums, bit for bit; the weight gradient, rounded to bf16 after each of the 9 chunks,
    stays within bf16 rounding of float64 but farther from it than the float32 sums."""
    div = DIVERGENCES[name]()
    case = make_case(6, torch.bfloat16)
    out32, g_h32, g_w32 = fused(div, *case, chunk_size=16)
    out16, g_h16, g_w16 = fused(div, *case, chunk_size=16, float32_weight_grad=False)
    _, _, r_w = bf16_reference(div, *case)
    assert torch.equal(out16.total, out32.total) and torch.equal(g_h16, g_h32)
    assert g_w16.dtype == torch.bfloat16
    scale = float(r_w.abs().max())
    torch.testing.assert_close(g_w16.double(), r_w, atol=2e-2 * scale, rtol=2e-2)
    err16, err32 = ((g.double() - r_w).abs().sum() for g in (g_w16, g_w32))
    assert err32 < err16


BF16_CASES = [(name, chunk, False) for name in sorted(DIVERGENCES) for chunk in (16, 1)] + [
    pytest.param("tad", 16, True, marks=pytest.mark.slow),
    pytest.param("forward_kl", 16, True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,chunk,compile_chunks", BF16_CASES)
def test_bf16_inputs_against_float64(name, chunk, compile_chunks):
    """bf16 hidden states and weights: the logits are bf16 matmul outputs (as the model's), the
    math float32, the weight gradient accumulated in float32 over chunks. Reference: float64 math
    on the SAME bf16 logits, chained to the hidden states and weight in float64. The gradients
    come back in bf16 (relative rounding 2**-8) after per-chunk bf16 matmuls (chunk 1: the
    weight gradient by vocabulary blocks of 5). Compiled: inductor reads the bf16 projections
    and writes the bf16 gradient itself."""
    torch._dynamo.reset()
    div = DIVERGENCES[name]()
    case = make_case(6, torch.bfloat16)
    out, g_h, g_w = fused(div, *case, chunk_size=chunk, compile_chunks=compile_chunks)
    ref, r_h, r_w = bf16_reference(div, *case)
    assert out.total.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.bfloat16
    torch.testing.assert_close(out.total.double(), ref.total, atol=0, rtol=1e-5)
    for got, want in ((g_h, r_h), (g_w, r_w)):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("name", ["forward_kl", "tad"])
def test_tied_embedding_and_output_weight(name):
    """The output weight is the embedding table: both uses add up in the one parameter."""
    div = DIVERGENCES[name]()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    _, _, h_t, w_t, labels = make_case(7)

    def run(use_fused):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(V, D)
        mix = torch.nn.Linear(D, D)
        h = torch.tanh(mix(emb(tokens)))  # (B, T, D)
        if use_fused:
            out = fused_divergence(div, h, emb.weight, h_t, w_t, labels, chunk_size=17)
        else:
            out = div.sum_and_count(h @ emb.weight.T, h_t @ w_t.T, labels)
        out.mean().backward()
        return out.mean().detach(), emb.weight.grad, mix.weight.grad

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_no_grad_gives_the_value_and_backward_runs_once():
    div = TADLoss(k=5)
    h_s, w_s, h_t, w_t, labels = make_case(12)
    w_s.requires_grad_(True)
    with torch.no_grad():
        value = fused_divergence(div, h_s, w_s, h_t, w_t, labels).total
    out = fused_divergence(div, h_s, w_s, h_t, w_t, labels)
    torch.testing.assert_close(value, out.total.detach(), atol=0, rtol=1e-6)
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.total.backward()


def test_default_chunk_size():
    assert default_chunk_size(2048, 32000, 512) == 64  # Liger's rule
    assert default_chunk_size(8192, 151936, 2048) == 128
    assert default_chunk_size(10, 50000, 16) == 32  # floor
    assert default_chunk_size(10**6, 1000, 4096) == 1024  # ceiling
    assert default_chunk_size(2048, 32000, 512, "cpu") == 128  # twice Liger's on CPU
    assert default_chunk_size(2048, 32000, 512, torch.device("cuda", 1)) == 64
    assert default_chunk_size(10**6, 1000, 4096, "cpu") == 1024  # same ceiling


def test_shape_errors():
    h_s, w_s, h_t, w_t, labels = make_case(8)
    with pytest.raises(ValueError, match="labels shape"):
        fused_divergence(ForwardKLLoss(), h_s, w_s, h_t, w_t, labels[:, :-1])
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_divergence(ForwardKLLoss(), h_s, w_s, h_t[:, :-1], w_t, labels)
    with pytest.raises(ValueError, match="student_weight"):
        fused_divergence(ForwardKLLoss(), h_s, w_s[:, :-1], h_t, w_t, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_divergence(ForwardKLLoss(), h_s, w_s, h_t, w_t, labels, chunk_size=0)


# ----------------------------------------------------------------------------- closed-form grads


def chunk_inputs(kind, seed=9, n=29, v=V):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=gen)
    if kind == "masked_vocab":  # -inf entries in both models
        s[:, -7:] = t[:, -7:] = float("-inf")
        y = y % (v - 7)
    elif kind == "huge":
        s, t = s * 1e3, t * 1e3
    elif kind == "one_hot_teacher":
        t = torch.full_like(t, -1e4).scatter_(-1, y.unsqueeze(-1), 0.0)
    elif kind == "ties":  # on a coarse grid, as bf16 logits are: ties at every top-K boundary
        s, t = (s * 2).round() / 2, (t * 2).round() / 2
    return s, t, y


KINDS = ["plain", "masked_vocab", "huge", "one_hot_teacher", "ties"]


def grad_fn(div, mode):
    """The divergence's ``chunk_grad_fn`` as run eagerly, or as ``torch.compile`` traces it
    (the branches ``is_compiling()`` selects; AOTAutograd's graph run without code generation:
    inductor's own output is compared in ``test_compile_chunks_*``)."""
    if mode == "eager":
        return div.chunk_grad_fn
    torch._dynamo.reset()
    return torch.compile(div.chunk_grad_fn, backend="aot_eager", fullgraph=True, dynamic=False)


def chunk_extras(div, t, y):
    """The divergence's per-token extras for one chunk that is one whole row (its teacher pass
    on ``t``), or none."""
    if div.top_k is None:
        return ()
    valid = torch.ones(len(y), dtype=torch.bool)
    return top_k_extras(div, [teacher_top_k(t, div.top_k)], valid, (1, len(y)))


@pytest.mark.parametrize("mode", ["eager", "traced"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_chunk_grad_fn_equals_autograd(name, kind, mode):
    div = DIVERGENCES[name]()
    s, t, y = chunk_inputs(kind)
    extras = chunk_extras(div, t, y)
    s_ = s.clone().requires_grad_(True)
    value, stats = div.chunk_fn(s_, t, y, *extras)
    (grad,) = torch.autograd.grad(value.sum(), s_)
    s_before = s.clone()
    value2, stats2, grad2 = grad_fn(div, mode)(s, t, y, *extras)
    assert torch.equal(s, s_before)  # s is read only (t is scratch, TAD writes to it)
    torch.testing.assert_close(value2, value.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad2, grad, atol=1e-10, rtol=1e-8)
    for k in stats:
        torch.testing.assert_close(stats2[k], stats[k].detach(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["tad", "forward_kl", "reverse_kl", "drkl"])
def test_traced_chunk_grads_scatter_nothing(name):
    """What ``torch.compile`` traces of the closed forms holds no scatter (each would be a kernel
    of its own and a copy of a ``[n, V]`` buffer: ``docs/design.md``, "The fused head on a
    GPU"); the eager functions do scatter, so the check sees the traced branch."""
    div = DIVERGENCES[name]()
    s, t, y = chunk_inputs("plain")
    extras = chunk_extras(div, t, y)
    seen = []

    def recording(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(div.chunk_grad_fn, backend=recording, fullgraph=True)(s, t, y, *extras,
                                                                        ce_weight=0.5)
    assert seen and not [op for op in seen if "scatter" in op], seen
    eager = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            eager.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Recording():
        div.chunk_grad_fn(s, t.clone(), y, *extras, ce_weight=0.5)
    assert [op for op in eager if "scatter" in op], eager


@pytest.mark.parametrize("mode", ["eager", "traced"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(n for n, d in DIVERGENCES.items() if d().chunk_grad_fn))
def test_chunk_grad_fn_with_the_cross_entropy_folded_in(name, kind, mode):
    """``chunk_grad_fn(..., ce_weight=c)``: the divergence's value, the per-token CE and the
    gradient of ``divergence + c * CE``, against autograd of ``chunk_fn`` plus torch's CE."""
    div = DIVERGENCES[name]()
    s, t, y = chunk_inputs(kind)
    extras = chunk_extras(div, t, y)
    c = 0.7
    s_ = s.clone().requires_grad_(True)
    value, _ = div.chunk_fn(s_, t, y, *extras)
    ce = torch.nn.functional.cross_entropy(s_, y, reduction="none")
    (grad,) = torch.autograd.grad((value + c * ce).sum(), s_)
    value2, _, grad2, ce2 = grad_fn(div, mode)(s, t.clone(), y, *extras, ce_weight=c)
    torch.testing.assert_close(value2, value.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ce2, ce.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad2, grad, atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------- teacher cache

ROW_BYTES = T * V * 4  # one row of float32 teacher logits


@pytest.mark.parametrize("temperature,caps", [(1.0, (None, None)), (2.0, (None, None)),
                                              (2.0, (3.0, 5.0))])
@pytest.mark.parametrize("cache_bytes,projections", [
    (0, 2 * 141),                     # every teacher chunk recomputed: 2 passes of 141 tokens
    # one row per segment; of its chunks (12, 12, 12, 11 tokens) the first and the last fit in
    # half a row's bytes, the two middle ones (24 tokens per row) are projected twice
    (ROW_BYTES // 2, 141 + 3 * 24),
    (ROW_BYTES, 141),                 # one row per segment, all of it kept
    (2 * ROW_BYTES + 1, 141),         # 2 rows, then 1
    (10 * ROW_BYTES, 141),            # the whole batch in one segment
    (None, 141),                      # None: one row per segment, all of it kept
])
def test_teacher_cache_budgets(monkeypatch, cache_bytes, projections, temperature, caps):
    """TAD's two passes share cached teacher projections up to the budget: same values as the
    unfused loss for every budget, and each kept chunk is projected once instead of twice."""
    div = TADLoss(k=10, beta=2.0, temperature=temperature)
    case = make_case(12)
    expected = unfused(div, *case, s_cap=caps[0], t_cap=caps[1])
    calls = count_teacher_projections(monkeypatch, case[3])
    got = fused(div, *case, chunk_size=12, student_softcap=caps[0], teacher_softcap=caps[1],
                teacher_cache_mib=None if cache_bytes is None else cache_bytes / 2**20)
    assert_same(got, expected, torch.float32)
    assert sum(calls) == projections


@pytest.mark.parametrize("cache_bytes,pieces", [
    (0, [12] * 11 + [9]),                  # nothing kept: one segment, whole chunks
    # the first and the last chunk of each row kept: every chunk in halves while the last is
    # still to come (its projection and one recomputed or kept are alive with the student's)
    (ROW_BYTES // 2, [6, 6, 6, 6, 6, 6, 11] * 3),
    (ROW_BYTES, [6, 6, 12, 12, 11] * 3),   # a row kept: its first chunk in halves
    (None, [6, 6, 12, 12, 11] * 3),
    # segments of 2 rows (94 tokens: chunks of 12 across rows, the last 10), then 1
    (2 * ROW_BYTES + 1, [6, 6] + [12] * 6 + [10] + [6, 6, 12, 12, 11]),
    (10 * ROW_BYTES, [6, 6] + [12] * 10 + [9]),  # one segment of 141 tokens
])
def test_kept_segments_run_their_first_chunks_in_halves(monkeypatch, cache_bytes, pieces):
    """The student's side of TAD's second pass (its projection, its gradient) runs in halves of
    a chunk while the kept teacher projections still to come would make a whole chunk the
    peak: the rows the student is projected on, chunk by chunk, with the same values."""
    div = TADLoss(k=10, beta=2.0)
    case = make_case(12)
    # the student's projections: its width D (the teacher's is D_T); ``fused`` copies w_s
    calls = count_projections(monkeypatch, lambda w: w.shape[1] == D)
    got = fused(div, *case, chunk_size=12,
                teacher_cache_mib=None if cache_bytes is None else cache_bytes / 2**20)
    assert calls == pieces
    assert_same(got, unfused(div, *case), torch.float32)


def test_teacher_cache_unused_without_teacher_pass(monkeypatch):
    """Divergences without a teacher pass project the teacher once per chunk, whatever the
    budget."""
    case = make_case(13)
    calls = count_teacher_projections(monkeypatch, case[3])
    fused(ForwardKLLoss(), *case, chunk_size=12, teacher_cache_mib=0)
    fused(ForwardKLLoss(), *case, chunk_size=12, teacher_cache_mib=1000)
    assert sum(calls) == 2 * 141


@pytest.mark.parametrize("bad", [-1, float("nan"), "64", True])
def test_teacher_cache_argument_errors(bad):
    with pytest.raises(ValueError, match="teacher_cache_mib"):
        fused_divergence(TADLoss(), *make_case(0), teacher_cache_mib=bad)


# ----------------------------------------------------------------------------- peak memory


MEM_ROWS, MEM_T, MEM_V, MEM_CHUNK = 2, 256, 2048, 16
CHUNK_BYTES = MEM_CHUNK * MEM_V * 4  # one [chunk, V] float32 buffer; [N, V] is 32 of them


@pytest.mark.parametrize("name,cache_chunks,limit", [
    # beyond the gradients and the cached teacher chunks: the student chunk, the teacher chunk
    # (scratch for TAD's chunk gradient), TAD's two working buffers, a bool mask and the
    # [N, K] / [N] statistics; the code before this bound held 7.2 and 8.4 buffers. With
    # teacher chunks kept, the first chunk runs in halves (2.5 here, 3.5 before them)
    ("tad", 4, 3.0),
    ("tad", 0, 6.0),
    ("tad", None, 3.0),  # teacher_cache_mib=None: one row of the teacher's chunks kept

    # the other divergences have no teacher pass; far below the 32 buffers of [N, V] (their
    # chunk functions before this bound held 9, 8 and 13.3)
    ("forward_kl", 0, 6.0),
    ("reverse_kl", 0, 6.0),
    ("drkl_gamma2.5", 0, 6.0),
])
@pytest.mark.parametrize("temperature,caps", [(1.0, (None, None)), (2.0, (5.0, 7.0))])
def test_peak_memory_is_a_few_chunks(name, cache_chunks, limit, temperature, caps):
    """Peak memory of a fused forward (where all the work happens) in ``[chunk, V]`` buffers,
    beyond the two gradients and the teacher cache, counted from every torch allocation."""
    case = make_case(21, b=MEM_ROWS, t=MEM_T, v=MEM_V)
    h_s, w_s = (x.requires_grad_(True) for x in case[:2])
    div = DIVERGENCES[name](temperature=temperature)
    grads = (w_s.numel() + h_s.numel()) * 4
    cache = (MEM_T // MEM_CHUNK if cache_chunks is None else cache_chunks) * CHUNK_BYTES

    def forward():
        fused_divergence(div, h_s, w_s, *case[2:], chunk_size=MEM_CHUNK, student_softcap=caps[0],
                         teacher_softcap=caps[1],
                         teacher_cache_mib=None if cache_chunks is None else cache / 2**20)

    forward()  # first calls allocate caches of their own (e.g. the CPU allocator's)
    buffers = (peak_allocated_bytes(forward) - grads - cache) / CHUNK_BYTES
    assert 1.0 < buffers <= limit, buffers


@pytest.mark.parametrize("cache_chunks", [4, None])
def test_halves_save_a_chunk_of_peak_memory(monkeypatch, cache_chunks):
    """Running the first chunk of a segment with kept teacher projections in halves takes one
    ``[chunk, V]`` buffer off the peak (half the student's logits, half their gradient)."""
    from tad_torchtune.losses import fused as fused_module

    case = make_case(21, b=MEM_ROWS, t=MEM_T, v=MEM_V)
    h_s, w_s = (x.requires_grad_(True) for x in case[:2])
    cache = None if cache_chunks is None else cache_chunks * CHUNK_BYTES / 2**20

    def peak():
        def forward():
            fused_divergence(TADLoss(), h_s, w_s, *case[2:], chunk_size=MEM_CHUNK,
                             teacher_cache_mib=cache)
        forward()
        return peak_allocated_bytes(forward)

    halves = peak()
    monkeypatch.setattr(fused_module._ProjectedTeacher, "halves", lambda self: False)
    whole = peak()
    assert whole - halves >= 0.9 * CHUNK_BYTES, (whole - halves) / CHUNK_BYTES


@pytest.mark.parametrize("name,cache_mib,teacher_projections", [
    ("forward_kl", 128, 1),
    ("tad", 128, 1),  # the whole teacher kept between TAD's passes: the cost of KL
    ("tad", 0, 2),
])
def test_matmul_flops(name, cache_mib, teacher_projections):
    """Matmul work of a fused forward + backward: the student's projection and its two gradient
    matmuls (3 x 2 N V D) plus the teacher's projection once per pass that needs it."""
    h_s, w_s, h_t, w_t, labels = make_case(23)
    flops = matmul_flops(lambda: fused(DIVERGENCES[name](), h_s, w_s, h_t, w_t, labels,
                                       chunk_size=12, teacher_cache_mib=cache_mib))
    assert flops == 2 * B * T * V * (3 * D + teacher_projections * D_T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(DIVERGENCES) + ["ce_only"])
@pytest.mark.parametrize("weights,temperature,caps", [
    ((1.0, 1.0), 1.0, (None, None)),
    ((0.7, 1.3), 2.0, (3.0, 5.0)),
])
def test_fused_head_equals_unfused_ce_plus_divergence(name, weights, temperature, caps, dtype):
    """One projection per chunk serves the CE and the divergence: the objective, both sums, the
    diagnostics and both gradients equal CE + divergence on materialised logits."""
    ce_w, kd_w = weights
    div = None if name == "ce_only" else DIVERGENCES[name](temperature=temperature)
    case = make_case(31, dtype)
    ref_obj, ref_ce, ref_kd, ref_n, ref_gh, ref_gw = unfused_head(
        div, *case, ce_w, kd_w, s_cap=caps[0], t_cap=caps[1])
    out, gh, gw = head(div, *case, ce_weight=ce_w, kd_weight=kd_w, student_softcap=caps[0],
                       teacher_softcap=caps[1], chunk_size=13, compute_ce=True)
    assert_head_equals(out, gh, gw, (ref_obj, ref_ce, ref_kd, ref_n, ref_gh, ref_gw), dtype)


@pytest.mark.parametrize("name,cache_mib,teacher_projections", [
    ("forward_kl", 128, 1),
    ("tad", 128, 1),
    ("tad", 0, 2),
    ("ce_only", 0, 0),
])
def test_fused_step_does_the_floor_of_matmul_work(name, cache_mib, teacher_projections):
    """A fused step as the recipe runs it (CE + divergence): the student is projected ONCE per
    chunk for both terms, so the step is the 4-matmul floor, 2 N V (3 D + D_T), when the cache
    holds TAD's teacher rows (one teacher projection more without it); the CE alone, 3 x 2 N V D."""
    h_s, w_s, h_t, w_t, labels = make_case(23)
    div = None if name == "ce_only" else DIVERGENCES[name]()
    flops = matmul_flops(lambda: head(div, h_s, w_s, h_t, w_t, labels, chunk_size=12,
                                      teacher_cache_mib=cache_mib, compute_ce=True))
    assert flops == 2 * B * T * V * (3 * D + teacher_projections * D_T)


@pytest.mark.parametrize("float32_weight_grad", [True, False])
def test_bf16_weight_gradient_is_summed_by_vocabulary_blocks(float32_weight_grad):
    """A wide bf16 weight: the per-chunk bf16 product ``grad.T @ h`` is added to the float32
    weight gradient block by block, never as a whole ``[V, D]`` (whole: 192 chunk buffers here,
    the bf16 product and its float32 promotion); summed in bf16, the weight gradient is half the
    size and the chunk's product goes straight into it."""
    chunk, hidden = 4, 512
    case = make_case(22, torch.bfloat16, b=1, t=64, v=MEM_V)
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(1, 64, hidden, generator=gen).bfloat16().requires_grad_(True)
    w_s = (torch.randn(MEM_V, hidden, generator=gen) * 0.05).bfloat16().requires_grad_(True)
    chunk_bytes = chunk * MEM_V * 4
    # the two gradient sums, held until backward
    grads = w_s.numel() * (4 if float32_weight_grad else 2) + h_s.numel() * 4

    def forward():
        fused_divergence(ForwardKLLoss(), h_s, w_s, *case[2:], chunk_size=chunk,
                         float32_weight_grad=float32_weight_grad)

    forward()
    buffers = (peak_allocated_bytes(forward) - grads) / chunk_bytes
    # measured 4.8 either way; 192 without the blocks (a matmul kernel's own workspace is not
    # counted: 32.8 with it on an AMX CPU, whose oneDNN packs the bf16 operands per product)
    assert buffers <= 6.0, buffers


# ----------------------------------------------------------------------------- compile


def test_compiled_caller_matches_eager():
    """torch.compile of a caller: the fused call is a graph break (run eagerly), values equal."""
    torch._dynamo.reset()
    div = TADLoss(k=4)
    h_s, w_s, h_t, w_t, labels = make_case(10, b=2, t=9)
    proj = torch.nn.Linear(D, D)

    def step(x, w):
        out = fused_divergence(div, torch.relu(proj(x)), w, h_t, w_t, labels, chunk_size=5)
        return out.total / out.num_tokens.clamp(min=1) * 2.0

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=False)):
        x, w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        loss = fn(x, w)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["forward_kl", "tad"])
def test_compile_chunks_matches_unfused(name):
    """``compile_chunks=True``: the per-chunk functions through inductor, chunks of two lengths
    (64, 64, 13): same loss and gradients as the unfused loss."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    div = DIVERGENCES[name]()
    case = make_case(14)
    assert_same(fused(div, *case, chunk_size=64, compile_chunks=True), unfused(div, *case),
                torch.float32)
    assert counters["stats"]["unique_graphs"] >= 1  # the chunk function did go through dynamo


@pytest.mark.parametrize("name", ["tad", "forward_kl"])
def test_compiled_chunks_compile_once(monkeypatch, name):
    """Steps after the first compile nothing: the chunk functions' guards (chunk length, ignored
    rows or not, the settings) hold from step to step, as a GPU run's throughput needs. Dynamo's
    guards do not depend on the backend, so AOTAutograd without code generation stands in."""

    from torch._dynamo.utils import counters

    from tad_torchtune.losses import fused as fused_module

    monkeypatch.setattr(fused_module, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for step in range(3):
        h_s, w_s, h_t, w_t, labels = make_case(30 + step)  # 141 tokens: chunks of 64, 64, 13
        head(DIVERGENCES[name](), h_s, w_s, h_t, w_t, labels, chunk_size=64, ce_weight=0.5,
             compile_chunks=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2 and graphs[1] == graphs[2] == graphs[0], graphs


@pytest.mark.parametrize("name", ["tad", "forward_kl"])
def test_compiled_chunks_settle_on_batches_of_any_length(monkeypatch, name):
    """Padded SFT batches change the last chunk's length from step to step: the second length
    makes dynamo compile that dimension dynamic, and no later length compiles anything (a GPU
    run pays two compiles, not one per batch length, and never hits the recompile limit)."""

    from torch._dynamo.utils import counters

    from tad_torchtune.losses import fused as fused_module

    monkeypatch.setattr(fused_module, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for step, n in enumerate([141, 141, 100, 103, 123, 131, 77]):  # last chunks 13, 36, ... 13
        h_s, w_s, h_t, w_t, labels = make_case(30 + step)  # [3, 47]: one row of n tokens
        h_s, h_t = (h.flatten(0, 1)[None, :n] for h in (h_s, h_t))
        head(DIVERGENCES[name](), h_s, w_s, h_t, w_t, labels.flatten()[None, :n], chunk_size=64,
             ce_weight=0.5, compile_chunks=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] <= graphs[2], graphs  # 36 rows: the dynamic recompile
    assert graphs[2:] == [graphs[2]] * 5, graphs  # nothing after


@pytest.mark.parametrize("gpu", [True, False])
def test_compiled_chunks_take_the_gpu_settings_of_their_divergence(monkeypatch, gpu):
    """On a GPU the chunk function compiles under ``INDUCTOR_OPTIONS`` and its divergence's
    ``gpu_inductor_options`` (DRKL's opcount threshold, no other's); on a CPU under inductor's
    own defaults."""
    from torch._inductor import config as inductor_config

    from tad_torchtune.losses import fused as fused_module

    seen = []

    def backend(gm, example_inputs):
        seen.append((inductor_config.realize_reads_threshold,
                     inductor_config.realize_opcount_threshold))
        return gm.forward

    defaults = (inductor_config.realize_reads_threshold,
                inductor_config.realize_opcount_threshold)
    monkeypatch.setattr(fused_module, "_COMPILED", {})
    monkeypatch.setattr(fused_module, "_gpu_settings", lambda z: gpu)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    settings = {}
    for name in ("drkl", "reverse_kl"):
        seen.clear()
        head(DIVERGENCES[name](), *make_case(3), chunk_size=64, ce_weight=0.5,
             compile_chunks=True)
        assert seen and len(set(seen)) == 1, seen
        settings[name] = seen[0]
    reads = fused_module.INDUCTOR_OPTIONS["realize_reads_threshold"]
    assert settings == ({"drkl": (reads, 64), "reverse_kl": (reads, defaults[1])} if gpu else
                        {"drkl": defaults, "reverse_kl": defaults})
    assert defaults[1] != 64 and defaults[0] != reads  # the settings do change something


def test_halves_and_whole_chunks_share_their_graphs(monkeypatch):
    """Rows of two chunks kept whole: each row's first chunk in halves, its second whole, each
    row's per-token slices at other offsets, ignored rows in some chunks (a masked prompt in row
    0's first, padding in row 1's last). The chunk function compiles ONCE (its token dimension
    dynamic from the first call; every compiled chunk masks its ignored rows), the teacher's
    split once; a second batch compiles nothing; the values are the unfused ones. (With a flag
    per chunk: a graph per flag, and the one first compiled at row 0's second half, whose
    slices share an offset, again at row 1: 5 graphs.)"""

    from torch._dynamo.utils import counters

    from tad_torchtune.losses import fused as fused_module

    monkeypatch.setattr(fused_module, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for seed in (41, 42):
        case = make_case(seed, b=4, t=48)
        got = head(TADLoss(), *case, chunk_size=24, ce_weight=0.5, teacher_cache_mib=None,
                   compile_chunks=True)
        graphs.append(counters["stats"]["unique_graphs"])
        assert_head_equals(*got, unfused_head(TADLoss(), *case, 0.5, 1.0), torch.float32)
    assert graphs == [2, 2], graphs


@pytest.mark.slow
@pytest.mark.parametrize("name,weights,temperature,caps,cache_mib", [
    ("tad", (0.7, 1.3), 1.0, (None, None), 0),      # the CE folded into TAD's closed form
    ("tad", (0.7, 1.3), 2.0, (3.0, 5.0), 128),      # CE apart; kept teacher projections
])
def test_compiled_head_matches_unfused(name, weights, temperature, caps, cache_mib):
    """The recipe's compiled head (CE + divergence, ignored rows, soft-caps, temperature)
    through inductor: what inductor generates from the traced branches equals CE + divergence
    on materialised logits."""
    torch._dynamo.reset()
    div = DIVERGENCES[name](temperature=temperature)
    case = make_case(15)
    out, gh, gw = head(div, *case, ce_weight=weights[0], kd_weight=weights[1], chunk_size=64,
                       student_softcap=caps[0], teacher_softcap=caps[1],
                       teacher_cache_mib=cache_mib, compile_chunks=True)
    ref = unfused_head(div, *case, *weights, s_cap=caps[0], t_cap=caps[1])
    assert_head_equals(out, gh, gw, ref, torch.float32)


# ----------------------------------------------------------------------------- FSDP2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, name: str, result_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        h_s, w_s, h_t, w_t, labels = make_case(11, b=4, t=23)
        head = torch.nn.Linear(D, V, bias=False)  # the student's output projection
        with torch.no_grad():
            head.weight.copy_(w_s)
        fully_shard(head)  # head.weight is now a DTensor sharded over the 2 ranks
        rows = slice(rank * 2, rank * 2 + 2)  # data parallel: each rank its 2 sequences
        x = h_s[rows].clone().requires_grad_(True)
        out = fused_divergence(DIVERGENCES[name](), x, head.weight, h_t[rows], w_t, labels[rows],
                               chunk_size=8)
        count = out.num_tokens.clone()
        dist.all_reduce(count)  # the global valid-token count normalises (docs/design.md)
        (out.total / count).backward()
        total = out.total.detach().clone()
        dist.all_reduce(total)
        grad_w = head.weight.grad.full_tensor()
        if rank == 0:
            torch.save({"loss": total / count, "grad_w": grad_w, "grad_x0": x.grad}, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["tad"])
def test_fsdp2_two_processes_match_one(name, tmp_path):
    """2 ranks (gloo, CPU), the output projection fully_shard-ed: same loss as 1 process, and the
    sharded weight gradient is the 1-process gradient averaged over ranks, as FSDP2 averages."""
    import torch.multiprocessing as mp

    if sys.platform != "linux":
        pytest.skip("gloo spawn test runs on Linux")
    result = tmp_path / "rank0.pt"
    mp.spawn(_fsdp_worker, args=(2, _free_port(), name, str(result)), nprocs=2, join=True)
    got = torch.load(result)

    h_s, w_s, h_t, w_t, labels = make_case(11, b=4, t=23)
    div = DIVERGENCES[name]()
    x = h_s.clone().requires_grad_(True)
    w = w_s.clone().requires_grad_(True)
    out = fused_divergence(div, x, w, h_t, w_t, labels, chunk_size=8)
    out.mean().backward()
    torch.testing.assert_close(got["loss"], out.mean().detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["grad_w"], w.grad / 2, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(got["grad_x0"], x.grad[:2], atol=1e-7, rtol=1e-5)


def test_fused_tad_per_document_equals_unfused():
    """Document ids reach the fused path's teacher pass, whatever the segments of the cache."""
    g = torch.Generator().manual_seed(4)
    docs = torch.zeros(B, T, dtype=torch.long)
    for r in range(B):
        for c in sorted(torch.randperm(T - 1, generator=g)[: r + 2].add(1).tolist()):
            docs[r, c:] += 1
    case = make_case(41)
    div = TADLoss(k=3, abar_scope="document")
    h_s, w_s = (x.detach().clone().requires_grad_(True) for x in case[:2])
    ref = div.sum_and_count(h_s @ w_s.T, case[2] @ case[3].T, case[4], document_ids=docs)
    ref.total.backward()
    for cache_mib in (0, 1e-3, 128):  # no cache, a one-row segment, everything at once
        out = fused(div, *case, chunk_size=11, document_ids=docs, teacher_cache_mib=cache_mib)
        assert_same(out, (ref, h_s.grad, w_s.grad), torch.float32)


@pytest.mark.parametrize("name,compile_chunks", [(name, False) for name in sorted(REGISTRY)]
                         + [pytest.param("tad", True, marks=pytest.mark.slow)])
def test_output_biases_on_the_fused_path(name, compile_chunks):
    """An output projection with a bias (Phi-2's): the fused head adds both biases and returns
    the student bias's gradient, as autograd through the materialised logits does (compiled:
    the bias's gradient summed inside inductor's function)."""
    torch._dynamo.reset()
    div = REGISTRY[name]()
    h_s, w_s, h_t, w_t, labels = make_case(31, torch.float64)
    g = torch.Generator().manual_seed(3)
    b_s, b_t = (torch.randn(V, generator=g, dtype=torch.float64) for _ in range(2))
    hs, ws, bs = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s, b_s))
    logits = hs @ ws.T + bs
    ce, _ = chunked_cross_entropy(logits, labels)
    kd = div.sum_and_count(logits, h_t @ w_t.T + b_t, labels)
    (0.4 * ce + 1.5 * kd.total).backward()
    hf, wf, bf = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s, b_s))
    out = fused_head(hf, wf, labels, divergence=div, teacher_hidden=h_t, teacher_weight=w_t,
                     student_bias=bf, teacher_bias=b_t, ce_weight=0.4, kd_weight=1.5,
                     chunk_size=13, compile_chunks=compile_chunks)
    out.objective.backward()
    torch.testing.assert_close(out.kd.total, kd.total.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.ce, ce.detach(), atol=1e-10, rtol=1e-10)
    for mine, ref in ((hf, hs), (wf, ws), (bf, bs)):
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-10, rtol=1e-9)
    without = fused_divergence(div, h_s, w_s, h_t, w_t, labels, chunk_size=13)
    assert abs(float(without.total.detach()) - float(kd.total.detach())) > 1e-3  # biases matter


def test_the_fused_head_checks_its_divergence_as_sum_and_count_does():
    """A divergence without its chunk math, or one a sampled cache cannot serve: one line
    (before, ``'NoneType' object is not callable`` from a chunk, or an AssertionError), as
    ``sum_and_count`` says it."""
    from tad_torchtune.errors import ConfigError
    from tad_torchtune.losses import Divergence
    from tad_torchtune.losses import ReverseKLLoss
    from tad_torchtune.losses.cached import teacher_sampled, teacher_top_m
    from tad_torchtune.losses.fused import fused_divergence, fused_head

    class Unfinished(Divergence):
        pass

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (2, 5), generator=g)
    with pytest.raises(ConfigError, match="Unfinished sets no chunk_fn"):
        fused_divergence(Unfinished(), h, w, h, w, labels)
    sampled = teacher_sampled(h @ w.T, 6, 4, seed=0, blocks=torch.arange(2))
    with pytest.raises(ConfigError, match=r"^ReverseKLLoss._component_: ReverseKLLoss cannot be "
                                          r"estimated from a sampled teacher cache"):
        fused_head(h, w, labels, divergence=ReverseKLLoss(), teacher_cache=sampled)
    fused_head(h, w, labels, divergence=ForwardKLLoss(), teacher_cache=sampled)  # it can
    fused_head(h, w, labels, divergence=ReverseKLLoss(),
               teacher_cache=teacher_top_m(h @ w.T, labels, 6))
