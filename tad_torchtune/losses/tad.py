"""TAD, the tail-aware divergence (arXiv 2602.20816, eq. 2-4 and Appendix A; ``docs/design.md``)."""

import math
import sys

import torch
from torch import Tensor

from tad_torchtune.checks import check_choice, check_int, check_positive
from tad_torchtune.errors import ConfigError
from tad_torchtune.losses.base import Divergence, DivergenceUse, TailWeight
from tad_torchtune.losses.terms import (
    TopK,
    add_at_,
    in_ids,
    logsumexp,
    masked_xlogy_sum,
    masked_xlogy_terms_,
    safe_finite,
    split_grad,
    split_kl,
)

ABAR_SCOPES = ("row", "document")


def tad_tail_weights(
    log_alpha: Tensor, valid: Tensor, beta: float, groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token weight of D_KL2, ``beta * alphaT(t) / abar(X)``, and ``abar(X)`` per token.

    ``abar(X)`` is the mean of ``alphaT`` over the valid tokens of the token's sequence: its row
    of the batch, or with ``groups`` the tokens of its row with the same group id (its document
    in a row packed with several). Computed in log space, so tail masses that underflow float32
    still give the right ratio. A sequence whose teacher has no tail mass at all (``abar = 0``)
    gets weight 0, not NaN.

    Args:
        log_alpha: ``[B, T]`` log tail mass of the teacher.
        valid: ``[B, T]`` bool.
        beta: TAD's beta, > 0.
        groups: ``[B, T]`` integer ids in ``[0, T)`` of the sequences within each row, or None.

    Returns:
        ``(weight [B, T], abar [B, T])``, both without gradient.
    """
    neg_inf = log_alpha.new_full((), float("-inf"))
    log_alpha = torch.where(valid, log_alpha, neg_inf)
    if groups is None:
        count = valid.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        log_abar = log_alpha.logsumexp(-1, keepdim=True) - torch.log(count.to(log_alpha.dtype))
        log_abar = log_abar.expand_as(log_alpha)
    else:  # a log-sum-exp per (row, group), by scatter over the flat keys row * T + group
        rows, length = log_alpha.shape
        key = (torch.arange(rows, device=groups.device).unsqueeze(-1) * length
               + groups.long()).reshape(-1)
        flat = log_alpha.reshape(-1)
        peak = flat.new_full((rows * length,), float("-inf")).scatter_reduce(
            0, key, flat, "amax", include_self=True)
        shift = safe_finite(peak)
        total = torch.zeros_like(flat).scatter_add_(0, key, (flat - shift[key]).exp())
        count = torch.zeros_like(flat).scatter_add_(0, key, valid.reshape(-1).to(flat.dtype))
        log_abar = (total.log() + shift - count.clamp(min=1).log())[key].reshape(rows, length)
    has_tail = torch.isfinite(log_abar) & torch.isfinite(log_alpha)
    log_weight = log_alpha - safe_finite(log_abar) + math.log(beta)
    weight = torch.where(has_tail, log_weight.exp(), log_alpha.new_zeros(()))
    return weight, log_abar.exp()


def tad_chunk(
    s: Tensor,
    t: Tensor,
    labels: Tensor,
    topk_idx: Tensor,
    lse_t: Tensor,
    lse_t_tail: Tensor,
    tail_weight: Tensor,
    abar: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token ``D_KL1 + tail_weight * D_KL2`` for a chunk ``[n, V]`` of (scaled) logits.

    ``topk_idx``, ``lse_t`` and ``lse_t_tail`` are the teacher's ``TopK`` split of the same
    positions; ``tail_weight`` and ``abar`` come from ``tad_tail_weights``.
    """
    neg_inf = float("-inf")
    in_top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, topk_idx, True)
    s_top = s.gather(-1, topk_idx)  # (n, K)
    s_tail = s.masked_fill(in_top, neg_inf)  # (n, V), top-K ids at -inf
    lse_s_tail = s_tail.logsumexp(-1)
    lse_s = torch.logaddexp(lse_s_tail, s_top.logsumexp(-1))
    log_alpha_t = lse_t_tail - lse_t
    dkl1 = split_kl(t.gather(-1, topk_idx) - lse_t.unsqueeze(-1), s_top - lse_s.unsqueeze(-1),
                    log_alpha_t, lse_s_tail - lse_s)

    # D_KL2: KL between the renormalised tails; 0 where the teacher has no tail mass.
    has_tail = torch.isfinite(lse_t_tail)
    log_pt = t.masked_fill(in_top, neg_inf) - safe_finite(lse_t_tail).unsqueeze(-1)
    log_qt = s_tail - safe_finite(lse_s_tail).unsqueeze(-1)
    dkl2 = masked_xlogy_sum(log_pt.exp(), log_pt - log_qt)
    dkl2 = torch.where(has_tail, dkl2, dkl2.new_zeros(()))

    per_token = dkl1 + torch.where(tail_weight > 0, tail_weight * dkl2, dkl2.new_zeros(()))
    stats = {"dkl1": dkl1, "dkl2": dkl2, "tail_mass": log_alpha_t.exp(), "abar": abar}
    return per_token, stats


