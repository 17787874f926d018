"""Divergences from a teacher cache: adapters that serve any divergence from stored teacher
statistics instead of teacher logits (``docs/design.md``, "Divergences from a teacher cache").

A cache kind is an entries class: the statistics of a batch's positions, ``[..., M]`` and
``[...]``, that a divergence's ``sum_and_count`` (and the fused head) takes in place of teacher
logits. It adapts the divergence: ``chunk_inputs`` gives the per-token inputs of the chunk
function ``chunk_fn(divergence)`` of the student's logits alone. No divergence knows about caches.

``TeacherTopM``, the bucket cache, holds per position:

- ``ids [.., M]``: the teacher's M most probable ids, most probable first;
- ``logp [.., M]``: their log-probabilities under the FULL softmax;
- ``log_rest [..]``: ``log r_M``, the log of the mass outside those ids, computed as
  ``LSE(logits outside the top-M) - LSE(logits)``, never as ``log(1 - sum)``;
- ``label_logp [..]``: the teacher's log-probability of the label (the next token).

All at the cache's temperature. Its adapter runs the divergence's OWN chunk function on the
M + 1 outcomes "each cached id" and "the rest" (the bucket): the teacher's are the cached
log-probabilities, the student's its logits at the cached ids and the log-sum-exp of its logits
outside them, so the math of every divergence is written once. A divergence with a ``top_k``
reads the first K outcomes as the teacher's top-K (the ids are ranked), and one that reads the
label (``reads_labels``: DRKL) gets the label as an outcome of its own, taken out of the bucket
when it lies there. Merging outcomes into one bucket can only lower a KL (the data processing
inequality), so a cached divergence is a lower bound of its online value, equal when the bucket
holds a single id (M = V - 1).

``TeacherSampled``, the sampled cache, holds per position the teacher's top-K ids and their
log-probabilities, ``log_tail`` (the log mass outside them), ``entropy`` (the entropy of the
renormalised tail) and ``draws``: S ids drawn from that tail. Its adapter serves the divergences
of the form ``D_KL1 + w * D_KL2`` (``Divergence.tail_weight``: TAD, forward KL). ``D_KL1``,
``alphaT`` and ``abar`` are exact; ``D_KL2 = -H(pt) + LSE_tail(zS) - E_pt[zS]`` is estimated
without bias by the mean of the student's logits at the draws (``docs/design.md``, "Divergences
from a sampled-tail cache"). A loss with a smaller K than the cache's keeps the ranks between
them exact.
"""

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from tad_torchtune.common import compute_dtype
from tad_torchtune.losses.engine import (
    DEFAULT_CHUNK_SIZE,
    DivergenceOutput,
    chunk_slices,
    reduce_chunks,
    row_layout,
    top_k_extras,
)
from tad_torchtune.losses.terms import (
    SparseGrad,
    TopK,
    in_ids,
    is_in,
    log1mexp,
    logsumexp,
    lse_outside,
    masked_xlogy_sum,
    safe_finite,
    split_grad,
    split_kl,
    top_k,
)


