"""The log-space terms the divergences share, each written once (``docs/design.md``, "The
divergences").

- ``logsumexp``: a row's log-sum-exp, in ONE loop over the row where inductor compiles it for
  a GPU (its online softmax);
- ``lse_outside``: the log-sum-exp of a row over the ids OUTSIDE a set (TAD's tails, DRKL's
  non-target mass, a teacher cache's bucket, the metrics' tail masses);
- ``top_k``: ``topk`` for k much smaller than V in about one pass (by blocks);
- ``teacher_top_k``: the teacher's top-K split of a chunk, ``TopK(ids, lse, lse_tail)``, which
  every teacher side (logits, projections, caches) provides to a divergence that reads one;
- ``split_kl``: ``D_KL1``, the KL over the K modes plus one outcome holding the rest of the mass,
  and ``split_grad``, the closed-form gradient of ``D_KL1 + w * D_KL2`` (TAD's eq. 6);
- ``masked_xlogy_*``: ``sum p * log_ratio`` where ``p = 0`` terms are 0, also when
  ``log_ratio`` is ``-inf - -inf`` (an id masked in both models);
- ``log1mexp`` and ``safe_finite``: the log of a complement, and a log-normaliser that may be
  ``-inf``;
- ``in_ids`` and ``add_at_``: a row's set of ids as a ``[n, V]`` mask, and a value added at one
  id per row, each as a scatter when run eagerly and as a comparison with the column index when
  ``torch.compile`` traces it (inductor then fuses it into the loops that read it: no ``[n, V]``
  buffer, no scatter kernel); ``is_in``, the same membership at given columns;
- ``SparseGrad``: a gradient w.r.t. ``[n, V]`` logits as an element-wise part plus values at a
  few ids per row (the teacher caches' closed forms), finished by the fused head into one
  buffer in the gradient's dtype, every entry rounded once.

Everything is float32 (float64 stays float64) and in log space: a mass is the exponential of a
difference of log-sum-exps, never ``1 - sum(...)``.
"""

from typing import Callable, NamedTuple

import torch
from torch import Tensor



#: ``in_ids`` under ``torch.compile``: up to this many ids as an OR of comparisons, more as a
#: reduction over a ``[n, K, V]`` comparison
IN_IDS_UNROLLED = 64

#: ``top_k`` works by blocks of this many ids (a row's block maxima, then the best blocks)
TOP_K_BLOCK = 64


