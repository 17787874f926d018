"""The fused head: cross-entropy and divergence from hidden states, without the ``[N, V]`` logits.

``fused_head`` takes the student's final hidden states (after the final norm) and output weight,
and the teacher's, instead of their logits. Chunk by chunk over tokens (``engine.chunk_slices``)
it projects the student's hidden states ONCE to logits, applies the soft-cap, and from that one
chunk computes the cross-entropy and the divergence, values AND gradients (closed form:
``Divergence.chunk_grad_fn``; or autograd through ``chunk_fn``), then turns the gradient of
``ce_weight * CE + kd_weight * divergence`` w.r.t. the chunk's logits into gradients w.r.t. the
student's hidden states and output weight, in the forward pass (Liger-Kernel's fused linear
losses do the same). A step so does the floor of matmul work: the student's projection and its
two gradient products, and the teacher's projection (``docs/design.md``, "The fused head").

What survives a chunk is the student hidden-state gradient ``[N, D]`` and the output-weight
gradient ``[V, D]``, both float32 (the weight's own dtype with ``float32_weight_grad=False``), so
the extra memory is those plus a few ``[chunk, V]`` float32 buffers, never ``[N, V]``: each
chunk's logits are masked, scaled and soft-capped in their own buffer, and the divergence's chunk
gradient works in the teacher chunk's (``test_peak_memory_is_a_few_chunks`` in
``tests/losses/test_fused.py``). A bf16 weight gradient is summed in float32 by vocabulary blocks
(``_accumulate_weight_grad``).

A divergence with a ``top_k`` (TAD: ``abar`` is a mean over every valid token of a
row) works segment by segment, a segment being whole rows of the batch: first the teacher-only
pass (``engine.teacher_pass``) over the segment's chunks, then the per-chunk terms with the exact
row statistics. The teacher's projection of a chunk is needed by both passes; up to
``teacher_cache_mib`` of them are kept from the first pass (in the projection's own dtype, so the
second pass sees bit-identical values) and the rest are recomputed. A segment holds as many rows
as the cache can hold entirely (at least one row), so a budget of one row's teacher logits
removes every recomputation: ``teacher_cache_mib=None`` is that budget, whatever the shapes.
While kept projections are still to come, a chunk's student side runs in two halves
(``_ProjectedTeacher.halves``): the peak is then the kept chunks plus one, not plus two.

``compile_chunks=True`` runs each chunk's element-wise work through ``torch.compile``: the
teacher pass's split of a chunk (``_teacher_split``) and the chunk's terms and gradient
(``_head_chunk``), from the raw projections. The closed forms' traced branches (``terms.in_ids``,
``terms.add_at_``, TAD's ``_tad_chunk_grad_traced``) leave inductor no scatter and no ``[n, V]``
intermediate, so a chunk of CE + TAD is about 11 passes over ``[chunk, V]`` instead of 48
(``docs/design.md``, "The fused head on a GPU"); the projections and the loop stay eager.
"""

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from tad_torchtune.checks import check_int, check_non_negative
from tad_torchtune.common import IGNORE_INDEX, compute_dtype, full_tensor
from tad_torchtune.losses.base import Divergence
from tad_torchtune.losses.cached import CacheEntries
from tad_torchtune.losses.terms import (
    SparseGrad,
    TopK,
    add_at_,
    finished,
    logsumexp,
    teacher_top_k,
)
from tad_torchtune.losses.engine import (
    DivergenceOutput,
    chunk_slices,
    chunks_with_ignored,
    row_layout,
    teacher_pass,
)
from tad_torchtune.vocab import MergedRows, check_merges_softcap

#: default ``teacher_cache_mib``: one 1024-token row of 32K-vocabulary float32 teacher logits, or
#: 256 tokens of a 256K vocabulary in bf16; small next to the float32 ``[V, D]`` weight gradient.
DEFAULT_TEACHER_CACHE_MIB = 128


def teacher_projection_bytes(tokens: int, hidden: Tensor, weight: Tensor) -> int:
    """Bytes of ``tokens`` teacher projections of ``hidden`` by the ``[V, D]`` ``weight``, as
    the fused head keeps them between TAD's two passes (``teacher_cache_mib``'s unit)."""
    return tokens * weight.shape[0] * torch.promote_types(hidden.dtype, weight.dtype).itemsize


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


@dataclass(frozen=True)
class _Plan:
    divergence: Divergence | None
    ce_weight: float
    kd_weight: float
    compute_ce: bool
    ignore_index: int
    student_softcap: float | None
    teacher_softcap: float | None
    chunk_size: int
    lead: tuple[int, int]  # (rows, tokens per row): TAD's abar is a mean over a row
    cache_bytes: int | None = 0  # teacher chunk projections kept between the passes; None: a row
    compile_chunks: bool = False
    float32_weight_grad: bool = True


