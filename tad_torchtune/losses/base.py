"""The interface every divergence of this package offers to the recipe."""

import torch
from torch import Tensor, nn

from tad_torchtune.losses._reduction import (
    DivergenceOutput,
    align_teacher_vocab,
    check_logits,
    check_positive,
    check_vocab_alignment,
)


class Divergence(nn.Module):
    """Base of the logit divergences: ``forward`` is the mean over valid tokens.

    Subclasses implement ``sum_and_count`` (un-normalised sum, valid-token count, diagnostics), so
    a recipe can normalise by the global token count of an optimizer step (DESIGN.md §1,
    Reduction), and ``chunk_fn``, the per-chunk math that the fused path reuses.

    Args:
        temperature: both logits are divided by it before the softmax; no ``tau**2`` scaling.
        ignore_index: label value of tokens that do not count.
        chunk_size: tokens processed at once; ``None`` for all at once.
        vocab_alignment: ``"exact"`` (vocabulary sizes must match) or ``"truncate_teacher"``
            (a larger teacher vocabulary whose first ids are the student's is cut to the student's).
    """

    #: names of the per-token diagnostics in ``DivergenceOutput.stats``
    stat_names: tuple[str, ...] = ()

    #: The fused path's per-chunk value AND gradient: ``fn(s, t, labels, *extras) ->
    #: (per_token [n], stats, grad [n, V])`` with ``grad = d per_token.sum() / d s``, same inputs
    #: as ``chunk_fn``. ``s`` is read only (the fused path reuses it); ``t`` is the chunk's own
    #: buffer and may be overwritten, to save a ``[n, V]`` one. ``None``: the fused path
    #: differentiates ``chunk_fn`` with autograd.
    chunk_grad_fn = None

    #: True when the divergence needs teacher-only statistics of ALL tokens before any per-chunk
    #: term (TAD's ``abar``): the fused path then runs ``teacher_chunk_stats`` over every chunk
    #: first and hands ``teacher_extras`` to the per-chunk functions.
    needs_teacher_pass: bool = False

    def teacher_chunk_stats(self, t: Tensor) -> tuple[Tensor, ...]:
        """Per-token teacher-only statistics ``[n, ...]`` of a chunk ``[n, V]`` of scaled,
        float32 teacher logits (first pass; only called when ``needs_teacher_pass``)."""
        return ()

    def teacher_extras(self, stats: tuple[Tensor, ...], valid: Tensor) -> tuple[Tensor, ...]:
        """Turn the first pass's statistics ``[B, T, ...]`` (all tokens) into the per-token
        ``extras`` ``[B, T, ...]`` of ``chunk_fn``; ``valid`` is ``[B, T]`` bool."""
        return ()

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = -100,
        chunk_size: int | None = 1024,
        vocab_alignment: str = "exact",
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.ignore_index = int(ignore_index)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.vocab_alignment = check_vocab_alignment(vocab_alignment)

    def prepare_inputs(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor
    ) -> Tensor:
        """Check shapes and return the teacher logits aligned to the student's vocabulary."""
        check_logits(student_logits, teacher_logits, labels)
        return align_teacher_vocab(
            teacher_logits, student_logits.shape[-1], self.vocab_alignment
        )

    def sum_and_count(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor
    ) -> DivergenceOutput:
        raise NotImplementedError

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor
    ) -> Tensor:
        """Mean over valid tokens of the per-token divergence (0 when no token is valid).

        Args:
            student_logits: ``[B, T, V]``.
            teacher_logits: ``[B, T, V_T]``.
            labels: ``[B, T]``, already shifted (position t predicts ``labels[t]``).

        Returns:
            Scalar tensor.
        """
        return self.sum_and_count(student_logits, teacher_logits, labels).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"


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


def safe_finite(x: Tensor) -> Tensor:
    """``x`` where finite, 0 elsewhere: used to subtract a log-normaliser that may be ``-inf``."""
    return torch.where(torch.isfinite(x), x, x.new_zeros(()))