def _top_k_terms(s: Tensor, t: Tensor, topk_idx: Tensor, lse_t: Tensor, lse_t_tail: Tensor,
                 lse_s_tail: Tensor) -> tuple[Tensor, ...]:
    """What the closed forms derive from the ``[n, K]`` logits at the teacher's top-K ids, given
    the student's tail log-sum-exp: ``(lse_s, log_p_top, log_q_top, log_alphaS, D_KL1)``."""
    s_top = s.gather(-1, topk_idx)  # (n, K)
    lse_s = torch.logaddexp(lse_s_tail, s_top.logsumexp(-1))
    log_p_top = t.gather(-1, topk_idx) - lse_t.unsqueeze(-1)
    log_q_top = s_top - lse_s.unsqueeze(-1)
    log_alpha_s = lse_s_tail - lse_s
    dkl1 = split_kl(log_p_top, log_q_top, lse_t_tail - lse_t, log_alpha_s, differentiable=False)
    return lse_s, log_p_top, log_q_top, log_alpha_s, dkl1


def tad_chunk_grad(
    s: Tensor,
    t: Tensor,
    labels: Tensor,
    topk_idx: Tensor,
    lse_t: Tensor,
    lse_t_tail: Tensor,
    tail_weight: Tensor,
    abar: Tensor,
    *,
    ce_weight: float | None = None,
) -> tuple[Tensor, ...]:
    """``tad_chunk`` plus its gradient w.r.t. ``s`` in closed form (the fused path's chunk).

    With ``w = tail_weight``, ``qt = q / alphaS`` and ``pt = p / alphaT`` on the tail:
    ``dL/ds_i = q_i - p_i`` on a top-K id and ``q_i - alphaT qt_i + w (qt_i - pt_i)`` on a tail id
    (paper eq. 6 rewritten without dividing by ``alphaT``, which may underflow).

    With ``ce_weight`` (temperature 1, so ``s`` are the logits themselves) the chunk also
    returns the per-token cross-entropy ``LSE(s) - s_y`` and ``grad`` is that of
    ``TAD + ce_weight * CE``: the CE's ``ce_weight * q`` joins the coefficients (``q = alphaS qt``
    on the tail), so the CE costs no pass over ``[n, V]`` of its own.

    ``t`` is scratch: it is overwritten (the fused path's teacher chunk is its own). Besides ``s``
    and ``t`` the chunk allocates two ``[n, V]`` float buffers, one of which becomes ``grad``.

    Traced by ``torch.compile`` (the fused head's ``compile: true``) it is
    ``_tad_chunk_grad_traced``: the same terms, written for inductor.

    Returns:
        ``(per_token [n], stats, grad [n, V])``, and ``ce [n]`` with ``ce_weight``.
    """
    if torch.compiler.is_compiling():
        return _tad_chunk_grad_traced(s, t, labels, topk_idx, lse_t, lse_t_tail, tail_weight,
                                      abar, ce_weight=ce_weight)
    neg_inf = float("-inf")
    zero = s.new_zeros(())
    log_qt = s.scatter(-1, topk_idx, neg_inf)  # (n, V), top-K ids at -inf
    lse_s_tail = log_qt.logsumexp(-1)
    lse_s, log_p_top, log_q_top, log_alpha_s, dkl1 = _top_k_terms(
        s, t, topk_idx, lse_t, lse_t_tail, lse_s_tail)
    alpha_t = (lse_t_tail - lse_t).exp()

    # D_KL2 = sum_tail pt (log pt - log qt); 0 where the teacher has no tail mass.
    has_tail = torch.isfinite(lse_t_tail)
    log_qt.sub_(safe_finite(lse_s_tail).unsqueeze(-1))
    log_pt = t.scatter_(-1, topk_idx, neg_inf).sub_(safe_finite(lse_t_tail).unsqueeze(-1))
    log_ratio = log_pt - log_qt  # NaN on the top-K ids (-inf - -inf), masked out below
    pt = log_pt.exp_()  # (n, V), 0 on the top-K ids
    dkl2 = torch.where(has_tail, masked_xlogy_terms_(pt, log_ratio).sum(-1), zero)
    del log_ratio
    w = torch.where(tail_weight > 0, tail_weight, zero)
    per_token = dkl1 + torch.where(w > 0, w * dkl2, zero)
    stats = {"dkl1": dkl1, "dkl2": dkl2, "tail_mass": alpha_t, "abar": abar}
    grad = split_grad(log_qt, pt, log_alpha_s, alpha_t, w, topk_idx, log_q_top,
                      log_p_top.exp(), ce_weight)
    if ce_weight is None:
        return per_token, stats, grad
    y = labels.unsqueeze(-1)
    grad.scatter_add_(-1, y, grad.new_full(y.shape, -ce_weight))
    return per_token, stats, grad, lse_s - s.gather(-1, y).squeeze(-1)