def _capped(z: Tensor, cap: float | None, dtype: torch.dtype, keep: bool = False) -> Tensor:
    """Projection output ``z`` in ``dtype``, soft-capped (``cap * tanh(z / cap)``) unless None;
    in place where ``z`` is already in ``dtype``, unless ``keep`` (a cached projection, or an
    input of a compiled function: inductor would write it back)."""
    x = z.to(dtype)
    if cap is None:
        return x
    x = x / cap if (keep and x is z) else x.div_(cap)
    return x.tanh_().mul_(cap)


def _masked_scaled(x: Tensor, rows: Tensor, ignored: bool, tau: float, keep: bool) -> Tensor:
    """Chunk logits as the divergence sees them: ignored rows zeroed (a fill, not a
    multiplication: garbage in an ignored row must not reach any sum), divided by the
    temperature; in place unless ``keep`` (``x`` is a cached teacher projection, read again).
    The in-place twin of ``engine.scaled_chunk``."""
    if keep and (ignored or tau != 1.0):
        x = x.clone()
    if ignored:
        x = x.masked_fill_(~rows, 0.0)
    return x.div_(tau) if tau != 1.0 else x


def _autograd_chunk_grad(fn):
    """``chunk_grad_fn`` from a ``chunk_fn`` (or a cache adapter's), for divergences without
    a closed-form gradient: the same arguments, the gradient w.r.t. the first."""

    def chunk_grad(s: Tensor, *args: Tensor):
        with torch.enable_grad():
            s = s.detach().requires_grad_(True)
            per_token, stats = fn(s, *args)
            (grad,) = torch.autograd.grad(per_token.sum(), s)
        return per_token.detach(), {k: v.detach() for k, v in stats.items()}, grad

    return chunk_grad


def _teacher_split(z: Tensor, rows: Tensor, ignored: bool, tau: float, cap: float | None,
                   dtype: torch.dtype, k: int, keep: bool) -> TopK:
    """The teacher pass's work on one chunk's projection ``z`` (``keep``: ``z`` is read again,
    a cached projection, or is an input of a compiled function): soft-cap, mask, scale,
    ``teacher_top_k``."""
    t = _capped(z, cap, dtype, keep=keep)
    return teacher_top_k(_masked_scaled(t, rows, ignored, tau, keep=keep and t is z), k)


class _ChunkSettings(NamedTuple):
    """What ``_head_chunk`` does with a chunk, the same for every chunk of a call (a tuple of
    constants to ``torch.compile``, which guards on their values)."""

    folds_ce: bool  # div_grad is a closed form taking ce_weight, and the temperature is 1
    compute_ce: bool
    ce_weight: float
    kd_weight: float
    tau: float
    cap: float | None
    teacher_cap: float | None
    dtype: torch.dtype  # the element-wise work's (float32, float64 for float64 inputs)
    stat_names: tuple[str, ...]
    grad_dtype: torch.dtype  # the gradient's, as the gradient products take it
    bias_grad: bool


