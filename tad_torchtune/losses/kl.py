"""Forward and reverse KL divergences between teacher and student next-token distributions."""

import torch
from torch import Tensor

from tad_torchtune.losses.base import Divergence, TailWeight
from tad_torchtune.losses.terms import (add_at_, logsumexp, masked_xlogy_sum,
                                        masked_xlogy_terms_)


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


def forward_kl_chunk_grad(
    s: Tensor, t: Tensor, labels: Tensor, *, ce_weight: float | None = None
) -> tuple[Tensor, ...]:
    """``forward_kl_chunk`` plus its gradient w.r.t. ``s``, ``q - p`` (the fused path's chunk).
    ``t`` is scratch (``log p``, then the per-entry terms): two ``[n, V]`` buffers are new.

    With ``ce_weight`` (temperature 1) it also returns the per-token cross-entropy ``-log q_y``
    and ``grad`` is that of ``KL + ce_weight * CE``, ``(1 + ce_weight) q - p - ce_weight
    onehot(y)``, at no extra pass over ``[n, V]``."""
    log_q = torch.log_softmax(s, dim=-1)
    log_p = t.sub_(logsumexp(t, keepdim=True))
    p = log_p.exp()
    per_token = masked_xlogy_terms_(p, log_p.sub_(log_q)).sum(-1)
    if ce_weight is None:
        return per_token, {}, log_q.exp_().sub_(p)
    y = labels.unsqueeze(-1)
    ce = -log_q.gather(-1, y).squeeze(-1)
    grad = log_q.exp_().mul_(1.0 + ce_weight).sub_(p)
    return per_token, {}, add_at_(grad, labels, -ce_weight), ce


def reverse_kl_chunk_grad(
    s: Tensor, t: Tensor, labels: Tensor, *, ce_weight: float | None = None
) -> tuple[Tensor, ...]:
    """``reverse_kl_chunk`` plus its gradient w.r.t. ``s``: with ``R = KL(q||p)``,
    ``dR/ds_i = q_i (log q_i - log p_i) - q_i R`` (entries with ``q_i = 0`` contribute 0).
    ``t`` is scratch (``log p``): two ``[n, V]`` buffers are new.

    With ``ce_weight`` (temperature 1) it also returns the per-token cross-entropy ``-log q_y``
    and ``grad`` is that of ``R + ce_weight * CE``: ``- q (R - ce_weight)`` in place of
    ``- q R``, ``-ce_weight`` at the label. Traced by ``torch.compile``:
    ``_reverse_kl_chunk_grad_traced``."""
    if torch.compiler.is_compiling():
        return _reverse_kl_chunk_grad_traced(s, t, labels, ce_weight=ce_weight)
    log_q = torch.log_softmax(s, dim=-1)
    log_p = t.sub_(logsumexp(t, keepdim=True))
    q = log_q.exp()
    ce = None
    if ce_weight is not None:
        y = labels.unsqueeze(-1)
        ce = -log_q.gather(-1, y).squeeze(-1)
    term = masked_xlogy_terms_(q, log_q.sub_(log_p))  # q (log q - log p)
    per_token = term.sum(-1)
    scale = per_token if ce_weight is None else per_token - ce_weight
    grad = term.sub_(q.mul_(scale.unsqueeze(-1)))
    if ce_weight is None:
        return per_token, {}, grad
    return per_token, {}, add_at_(grad, labels, -ce_weight), ce


def _reverse_kl_chunk_grad_traced(
    s: Tensor, t: Tensor, labels: Tensor, *, ce_weight: float | None = None
) -> tuple[Tensor, ...]:
    """``reverse_kl_chunk_grad`` for ``torch.compile``: the same terms as expressions, no
    buffer written in place. On a GPU (``fused.INDUCTOR_OPTIONS``) inductor then makes three
    loops over the row (both log-sum-exps in one, the sum of the terms, the gradient),
    recomputing ``q (log q - log p)`` in the last where the in-place form stores it in a float32
    ``[n, V]`` buffer and reads it back."""
    zero = s.new_zeros(())
    lse_s = logsumexp(s, keepdim=True)
    log_q = s - lse_s
    q = log_q.exp()
    term = torch.where(q > 0, q * (log_q - (t - logsumexp(t, keepdim=True))), zero)
    per_token = term.sum(-1)
    scale = per_token if ce_weight is None else per_token - ce_weight
    grad = term - q * scale.unsqueeze(-1)
    if ce_weight is None:
        return per_token, {}, grad
    ce = lse_s.squeeze(-1) - s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return per_token, {}, add_at_(grad, labels, -ce_weight), ce


class ForwardKLLoss(Divergence):
    """Forward KL, the divergence of vanilla KD: ``KL(p || q) = sum_i p_i (log p_i - log q_i)``.

    ``p = softmax(teacher_logits / tau)``, ``q = softmax(student_logits / tau)``. This is the true
    KL, 0 when the student equals the teacher (torchtune 0.6.1's ``ForwardKLLoss`` returns the
    cross-entropy ``-sum p log q`` instead: same gradient, value offset by the teacher entropy).
    Vocabulary entries with ``p_i = 0`` contribute 0.

    Reduction: mean over tokens whose label is not ``ignore_index``; 0 with zero gradient when no
    token is valid. Ignored positions may hold any values (NaN, inf): they never reach the result.
    From a bucket teacher cache (``tad_torchtune.losses.cached``): the KL over the cached top-M
    ids plus one bucket for the rest, the student's bucket being its mass outside those ids;
    exact when the bucket is one id, a lower bound otherwise. From a sampled cache: ``D_KL1 +
    alphaT * D_KL2`` over the cache's top-K, the tail term estimated without bias from the
    teacher's draws (``tail_weight``). See ``Divergence`` for the arguments.
    """

    name = "forward_kl"
    chunk_fn = staticmethod(forward_kl_chunk)
    chunk_grad_fn = staticmethod(forward_kl_chunk_grad)

    def tail_weight(self, log_alpha_t: Tensor, valid: Tensor, groups: Tensor | None = None
                    ) -> TailWeight:
        """``KL(p||q) = D_KL1 + alphaT * D_KL2`` for any top-K split: ``w = alphaT``."""
        return TailWeight(torch.where(valid, log_alpha_t.exp(), log_alpha_t.new_zeros(())), {})


class ReverseKLLoss(Divergence):
    """Reverse KL: ``KL(q || p) = sum_i q_i (log q_i - log p_i)``, mode-seeking.

    Same conventions as ``ForwardKLLoss`` (temperature, reduction, masking, the same bucketing
    from a top-M teacher cache); entries with ``q_i = 0`` contribute 0. A sampled teacher cache
    cannot serve it (``validate``).
    """

    name = "reverse_kl"
    chunk_fn = staticmethod(reverse_kl_chunk)
    chunk_grad_fn = staticmethod(reverse_kl_chunk_grad)