def _tad_chunk_grad_traced(s: Tensor, t: Tensor, labels: Tensor, topk_idx: Tensor,
                           lse_t: Tensor, lse_t_tail: Tensor, tail_weight: Tensor, abar: Tensor,
                           *, ce_weight: float | None = None) -> tuple[Tensor, ...]:
    """``tad_chunk_grad`` for ``torch.compile``: reductions over ``s`` and ``t`` and ONE
    element-wise gradient, with no ``[n, V]`` intermediate and no scatter (``docs/design.md``,
    "The fused head on a GPU").

    The top-K set is a comparison with the column index (``in_ids``), fused into the loops,
    each loop its own (one shared by both would be stored as a ``[n, V]`` mask). The
    student's tail log-sum-exp is one loop over the row (``terms.logsumexp``: on a GPU
    inductor's online softmax; ``lse_t_tail`` is known from the teacher pass). ``D_KL2 = sum
    pt (log pt - log qt)`` needs it, so its sum joins the gradient's loop, where ``s`` and ``t``
    are read anyway. The gradient is one element-wise expression of ``s``, ``t`` and per-row
    scalars: ``(1 + c) q - p`` on the top-K, ``coef qt - w pt`` on the tail, ``-c`` at the
    label. Inductor so makes two loops over the row, one reading ``s``, one reading ``s`` and
    ``t`` and writing the gradient, where the eager function's in-place steps become a dozen.
    """
    zero = s.new_zeros(())
    lse_s_tail = logsumexp(s.masked_fill(in_ids(topk_idx, s.shape[-1]), float("-inf")))
    lse_s, _, _, log_alpha_s, dkl1 = _top_k_terms(s, t, topk_idx, lse_t, lse_t_tail, lse_s_tail)
    alpha_t = (lse_t_tail - lse_t).exp()

    has_tail = torch.isfinite(lse_t_tail)
    shift_t, shift_s = safe_finite(lse_t_tail).unsqueeze(-1), safe_finite(lse_s_tail)
    in_top = in_ids(topk_idx, s.shape[-1])  # the gradient loop's own (``in_ids``)
    pt = torch.where(in_top, zero, (t - shift_t).exp())  # (n, V) as an expression only
    # sum pt (log pt - log qt), 0 where pt is 0
    log_ratio = (t - shift_t) - (s - shift_s.unsqueeze(-1))
    dkl2 = torch.where(pt > 0, pt * log_ratio, zero).sum(-1)
    dkl2 = torch.where(has_tail, dkl2, zero)
    w = torch.where(tail_weight > 0, tail_weight, zero)
    per_token = dkl1 + torch.where(w > 0, w * dkl2, zero)
    stats = {"dkl1": dkl1, "dkl2": dkl2, "tail_mass": alpha_t, "abar": abar}

    c = 0.0 if ce_weight is None else ce_weight
    coef = (log_alpha_s.exp() * (1.0 + c) - alpha_t + w).unsqueeze(-1)
    top = (s - lse_s.unsqueeze(-1)).exp() * (1.0 + c) - (t - lse_t.unsqueeze(-1)).exp()
    tail = coef * (s - shift_s.unsqueeze(-1)).exp() - w.unsqueeze(-1) * pt
    grad = torch.where(in_top, top, tail)
    if ce_weight is None:
        return per_token, stats, grad
    return (per_token, stats, add_at_(grad, labels, -ce_weight),
            lse_s - s.gather(-1, labels.unsqueeze(-1)).squeeze(-1))