def _head_chunk(z: Tensor, t: Tensor | None, y: Tensor, rows: Tensor, extras: tuple,
                div_grad, ignored: bool, settings: _ChunkSettings):
    """One chunk of the fused head, after the projections.

    ``z`` ``[n, V]``: the student's projection (its own buffer: consumed). ``t``: the teacher's
    (scratch), or None without a divergence or from a teacher cache (whose entries are among
    the ``extras``). Both are soft-capped in ``settings.dtype`` here, the teacher's masked and
    scaled as the divergence sees it. With ``settings.folds_ce``, ``div_grad`` (the divergence's
    ``chunk_grad_fn``) computes the CE term too.

    Under ``torch.compile`` the in-place steps act on copies of the inputs, which inductor does
    not make: it fuses them into its loops, and writes no input back.

    Returns:
        ``(sums, grad, bias_grad)``: ``sums`` ``[2 + len(stat_names)]``, the chunk's sums over
        valid rows of the CE, the divergence and its diagnostics (0 for a term not computed);
        ``grad`` ``[n, V]`` in ``grad_dtype``, the gradient of ``ce_weight * CE + kd_weight *
        KD`` w.r.t. the logits BEFORE the soft-cap, 0 on ignored rows; ``bias_grad`` ``[V]``,
        its sum over the rows in ``dtype`` (None unless ``settings.bias_grad``).
    """
    (folds_ce, compute_ce, ce_weight, kd_weight, tau, cap, teacher_cap, dtype, names,
     grad_dtype, bias_grad) = settings
    if torch.compiler.is_compiling():
        z, t = z.clone(), None if t is None else t.clone()
    z = _capped(z, cap, dtype)
    if t is not None:
        t = _masked_scaled(_capped(t, teacher_cap, dtype), rows, ignored, tau, keep=False)
    if ignored:
        z = z.masked_fill_(~rows, 0.0)
    want_ce = compute_ce or bool(ce_weight)
    ce = lse = None
    kd, stats, grad = None, {}, None
    s = z
    scale = 1.0  # the divergence's gradient's weight, applied by ``finish``

    def finish(g: Tensor, s_at: Tensor) -> Tensor:
        """The rest of the gradient, element-wise, given the logits ``s`` at the same entries
        (written): the weight, ignored rows, the soft-cap's derivative."""
        if scale != 1.0:
            g = g.mul_(scale)
        if ignored:
            g = g.masked_fill_(~rows, 0.0)
        if cap is not None:
            # d(cap tanh(x / cap))/dx = 1 - tanh^2 = 1 - (z / cap)^2, in s's buffer (z = s tau)
            g = g.mul_(s_at.mul_(tau / cap).square_().neg_().add_(1.0))
        return g

    if div_grad is not None and folds_ce and want_ce and kd_weight:
        # the divergence's closed form folds the CE in: grad of KD + (ce_weight / kd_weight) CE
        args = (s, y, *extras) if t is None else (s, t, y, *extras)
        kd, stats, grad, ce = div_grad(*args, ce_weight=ce_weight / kd_weight)
        del t
        scale = kd_weight
    else:
        if want_ce:
            lse = logsumexp(z)  # (n,)
            ce = lse - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if div_grad is not None:
            s = z.div_(tau) if tau != 1.0 else z  # s is read only from here
            kd, stats, grad = div_grad(s, y, *extras) if t is None else div_grad(s, t, y, *extras)
            del t
            scale = kd_weight / tau
        if ce_weight:  # + ce_weight * (softmax(z) - onehot(y)), z = s * tau
            grad = finished(grad)
            if grad is not None and scale != 1.0:
                grad = grad.mul_(scale)
            scale = 1.0
            q = (s.mul(tau) if tau != 1.0 else s.clone()).sub_(lse.unsqueeze(-1)).exp_()
            grad = q.mul_(ce_weight) if grad is None else grad.add_(q, alpha=ce_weight)
            del q
            grad = add_at_(grad, y, -ce_weight)
    if grad is None:  # nothing is differentiated (both weights 0)
        grad = torch.zeros_like(z)
    if isinstance(grad, SparseGrad) and not bias_grad:
        # a teacher cache's closed form: written once, in the gradient's dtype
        grad = grad.finish(grad_dtype, finish)
    else:
        grad = finish(finished(grad), s)
    zero = torch.zeros(rows.shape[0], dtype=dtype, device=rows.device)
    per_token = torch.stack([zero if v is None else v.to(dtype)
                             for v in (ce, kd, *(stats[k] for k in names))], dim=-1)
    sums = torch.where(rows, per_token, 0.0).sum(0)  # one reduction
    return sums, grad.to(grad_dtype), grad.sum(0) if bias_grad else None


_COMPILED: dict = {}

#: inductor settings for the head's compiled functions on a GPU: an element-wise value used
#: twice (a closed form's per-entry term: in its row's sum and in the gradient) is recomputed
#: where it reads up to 8 tensors (inductor's default, 4, stores it in a float32 ``[n, V]``
#: buffer and reads it back: reverse KL's and DRKL's terms read the student's and teacher's
#: logits, their log-normalisers and the rows' mask); ``docs/design.md``, "The fused head on a
#: GPU". Not on a CPU, where this work is compute-bound: recomputing the term's ``exp`` made the
#: compiled CE + reverse KL 9% slower there.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 8}


def _compiled(fn, options: dict | None = None):
    """``torch.compile(fn)``, built once per function and ``options`` (recompiles for a new
    chunk length, then with a dynamic token dimension; a new device compiles anew), on a GPU
    under ``INDUCTOR_OPTIONS`` and ``options`` (a configuration patch around each call: whatever
    backend ``torch.compile`` is given, as the tests' are)."""
    options = options or {}
    key = (fn, tuple(sorted(options.items())))
    if key not in _COMPILED:
        from torch._inductor import config as inductor_config

        compiled = torch.compile(fn)
        settings = {**INDUCTOR_OPTIONS, **options}

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not _gpu_settings(args[0]):  # the chunk's logits
                return compiled(*args, **kwargs)
            with inductor_config.patch(settings):
                return compiled(*args, **kwargs)

        _COMPILED[key] = run
    return _COMPILED[key]


