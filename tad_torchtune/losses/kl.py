"""Forward and reverse KL divergences between teacher and student next-token distributions."""

import torch
from torch import Tensor

from tad_torchtune.losses.base import Divergence, masked_xlogy_sum, masked_xlogy_terms_
from tad_torchtune.losses.cached import bucketed, student_side


def forward_kl_chunk(s: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token ``KL(p || q)`` for a chunk ``[n, V]`` of (scaled) logits."""
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    return masked_xlogy_sum(log_p.exp(), log_p - log_q), {}


def reverse_kl_chunk(s: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token ``KL(q || p)`` for a chunk ``[n, V]`` of (scaled) logits."""
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    return masked_xlogy_sum(log_q.exp(), log_q - log_p), {}


def _cached_outcomes(s: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """Log-masses ``[n, M + 1]`` of the cached outcomes (top-M ids and the bucket), student's
    and teacher's."""
    lse, s_m, lse_rest = student_side(s, ids)
    return bucketed(s_m, lse_rest) - lse.unsqueeze(-1), bucketed(logp, log_rest)


def forward_kl_cached_chunk(s: Tensor, labels: Tensor, ids: Tensor, logp: Tensor,
                            log_rest: Tensor, label_logp: Tensor
                            ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token forward KL over the M + 1 cached outcomes: ``sum_{I_M} p log(p / q)
    + r_M log(r_M / s_M)``, ``s_M`` the student's mass outside ``I_M`` (exact when the bucket is
    one id, a lower bound otherwise)."""
    log_q, log_p = _cached_outcomes(s, ids, logp, log_rest)
    return masked_xlogy_sum(log_p.exp(), log_p - log_q), {}


def reverse_kl_cached_chunk(s: Tensor, labels: Tensor, ids: Tensor, logp: Tensor,
                            log_rest: Tensor, label_logp: Tensor
                            ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token reverse KL over the M + 1 cached outcomes (``forward_kl_cached_chunk``'s
    bucketing on both sides)."""
    log_q, log_p = _cached_outcomes(s, ids, logp, log_rest)
    return masked_xlogy_sum(log_q.exp(), log_q - log_p), {}


def forward_kl_chunk_grad(
    s: Tensor, t: Tensor, labels: Tensor, *, ce_weight: float | None = None
) -> tuple[Tensor, ...]:
    """``forward_kl_chunk`` plus its gradient w.r.t. ``s``, ``q - p`` (the fused path's chunk).
    ``t`` is scratch (``log p``, then the per-entry terms): two ``[n, V]`` buffers are new.

    With ``ce_weight`` (temperature 1) it also returns the per-token cross-entropy ``-log q_y``
    and ``grad`` is that of ``KL + ce_weight * CE``, ``(1 + ce_weight) q - p - ce_weight
    onehot(y)``, at no extra pass over ``[n, V]``."""
    log_q = torch.log_softmax(s, dim=-1)
    log_p = t.sub_(t.logsumexp(-1, keepdim=True))
    p = log_p.exp()
    per_token = masked_xlogy_terms_(p, log_p.sub_(log_q)).sum(-1)
    if ce_weight is None:
        return per_token, {}, log_q.exp_().sub_(p)
    y = labels.unsqueeze(-1)
    ce = -log_q.gather(-1, y).squeeze(-1)
    grad = log_q.exp_().mul_(1.0 + ce_weight).sub_(p)
    grad.scatter_add_(-1, y, grad.new_full(y.shape, -ce_weight))
    return per_token, {}, grad, ce


def reverse_kl_chunk_grad(
    s: Tensor, t: Tensor, labels: Tensor
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """``reverse_kl_chunk`` plus its gradient w.r.t. ``s``: with ``R = KL(q||p)``,
    ``dR/ds_i = q_i (log q_i - log p_i) - q_i R`` (entries with ``q_i = 0`` contribute 0).
    ``t`` is scratch (``log p``): two ``[n, V]`` buffers are new."""
    log_q = torch.log_softmax(s, dim=-1)
    log_p = t.sub_(t.logsumexp(-1, keepdim=True))
    q = log_q.exp()
    term = masked_xlogy_terms_(q, log_q.sub_(log_p))  # q (log q - log p)
    per_token = term.sum(-1)
    return per_token, {}, term.sub_(q.mul_(per_token.unsqueeze(-1)))


class ForwardKLLoss(Divergence):
    """Forward KL, the divergence of vanilla KD: ``KL(p || q) = sum_i p_i (log p_i - log q_i)``.

    ``p = softmax(teacher_logits / tau)``, ``q = softmax(student_logits / tau)``. This is the true
    KL, 0 when the student equals the teacher (torchtune 0.6.1's ``ForwardKLLoss`` returns the
    cross-entropy ``-sum p log q`` instead: same gradient, value offset by the teacher entropy).
    Vocabulary entries with ``p_i = 0`` contribute 0.

    Reduction: mean over tokens whose label is not ``ignore_index``; 0 with zero gradient when no
    token is valid. Ignored positions may hold any values (NaN, inf): they never reach the result.
    From a teacher cache (``sum_and_count_cached``): the KL over the cached top-M ids plus one
    bucket for the rest, the student's bucket being its mass outside those ids; exact when the
    bucket is one id, a lower bound otherwise. See ``Divergence`` for the arguments.
    """

    name = "forward_kl"
    chunk_fn = staticmethod(forward_kl_chunk)
    chunk_grad_fn = staticmethod(forward_kl_chunk_grad)
    fuses_ce = True
    cached_chunk_fn = staticmethod(forward_kl_cached_chunk)


class ReverseKLLoss(Divergence):
    """Reverse KL: ``KL(q || p) = sum_i q_i (log q_i - log p_i)``, mode-seeking.

    Same conventions as ``ForwardKLLoss`` (temperature, reduction, masking, the same bucketing
    from a teacher cache); entries with ``q_i = 0`` contribute 0.
    """

    name = "reverse_kl"
    chunk_fn = staticmethod(reverse_kl_chunk)
    chunk_grad_fn = staticmethod(reverse_kl_chunk_grad)
    cached_chunk_fn = staticmethod(reverse_kl_cached_chunk)
