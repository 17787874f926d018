"""The interface every divergence of this package offers, its registry, and the log-space helpers
their per-chunk functions share (``docs/design.md``, "The divergences")."""

from typing import ClassVar

import torch
from torch import Tensor, nn

from tad_torchtune.losses.cached import TeacherTopM, sanitized
from tad_torchtune.losses.engine import (
    DivergenceOutput,
    chunk_slices,
    reduce_chunks,
    row_layout,
    scaled_chunk,
    teacher_pass,
)
from tad_torchtune.vocab import align_teacher_vocab, check_vocab_alignment

#: every divergence class by its ``name``: what the config check, the benchmark and the tests
#: iterate over. A subclass with a ``name`` registers itself when its module is imported.
DIVERGENCES: dict[str, type["Divergence"]] = {}


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def check_logits(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> None:
    """Shape checks shared by the divergences (vocabulary sizes are checked by alignment)."""
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [B, T, V] or [N, V], got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} does not match student_logits "
            f"shape {tuple(student_logits.shape)} in the leading (batch, token) dimensions"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError("student_logits and teacher_logits must be floating point tensors")


class Divergence(nn.Module):
    """Base of the logit divergences: ``forward`` is the mean over valid tokens.

    A divergence is its per-chunk math, written once:

    - ``chunk_fn(s, t, labels, *extras) -> (per_token [n], stats)``: the value, on chunks
      ``[n, V]`` of student and teacher logits already divided by the temperature, in float32
      (float64 stays float64), ignored rows zeroed. The unfused path differentiates it with
      autograd; it is the reference.
    - ``chunk_grad_fn`` (optional): the same value AND its gradient w.r.t. ``s`` in closed form,
      ``(per_token, stats, grad [n, V])``, held against autograd of ``chunk_fn`` by the tests.
      ``s`` is read only (the fused path reuses it); ``t`` is the chunk's own buffer and may be
      overwritten, to save a ``[n, V]`` one. ``None``: the fused path differentiates
      ``chunk_fn``.
    - ``needs_teacher_pass``: the divergence needs teacher-only statistics of ALL tokens of a row
      before any per-token term (TAD's ``abar``); ``teacher_chunk_stats`` gives them per chunk
      and ``teacher_extras`` turns them into the per-token ``extras`` of the chunk functions.
      ``engine.teacher_pass`` runs that pass on both paths.

    ``sum_and_count`` (un-normalised sum, valid-token count, diagnostics) lets a recipe normalise
    by the global token count of an optimizer step. A new divergence is one subclass with a
    ``name`` (it joins ``DIVERGENCES``) that sets ``chunk_fn``; see ``docs/design.md``.

    Args:
        temperature: both logits are divided by it before the softmax; no ``tau**2`` scaling.
        ignore_index: label value of tokens that do not count.
        chunk_size: tokens processed at once; ``None`` for all at once.
        vocab_alignment: ``"exact"`` (vocabulary sizes must match) or ``"truncate_teacher"``
            (a larger teacher vocabulary whose first ids are the student's is cut to the student's).
    """

    #: registry name (``DIVERGENCES``); empty for abstract bases
    name: ClassVar[str] = ""
    #: names of the per-token diagnostics in ``DivergenceOutput.stats``
    stat_names: tuple[str, ...] = ()
    chunk_fn = None
    chunk_grad_fn = None
    #: ``chunk_grad_fn(..., ce_weight=c)`` also returns the per-token cross-entropy of ``s``
    #: (temperature 1) and the gradient of ``divergence + c * CE``: the fused head then spends no
    #: pass over ``[n, V]`` on the CE
    fuses_ce: bool = False
    needs_teacher_pass: bool = False
    #: ``(s, labels, ids, logp, log_rest, label_logp, *extras) -> (per_token, stats)``: the value
    #: from a teacher cache (``losses/cached.py``) instead of teacher logits; None: no such version
    cached_chunk_fn = None
    #: its closed-form gradient, as ``chunk_grad_fn``; None: autograd through ``cached_chunk_fn``
    cached_chunk_grad_fn = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            DIVERGENCES[cls.name] = cls

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

    def teacher_chunk_stats(self, t: Tensor) -> tuple[Tensor, ...]:
        """Per-token teacher-only statistics ``[n, ...]`` of a chunk ``[n, V]`` of scaled,
        float32 teacher logits (first pass; only called when ``needs_teacher_pass``)."""
        return ()

    def teacher_extras(self, stats: tuple[Tensor, ...], valid: Tensor,
                       groups: Tensor | None = None) -> tuple[Tensor, ...]:
        """Turn the first pass's statistics ``[B, T, ...]`` (all tokens) into the per-token
        ``extras`` ``[B, T, ...]`` of ``chunk_fn``; ``valid`` is ``[B, T]`` bool, ``groups``
        ``[B, T]`` document ids within each row (None: each row is one group)."""
        return ()

    def check_top_m(self, top_m: int) -> None:
        """Raise if a teacher cache of ``top_m`` ids cannot serve this divergence."""

    def cached_teacher_extras(self, cache: tuple[Tensor, ...], valid: Tensor,
                              groups: Tensor | None = None) -> tuple[Tensor, ...]:
        """The extras of ``cached_chunk_fn`` ``[B, T, ...]`` from the cached
        ``(ids, logp, log_rest, label_logp)`` of all tokens (TAD's row normaliser)."""
        return ()

    def cached_inputs(self, cache: TeacherTopM, labels: Tensor,
                      document_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        """The flat per-token extras ``[N, ...]`` of ``cached_chunk_fn``: the cache's four
        tensors (ignored positions sanitized) and the divergence's own extras.

        Raises:
            ValueError: if the divergence has no cached version, or the cache's shape or top-M
                does not fit.
        """
        if self.cached_chunk_fn is None:
            raise ValueError(f"{type(self).__name__} has no teacher-cache version")
        if cache.ids.shape[:-1] != labels.shape:
            raise ValueError(f"teacher cache shape {tuple(cache.ids.shape)} does not match the "
                             f"labels' {tuple(labels.shape)}")
        self.check_top_m(cache.top_m)
        valid = labels != self.ignore_index
        flat = sanitized(valid.reshape(-1), *cache.flat())
        lead = row_layout(labels)
        extras = self.cached_teacher_extras(
            tuple(x.reshape(*lead, *x.shape[1:]) for x in flat), valid.reshape(lead),
            None if document_ids is None else document_ids.reshape(lead))
        return (*flat, *(e.reshape(-1, *e.shape[2:]) for e in extras))

    def sum_and_count_cached(
        self, student_logits: Tensor, cache: TeacherTopM, labels: Tensor, *,
        document_ids: Tensor | None = None,
    ) -> DivergenceOutput:
        """``sum_and_count`` from a teacher cache (``TeacherTopM``, ``[B, T, ...]``, at the
        divergence's temperature) instead of teacher logits: ``docs/design.md``, "Divergences
        from a teacher cache". The student logits ``[B, T, V]`` are those of the vocabulary the
        cached ids index."""
        extras = self.cached_inputs(cache, labels, document_ids)
        return reduce_chunks(
            self.cached_chunk_fn, (student_logits,), labels, ignore_index=self.ignore_index,
            temperature=self.temperature, chunk_size=self.chunk_size,
            stat_names=self.stat_names, extras=extras,
        )

    def prepare_inputs(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor
    ) -> Tensor:
        """Check shapes and return the teacher logits aligned to the student's vocabulary."""
        check_logits(student_logits, teacher_logits, labels)
        return align_teacher_vocab(
            teacher_logits, student_logits.shape[-1], self.vocab_alignment
        )

    @torch.no_grad()
    def teacher_pass(self, teacher_logits: Tensor, labels: Tensor,
                     document_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        """The first pass on materialised teacher logits ``[B, T, V]`` (aligned) and labels
        ``[B, T]``: the extras of ``chunk_fn``, each ``[B, T, ...]`` (``engine.teacher_pass``)."""
        if not self.needs_teacher_pass:
            return ()
        vocab = teacher_logits.shape[-1]
        t = teacher_logits.reshape(-1, vocab)
        valid = (labels != self.ignore_index).reshape(-1)
        slices = chunk_slices(valid.shape[0], self.chunk_size)

        def chunk(_: int, sl: slice) -> Tensor:
            return scaled_chunk(t[sl], valid[sl].unsqueeze(-1), self.temperature)

        groups = None if document_ids is None else document_ids.reshape(-1)
        extras = teacher_pass(self, chunk, slices, valid, row_layout(labels), groups)
        return tuple(e.reshape(*labels.shape, *e.shape[1:]) for e in extras)

    def sum_and_count(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
        document_ids: Tensor | None = None,
    ) -> DivergenceOutput:
        """Un-normalised sum over valid tokens, their count and the diagnostics' sums.

        Args and shapes as ``forward``; ``document_ids`` ``[B, T]`` (optional) are the document
        of each token within its row, for divergences whose row statistics can be per document.
        """
        teacher_logits = self.prepare_inputs(student_logits, teacher_logits, labels)
        extras = self.teacher_pass(teacher_logits, labels, document_ids)
        n = labels.numel()
        return reduce_chunks(
            self.chunk_fn, (student_logits, teacher_logits), labels,
            ignore_index=self.ignore_index, temperature=self.temperature,
            chunk_size=self.chunk_size, stat_names=self.stat_names,
            extras=tuple(e.reshape(n, *e.shape[labels.dim():]) for e in extras),
        )

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