def _gpu_settings(z: Tensor) -> bool:
    """Whether a compiled chunk on ``z``'s device takes the GPU's inductor settings
    (``benchmarks/head_kernels.py`` answers True where it generates a GPU's code on a CPU)."""
    return z.is_cuda


def _dynamic_rows(*args) -> None:
    """Marks the token dimension of a compiled chunk's tensors (a tensor or a tuple of them
    each) dynamic, so that a head whose chunks come in two lengths (halves and whole chunks)
    compiles ONE graph for both instead of a static one and then a dynamic one
    (``_compiled``). A dynamic tensor's storage offset is symbolic and guarded too: the graph
    is compiled at the first call, where every slice starts at offset 0 (no flag per chunk
    makes a later first call; ``docs/design.md``)."""
    for x in args:
        for y in x if isinstance(x, tuple) else (x,):
            if isinstance(y, Tensor) and y.dim():
                torch._dynamo.maybe_mark_dynamic(y, 0)


def _project(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(h, w, b)


class _ProjectedTeacher:
    """The teacher side of the fused head: chunk logits projected from hidden states, some kept
    between the two passes of a divergence with a ``top_k``."""

    def __init__(self, h: Tensor, w: Tensor, b: Tensor | None, plan: _Plan,
                 dtype: torch.dtype, merge: MergedRows | None = None) -> None:
        self.h, self.w, self.b, self.plan, self.dtype = h, w, b, plan, dtype
        self.merge = merge
        self.tau = plan.divergence.temperature
        self.cache: dict[int, Tensor] = {}
        self.kept = 0  # projections kept by the current segment's teacher pass
        # one row of the batch's teacher projections, in their dtype; the cache's budget
        # (``teacher_cache_mib``'s, or that row's)
        self.row_bytes = teacher_projection_bytes(plan.lead[1], h, w)
        self.budget = self.row_bytes if plan.cache_bytes is None else plan.cache_bytes

    def segment_rows(self) -> int:
        """Rows of the batch per segment: every row at once when no teacher pass is needed or no
        cache is allowed, else as many rows as the cache holds whole, at least one."""
        rows = self.plan.lead[0]
        if self.plan.divergence.top_k is None or self.budget <= 0:
            return rows
        return min(rows, max(1, self.budget // max(1, self.row_bytes)))

    def extras(self, seg: slice, slices: list[slice], flags: list[bool], valid: Tensor,
               groups: Tensor | None) -> tuple[Tensor, ...]:
        """The divergence's per-token extras of one segment: its teacher pass, if it needs one,
        keeping projections within the budget."""
        self.cache = {}
        budget = self.budget

        split = _compiled(_teacher_split) if self.plan.compile_chunks else _teacher_split

        def chunk_top(i: int, sl: slice) -> TopK:
            nonlocal budget
            z = self.project(self.h[seg][sl])
            size = z.numel() * z.element_size()
            keep = size <= budget
            if keep:
                self.cache[i] = z
                budget -= size
            return split(z, valid[sl].unsqueeze(-1), flags[i], self.tau,
                         self.plan.teacher_softcap, self.dtype, self.plan.divergence.top_k,
                         keep or self.plan.compile_chunks)

        rows = (seg.stop - seg.start) // self.plan.lead[1]
        extras = teacher_pass(self.plan.divergence, chunk_top, slices, valid,
                              (rows, self.plan.lead[1]), groups)
        self.kept = len(self.cache)
        return extras

    def chunk(self, i: int, sl: slice) -> Tensor:
        """The teacher's projection of chunk ``i`` of the current segment, as scratch."""
        z = self.cache.pop(i, None)
        return self.project(self.h[sl]) if z is None else z

    def project(self, h: Tensor) -> Tensor:
        """The teacher's logits of hidden states ``h`` ``[n, D_T]`` before the soft-cap, with
        ``teacher_id_merges`` folded in."""
        z = _project(h, self.w, self.b)
        return z if self.merge is None else self.merge.apply_(z, h)

    def halves(self) -> bool:
        """Whether the chunk just taken runs in two halves. Its projection and the segment's
        kept ones still to come are alive while it runs; with the student's logits and their
        gradient in whole chunks the peak would be ``kept + 2`` chunks (at the segment's first
        chunk), in halves it is ``kept + 1``, as at the next chunk: every chunk taken while at
        least ``kept - 1`` (and one) kept projections are still to come, only the first with
        the whole cache kept (``docs/design.md``, "The fused head on a GPU")."""
        return len(self.cache) >= max(self.kept - 1, 1)


class _CachedTeacher:
    """The teacher side of the fused head from a teacher cache: no teacher projection at all;
    the cache's adapter gives the per-token inputs of its chunk function."""

    def __init__(self, cache: CacheEntries, plan: _Plan) -> None:
        self.cache, self.plan = cache, plan

    def segment_rows(self) -> int:
        return self.plan.lead[0]

    def extras(self, seg: slice, slices: list[slice], flags: list[bool], valid: Tensor,
               groups: Tensor | None) -> tuple[Tensor, ...]:
        return self.cache.chunk_inputs(self.plan.divergence, valid, self.plan.lead, groups)

    def chunk(self, i: int, sl: slice) -> None:
        return None


_MIXED_MM: dict[tuple[str, torch.dtype], bool] = {}


def _mixed_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` accumulates products
    of ``dtype`` inputs into a float32 ``acc`` inside the matmul on ``device`` (cuBLAS: beta = 1,
    float32 output), checked once against float32 arithmetic. CPU builds lack the kernel."""
    key = (device.type, dtype)
    if key not in _MIXED_MM:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(64, 48, device=device, generator=g).to(dtype)
                b = torch.randn(48, 32, device=device, generator=g).to(dtype)
                acc = torch.ones(64, 32, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _MIXED_MM[key] = ok
    return _MIXED_MM[key]


def _accumulate_weight_grad(grad_w: Tensor, grad: Tensor, h: Tensor) -> None:
    """``grad_w += grad.T @ h`` (``[V, D] += [V, n] @ [n, D]``). Inputs of a lower precision than
    the float32 ``grad_w`` (bf16) multiply in their own dtype, like the model's matmuls: on a GPU
    the product is accumulated into ``grad_w`` inside the matmul (float32 output, beta = 1: no
    low-precision ``[V, D]`` product and no pass of its own for the sum); elsewhere it is added
    by vocabulary blocks, so the low-precision product is never a whole ``[V, D]`` (1.7 GiB at
    Gemma2-9B's 256000 x 3584, and as much again for its float32 promotion in the sum): the two
    together take at most the size of the chunk's float32 ``[n, V]`` logits."""
    if grad_w.dtype == h.dtype:
        grad_w.addmm_(grad.t(), h)
        return
    if grad_w.dtype == torch.float32 and _mixed_mm_ok(h.device, h.dtype):
        torch.addmm(grad_w, grad.t(), h, out_dtype=torch.float32, out=grad_w)
        return
    vocab, hidden = grad_w.shape
    block = max(1, grad.shape[0] * vocab * 4 // (hidden * (h.element_size() + 4)))
    for v in range(0, vocab, block):
        grad_w[v : v + block] += grad[:, v : v + block].t() @ h


class _FusedHead(torch.autograd.Function):
    """Loss sums and diagnostics in forward; backward only rescales the stored gradients."""

    @staticmethod
    def forward(ctx, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, labels: Tensor, plan: _Plan,
                teacher, groups: Tensor | None) -> tuple[Tensor, ...]:
        div = plan.divergence
        n, hidden = h_s.shape
        dtype = compute_dtype(h_s.dtype)
        valid = labels != plan.ignore_index  # (N,)
        y = torch.where(valid, labels, 0)
        div_grad, folds_ce = None, False
        if div is not None:
            closed, fn = div.chunk_grad_fn, div.chunk_fn
            if isinstance(teacher, _CachedTeacher):  # the cache's adapter of the divergence
                closed, fn = teacher.cache.chunk_grad_fn(div), teacher.cache.chunk_fn(div)
            div_grad = closed or _autograd_chunk_grad(fn)
            folds_ce = closed is not None and div.temperature == 1.0
        step = (_compiled(_head_chunk, div.gpu_inductor_options if div is not None else None)
                if plan.compile_chunks else _head_chunk)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b_s is not None and ctx.needs_input_grad[2]
        # float32 even for bf16 inputs: the weight gradient is a sum over all chunks (unless
        # the caller trades that precision for a [V, D] float32 buffer).
        grad_h = h_s.new_zeros((n, hidden), dtype=dtype) if need_h else None
        grad_w = w_s.new_zeros(w_s.shape, dtype=dtype if plan.float32_weight_grad else w_s.dtype
                               ) if need_w else None
        grad_b = b_s.new_zeros(b_s.shape, dtype=dtype) if need_b else None
        names = sorted(div.stat_names) if div is not None else []
        sums = torch.zeros(2 + len(names), dtype=dtype, device=h_s.device)  # ce, kd, *stats
        tau = div.temperature if div is not None else 1.0
        # the gradient in the matmuls' dtype (bf16 products, float32 accumulation, as Liger);
        # with no product to feed (evaluation), left as it is
        settings = _ChunkSettings(folds_ce, plan.compute_ce, plan.ce_weight, plan.kd_weight, tau,
                                  plan.student_softcap, plan.teacher_softcap, dtype, tuple(names),
                                  h_s.dtype if need_h or need_w else dtype, need_b)
        dynamic = False  # the compiled chunks' token dimension marked dynamic (halves)
        row_len = plan.lead[1]
        seg_rows = teacher.segment_rows() if teacher is not None else plan.lead[0]
        for seg_start in range(0, n, max(1, seg_rows * row_len)):
            seg = slice(seg_start, min(seg_start + seg_rows * row_len, n))
            slices = chunk_slices(seg.stop - seg.start, plan.chunk_size)  # never cross a segment
            # compiled, every chunk masks its ignored rows: the mask is fused into the loops
            # (no pass of its own), and one graph per function serves every chunk, where a
            # flag per chunk compiles two (and asks the device for the flags)
            flags = ([True] * len(slices) if plan.compile_chunks
                     else chunks_with_ignored(valid[seg], slices))
            extras: tuple[Tensor, ...] = ()
            if div is not None:
                extras = teacher.extras(seg, slices, flags, valid[seg],
                                        None if groups is None else groups[seg])
            for i, (local, ignored) in enumerate(zip(slices, flags)):
                sl = slice(seg.start + local.start, seg.start + local.stop)
                t_chunk = teacher.chunk(i, sl) if div is not None else None
                pieces = [(local, t_chunk)]
                if t_chunk is not None and teacher.halves() and local.stop - local.start > 1:
                    mid = (local.stop - local.start + 1) // 2
                    pieces = [(slice(local.start, local.start + mid), t_chunk[:mid]),
                              (slice(local.start + mid, local.stop), t_chunk[mid:])]
                    dynamic = plan.compile_chunks  # one graph for halves and chunks
                del t_chunk  # freed with its last piece
                while pieces:
                    piece, t = pieces.pop(0)
                    sl = slice(seg.start + piece.start, seg.start + piece.stop)
                    rows = valid[sl].unsqueeze(-1)  # (n, 1)
                    z = _project(h_s[sl], w_s, b_s)
                    args = (z, t, y[sl], rows, tuple(e[piece] for e in extras))
                    if dynamic:
                        _dynamic_rows(*args)
                    part, grad, bias_part = step(*args, div_grad, ignored, settings)
                    del z, t, args
                    sums += part
                    if need_b:
                        grad_b += bias_part
                    if need_h:
                        grad_h[sl] = grad @ w_s
                    if need_w:
                        _accumulate_weight_grad(grad_w, grad, h_s[sl])
                    del grad
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        ctx.done = False
        objective = plan.ce_weight * sums[0] + plan.kd_weight * sums[1]
        num_tokens = valid.sum()
        others = [sums[i].clone() for i in range(sums.shape[0])]
        ctx.mark_non_differentiable(num_tokens, *others)
        return (objective, num_tokens, *others)

    @staticmethod
    def backward(ctx, grad_objective: Tensor, *_):
        if ctx.done:
            raise RuntimeError(
                "the fused head's backward can run only once (retain_graph=True is not "
                "supported): it scales its stored gradients in place to save a [V, D] copy"
            )
        ctx.done = True
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if g is None else g.mul_(grad_objective).to(dtype))
        return (*grads, None, None, None, None)


@torch.compiler.disable  # a Python loop over chunks: run eagerly, graph break around it
def _apply(h_s, w_s, b_s, labels, plan, teacher, groups):
    return _FusedHead.apply(h_s, w_s, b_s, labels, plan, teacher, groups)


@dataclass
class HeadOutput:
    """What ``fused_head`` returns.

    Attributes:
        objective: ``ce_weight * CE sum + kd_weight * divergence sum`` over valid tokens
            (scalar, differentiable w.r.t. the student's hidden states and output weight).
        ce: the CE sum (detached), or None when it was not computed.
        kd: the divergence's ``DivergenceOutput`` (its ``total`` detached), or None.
        num_tokens: valid tokens (scalar int64).
    """

    objective: Tensor
    ce: Tensor | None
    kd: DivergenceOutput | None
    num_tokens: Tensor


def fused_head(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    divergence: Divergence | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_cache: CacheEntries | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    compute_ce: bool | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    teacher_merge: MergedRows | None = None,
    document_ids: Tensor | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    teacher_cache_mib: float | None = DEFAULT_TEACHER_CACHE_MIB,
    compile_chunks: bool = False,
    float32_weight_grad: bool = True,
) -> HeadOutput:
    """``ce_weight * CE + kd_weight * divergence`` from hidden states, without the logits.

    The student logits are ``cap_s * tanh((student_hidden @ student_weight.T + student_bias) /
    cap_s)`` (no tanh when ``student_softcap`` is None, no bias when it is None), the teacher's
    likewise; the teacher gets no gradient. The cross-entropy uses the student's logits as they
    are (no temperature); the divergence, both divided by its temperature. One projection of the
    student per chunk serves both terms.

    Args:
        student_hidden: ``[B, T, D]`` (or ``[N, D]``) final hidden states, after the final norm.
        student_weight: ``[V, D]`` output projection (the embedding table when tied); may be an
            FSDP2-sharded DTensor, gathered with ``full_tensor()``.
        labels: ``[B, T]`` (or ``[N]``, one sequence); ``ignore_index`` marks ignored tokens.
        divergence: any ``Divergence`` of this package (its temperature and ignore_index apply),
            or None for the cross-entropy alone.
        teacher_hidden: ``[B, T, D_T]`` (or ``[N, D_T]``), with a divergence.
        teacher_weight: ``[V, D_T]``, over the student's vocabulary (a larger teacher's aligned
            first: ``tad_torchtune.vocab.align_teacher_vocab`` of its transpose).
        teacher_cache: a teacher cache's entries of these positions (``losses.cached``,
            ``[B, T, ...]``) instead of ``teacher_hidden`` and ``teacher_weight``: the
            divergence through the cache's adapter, from the student's logits alone; no teacher
            projection.
        student_bias, teacher_bias: ``[V]`` output-projection biases, or None.
        ce_weight, kd_weight: weights of the two sums in ``objective``.
        compute_ce: compute the CE sum (default: when ``ce_weight > 0``).
        student_softcap, teacher_softcap: logit soft-caps (``model.logit_softcap``) or None.
        teacher_merge: the teacher's output-projection rows of ``teacher_id_merges``
            (``tad_torchtune.vocab.MergedRows``), folded into each teacher projection before
            anything reads it (not with a ``teacher_softcap``), or None.
        document_ids: ``[B, T]`` document of each token within its row, for divergences whose
            row statistics can be per document (TAD with ``abar_scope="document"``).
        ignore_index: label of ignored tokens without a divergence (default -100).
        chunk_size: tokens per chunk; None picks ``default_chunk_size`` (Liger's rule; twice
            that on CPU).
        teacher_cache_mib: memory (MiB) for teacher chunk projections kept from the first pass
            of a divergence with a ``top_k`` (TAD) to the second, instead of recomputing them;
            0 recomputes every one; None keeps every one, a row of the batch at a time (the
            memory of one row's teacher logits, ``T x V`` in the teacher's dtype: 1 GiB for
            2048 tokens of a 256000-token bf16 vocabulary). Ignored by the other divergences.
        compile_chunks: run each chunk's element-wise work through ``torch.compile``.
        float32_weight_grad: sum the output-weight gradient over chunks in float32 (default).
            False sums it in the weight's dtype, as autograd does for a chunked output layer
            (torchtune's path) and Liger-Kernel does: for bf16 weights that saves a float32
            ``[V, D]`` buffer (3.4 GiB at 256000 x 3584) for a rounding to bf16 per chunk.

    Returns:
        ``HeadOutput``.

    Raises:
        ValueError: on mismatched shapes or vocabularies, or bad arguments.
    """
    if student_hidden.dim() < 2 or labels.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal student_hidden's leading shape "
            f"{tuple(student_hidden.shape[:-1])} (student_hidden is [B, T, D] or [N, D])"
        )
    if divergence is not None:  # what sum_and_count checks too: a traceback in a chunk else
        from tad_torchtune.losses.base import CacheSpec, DivergenceUse

        cache = (None if teacher_cache is None else
                 CacheSpec(teacher_cache.mode, teacher_cache.top_m, divergence.temperature,
                           where="teacher cache"))
        divergence.validate(DivergenceUse(vocab_size=student_weight.shape[0], fused=True,
                                          cache=cache, key=type(divergence).__name__))
    sides = [("student", student_hidden, student_weight, student_bias)]
    if divergence is not None and teacher_cache is None:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a divergence needs teacher_hidden and teacher_weight, or a "
                             "teacher_cache")
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"teacher_hidden shape {tuple(teacher_hidden.shape)} does not match "
                f"student_hidden shape {tuple(student_hidden.shape)} in the leading (batch, "
                f"token) dimensions"
            )
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"teacher_weight has {teacher_weight.shape[0]} rows, student_weight "
                f"{student_weight.shape[0]}: align a larger teacher vocabulary first "
                f"(tad_torchtune.vocab.align_teacher_vocab)")
        sides.append(("teacher", teacher_hidden, teacher_weight, teacher_bias))
        if teacher_merge is not None:
            check_merges_softcap(teacher_merge.ids, teacher_softcap)
    for name, h, w, b in sides:
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{name}_weight must be [V, D] with D = {name}_hidden.shape[-1] = "
                f"{h.shape[-1]}, got shape {tuple(w.shape)}"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name}_bias must be [V] = [{w.shape[0]}], got {tuple(b.shape)}")
    if teacher_cache_mib is not None:
        check_non_negative(teacher_cache_mib, "teacher_cache_mib")
    check_int(chunk_size, "chunk_size", optional=True)
    w_s = full_tensor(student_weight, differentiable=True)
    b_s = None if student_bias is None else full_tensor(student_bias, differentiable=True)
    hidden = student_hidden.shape[-1]
    h_s = student_hidden.reshape(-1, hidden)  # (N, D)
    y = labels.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: the values only, no gradient buffers
        h_s, w_s = h_s.detach(), w_s.detach()
        b_s = None if b_s is None else b_s.detach()
    n = y.shape[0]
    plan = _Plan(
        divergence, float(ce_weight), float(kd_weight) if divergence is not None else 0.0,
        bool(ce_weight > 0 if compute_ce is None else compute_ce),
        divergence.ignore_index if divergence is not None else
        (IGNORE_INDEX if ignore_index is None else int(ignore_index)),
        student_softcap, teacher_softcap,
        chunk_size or default_chunk_size(n, w_s.shape[0], hidden, h_s.device),
        row_layout(labels),
        cache_bytes=None if teacher_cache_mib is None else int(teacher_cache_mib * 2**20),
        compile_chunks=bool(compile_chunks), float32_weight_grad=bool(float32_weight_grad))
    teacher = None
    if divergence is not None and teacher_cache is not None:
        teacher = _CachedTeacher(teacher_cache, plan)
    elif divergence is not None:
        w_t = full_tensor(teacher_weight).detach()
        b_t = None if teacher_bias is None else full_tensor(teacher_bias).detach()
        h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # (N, D_T)
        if teacher_merge is not None:
            b_m = teacher_merge.bias
            teacher_merge = teacher_merge._replace(
                weight=full_tensor(teacher_merge.weight).detach(),
                bias=None if b_m is None else full_tensor(b_m).detach())
        teacher = _ProjectedTeacher(h_t, w_t, b_t, plan, compute_dtype(h_t.dtype),
                                    teacher_merge)
    groups = None if document_ids is None else document_ids.reshape(-1)
    objective, num_tokens, ce, kd, *stats = _apply(h_s, w_s, b_s, y, plan, teacher, groups)
    kd_out = None
    if divergence is not None:
        names = sorted(divergence.stat_names)
        kd_out = DivergenceOutput(total=kd, num_tokens=num_tokens, stats=dict(zip(names, stats)))
    return HeadOutput(objective=objective, ce=ce if plan.compute_ce else None, kd=kd_out,
                      num_tokens=num_tokens)


def fused_divergence(
    divergence: Divergence,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    **kwargs,
) -> DivergenceOutput:
    """``divergence.sum_and_count(student logits, teacher logits, labels)`` without the logits:
    ``fused_head`` with the divergence alone (``ce_weight=0``), its ``total`` differentiable.

    Args:
        divergence, student_hidden, student_weight, teacher_hidden, teacher_weight, labels:
            as ``fused_head``.
        **kwargs: the other keyword arguments of ``fused_head`` (soft-caps, biases,
            ``document_ids``, ``chunk_size``, ``teacher_cache_mib``, ``compile_chunks``,
            ``float32_weight_grad``).

    Returns:
        ``DivergenceOutput``: ``total`` (float32, float64 for float64 inputs) differentiable
        w.r.t. ``student_hidden`` and ``student_weight``, ``num_tokens`` and ``stats``.
    """
    out = fused_head(student_hidden, student_weight, labels, divergence=divergence,
                     teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, ce_weight=0.0,
                     kd_weight=1.0, **kwargs)
    return DivergenceOutput(total=out.objective, num_tokens=out.num_tokens, stats=out.kd.stats)