class CacheEntries:
    """What every cache kind's entries share: moving and stacking them, and serving a divergence
    (``sum_and_count``, the unfused path; the fused head calls ``chunk_inputs`` and
    ``chunk_fn`` itself)."""

    #: the ``cache_mode`` of this kind (``tad_torchtune.losses.base.CACHE_MODES``)
    mode: ClassVar[str] = ""

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device | str) -> "CacheEntries":
        return type(self)(*(x.to(device, non_blocking=True) for x in self.tensors()))

    @classmethod
    def stack(cls, entries: list["CacheEntries"]) -> "CacheEntries":
        """Entries of several blocks ``[L, ...]`` as a batch ``[B, L, ...]``."""
        return cls(*(torch.stack(parts) for parts in zip(*(e.tensors() for e in entries))))

    @property
    def lead_shape(self) -> torch.Size:
        """The positions' shape ``[...]`` (``[B, T]`` for a batch)."""
        raise NotImplementedError

    @property
    def top_m(self) -> int:
        """Teacher ids stored exactly per position."""
        raise NotImplementedError

    def chunk_inputs(self, divergence, valid: Tensor, lead: tuple[int, int],
                     groups: Tensor | None = None) -> tuple[Tensor, ...]:
        """The flat per-token inputs ``[N, ...]`` of ``chunk_fn(divergence)``, ignored positions
        (``valid [N]`` False) sanitized; ``lead = (rows, T)``, ``groups [N]`` document ids."""
        raise NotImplementedError

    def chunk_fn(self, divergence) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
        """``(s [n, V], labels [n], *inputs) -> (per_token [n], stats)``: the divergence from
        the student's scaled logits and the chunk's inputs. Built once per divergence (the
        fused head compiles it)."""
        raise NotImplementedError

    def chunk_grad_fn(self, divergence) -> Callable[..., tuple[Tensor, ...]] | None:
        """The same value and its gradient w.r.t. ``s`` in closed form, with ``ce_weight`` as
        ``Divergence.chunk_grad_fn``, the gradient a ``[n, V]`` tensor or a ``SparseGrad``
        (the head finishes it in its gradient's dtype; ``terms.finished``: as a tensor); None:
        the fused head differentiates ``chunk_fn``."""
        return None

    def sum_and_count(self, divergence, student_logits: Tensor, labels: Tensor, *,
                      document_ids: Tensor | None = None,
                      chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> DivergenceOutput:
        """``divergence.sum_and_count`` from these entries (``[B, T, ...]``, at the
        divergence's temperature) instead of teacher logits; the student logits ``[B, T, V]``
        are those of the vocabulary the cached ids index."""
        from tad_torchtune.losses.base import CacheSpec, DivergenceUse

        if tuple(self.lead_shape) != tuple(labels.shape):
            raise ValueError(f"teacher cache shape {tuple(self.lead_shape)} does not match the "
                             f"labels' {tuple(labels.shape)}")
        divergence.validate(DivergenceUse(
            vocab_size=student_logits.shape[-1], key=type(divergence).__name__,
            cache=CacheSpec(self.mode, self.top_m, divergence.temperature, where="teacher cache")))
        valid = (labels != divergence.ignore_index).reshape(-1)
        groups = None if document_ids is None else document_ids.reshape(-1)
        inputs = self.chunk_inputs(divergence, valid, row_layout(labels), groups)
        return reduce_chunks(
            self.chunk_fn(divergence), (student_logits,), labels,
            ignore_index=divergence.ignore_index, temperature=divergence.temperature,
            chunk_size=chunk_size, stat_names=divergence.stat_names, extras=inputs)


_BUCKET_CHUNKS: "WeakKeyDictionary[Any, Callable]" = WeakKeyDictionary()
_BUCKET_GRADS: "WeakKeyDictionary[Any, Callable]" = WeakKeyDictionary()


@dataclass
class TeacherTopM(CacheEntries):
    """The bucket cache's statistics of some positions, ``[..., M]`` and ``[...]`` (the module
    docstring)."""

    ids: Tensor
    logp: Tensor
    log_rest: Tensor
    label_logp: Tensor

    mode: ClassVar[str] = "top_m"

    @property
    def top_m(self) -> int:
        return self.ids.shape[-1]

    @property
    def lead_shape(self) -> torch.Size:
        return self.log_rest.shape

    def flat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four tensors as ``[N, M]``, ``[N, M]``, ``[N]``, ``[N]`` (long, then the compute
        dtype: float32, float64 stays float64)."""
        m, dtype = self.top_m, compute_dtype(self.logp.dtype)
        return (self.ids.reshape(-1, m).long(), self.logp.reshape(-1, m).to(dtype),
                self.log_rest.reshape(-1).to(dtype), self.label_logp.reshape(-1).to(dtype))

    def chunk_inputs(self, divergence, valid: Tensor, lead: tuple[int, int],
                     groups: Tensor | None = None) -> tuple[Tensor, ...]:
        """The four tensors (ignored positions sanitized), then, for a divergence with a
        ``top_k``, the ``TopK`` of the ranked outcomes and the divergence's sequence extras."""
        entries = sanitized(valid, *self.flat())
        if divergence.top_k is None:
            return entries
        _, logp, log_rest, label_logp = entries
        outcomes = torch.cat([logp, log_rest.unsqueeze(-1)], dim=-1)  # (N, M + 1)
        if divergence.reads_labels:  # the label's own outcome: no mass in the ranking's sums
            outcomes = torch.cat([outcomes[:, :-1], torch.full_like(label_logp, float("-inf"))
                                  .unsqueeze(-1), outcomes[:, -1:]], dim=-1)
        k = divergence.top_k
        ids = torch.arange(k, device=logp.device).expand(logp.shape[0], k)
        top = TopK(ids, outcomes.logsumexp(-1), outcomes[:, k:].logsumexp(-1))
        return (*entries, *top_k_extras(divergence, [top], valid, lead, groups))

    def chunk_fn(self, divergence) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
        if divergence not in _BUCKET_CHUNKS:
            with_label = divergence.reads_labels

            def bucket_chunk(s: Tensor, labels: Tensor, ids: Tensor, logp: Tensor,
                             log_rest: Tensor, label_logp: Tensor, *extras: Tensor):
                sv, tv, y = bucket_outcomes(s, labels, ids, logp, log_rest, label_logp,
                                            with_label=with_label)
                return divergence.chunk_fn(sv, tv, y, *extras)

            _BUCKET_CHUNKS[divergence] = bucket_chunk
        return _BUCKET_CHUNKS[divergence]

    def chunk_grad_fn(self, divergence) -> Callable[..., tuple[Tensor, ...]]:
        """``chunk_fn`` with its gradient w.r.t. ``s``: autograd of the divergence's own chunk
        function on the ``[n, M + 1]`` outcomes only (small), then ``bucket_grad`` takes it to
        the ``[n, V]`` logits in closed form; ``ce_weight`` as ``Divergence.chunk_grad_fn``."""
        if divergence not in _BUCKET_GRADS:
            with_label = divergence.reads_labels

            def bucket_chunk_grad(s: Tensor, labels: Tensor, ids: Tensor, logp: Tensor,
                                  log_rest: Tensor, label_logp: Tensor, *extras: Tensor,
                                  ce_weight: float | None = None) -> tuple[Tensor, ...]:
                sv, tv, y = bucket_outcomes(s, labels, ids, logp, log_rest, label_logp,
                                            with_label=with_label)
                # torch.func, not torch.autograd: Dynamo traces it (no graph break)
                per_token, vjp, stats = torch.func.vjp(
                    lambda v: divergence.chunk_fn(v, tv, y, *extras), sv, has_aux=True)
                (g,) = vjp(torch.ones_like(per_token))
                out = bucket_grad(s, labels, ids, sv, g, with_label=with_label,
                                  ce_weight=ce_weight)
                return per_token, stats, *out

            _BUCKET_GRADS[divergence] = bucket_chunk_grad
        return _BUCKET_GRADS[divergence]


def bucket_outcomes(s: Tensor, labels: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor,
                    label_logp: Tensor, *, with_label: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The bucket cache's outcomes as logits a divergence's chunk function reads.

    Args:
        s: ``[n, V]`` the student's scaled logits (autograd flows through).
        labels: ``[n]`` ids in ``[0, V)``.
        ids, logp, log_rest, label_logp: the chunk's cache entries (``[n, M]``, ``[n]``).
        with_label: the label as an outcome of its own (after the M ids), taken out of the
            bucket when it is not among the ids (its slot is then empty, ``-inf``, on both sides).

    Returns:
        ``(student [n, M + 1], teacher [n, M + 1], labels [n])`` (``M + 2`` with the label): the
        student's logits at the ids and the log-sum-exp outside them (an unnormalised
        log-distribution over the outcomes), the teacher's log-probabilities, and the label's
        outcome (0 without ``with_label``: unread).
    """
    neg_inf = float("-inf")
    s_m = s.gather(-1, ids)  # (n, M)
    if not with_label:
        student = torch.cat([s_m, lse_outside(s, ids).unsqueeze(-1)], dim=-1)
        teacher = torch.cat([logp, log_rest.unsqueeze(-1)], dim=-1)
        return student, teacher, torch.zeros_like(labels)
    y = labels.unsqueeze(-1)
    in_m = ids == y  # (n, M)
    y_in = in_m.any(-1)
    s_y = torch.where(y_in, neg_inf, s.gather(-1, y).squeeze(-1))
    t_y = torch.where(y_in, neg_inf, label_logp)
    s_rest = lse_outside(s, torch.cat([ids, y], dim=-1))
    # the teacher's bucket without the label: log(r_M - p_y), without cancellation
    t_rest = torch.where(y_in, log_rest, log_rest + log1mexp(label_logp - log_rest))
    student = torch.cat([s_m, s_y.unsqueeze(-1), s_rest.unsqueeze(-1)], dim=-1)
    teacher = torch.cat([logp, t_y.unsqueeze(-1), t_rest.unsqueeze(-1)], dim=-1)
    outcome = torch.where(y_in, in_m.long().argmax(-1), ids.shape[-1])
    return student, teacher, outcome


def bucket_grad(s: Tensor, labels: Tensor, ids: Tensor, outcomes: Tensor, grad: Tensor, *,
                with_label: bool = False, ce_weight: float | None = None) -> tuple[Tensor, ...]:
    """The gradient w.r.t. the logits ``s [n, V]`` of a function of the bucket outcomes
    (``bucket_outcomes``' student side ``outcomes``), given its gradient ``grad`` w.r.t. them.

    An outcome at an id is that logit: its gradient goes to the id. The bucket is the
    log-sum-exp of the logits outside the ids (and the label, with ``with_label``): an id ``i``
    there gets ``grad_bucket * exp(s_i - bucket)``. The label's own outcome goes to the label
    unless the label is among the ids (then it is a constant ``-inf``). With ``ce_weight`` c the
    CE's ``c (softmax(s) - onehot(y))`` joins (the outcomes partition the vocabulary, so their
    log-sum-exp is the full one) and the per-token CE is returned too. One element-wise
    expression and one ``scatter`` (``SparseGrad``).

    Returns:
        ``(grad,)``, or ``(grad, ce [n])`` with ``ce_weight``: ``grad`` a ``SparseGrad`` for
        the ``[n, V]`` logits.
    """
    m = ids.shape[-1]
    y = labels.unsqueeze(-1)
    outside = torch.cat([ids, y], dim=-1) if with_label else ids
    bucket = safe_finite(outcomes[:, -1]).unsqueeze(-1)
    g_bucket = grad[:, -1:]
    lse = None if ce_weight is None else outcomes.logsumexp(-1)  # the outcomes: a partition

    def part(cols: Tensor | None, sv: Tensor) -> Tensor:
        g = torch.where(is_in(outside, cols, s.shape[-1]), 0.0, g_bucket * (sv - bucket).exp())
        return g if lse is None else g + ce_weight * (sv - lse.unsqueeze(-1)).exp()

    at, values = [ids], [grad[:, :m]]
    if with_label:
        label_in_ids = (ids == y).any(-1, keepdim=True)
        at.append(y)
        values.append(torch.where(label_in_ids, 0.0, grad[:, m : m + 1]))
    return _sparse_grad(part, s, labels, at, values, lse, ce_weight)


@torch.no_grad()
def teacher_top_m(logits: Tensor, labels: Tensor, top_m: int, *, temperature: float = 1.0,
                  chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> TeacherTopM:
    """The bucket cache's entries of teacher logits ``[..., V]`` (already aligned to the
    student's vocabulary) and their labels ``[...]`` (an ignored label gets ``label_logp`` 0),
    in float32 (float64 stays float64), chunk by chunk.

    Raises:
        ValueError: unless ``1 <= top_m < V``.
    """
    vocab = logits.shape[-1]
    if not 1 <= top_m < vocab:
        raise ValueError(f"top_m must be in [1, {vocab}) for a vocabulary of {vocab}, got {top_m}")
    flat = logits.reshape(-1, vocab)
    y = labels.reshape(-1)
    parts = []
    for sl in chunk_slices(flat.shape[0], chunk_size):
        z = flat[sl].to(compute_dtype(flat.dtype)) / temperature  # (n, V)
        lse = z.logsumexp(-1)
        top, ids = top_k(z, top_m)  # most probable first
        rest = lse_outside(z, ids)
        label = z.gather(-1, y[sl].clamp(min=0).unsqueeze(-1)).squeeze(-1) - lse
        parts.append((ids, top - lse.unsqueeze(-1), rest - lse,
                      torch.where(y[sl] >= 0, label, label.new_zeros(()))))
    ids, logp, log_rest, label_logp = (torch.cat(p) for p in zip(*parts))
    lead = labels.shape
    return TeacherTopM(ids.reshape(*lead, top_m), logp.reshape(*lead, top_m),
                       log_rest.reshape(lead), label_logp.reshape(lead))


def sanitized(valid: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor, label_logp: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cache entries with those of ignored positions ``[N]`` replaced by a consistent,
    finite stand-in (distinct ids, a uniform distribution), so that nothing they hold (a block's
    last position is never computed) reaches a value or a gradient."""
    n, m = ids.shape
    vocab_guess = m + 1  # any V > M: the stand-in spreads the mass over M + 1 outcomes
    rows = valid.unsqueeze(-1)
    uniform = -torch.log(logp.new_tensor(float(vocab_guess)))
    return (torch.where(rows, ids, torch.arange(m, device=ids.device)),
            torch.where(rows, logp, uniform), torch.where(valid, log_rest, uniform),
            torch.where(valid, label_logp, uniform))


# ------------------------------------------------------------------------------ the sampled cache

_SAMPLED_CHUNKS: "WeakKeyDictionary[Any, tuple[Callable, Callable]]" = WeakKeyDictionary()


@dataclass
class TeacherSampled(CacheEntries):
    """The sampled cache's statistics of some positions (the module docstring): ``ids``,
    ``logp`` ``[..., K]``, ``log_tail``, ``entropy`` ``[...]``, ``draws`` ``[..., S]``."""

    ids: Tensor
    logp: Tensor
    log_tail: Tensor
    entropy: Tensor
    draws: Tensor

    mode: ClassVar[str] = "sampled"

    @property
    def top_m(self) -> int:
        return self.ids.shape[-1]

    @property
    def samples(self) -> int:
        return self.draws.shape[-1]

    @property
    def lead_shape(self) -> torch.Size:
        return self.log_tail.shape

    def flat(self) -> tuple[Tensor, ...]:
        """``ids [N, K]``, ``logp [N, K]``, ``log_tail``, ``entropy`` ``[N]``, ``draws [N, S]``
        (ids long, the rest in the compute dtype)."""
        k, s, dtype = self.top_m, self.samples, compute_dtype(self.logp.dtype)
        return (self.ids.reshape(-1, k).long(), self.logp.reshape(-1, k).to(dtype),
                self.log_tail.reshape(-1).to(dtype), self.entropy.reshape(-1).to(dtype),
                self.draws.reshape(-1, s).long())

    def chunk_inputs(self, divergence, valid: Tensor, lead: tuple[int, int],
                     groups: Tensor | None = None) -> tuple[Tensor, ...]:
        """The five tensors (ignored positions sanitized), then the divergence's tail weight
        ``w`` and its diagnostics, from the EXACT tail masses outside its top-K."""
        ids, logp, log_tail, entropy, draws = self.flat()
        rows = valid.unsqueeze(-1)
        k_c = self.top_m
        uniform = -torch.log(logp.new_tensor(float(k_c + 1)))
        ids = torch.where(rows, ids, torch.arange(k_c, device=ids.device))
        logp = torch.where(rows, logp, uniform)
        log_tail = torch.where(valid, log_tail, uniform)
        entropy = torch.where(valid, entropy, 0.0)
        draws = torch.where(rows, draws, k_c)  # an id outside the stand-in's top ids
        k = _sampled_k(divergence, k_c)
        log_alpha_t = torch.logaddexp(logp[:, k:].logsumexp(-1), log_tail)
        weight = divergence.tail_weight(
            log_alpha_t.reshape(lead), valid.reshape(lead),
            None if groups is None else groups.reshape(lead))
        assert weight is not None, "a sampled cache serves divergences of the D_KL1 + w D_KL2 form"
        stats = tuple(weight.stats[name].reshape(-1) for name in sorted(weight.stats))
        return (ids, logp, log_tail, entropy, draws, weight.weight.reshape(-1), *stats)

    def chunk_fn(self, divergence) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
        return self._chunks(divergence)[0]

    def chunk_grad_fn(self, divergence) -> Callable[..., tuple[Tensor, ...]]:
        return self._chunks(divergence)[1]

    def _chunks(self, divergence) -> tuple[Callable, Callable]:
        if divergence not in _SAMPLED_CHUNKS:
            k = _sampled_k(divergence, self.top_m)
            names = tuple(sorted(set(divergence.stat_names) - {"dkl1", "dkl2", "tail_mass"}))
            wanted = set(divergence.stat_names)

            def sampled_chunk(s: Tensor, labels: Tensor, *inputs: Tensor):
                per_token, stats = sampled_terms(s, *inputs[:6], k=k)
                stats.update(zip(names, inputs[6:]))
                return per_token, {n: v for n, v in stats.items() if n in wanted}

            def sampled_chunk_grad(s: Tensor, labels: Tensor, *inputs: Tensor,
                                   ce_weight: float | None = None):
                out = sampled_terms(s, *inputs[:6], k=k, grad=True, ce_weight=ce_weight,
                                    labels=labels)
                out[1].update(zip(names, inputs[6:]))
                stats = {n: v for n, v in out[1].items() if n in wanted}
                return (out[0], stats, *out[2:])

            _SAMPLED_CHUNKS[divergence] = (sampled_chunk, sampled_chunk_grad)
        return _SAMPLED_CHUNKS[divergence]


def _sampled_k(divergence, cache_k: int) -> int:
    """The top-K split of a divergence from a sampled cache: its own ``top_k`` (TAD), or every
    id the cache stores exactly (forward KL: any split gives the KL)."""
    return cache_k if divergence.top_k is None else divergence.top_k


def sampled_terms(s: Tensor, ids: Tensor, logp: Tensor, log_tail: Tensor, entropy: Tensor,
                  draws: Tensor, weight: Tensor, *, k: int, grad: bool = False,
                  ce_weight: float | None = None, labels: Tensor | None = None
                  ) -> tuple[Tensor, ...]:
    """``D_KL1 + w * D2_hat`` per position from a sampled cache, and with ``grad`` its gradient
    w.r.t. ``s`` in closed form (``terms.split_grad``; with ``ce_weight`` the CE folded in, as
    ``Divergence.chunk_grad_fn``).

    With ``S_K`` the first ``k`` cached ids, the tail is the cached ranks ``k+1..K`` (exact
    log-probabilities) and the rest beyond the cache's K, of mass ``a = alpha_K / alphaT``:
    ``D_KL2 = sum_{ranks} pt log(pt / qt) + a (log a - H + LSE_tail(s) - E_pc[s])``, the last
    expectation (under the renormalised rest ``pc``) estimated by the mean of ``s`` at the draws.

    Args:
        s: ``[n, V]`` scaled student logits (read only).
        ids, logp: ``[n, K]`` the cached top ids and log-probabilities.
        log_tail, entropy: ``[n]`` log mass and entropy of the rest beyond them.
        draws: ``[n, S]`` ids drawn from the rest.
        weight: ``[n]`` the divergence's tail weight ``w``.
        k: the divergence's top-K split (``<= K``).

    Returns:
        ``(per_token [n], stats)`` (``dkl1``, ``dkl2`` estimated, ``tail_mass``), and with
        ``grad`` also ``grad`` (``[n, V]``; traced, a ``SparseGrad``) and, with
        ``ce_weight``, ``ce [n]``.
    """
    # the cache's values in the logits' dtype (float32 for a float16 cache; float64 logits, as
    # references run, take them to float64: no op where they agree)
    logp, log_tail, entropy, weight = (t.to(s.dtype) for t in (logp, log_tail, entropy, weight))
    zero = s.new_zeros(())
    top = ids[:, :k]
    traced = grad and torch.compiler.is_compiling()
    # one gather for the top ids, the cached ranks and the draws: backward then adds into one
    # [n, V] buffer, not three
    picked = s.gather(-1, torch.cat([ids, draws], dim=-1))  # (n, K + S)
    s_top, s_ranks, s_drawn = picked[:, :k], picked[:, k : ids.shape[-1]], picked[:, ids.shape[-1]:]
    if traced:  # a comparison inductor fuses into the reduction (terms.in_ids)
        lse_tail_s = logsumexp(s.masked_fill(in_ids(top, s.shape[-1]), float("-inf")))
    elif grad:
        log_qt = s.scatter(-1, top, float("-inf"))  # (n, V), becomes the gradient
        lse_tail_s = log_qt.logsumexp(-1)
    else:
        lse_tail_s = lse_outside(s, top)
    lse = torch.logaddexp(lse_tail_s, s_top.logsumexp(-1))
    log_q_top = s_top - lse.unsqueeze(-1)
    log_alpha_s = lse_tail_s - lse
    log_alpha_t = torch.logaddexp(logp[:, k:].logsumexp(-1), log_tail)
    dkl1 = split_kl(logp[:, :k], log_q_top, log_alpha_t, log_alpha_s, differentiable=not grad)

    has_tail = torch.isfinite(log_alpha_t)
    norm_t, norm_s = safe_finite(log_alpha_t), safe_finite(lse_tail_s)
    log_pt_ranks = logp[:, k:] - norm_t.unsqueeze(-1)  # (n, K - k)
    ranks = masked_xlogy_sum(log_pt_ranks.exp(), log_pt_ranks - (s_ranks - norm_s.unsqueeze(-1)))
    log_a = torch.where(has_tail, log_tail - norm_t, float("-inf"))
    a = log_a.exp()
    rest = torch.where(a > 0, a * (safe_finite(log_a) - entropy + norm_s - s_drawn.mean(-1)), zero)
    dkl2 = torch.where(has_tail, ranks + rest, zero)
    w = torch.where(weight > 0, weight, zero)
    per_token = dkl1 + torch.where(w > 0, w * dkl2, zero)
    stats = {"dkl1": dkl1, "dkl2": dkl2, "tail_mass": log_alpha_t.exp()}
    if not grad:
        return per_token, stats
    if traced:
        return (per_token, stats, *_sampled_grad_traced(
            s, labels, ids, draws, logp[:, :k].exp(), log_pt_ranks.exp(), a, lse, norm_s,
            log_alpha_s.exp(), log_alpha_t.exp(), w, ce_weight))
    # the tail distribution's estimate: the cached ranks exactly, a / S at each draw
    pt = torch.zeros_like(s).scatter_(-1, ids[:, k:], log_pt_ranks.exp())
    pt.scatter_add_(-1, draws, (a / draws.shape[-1]).unsqueeze(-1).expand_as(draws).contiguous())
    log_qt.sub_(norm_s.unsqueeze(-1))
    g = split_grad(log_qt, pt, log_alpha_s, log_alpha_t.exp(), w, top, log_q_top,
                   logp[:, :k].exp(), ce_weight)
    if ce_weight is None:
        return per_token, stats, g
    y = labels.unsqueeze(-1)
    g.scatter_add_(-1, y, g.new_full(y.shape, -ce_weight))
    return per_token, stats, g, lse - s.gather(-1, y).squeeze(-1)


def _sampled_grad_traced(s: Tensor, labels: Tensor, ids: Tensor, draws: Tensor,
                         p_top: Tensor, pt_ranks: Tensor, a: Tensor, lse: Tensor, norm_s: Tensor,
                         alpha_s: Tensor, alpha_t: Tensor, w: Tensor, ce_weight: float | None
                         ) -> tuple[SparseGrad | Tensor, ...]:
    """``sampled_terms``' gradient (and CE) for ``torch.compile``, a ``SparseGrad``: the dense
    part one element-wise expression, ``(1 + c) q`` on the top-K and ``(alphaS (1 + c) - alphaT
    + w) qt`` on the tail, and the sparse rest in ONE ``scatter``: ``-p`` at the top-K, ``-w pt``
    at the cached ranks and ``-w a / S`` at each draw, ``-c`` at the label. (The eager form
    builds a ``[n, V]`` estimate of ``pt`` by two scatters and edits the gradient in place:
    under inductor each is a pass of its own.)"""
    c = 0.0 if ce_weight is None else ce_weight
    k = p_top.shape[-1]
    coef = (alpha_s * (1.0 + c) - alpha_t + w).unsqueeze(-1)
    lse_, norm_s_ = lse.unsqueeze(-1), norm_s.unsqueeze(-1)
    top = ids[:, :k]

    def part(cols: Tensor | None, sv: Tensor) -> Tensor:
        top_here = is_in(top, cols, s.shape[-1])  # the gradient loop's own (``in_ids``)
        return torch.where(top_here, (sv - lse_).exp() * (1.0 + c), coef * (sv - norm_s_).exp())

    w_ = w.unsqueeze(-1)
    at = [top, ids[:, k:], draws]
    values = [-p_top, -w_ * pt_ranks, (-w_ * a.unsqueeze(-1) / draws.shape[-1]).expand_as(draws)]
    return _sparse_grad(part, s, labels, at, values, lse, ce_weight)


def _sparse_grad(part: Callable[[Tensor | None, Tensor], Tensor], s: Tensor, labels: Tensor,
                 at: list[Tensor], values: list[Tensor], lse: Tensor | None,
                 ce_weight: float | None) -> tuple[SparseGrad | Tensor, ...]:
    """The cache adapters' closed-form gradients: the element-wise ``part`` (the CE's ``c q``
    already in it) plus ``values`` at the ids ``at`` and the CE's ``-c`` at the label, as a
    ``SparseGrad`` the fused head finishes in its gradient's dtype (one rounding per entry, one
    ``scatter``); with ``ce_weight`` also the per-token CE ``lse - s_y`` (``lse`` ``[n]``).

    Returns:
        ``(grad,)``, or ``(grad, ce)`` with ``ce_weight``.
    """
    y = labels.unsqueeze(-1)
    if ce_weight is not None:
        at, values = [*at, y], [*values, s.new_full(y.shape, -ce_weight)]
    grad = SparseGrad(part, s, torch.cat(at, dim=-1), torch.cat(values, dim=-1))
    if ce_weight is None:
        return (grad,)
    return grad, lse - s.gather(-1, y).squeeze(-1)


# -- drawing from the teacher's tail, reproducibly: a counter-based generator keyed by
# (seed, block, position), so a shard is the same bytes whoever computes it and whenever

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) & 0xFFFF) * 65536) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: int, blocks: Tensor, positions: Tensor) -> Tensor:
    """Uniforms in ``[0, 1)`` (48 random bits, float64) ``[R, T]`` that are a function of
    ``(seed, blocks[r], positions[t])`` alone.

    Args:
        seed: the cache's seed.
        blocks: ``[R]`` int64 block indices (of a split of the token store).
        positions: ``[T]`` int64 positions within a block.
    """
    h = _hash32(torch.full_like(blocks, seed & _MASK32) ^ 0x2545F491)
    h = _hash32(h ^ (blocks & _MASK32)).unsqueeze(-1)
    h = _hash32(h ^ (positions & _MASK32).unsqueeze(0))  # (R, T)
    low = _hash32(h ^ 0x9E3779B9)
    return (h >> 8).double() * 2.0**-24 + (low >> 8).double() * 2.0**-48


