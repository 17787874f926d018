"""TAD, the tail-aware divergence (arXiv 2602.20816, eq. 2-4 and Appendix A; ``docs/design.md``)."""

import math

import torch
from torch import Tensor

from tad_torchtune.losses.base import (
    Divergence,
    check_positive,
    masked_xlogy_sum,
    masked_xlogy_terms_,
    masked_xlogy_value,
    safe_finite,
)
from tad_torchtune.losses.cached import bucketed, student_side
from tad_torchtune.losses.engine import top_k


def tad_teacher_stats(t: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-only statistics of TAD for a chunk of (scaled) teacher logits ``[n, V]``.

    The top K+1 logits give the top-K ids and, in the (K+1)-th, the largest logit of the tail,
    which shifts the tail's log-sum-exp (one pass of ``exp`` with the top-K entries zeroed: the
    same sum as a log-sum-exp of the tail alone). ``t`` is only read.

    Returns:
        ``topk_idx [n, K]`` (the teacher's top-K ids), ``lse [n]`` (LSE over the vocabulary) and
        ``lse_tail [n]`` (LSE over the ids outside the top-K), so ``log alphaT = lse_tail - lse``.
    """
    top_vals, top_idx = top_k(t, k + 1)
    topk_idx = top_idx[..., :k]
    lse_tail = _tail_logsumexp(t, topk_idx, top_vals[..., k])
    lse = torch.logaddexp(lse_tail, top_vals[..., :k].logsumexp(-1))
    return topk_idx, lse, lse_tail


def _tail_logsumexp(x: Tensor, topk_idx: Tensor, tail_max: Tensor) -> Tensor:
    """The log-sum-exp ``[n]`` of ``x`` ``[n, V]`` over the ids outside ``topk_idx``, shifted by
    ``tail_max``, the largest of those entries (0 where that is not finite: a tail all ``-inf``
    sums to 0 and its log-sum-exp is ``-inf``): one ``exp`` pass with the top-K entries zeroed,
    no copy of the tail."""
    shift = safe_finite(tail_max)
    e = torch.sub(x, shift.unsqueeze(-1)).exp_().scatter_(-1, topk_idx, 0.0)
    return e.sum(-1).log_().add_(shift)


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
        beta: TAD's beta.
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

    ``topk_idx``, ``lse_t`` and ``lse_t_tail`` come from ``tad_teacher_stats`` on the same teacher
    logits; ``tail_weight`` and ``abar`` from ``tad_tail_weights``.
    """
    neg_inf = float("-inf")
    in_top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, topk_idx, True)
    s_top = s.gather(-1, topk_idx)  # (n, K)
    s_tail = s.masked_fill(in_top, neg_inf)  # (n, V), top-K ids at -inf
    lse_s_tail = s_tail.logsumexp(-1)
    lse_s = torch.logaddexp(lse_s_tail, s_top.logsumexp(-1))

    # D_KL1: the K modes plus one bucket holding the rest of the mass.
    log_p_top = t.gather(-1, topk_idx) - lse_t.unsqueeze(-1)
    log_q_top = s_top - lse_s.unsqueeze(-1)
    log_alpha_t = lse_t_tail - lse_t
    log_alpha_s = lse_s_tail - lse_s
    alpha_t = log_alpha_t.exp()
    dkl1 = masked_xlogy_sum(log_p_top.exp(), log_p_top - log_q_top) + torch.where(
        alpha_t > 0, alpha_t * (log_alpha_t - log_alpha_s), alpha_t.new_zeros(())
    )

    # D_KL2: KL between the renormalised tails; 0 where the teacher has no tail mass.
    has_tail = torch.isfinite(lse_t_tail)
    log_pt = t.masked_fill(in_top, neg_inf) - safe_finite(lse_t_tail).unsqueeze(-1)
    log_qt = s_tail - safe_finite(lse_s_tail).unsqueeze(-1)
    dkl2 = masked_xlogy_sum(log_pt.exp(), log_pt - log_qt)
    dkl2 = torch.where(has_tail, dkl2, dkl2.new_zeros(()))

    per_token = dkl1 + torch.where(tail_weight > 0, tail_weight * dkl2, dkl2.new_zeros(()))
    stats = {"dkl1": dkl1, "dkl2": dkl2, "tail_mass": alpha_t, "abar": abar}
    return per_token, stats


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

    Returns:
        ``(per_token [n], stats, grad [n, V])``, and ``ce [n]`` with ``ce_weight``.
    """
    neg_inf = float("-inf")
    zero = s.new_zeros(())
    s_top = s.gather(-1, topk_idx)  # (n, K)
    log_p_top = t.gather(-1, topk_idx) - lse_t.unsqueeze(-1)
    log_qt = s.scatter(-1, topk_idx, neg_inf)  # (n, V), top-K ids at -inf
    lse_s_tail = log_qt.logsumexp(-1)
    lse_s = torch.logaddexp(lse_s_tail, s_top.logsumexp(-1))

    log_q_top = s_top - lse_s.unsqueeze(-1)
    log_alpha_t = lse_t_tail - lse_t
    log_alpha_s = lse_s_tail - lse_s
    alpha_t = log_alpha_t.exp()
    p_top = log_p_top.exp()
    dkl1 = masked_xlogy_value(p_top, log_p_top - log_q_top) + torch.where(
        alpha_t > 0, alpha_t * (log_alpha_t - log_alpha_s), zero
    )

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

    # Tail: q - alphaT qt + w (qt - pt) = (alphaS - alphaT + w) qt - w pt; top-K: q - p.
    alpha_s = log_alpha_s.exp()
    c = 0.0 if ce_weight is None else ce_weight  # + c q = c alphaS qt on the tail, c q on top-K
    coef = alpha_s * (1.0 + c) - alpha_t + w
    grad = log_qt.exp_().mul_(coef.unsqueeze(-1)).sub_(pt.mul_(w.unsqueeze(-1)))
    grad.scatter_(-1, topk_idx, log_q_top.exp().mul_(1.0 + c) - p_top)
    stats = {"dkl1": dkl1, "dkl2": dkl2, "tail_mass": alpha_t, "abar": abar}
    if ce_weight is None:
        return per_token, stats, grad
    y = labels.unsqueeze(-1)
    grad.scatter_add_(-1, y, grad.new_full(y.shape, -c))
    return per_token, stats, grad, lse_s - s.gather(-1, y).squeeze(-1)


def cached_log_tail(logp: Tensor, log_rest: Tensor, k: int) -> Tensor:
    """``log alphaT`` from a teacher cache (K <= M): the mass of ranks K+1..M and of the bucket,
    exactly the online tail mass (``[..., M]``, ``[...]`` -> ``[...]``)."""
    return torch.logaddexp(logp[..., k:].logsumexp(-1), log_rest)


def make_tad_cached_chunk(k: int):
    """TAD's chunk from a teacher cache with M >= K outcomes kept (``docs/design.md``,
    "Divergences from a teacher cache"): ``S_K`` is the first K cached ids, so ``D_KL1``,
    ``alphaT`` and ``abar`` are exact; ``D_KL2`` is the KL between the tails renormalised over
    ranks K+1..M plus one bucket (teacher ``r_M / alphaT``, student ``s_M / alphaS``), which
    tends to the exact ``D_KL2`` as M grows."""

    def tad_cached_chunk(s: Tensor, labels: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor,
                         label_logp: Tensor, tail_weight: Tensor, abar: Tensor
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        zero = s.new_zeros(())
        lse, s_m, lse_rest = student_side(s, ids)
        log_q_m = s_m - lse.unsqueeze(-1)  # (n, M)
        log_s_rest = lse_rest - lse
        log_alpha_t = cached_log_tail(logp, log_rest, k)
        log_alpha_s = torch.logaddexp(log_q_m[:, k:].logsumexp(-1), log_s_rest)
        alpha_t = log_alpha_t.exp()
        log_p_top, log_q_top = logp[:, :k], log_q_m[:, :k]
        dkl1 = masked_xlogy_sum(log_p_top.exp(), log_p_top - log_q_top) + torch.where(
            alpha_t > 0, alpha_t * (log_alpha_t - log_alpha_s), zero)
        log_pt = bucketed(logp[:, k:], log_rest) - safe_finite(log_alpha_t).unsqueeze(-1)
        log_qt = bucketed(log_q_m[:, k:], log_s_rest) - safe_finite(log_alpha_s).unsqueeze(-1)
        dkl2 = torch.where(torch.isfinite(log_alpha_t),
                           masked_xlogy_sum(log_pt.exp(), log_pt - log_qt), zero)
        per_token = dkl1 + torch.where(tail_weight > 0, tail_weight * dkl2, zero)
        return per_token, {"dkl1": dkl1, "dkl2": dkl2, "tail_mass": alpha_t, "abar": abar}

    return tad_cached_chunk


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

    From a teacher cache (``sum_and_count_cached``, K <= M): ``S_K`` is the first K cached ids,
    so ``D_KL1``, ``alphaT`` and ``abar`` are exact; ``D_KL2`` is computed over ranks K+1..M plus
    one bucket for the rest (``make_tad_cached_chunk``), the only approximation.

    Diagnostics (``sum_and_count(...).stats``, summed over valid tokens): ``dkl1``, ``dkl2``,
    ``tail_mass`` (``alphaT``) and ``abar`` (the ``abar`` of the token's sequence).

    Args:
        k: size of the teacher's top-K set, ``1 <= k < V`` (paper: 10).
        beta: tail amplification, > 0 (paper: 2).
        abar_scope: ``"row"`` or ``"document"``: what ``abar`` averages over.
        temperature, ignore_index, chunk_size, vocab_alignment: see ``Divergence``.
    """

    name = "tad"
    stat_names = ("abar", "dkl1", "dkl2", "tail_mass")
    needs_teacher_pass = True
    chunk_fn = staticmethod(tad_chunk)
    chunk_grad_fn = staticmethod(tad_chunk_grad)
    fuses_ce = True

    def __init__(
        self,
        *,
        k: int = 10,
        beta: float = 2.0,
        abar_scope: str = "row",
        temperature: float = 1.0,
        ignore_index: int = -100,
        chunk_size: int | None = 1024,
        vocab_alignment: str = "exact",
    ) -> None:
        super().__init__(
            temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size,
            vocab_alignment=vocab_alignment,
        )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (and < vocabulary size), got {k!r}")
        self.k = k
        self.beta = check_positive("beta", beta)
        if abar_scope not in ABAR_SCOPES:
            raise ValueError(f"abar_scope must be one of {ABAR_SCOPES}, got {abar_scope!r}")
        self.abar_scope = abar_scope
        self.cached_chunk_fn = make_tad_cached_chunk(k)

    def check_k(self, vocab_size: int) -> None:
        if self.k >= vocab_size:
            raise ValueError(
                f"k must be < vocabulary size: k={self.k}, vocabulary size {vocab_size}"
            )

    def teacher_chunk_stats(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``tad_teacher_stats`` of a scaled teacher chunk ``[n, V]``: top-K ids, LSE, tail LSE."""
        self.check_k(t.shape[-1])
        return tad_teacher_stats(t, self.k)

    def teacher_extras(
        self, stats: tuple[Tensor, ...], valid: Tensor, groups: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(topk_idx, lse, lse_tail)`` of all tokens ``[B, T, ...]`` -> ``tad_chunk``'s extras,
        adding the tail weight and ``abar`` (``tad_tail_weights``; per document of ``groups``
        with ``abar_scope="document"``, per row otherwise)."""
        topk_idx, lse, lse_tail = stats
        if self.abar_scope == "row":
            groups = None
        weight, abar = tad_tail_weights(lse_tail - lse, valid, self.beta, groups)
        return topk_idx, lse, lse_tail, weight, abar

    def check_top_m(self, top_m: int) -> None:
        if self.k > top_m:
            raise ValueError(f"k={self.k} exceeds the teacher cache's top_m={top_m}: TAD from a "
                             f"cache needs its top-K among the cached ids (k <= top_m)")

    def cached_teacher_extras(self, cache: tuple[Tensor, ...], valid: Tensor,
                              groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(tail_weight, abar)`` ``[B, T]`` from the cached ``(ids, logp, log_rest,
        label_logp)`` (``[B, T, ...]``): ``alphaT`` is exact, so the normaliser is too."""
        _, logp, log_rest, _ = cache
        if self.abar_scope == "row":
            groups = None
        return tad_tail_weights(cached_log_tail(logp, log_rest, self.k), valid, self.beta, groups)

    def extra_repr(self) -> str:
        scope = "" if self.abar_scope == "row" else f", abar_scope={self.abar_scope!r}"
        return f"k={self.k}, beta={self.beta}{scope}, " + super().extra_repr()
