"""Fused output projection + divergence: the loss and its gradients without the ``[N, V]`` logits.

``fused_divergence`` takes the student's and the teacher's final hidden states (after the final
norm) and output weights instead of their logits. Chunk by chunk over tokens it projects the
hidden states to logits, applies the soft-caps and the temperature, evaluates the divergence's
per-chunk value AND gradient (``Divergence.chunk_grad_fn``, closed form; or autograd through
``Divergence.chunk_fn`` for a divergence without one), and immediately turns the gradient w.r.t.
the chunk's logits into gradients w.r.t. the student's hidden states and output weight, in the
forward pass (Liger-Kernel's fused linear losses do the same). What survives a chunk is the
student hidden-state gradient ``[N, D]`` and the output-weight gradient ``[V, D]``, both float32
(the weight's own dtype with ``float32_weight_grad=False``), so the extra memory is those plus a
few ``[chunk, V]`` float32 buffers, never ``[N, V]``: each chunk's logits are masked, scaled and
soft-capped in their own buffer, and every chunk gradient works in the teacher chunk's, so a
chunk holds about 4.5 (TAD) to 5.5 such buffers at its peak (``test_peak_memory_is_a_few_chunks``
in ``tests/losses/test_fused.py``). A bf16 weight gradient is summed in float32 by vocabulary
blocks (``_accumulate_weight_grad``).

A divergence with ``needs_teacher_pass`` (TAD: ``abar`` is a mean over every valid token of a
row) works segment by segment, a segment being whole rows of the batch: first a teacher-only pass
over the segment's chunks keeps per-token statistics (TAD: top-K ids, LSE, tail LSE: ``[n, K]``
and ``[n]``), then the per-chunk terms use the exact row statistics. The teacher's projection of
a chunk is needed by both passes; up to ``teacher_cache_mib`` of them are kept from the first pass
(in the projection's own dtype, so the second pass sees bit-identical values) and the rest are
recomputed. A segment holds as many rows as the cache can hold entirely (at least one row), so a
budget of one row's teacher logits removes every recomputation. With no cache the extra cost is
one more teacher projection per chunk and the top-K.

``compile_chunks=True`` runs each divergence's per-chunk function through ``torch.compile``
(inductor fuses its dozen element-wise passes over ``[chunk, V]`` into a few loops); the
projections and the loop stay eager.

The machinery is written once here; each divergence plugs in its per-chunk functions.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tad_torchtune.losses._reduction import (
    DivergenceOutput,
    align_teacher_vocab,
    compute_dtype,
)
from tad_torchtune.losses.base import Divergence

try:  # DTensor is what FSDP2 (fully_shard) leaves in a sharded parameter.
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Partial = None


#: default ``teacher_cache_mib``: one 1024-token row of 32K-vocabulary float32 teacher logits, or
#: 256 tokens of a 256K vocabulary in bf16; small next to the float32 ``[V, D]`` weight gradient.
DEFAULT_TEACHER_CACHE_MIB = 128


def default_chunk_size(
    num_tokens: int, vocab_size: int, hidden_size: int, device: torch.device | str = "cuda"
) -> int:
    """Liger-Kernel's rule: a chunk of logits ``[c, V]`` about as large as the hidden states
    ``[N, D]`` (``c = next_pow2(N / ceil(V / D))``), kept within ``[32, 1024]`` tokens; twice that
    on CPU, where every chunk's projections stream the whole ``[V, D]`` weights from memory and
    small chunks are bandwidth-bound (at (2048, 32000, 512) 128-token chunks took 0.77-0.94x the
    time of 64-token ones, for 1.2-1.5x the peak memory: benchmarks/RESULTS.md)."""
    ratio = max(1, math.ceil(vocab_size / max(hidden_size, 1)))
    c = max(1, math.ceil(num_tokens / ratio))
    if torch.device(device).type == "cpu":
        c *= 2
    return min(max(1 << (c - 1).bit_length(), 32), 1024)


def _chunks_with_ignored(valid: Tensor, step: int) -> list[bool]:
    """Per chunk, whether it holds an ignored token (one host sync for all chunks): chunks
    without one skip the masking passes over their ``[n, V]`` logits."""
    pad = -valid.shape[0] % step
    ignored = torch.nn.functional.pad(~valid, (0, pad), value=False)
    return ignored.view(-1, step).any(-1).tolist()


@dataclass(frozen=True)
class _Plan:
    divergence: Divergence
    student_softcap: float | None
    teacher_softcap: float | None
    chunk_size: int
    lead: tuple[int, int]  # (rows, tokens per row): TAD's abar is a mean over a row
    cache_bytes: int = 0  # teacher chunk projections kept between the two passes
    compile_chunks: bool = False
    float32_weight_grad: bool = True


def _capped(z: Tensor, cap: float | None, dtype: torch.dtype, keep: bool = False) -> Tensor:
    """Projection output ``z`` in ``dtype``, soft-capped (``cap * tanh(z / cap)``) unless None;
    in place where ``z`` is already in ``dtype``, unless ``keep`` (a cached projection)."""
    x = z.to(dtype)
    if cap is None:
        return x
    x = x / cap if (keep and x is z) else x.div_(cap)
    return x.tanh_().mul_(cap)


def _logits(h: Tensor, w: Tensor, cap: float | None, dtype: torch.dtype) -> Tensor:
    """``[n, V]`` logits in ``dtype`` (the projection runs in the inputs' dtype, as nn.Linear)."""
    return _capped(torch.nn.functional.linear(h, w), cap, dtype)


def _masked_scaled(x: Tensor, rows: Tensor, ignored: bool, tau: float, keep: bool) -> Tensor:
    """Chunk logits as the divergence sees them: ignored rows zeroed (a fill, not a
    multiplication: garbage in an ignored row must not reach any sum), divided by the
    temperature; in place unless ``keep`` (``x`` is a cached teacher projection, read again)."""
    if keep and (ignored or tau != 1.0):
        x = x.clone()
    if ignored:
        x = x.masked_fill_(~rows, 0.0)
    return x.div_(tau) if tau != 1.0 else x


def _autograd_chunk_grad(fn):
    """``chunk_grad_fn`` from a ``chunk_fn``, for divergences without a closed-form gradient."""

    def chunk_grad(s: Tensor, t: Tensor, labels: Tensor, *extras: Tensor):
        with torch.enable_grad():
            s = s.detach().requires_grad_(True)
            per_token, stats = fn(s, t, labels, *extras)
            (grad,) = torch.autograd.grad(per_token.sum(), s)
        return per_token.detach(), {k: v.detach() for k, v in stats.items()}, grad

    return chunk_grad


_COMPILED: dict = {}


def _compiled(fn):
    """``torch.compile(fn)``, built once per function (recompiles for a new chunk length, then
    with a dynamic token dimension)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _segment_rows(plan: _Plan, vocab: int, itemsize: int) -> int:
    """Rows of the batch per segment: every row at once when no teacher pass is needed or no
    cache is allowed, else as many rows as the cache holds whole, at least one."""
    rows, tokens = plan.lead
    if not plan.divergence.needs_teacher_pass or plan.cache_bytes <= 0:
        return rows
    return min(rows, max(1, plan.cache_bytes // max(1, tokens * vocab * itemsize)))


def _teacher_extras(plan: _Plan, h_t: Tensor, w_t: Tensor, valid: Tensor, flags: list[bool],
                    lead: tuple[int, int]) -> tuple[tuple[Tensor, ...], dict[int, Tensor]]:
    """First, teacher-only pass over one segment: the divergence's per-token extras ``[n, ...]``
    and the teacher chunk projections kept for the second pass (chunk start -> raw ``[c, V]``)."""
    div = plan.divergence
    cache: dict[int, Tensor] = {}
    if not div.needs_teacher_pass or valid.shape[0] == 0:
        return (), cache
    dtype = compute_dtype(h_t.dtype)
    n, step = valid.shape[0], plan.chunk_size
    budget = plan.cache_bytes
    pieces = []
    for start, ignored in zip(range(0, n, step), flags):
        z = torch.nn.functional.linear(h_t[start : start + step], w_t)
        size = z.numel() * z.element_size()
        keep = size <= budget
        if keep:
            cache[start] = z
            budget -= size
        t = _capped(z, plan.teacher_softcap, dtype, keep=keep)
        t = _masked_scaled(t, valid[start : start + step].unsqueeze(-1), ignored,
                           div.temperature, keep=keep and t is z)
        pieces.append(div.teacher_chunk_stats(t))
    stats = tuple(torch.cat(p).reshape(*lead, *p[0].shape[1:]) for p in zip(*pieces))
    extras = div.teacher_extras(stats, valid.reshape(lead))
    return tuple(e.reshape(n, *e.shape[2:]) for e in extras), cache


def _accumulate_weight_grad(grad_w: Tensor, grad: Tensor, h: Tensor) -> None:
    """``grad_w += grad.T @ h`` (``[V, D] += [V, n] @ [n, D]``). Inputs of a lower precision than
    the float32 ``grad_w`` (bf16) multiply in their own dtype, like the model's matmuls, and are
    added by vocabulary blocks, so the low-precision product is never a whole ``[V, D]`` (1.7 GiB
    at Gemma2-9B's 256000 x 3584, and as much again for its float32 promotion in the sum): the
    two together take at most the size of the chunk's float32 ``[n, V]`` logits."""
    if grad_w.dtype == h.dtype:
        grad_w.addmm_(grad.t(), h)
        return
    vocab, hidden = grad_w.shape
    block = max(1, grad.shape[0] * vocab * 4 // (hidden * (h.element_size() + 4)))
    for v in range(0, vocab, block):
        grad_w[v : v + block] += grad[:, v : v + block].t() @ h


class _FusedDivergence(torch.autograd.Function):
    """Loss sum and diagnostics in forward; backward only rescales the stored gradients."""

    @staticmethod
    def forward(ctx, h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor,
                plan: _Plan) -> tuple[Tensor, ...]:
        div = plan.divergence
        n, hidden = h_s.shape
        dtype = compute_dtype(h_s.dtype)
        valid = labels != div.ignore_index  # (N,)
        y = torch.where(valid, labels, 0)
        grad_fn = div.chunk_grad_fn or _autograd_chunk_grad(div.chunk_fn)
        if plan.compile_chunks:
            grad_fn = _compiled(grad_fn)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # float32 even for bf16 inputs: the weight gradient is a sum over all chunks (unless
        # the caller trades that precision for a [V, D] float32 buffer).
        grad_h = h_s.new_zeros((n, hidden), dtype=dtype) if need_h else None
        grad_w = w_s.new_zeros(w_s.shape, dtype=dtype if plan.float32_weight_grad else w_s.dtype
                               ) if need_w else None
        names = sorted(div.stat_names)
        sums = torch.zeros(1 + len(names), dtype=dtype, device=h_s.device)  # total, *stats
        tau = div.temperature
        row_len = plan.lead[1]
        seg_rows = _segment_rows(plan, w_t.shape[0], h_t.element_size())
        for seg_start in range(0, n, max(1, seg_rows * row_len)):
            seg_n = min(seg_rows * row_len, n - seg_start)
            seg = slice(seg_start, seg_start + seg_n)
            seg_valid = valid[seg]
            flags = _chunks_with_ignored(seg_valid, plan.chunk_size)
            extras, cache = _teacher_extras(plan, h_t[seg], w_t, seg_valid, flags,
                                            (seg_n // row_len, row_len))
            for start, ignored in zip(range(0, seg_n, plan.chunk_size), flags):
                stop = min(start + plan.chunk_size, seg_n)  # chunks never cross a segment
                local, sl = slice(start, stop), slice(seg_start + start, seg_start + stop)
                rows = valid[sl].unsqueeze(-1)  # (n, 1)
                s = _masked_scaled(_logits(h_s[sl], w_s, plan.student_softcap, dtype), rows,
                                   ignored, tau, keep=False)  # (n, V)
                z_t = cache.pop(start, None)
                if z_t is None:
                    z_t = torch.nn.functional.linear(h_t[sl], w_t)
                t = _masked_scaled(_capped(z_t, plan.teacher_softcap, dtype), rows, ignored, tau,
                                   keep=False)
                del z_t
                # t is scratch for grad_fn (TAD's overwrites it); s is read only.
                per_token, stats, grad = grad_fn(s, t, y[sl], *(e[local] for e in extras))
                del t
                zero = per_token.new_zeros(())
                sums += torch.stack([torch.where(valid[sl], v, zero).sum()
                                     for v in (per_token, *(stats[k] for k in names))])
                if not (need_h or need_w):
                    continue
                if ignored:
                    grad = grad.masked_fill_(~rows, 0.0)  # d total / d (capped logits)
                if tau != 1.0:
                    grad = grad.div_(tau)
                if plan.student_softcap is not None:
                    # d(cap tanh(x / cap))/dx = 1 - tanh^2 = 1 - (s tau / cap)^2 on valid rows
                    # (the capped logits are s tau there); built in s's own buffer.
                    grad = grad.mul_(s.mul_(tau / plan.student_softcap).square_().neg_().add_(1.0))
                del s
                grad = grad.to(h_s.dtype)  # bf16 matmuls, float32 accumulation (as Liger)
                if need_h:
                    grad_h[sl] = grad @ w_s
                if need_w:
                    _accumulate_weight_grad(grad_w, grad, h_s[sl])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.done = False
        num_tokens = valid.sum()
        stat_sums = [sums[i].clone() for i in range(1, sums.shape[0])]
        ctx.mark_non_differentiable(num_tokens, *stat_sums)
        return (sums[0].clone(), num_tokens, *stat_sums)

    @staticmethod
    def backward(ctx, grad_total: Tensor, *_):
        if ctx.done:
            raise RuntimeError(
                "fused_divergence's backward can run only once (retain_graph=True is not "
                "supported): it scales its stored gradients in place to save a [V, D] copy"
            )
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if grad_h is None else grad_h.mul_(grad_total).to(h_dtype)
        gw = None if grad_w is None else grad_w.mul_(grad_total).to(w_dtype)
        return gh, gw, None, None, None, None


def _full(w: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter, differentiably.

    The gradient goes back as ``Partial("avg")``: reduce-scattered AND averaged over the ranks,
    which is what FSDP2 does with the gradients of every other parameter.
    """
    if DTensor is not None and isinstance(w, DTensor):
        return w.full_tensor(grad_placements=[Partial("avg")] * len(w.placements))
    return w


@torch.compiler.disable  # a Python loop over chunks: run eagerly, graph break around it
def _apply(h_s, w_s, h_t, w_t, labels, plan):
    return _FusedDivergence.apply(h_s, w_s, h_t, w_t, labels, plan)


def fused_divergence(
    divergence: Divergence,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    teacher_cache_mib: float = DEFAULT_TEACHER_CACHE_MIB,
    compile_chunks: bool = False,
    float32_weight_grad: bool = True,
) -> DivergenceOutput:
    """``divergence.sum_and_count(student logits, teacher logits, labels)`` without the logits.

    The student logits are ``cap_s * tanh(student_hidden @ student_weight.T / cap_s)`` (no tanh
    when ``student_softcap`` is None), the teacher's likewise; the teacher gets no gradient.

    Args:
        divergence: any ``Divergence`` of this package (its temperature, ignore_index and
            vocab_alignment apply; its ``chunk_size`` does not, see ``chunk_size``).
        student_hidden: ``[B, T, D]`` (or ``[N, D]``) final hidden states, after the final norm.
        student_weight: ``[V, D]`` output projection (the embedding table when tied); may be an
            FSDP2-sharded DTensor, gathered with ``full_tensor()``.
        teacher_hidden: ``[B, T, D_T]`` (or ``[N, D_T]``).
        teacher_weight: ``[V_T, D_T]``; with ``vocab_alignment="truncate_teacher"`` its first
            ``V`` rows are used when ``V_T > V``.
        labels: ``[B, T]`` (or ``[N]``, one sequence); ``ignore_index`` marks ignored tokens.
        student_softcap, teacher_softcap: logit soft-caps (``model.logit_softcap``) or None.
        chunk_size: tokens per chunk; None picks ``default_chunk_size`` (Liger's rule; twice
            that on CPU).
        teacher_cache_mib: memory (MiB) for teacher chunk projections kept from the first pass
            of a divergence with ``needs_teacher_pass`` (TAD) to the second, instead of
            recomputing them; 0 recomputes every one. Ignored by the other divergences.
        compile_chunks: run the divergence's per-chunk function through ``torch.compile``.
        float32_weight_grad: sum the output-weight gradient over chunks in float32 (default).
            False sums it in the weight's dtype, as autograd does for a chunked output layer
            (torchtune's path) and Liger-Kernel does: for bf16 weights that saves a float32
            ``[V, D]`` buffer (3.4 GiB at 256000 x 3584) for a rounding to bf16 per chunk.

    Returns:
        ``DivergenceOutput``: ``total`` (float32, float64 for float64 inputs) differentiable
        w.r.t. ``student_hidden`` and ``student_weight``, ``num_tokens`` and ``stats``.

    Raises:
        ValueError: on mismatched shapes or vocabularies.
    """
    if student_hidden.dim() < 2 or labels.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal student_hidden's leading shape "
            f"{tuple(student_hidden.shape[:-1])} (student_hidden is [B, T, D] or [N, D])"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} does not match student_hidden "
            f"shape {tuple(student_hidden.shape)} in the leading (batch, token) dimensions"
        )
    for name, h, w in (("student", student_hidden, student_weight),
                       ("teacher", teacher_hidden, teacher_weight)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{name}_weight must be [V, D] with D = {name}_hidden.shape[-1] = "
                f"{h.shape[-1]}, got shape {tuple(w.shape)}"
            )
    if (isinstance(teacher_cache_mib, bool) or not isinstance(teacher_cache_mib, (int, float))
            or not teacher_cache_mib >= 0):
        raise ValueError(f"teacher_cache_mib must be a number >= 0, got {teacher_cache_mib!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    w_s = _full(student_weight)
    with torch.no_grad():
        w_t = teacher_weight.full_tensor() if DTensor is not None and isinstance(
            teacher_weight, DTensor) else teacher_weight
        w_t = align_teacher_vocab(w_t.detach().t(), w_s.shape[0], divergence.vocab_alignment).t()
    hidden = student_hidden.shape[-1]
    h_s = student_hidden.reshape(-1, hidden)  # (N, D)
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # (N, D_T)
    y = labels.reshape(-1)
    lead = tuple(labels.shape) if labels.dim() == 2 else (1, y.shape[0])
    if labels.dim() > 2:
        lead = (math.prod(labels.shape[:-1]), labels.shape[-1])
    if not torch.is_grad_enabled():  # evaluation: the value only, no gradient buffers
        h_s, w_s = h_s.detach(), w_s.detach()
    n = y.shape[0]
    plan = _Plan(divergence, student_softcap, teacher_softcap,
                 chunk_size or default_chunk_size(n, w_s.shape[0], hidden, h_s.device), lead,
                 cache_bytes=int(teacher_cache_mib * 2**20), compile_chunks=bool(compile_chunks),
                 float32_weight_grad=bool(float32_weight_grad))
    total, num_tokens, *stats = _apply(h_s, w_s, h_t, w_t, y, plan)
    names = sorted(divergence.stat_names)
    return DivergenceOutput(total=total, num_tokens=num_tokens, stats=dict(zip(names, stats)))