@torch.no_grad()
def teacher_sampled(logits: Tensor, top_m: int, samples: int, *, seed: int, blocks: Tensor,
                    temperature: float = 1.0, chunk_size: int | None = 256) -> TeacherSampled:
    """The sampled cache's entries of teacher logits ``[B, T, V]`` (aligned to the student's
    vocabulary): the top ``top_m`` ids and log-probabilities, the log mass and the entropy of
    the rest, and ``samples`` draws from the rest.

    The draws are systematic: with ``U`` a uniform of ``(seed, block, position)``
    (``counter_uniform``), draw s is the id where the rest's cumulative mass crosses
    ``(s + U) / S``. Each draw is marginally from the renormalised rest, so their mean of any
    function is unbiased for its expectation, with less variance than independent draws; they
    come out sorted.

    Args:
        logits: ``[B, T, V]`` teacher logits.
        top_m: ids kept exactly (``1 <= top_m < V``).
        samples: draws per position.
        seed: the cache's seed.
        blocks: ``[B]`` the block index of each row (the counter of its draws).
        temperature: the logits are divided by it first.
        chunk_size: positions handled at once (the cumulative sum is float64 ``[n, V]``).
    """
    rows, length, vocab = logits.shape
    if not 1 <= top_m < vocab:
        raise ValueError(f"top_m must be in [1, {vocab}) for a vocabulary of {vocab}, got {top_m}")
    flat = logits.reshape(-1, vocab)
    uniform = counter_uniform(seed, blocks.long(), torch.arange(length)).reshape(-1)
    steps = torch.arange(samples, dtype=torch.float64, device=flat.device)
    parts = []
    for sl in chunk_slices(flat.shape[0], chunk_size):
        z = flat[sl].to(compute_dtype(flat.dtype)) / temperature  # (n, V)
        values, ids = top_k(z, top_m + 1)
        ids = ids[:, :top_m]
        lse_tail = lse_outside(z, ids, outside_max=values[:, top_m])
        lse = torch.logaddexp(lse_tail, values[:, :top_m].logsumexp(-1))
        pt = (z - safe_finite(lse_tail).unsqueeze(-1)).exp_().scatter_(-1, ids, 0.0)  # (n, V)
        entropy = -masked_xlogy_sum(pt, z - safe_finite(lse_tail).unsqueeze(-1))
        cdf = pt.double().cumsum_(-1)
        total = cdf[:, -1:]
        u = (steps + uniform[sl].to(flat.device).unsqueeze(-1)) / samples * total  # (n, S)
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        draws = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
        has_tail = torch.isfinite(lse_tail)
        parts.append((ids, values[:, :top_m] - lse.unsqueeze(-1), lse_tail - lse,
                      torch.where(has_tail, entropy, 0.0),
                      torch.where(has_tail.unsqueeze(-1), draws, 0)))
    ids, logp, log_tail, entropy, draws = (torch.cat(p) for p in zip(*parts))
    return TeacherSampled(ids.reshape(rows, length, top_m), logp.reshape(rows, length, top_m),
                          log_tail.reshape(rows, length), entropy.reshape(rows, length),
                          draws.reshape(rows, length, samples))