class TADLoss(Divergence):
    """Tail-aware divergence (TAD), arXiv 2602.20816 eq. 3.

    For each token, with ``p`` the teacher's and ``q`` the student's distribution (logits divided
    by ``temperature``) and ``S_K`` the teacher's top-``k`` ids:

    - ``alphaT = 1 - sum_{S_K} p``, ``alphaS = 1 - sum_{S_K} q`` (student mass on the SAME ids),
      both computed as log-sum-exps, never as ``log(1 - x)``;
    - ``D_KL1 = sum_{S_K} p (log p - log q) + alphaT (log alphaT - log alphaS)``;
    - ``D_KL2 = KL(pt || qt)`` between the tails renormalised to sum to 1;
    - ``L_DIV = D_KL1 + beta * alphaT / abar(X) * D_KL2``, where ``abar(X)`` is the mean of
      ``alphaT`` over the valid tokens of the token's sequence: its row of the batch
      (``abar_scope="row"``, the paper's sequence), or its document within the row
      (``abar_scope="document"``, for rows packed with several documents; the caller passes the
      documents as ``document_ids``, a row without them being one document).

    ``KL(p||q) = D_KL1 + alphaT * D_KL2`` exactly, so TAD only re-weights the tail term. The gradient
    on a top-K logit is the KL gradient ``q - p``; on a tail logit it is
    ``(q - p) + (beta/abar - 1)(q alphaT/alphaS - p)`` (paper eq. 6). ``abar`` comes from the
    teacher only and carries no gradient.

    Edge cases: a row whose valid tokens all have zero teacher tail mass gets tail term 0 (not
    NaN); ``alphaT/abar`` is at most the row's valid-token count; ``-inf`` logits (masked
    vocabulary) have probability 0 and contribute 0. Reduction: mean over valid tokens, 0 with
    zero gradient when none is valid.

    From a teacher cache (``tad_torchtune.losses.cached``): ``S_K`` is the first K cached ids, so
    ``D_KL1``, ``alphaT`` and ``abar`` are exact; the bucket cache computes ``D_KL2`` over ranks
    K+1..M plus one bucket for the rest, the sampled cache estimates it without bias from ids
    drawn from the teacher's tail.

    Diagnostics (``sum_and_count(...).stats``, summed over valid tokens): ``dkl1``, ``dkl2``,
    ``tail_mass`` (``alphaT``) and ``abar`` (the ``abar`` of the token's sequence).

    Args:
        k: size of the teacher's top-K set, ``1 <= k < V`` (paper: 10).
        beta: tail amplification, finite and > 0 (paper: 2).
        abar_scope: ``"row"`` or ``"document"``: what ``abar`` averages over.
        temperature, ignore_index: see ``Divergence``.
    """

    name = "tad"
    stat_names = ("abar", "dkl1", "dkl2", "tail_mass")
    chunk_fn = staticmethod(tad_chunk)
    chunk_grad_fn = staticmethod(tad_chunk_grad)

    def __init__(
        self,
        *,
        k: int = 10,
        beta: float = 2.0,
        abar_scope: str = "row",
        temperature: float = 1.0,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(temperature=temperature, ignore_index=ignore_index)
        self.top_k = self.k = check_int(k, "k", detail=" (and < vocabulary size)")
        self.beta = check_positive(beta, "beta")
        self.abar_scope = check_choice(abar_scope, "abar_scope", ABAR_SCOPES)

    def validate(self, use: DivergenceUse) -> None:
        """``k`` below the vocabulary and, from a teacher cache, within its stored ids."""
        if self.k >= use.vocab_size:
            raise ConfigError(f"{use.key}.k: must be < the vocabulary size {use.vocab_size}, "
                              f"got {self.k}")
        if use.cache is not None and self.k > use.cache.top_m:
            raise ConfigError(
                f"{use.key}.k: k={self.k} exceeds the teacher cache's top_m={use.cache.top_m} "
                f"({use.cache.where}): TAD from a cache needs its top-K among the cached ids "
                f"(k <= top_m); make the cache with cache_top_m >= {self.k}")
        if use.packed_rows and self.abar_scope == "row":
            print(f"{use.prog}: warning: {use.key}.abar_scope: row with packed rows: abar is the mean tail "
                  f"mass over each packed row; {use.key}.abar_scope: document makes it per "
                  "document", file=sys.stderr)
        super().validate(use)

    def tail_weight(self, log_alpha_t: Tensor, valid: Tensor, groups: Tensor | None = None
                    ) -> TailWeight:
        """``beta * alphaT / abar(X)``, ``abar`` over the row or the document (``abar_scope``)."""
        weight, abar = tad_tail_weights(log_alpha_t, valid, self.beta,
                                        groups if self.abar_scope == "document" else None)
        return TailWeight(weight, {"abar": abar})

    def sequence_extras(self, top: TopK, valid: Tensor, groups: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
        """``(tail_weight, abar)`` ``[B, T]`` of ``tad_chunk`` from the ``TopK`` of all tokens."""
        weight, stats = self.tail_weight(top.lse_tail - top.lse, valid, groups)
        return weight, stats["abar"]

    def extra_repr(self) -> str:
        scope = "" if self.abar_scope == "row" else f", abar_scope={self.abar_scope!r}"
        return f"k={self.k}, beta={self.beta}{scope}, " + super().extra_repr()