def logsumexp(x: Tensor, keepdim: bool = False) -> Tensor:
    """``x.logsumexp(-1)``, -inf for a row of -inf, written for inductor when traced.

    ``Tensor.logsumexp`` guards its shift against an infinite maximum, and that guard keeps
    inductor from rewriting the maximum and the sum of exponentials into one loop over the row
    (its online softmax, applied on GPUs): the compiled code then reads the row twice. Traced,
    this takes the maximum unguarded, as ``log_softmax`` does, and puts the -inf of an all -inf
    row back afterwards (its NaN never reaches the result). For code that does not
    backpropagate through it (the closed-form gradients); eagerly it is ``Tensor.logsumexp``.
    """
    if not torch.compiler.is_compiling():
        return x.logsumexp(-1, keepdim=keepdim)
    shift = x.amax(-1, keepdim=True)
    lse = (x - shift).exp().sum(-1, keepdim=True).log() + shift
    lse = torch.where(shift == float("-inf"), shift, lse)
    return lse if keepdim else lse.squeeze(-1)


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` (values in descending order, ids) for ``[n, V]`` logits with k much
    smaller than V, in about one pass over ``x`` instead of a partial sort of every row.

    Each row's ids are cut into blocks of ``TOP_K_BLOCK``; the k largest entries lie within the
    k blocks of largest maximum (a block holding one of them but outside those k would have k
    other blocks, each with an entry at least as large, above it), so the top-k of those blocks'
    entries (and of the ids past the last whole block) is the row's top-k. The values are those
    of ``topk``; among entries of equal value the ids taken may differ from ``topk``'s, which
    does not specify its choice either.
    """
    n, vocab = x.shape[0], x.shape[-1]
    blocks = vocab // TOP_K_BLOCK
    if x.dim() != 2 or blocks < 4 * k:
        return x.topk(k, dim=-1)
    whole = blocks * TOP_K_BLOCK
    best = x[:, :whole].reshape(n, blocks, TOP_K_BLOCK).amax(-1).topk(k, dim=-1).indices
    ids = (best.unsqueeze(-1) * TOP_K_BLOCK
           + torch.arange(TOP_K_BLOCK, device=x.device)).reshape(n, k * TOP_K_BLOCK)
    if whole < vocab:
        rest = torch.arange(whole, vocab, device=x.device).expand(n, vocab - whole)
        ids = torch.cat([ids, rest], dim=-1)
    values, pick = x.gather(-1, ids).topk(k, dim=-1)
    return values, ids.gather(-1, pick)


class TopK(NamedTuple):
    """The teacher's top-K split of a chunk of positions.

    Attributes:
        ids: ``[n, K]`` the K most probable ids, most probable first (an outcome space's own
            indices: vocabulary ids, or a cache's outcome positions).
        lse: ``[n]`` log-sum-exp of the teacher's logits over every outcome.
        lse_tail: ``[n]`` log-sum-exp over the outcomes outside ``ids`` (``-inf`` when they hold
            no mass), so ``log alphaT = lse_tail - lse``.
    """

    ids: Tensor
    lse: Tensor
    lse_tail: Tensor


def in_ids(ids: Tensor, vocab: int) -> Tensor:
    """``[n, vocab]`` bool: whether a column is one of its row's ``ids`` (``[n, K]``).

    Eagerly a scatter into a new mask. Traced by ``torch.compile``, the OR of K comparisons of
    the column index with the row's ids: an element-wise expression inductor computes inside the
    loop that reads it, so the compiled chunk functions never write a ``[n, V]`` mask (or a
    scatter's copy of a ``[n, V]`` buffer). One traced mask that two loops (two kernels) read is
    stored, though: written in the first, read in the second, 2 bytes per entry where
    the K comparisons move none; so each loop calls this for its own (a separate call is a node
    of its own in the traced graph)."""
    if not torch.compiler.is_compiling():
        mask = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
        return mask.scatter_(-1, ids, True)
    col = torch.arange(vocab, device=ids.device)
    if ids.shape[-1] > IN_IDS_UNROLLED:
        return (col == ids.unsqueeze(-1)).any(-2)
    mask = col == ids[:, :1]
    for j in range(1, ids.shape[-1]):
        mask = mask | (col == ids[:, j : j + 1])
    return mask


def is_in(ids: Tensor, cols: Tensor | None, vocab: int) -> Tensor:
    """Whether each column is one of its row's ``ids`` (``[n, K]``): ``in_ids(ids, vocab)``
    over the whole row when ``cols`` is None, else at the columns ``cols`` (``[n, J]``, a
    ``[n, J]`` result)."""
    if cols is None:
        return in_ids(ids, vocab)
    return (cols.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1)


class SparseGrad(NamedTuple):
    """A gradient w.r.t. logits ``s [n, V]``: the element-wise ``part(cols, s_at)`` everywhere
    plus ``values [n, J]`` at the ids ``at [n, J]`` (an id may repeat: its values add up).

    ``part`` gives the element-wise part at columns ``cols`` (``[n, J]``) from the logits there
    ``s_at``, or over the whole row from ``s`` itself when ``cols`` is None, so that it is
    evaluated at the ids without reading a ``[n, V]`` buffer. ``finish`` makes it one tensor.
    """

    part: Callable[[Tensor | None, Tensor], Tensor]
    s: Tensor
    at: Tensor
    values: Tensor

    def finish(self, dtype: torch.dtype | None = None,
               post: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """The ``[n, V]`` gradient in ``dtype`` (default: the part's), each entry rounded to it
        once: the element-wise part written over the row, then each id's total (the part there
        plus its values, repeats summed) written at it, in one ``scatter`` whose repeated ids
        carry equal totals. ``post(g, s_at)`` (element-wise, given the logits at the same
        entries) is applied to both before the cast: the head's weight, row mask and
        soft-cap derivative. Under ``torch.compile`` the part, ``post`` and the cast are one
        loop writing the row once in ``dtype`` (no float32 ``[n, V]`` buffer, no cast pass).
        ``post`` may write ``s`` (read last)."""
        s_at = self.s.gather(-1, self.at)
        same = self.at.unsqueeze(-1) == self.at.unsqueeze(-2)  # (n, J, J)
        total = self.part(self.at, s_at) + torch.where(
            same, self.values.unsqueeze(-2), self.values.new_zeros(())).sum(-1)
        dense = self.part(None, self.s)
        if post is not None:
            dense, total = post(dense, self.s), post(total, s_at)
        dtype = dtype or dense.dtype
        return dense.to(dtype).scatter_(-1, self.at, total.to(dtype))


def finished(grad: "Tensor | SparseGrad") -> Tensor:
    """A closed form's gradient as one tensor: a ``SparseGrad`` finished in its part's dtype."""
    return grad.finish() if isinstance(grad, SparseGrad) else grad


def add_at_(x: Tensor, ids: Tensor, value: float | Tensor) -> Tensor:
    """``x[i, ids[i]] += value`` (a number, or ``value[i]`` of a ``[n]`` tensor) for ``x [n, V]``
    and ``ids [n]`` (the label's ``-c`` of a CE folded into a gradient): in place eagerly, as an
    element-wise sum under ``torch.compile`` (``in_ids``'s reason)."""
    y = ids.unsqueeze(-1)
    value = x.new_full(y.shape, value) if not isinstance(value, Tensor) else value.reshape(y.shape)
    if not torch.compiler.is_compiling():
        return x.scatter_add_(-1, y, value.to(x.dtype))
    col = torch.arange(x.shape[-1], device=x.device)
    return x + torch.where(col == y, value, x.new_zeros(()))


def safe_finite(x: Tensor) -> Tensor:
    """``x`` where finite, 0 elsewhere: used to subtract a log-normaliser that may be ``-inf``."""
    return torch.where(torch.isfinite(x), x, x.new_zeros(()))


def lse_outside(x: Tensor, ids: Tensor, *, outside_max: Tensor | None = None) -> Tensor:
    """``LSE(x_i for i not in ids)`` per row: ``x [n, V]``, ``ids [n, k]`` -> ``[n]``.

    Differentiable (``-inf`` where the ids cover the row). With ``outside_max``, the largest
    entry outside ``ids`` (known from a top-(k+1), say), the sum is one ``exp`` pass shifted by
    it with the ids' entries zeroed, no ``[n, V]`` copy with ``-inf`` written in: for code that
    does not backpropagate through it.
    """
    traced = torch.compiler.is_compiling()  # a comparison, fused by inductor (in_ids)
    if outside_max is None:
        if traced:
            return logsumexp(x.masked_fill(in_ids(ids, x.shape[-1]), float("-inf")))
        return x.scatter(-1, ids, float("-inf")).logsumexp(-1)
    shift = safe_finite(outside_max)
    if traced:
        e = (x - shift.unsqueeze(-1)).exp().masked_fill(in_ids(ids, x.shape[-1]), 0.0)
        return e.sum(-1).log() + shift
    e = torch.sub(x, shift.unsqueeze(-1)).exp_().scatter_(-1, ids, 0.0)
    return e.sum(-1).log_().add_(shift)


def teacher_top_k(t: Tensor, k: int) -> TopK:
    """The top-K split of a chunk ``[n, V]`` of (scaled) teacher logits, ``t`` only read.

    The top K+1 logits (``top_k``) give the top-K ids and, in the (K+1)-th, the largest
    logit of the tail, which shifts the tail's log-sum-exp (``lse_outside(outside_max=...)``: one
    ``exp`` pass, no copy of the tail); the full log-sum-exp adds the top-K's.

    Raises:
        ValueError: unless ``1 <= k < V``.
    """
    vocab = t.shape[-1]
    if not 1 <= k < vocab:
        raise ValueError(f"k must be >= 1 and < the vocabulary size {vocab}, got {k}")
    values, ids = top_k(t, k + 1)
    ids = ids[..., :k]
    lse_tail = lse_outside(t, ids, outside_max=values[..., k])
    return TopK(ids, torch.logaddexp(lse_tail, values[..., :k].logsumexp(-1)), lse_tail)


def masked_xlogy_sum(prob: Tensor, log_ratio: Tensor) -> Tensor:
    """``sum_i prob_i * log_ratio_i`` over the last dim, where terms with ``prob_i == 0`` are 0.

    The ``where`` keeps ``0 * (-inf - -inf)`` (a vocabulary entry masked in both models) from
    becoming NaN, in the value and in the gradient.
    """
    positive = prob > 0
    zero = prob.new_zeros(())
    # The inner where also keeps the NaN out of d(prob * log_ratio)/d(prob) in backward.
    return torch.where(positive, prob * torch.where(positive, log_ratio, zero), zero).sum(-1)


def masked_xlogy_value(prob: Tensor, log_ratio: Tensor) -> Tensor:
    """``masked_xlogy_sum`` for code that never backpropagates through it (closed-form
    gradients): one ``where`` instead of two, same value."""
    return (prob * torch.where(prob > 0, log_ratio, prob.new_zeros(()))).sum(-1)


def masked_xlogy_terms_(prob: Tensor, log_ratio: Tensor) -> Tensor:
    """The per-entry terms ``prob * log_ratio``, 0 where ``prob == 0`` (also where ``log_ratio``
    is ``-inf - -inf``, an entry masked in both models), computed IN PLACE in ``log_ratio``: the
    closed-form chunk gradients' way of not allocating another ``[n, V]`` buffer."""
    return log_ratio.masked_fill_(prob == 0, 0.0).mul_(prob)


def split_kl(log_p_top: Tensor, log_q_top: Tensor, log_alpha_t: Tensor, log_alpha_s: Tensor,
             *, differentiable: bool = True) -> Tensor:
    """``D_KL1 = sum_{k in S_K} p_k log(p_k / q_k) + alphaT log(alphaT / alphaS)`` per row: the
    KL between teacher and student over the K modes plus one outcome holding the rest of the mass.

    Args:
        log_p_top, log_q_top: ``[n, K]`` log-probabilities of the teacher's top-K ids.
        log_alpha_t, log_alpha_s: ``[n]`` log masses outside them.
        differentiable: guard the gradient of the ``p = 0`` terms too (autograd flows through);
            False for closed-form callers (one ``where`` less).
    """
    xlogy = masked_xlogy_sum if differentiable else masked_xlogy_value
    alpha_t = log_alpha_t.exp()
    bucket = torch.where(alpha_t > 0, alpha_t * (log_alpha_t - log_alpha_s), alpha_t.new_zeros(()))
    return xlogy(log_p_top.exp(), log_p_top - log_q_top) + bucket


def split_grad(log_qt: Tensor, pt: Tensor, log_alpha_s: Tensor, alpha_t: Tensor, w: Tensor,
               top_ids: Tensor, log_q_top: Tensor, p_top: Tensor,
               ce_weight: float | None = None) -> Tensor:
    """The gradient w.r.t. the student's logits of ``D_KL1 + w * D_KL2 [+ c * CE]``, built IN
    PLACE in ``log_qt`` (``[n, V]``, the student's log tail distribution, ``-inf`` on the top-K
    ids) from ``pt`` (``[n, V]``, the teacher's tail distribution or its estimate, 0 on the
    top-K ids; scaled in place).

    Tail: ``q - alphaT qt + w (qt - pt) = (alphaS - alphaT + w) qt - w pt``; top-K: ``q - p``.
    With ``c = ce_weight`` the CE's ``c q`` joins (``c alphaS qt`` on the tail, ``c q`` on the
    top-K); its ``-c`` at the label is the caller's.
    """
    c = 0.0 if ce_weight is None else ce_weight
    coef = log_alpha_s.exp() * (1.0 + c) - alpha_t + w
    grad = log_qt.exp_().mul_(coef.unsqueeze(-1)).sub_(pt.mul_(w.unsqueeze(-1)))
    return grad.scatter_(-1, top_ids, log_q_top.exp().mul_(1.0 + c) - p_top)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` without cancellation (the log of a mass's complement
    when only the mass's log is known). ``x >= 0`` (nothing left) gives ``-inf`` with a zero
    gradient, not NaN."""
    empty = x >= 0
    x = torch.where(empty, x.new_full((), -1.0), x)  # the gradient flows through finite values only
    out = torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.masked_fill(empty, float("-inf"))
