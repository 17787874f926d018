"""DRKL, the diversity-aware reverse KL (arXiv 2604.00223; ``docs/design.md``).

Only the paper's abstract is public to this project, so the formulation below is a
RECONSTRUCTION from it, not the authors' code: it keeps RKL's target/non-target decomposition and
replaces the student-dependent weight of the non-target term by a constant ``gamma``.
"""

import torch
from torch import Tensor

from tad_torchtune.checks import check_positive
from tad_torchtune.losses.base import Divergence
from tad_torchtune.losses.terms import (
    add_at_,
    in_ids,
    logsumexp,
    masked_xlogy_sum,
    masked_xlogy_terms_,
    safe_finite,
)


def drkl_parts(s: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(KL(bq||bp), KL(qh||ph), q_y)`` per token for a chunk ``[n, V]`` of (scaled) logits.

    ``bq = [q_y, 1 - q_y]`` and ``bp = [p_y, 1 - p_y]`` are the binary target/non-target
    distributions of the label ``y``; ``qh``, ``ph`` the distributions over the non-target ids
    renormalised to sum to 1. ``log(1 - q_y)`` is the LSE over the non-target logits minus the full
    LSE, never ``log(1 - q_y)`` of a rounded ``q_y``. ``RKL = KL(bq||bp) + (1 - q_y) KL(qh||ph)``.
    """
    y = labels.unsqueeze(-1)  # (n, 1)
    neg_inf = float("-inf")
    s_nt = s.scatter(-1, y, neg_inf)  # (n, V), target id at -inf
    t_nt = t.scatter(-1, y, neg_inf)
    lse_s_nt, lse_t_nt = s_nt.logsumexp(-1), t_nt.logsumexp(-1)
    lse_s = torch.logaddexp(lse_s_nt, s.gather(-1, y).squeeze(-1))
    lse_t = torch.logaddexp(lse_t_nt, t.gather(-1, y).squeeze(-1))
    log_bq = torch.stack([s.gather(-1, y).squeeze(-1) - lse_s, lse_s_nt - lse_s], -1)  # (n, 2)
    log_bp = torch.stack([t.gather(-1, y).squeeze(-1) - lse_t, lse_t_nt - lse_t], -1)
    kl_binary = masked_xlogy_sum(log_bq.exp(), log_bq - log_bp)
    log_qh = s_nt - safe_finite(lse_s_nt).unsqueeze(-1)
    log_ph = t_nt - safe_finite(lse_t_nt).unsqueeze(-1)
    kl_nontarget = masked_xlogy_sum(log_qh.exp(), log_qh - log_ph)
    # A student with all its mass on the target has no non-target distribution: term 0.
    kl_nontarget = torch.where(torch.isfinite(lse_s_nt), kl_nontarget, kl_nontarget.new_zeros(()))
    return kl_binary, kl_nontarget, log_bq[:, 0].exp()


def make_drkl_chunk(gamma: float):
    def drkl_chunk(s: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        kl_binary, kl_nontarget, q_target = drkl_parts(s, t, labels)
        stats = {"kl_binary": kl_binary, "kl_nontarget": kl_nontarget, "q_target": q_target}
        return kl_binary + gamma * kl_nontarget, stats

    return drkl_chunk


def make_drkl_chunk_grad(gamma: float):
    """The DRKL chunk with its closed-form gradient w.r.t. ``s`` (the fused path's chunk).

    ``KL(bq||bp)`` depends on ``s`` through ``q_y`` only: ``d/ds_j = q_y (1[j=y] - q_j)
    (r_y - r_nt)`` with ``r_c = log bq_c - log bp_c`` (0 where ``bq_c = 0``). ``KL(qh||ph)`` does
    not depend on ``s_y``; for ``j != y`` its gradient is ``qh_j (log qh_j - log ph_j - KL(qh||ph))``.
    """

    def drkl_chunk_grad(
        s: Tensor, t: Tensor, labels: Tensor, *, ce_weight: float | None = None
    ) -> tuple[Tensor, ...]:
        # t is scratch (log ph, then q): two [n, V] buffers are new
        y = labels.unsqueeze(-1)  # (n, 1)
        neg_inf = float("-inf")
        s_y, t_y = s.gather(-1, y).squeeze(-1), t.gather(-1, y).squeeze(-1)
        if torch.compiler.is_compiling():  # a comparison inductor fuses (terms.in_ids)
            is_y = in_ids(y, s.shape[-1])
            log_qh, log_ph = s.masked_fill(is_y, neg_inf), t.masked_fill(is_y, neg_inf)
        else:
            log_qh = s.scatter(-1, y, neg_inf)  # (n, V), target id at -inf
            log_ph = t.scatter_(-1, y, neg_inf)
        lse_s_nt, lse_t_nt = logsumexp(log_qh), logsumexp(log_ph)
        lse_s = torch.logaddexp(lse_s_nt, s_y)
        lse_t = torch.logaddexp(lse_t_nt, t_y)
        log_bq = torch.stack([s_y - lse_s, lse_s_nt - lse_s], -1)  # (n, 2)
        log_bp = torch.stack([t_y - lse_t, lse_t_nt - lse_t], -1)
        bq = log_bq.exp()
        zero = s.new_zeros(())
        r = torch.where(bq > 0, log_bq - log_bp, zero)  # (n, 2)
        kl_binary = torch.where(bq > 0, bq * r, zero).sum(-1)
        has_nt = torch.isfinite(lse_s_nt)
        q_y = bq[:, 0]
        # the binary term's q_y (1[j=y] - q_j) (r_y - r_nt), and the CE's c (q_j - 1[j=y])
        c = 0.0 if ce_weight is None else ce_weight
        d_bin = (q_y * (r[:, 0] - r[:, 1]) - c).unsqueeze(-1)  # (n, 1)

        if torch.compiler.is_compiling():
            # the same terms as expressions, none written in place: on a GPU inductor
            # recomputes qh (log qh - log ph) in the gradient's loop (fused.INDUCTOR_OPTIONS,
            # DRKLLoss.gpu_inductor_options) where the in-place form stores it
            log_qh = s - safe_finite(lse_s_nt).unsqueeze(-1)
            qh = torch.where(is_y, zero, log_qh.exp())  # (n, V), 0 at the target id
            log_ph = t - safe_finite(lse_t_nt).unsqueeze(-1)
            term = torch.where(qh > 0, qh * (log_qh - log_ph), zero)
            kl_nontarget = torch.where(has_nt, term.sum(-1), zero)
            q = (s - lse_s.unsqueeze(-1)).exp()
            grad = torch.where(has_nt.unsqueeze(-1), term - qh * kl_nontarget.unsqueeze(-1), zero)
            grad = grad * gamma - q * d_bin
        else:
            log_qh.sub_(safe_finite(lse_s_nt).unsqueeze(-1))
            log_ph.sub_(safe_finite(lse_t_nt).unsqueeze(-1))
            qh = log_qh.exp()  # (n, V), 0 at the target id
            term = masked_xlogy_terms_(qh, log_qh.sub_(log_ph))  # qh (log qh - log ph)
            kl_nontarget = torch.where(has_nt, term.sum(-1), zero)
            q = torch.sub(s, lse_s.unsqueeze(-1), out=t).exp_()  # in t's buffer
            grad = term.sub_(qh.mul_(kl_nontarget.unsqueeze(-1)))
            grad = grad.masked_fill_(~has_nt.unsqueeze(-1), 0.0).mul_(gamma).sub_(q.mul_(d_bin))
        grad = add_at_(grad, labels, d_bin)
        stats = {"kl_binary": kl_binary, "kl_nontarget": kl_nontarget, "q_target": q_y}
        if ce_weight is None:
            return kl_binary + gamma * kl_nontarget, stats, grad
        return kl_binary + gamma * kl_nontarget, stats, grad, lse_s - s_y

    return drkl_chunk_grad


class DRKLLoss(Divergence):
    """Diversity-aware reverse KL (DRKL), reconstructed from the abstract of arXiv 2604.00223.

    With ``y`` the label (ground-truth next token), reverse KL decomposes exactly as
    ``KL(q||p) = KL(bq||bp) + (1 - q_y) * KL(qh||ph)`` (binary target/non-target part plus the
    renormalised non-target part). The abstract's diagnosis is that the student-dependent weight
    ``(1 - q_y)`` yields a gradient ``-q_y (1 - q_y) KL(qh||ph)`` on the target logit that pushes it
    up even when ``q = p``, and that the non-target supervision is weak. This reconstruction
    therefore uses

        ``DRKL = KL(bq||bp) + gamma * KL(qh||ph)``

    with a constant ``gamma > 0``; ``gamma > 1 - q_y`` strengthens the non-target signal. It is not
    the authors' code (their full text is not available to this project). It is 0 when
    ``q = p``. Needs the labels of valid tokens to be ids in ``[0, V)``.

    From a top-M teacher cache (``tad_torchtune.losses.cached``): the binary term is exact (the
    cache holds the teacher's label log-probability, and the label is an outcome of its own:
    ``reads_labels``); the non-target term is over the cached ids and the bucket without the
    label. A sampled cache cannot serve it (``validate``).

    Reduction and masking as ``ForwardKLLoss``. Diagnostics: ``kl_binary``, ``kl_nontarget``,
    ``q_target`` (sums over valid tokens).

    Args:
        gamma: weight of the non-target KL, > 0.
        temperature, ignore_index: see ``Divergence``.
    """

    name = "drkl"
    stat_names = ("kl_binary", "kl_nontarget", "q_target")
    reads_labels = True
    #: the non-target log ratio, read by its sum's loop and the gradient's, is an expression of
    #: over 30 ops (the two log-normalisers' guards inlined): at inductor's default opcount
    #: threshold it is stored in a float32 ``[n, V]`` buffer and read back (5.0 passes per chunk
    #: in bf16; recomputed 3.5, reverse KL's; ``benchmarks/RESULTS.md``). Not for every
    #: divergence: at 64 TAD's top-K set is stored again.
    gpu_inductor_options = {"realize_opcount_threshold": 64}

    def __init__(self, *, gamma: float = 1.0, temperature: float = 1.0,
                 ignore_index: int = -100) -> None:
        super().__init__(temperature=temperature, ignore_index=ignore_index)
        self.gamma = check_positive(gamma, "gamma")
        self.chunk_fn = make_drkl_chunk(self.gamma)
        self.chunk_grad_fn = make_drkl_chunk_grad(self.gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, " + super().extra_repr()
