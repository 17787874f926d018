"""Input checks, vocabulary alignment and the chunked token reduction shared by every divergence.

Every divergence in this package is a per-token function of (student logits, teacher logits) on a
flat chunk of tokens ``[n, V]``. This module turns such a function into the reduced loss of
DESIGN.md §1: the sum over valid tokens and the valid-token count. It works chunk by chunk over
tokens so that no ``[N, V]`` float32 copy of the logits ever exists, and wraps each chunk in
activation checkpointing so that backward keeps only the (views of the) input logits, not the
float32 intermediates of every chunk.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

VOCAB_ALIGNMENTS = ("exact", "truncate_teacher")


@dataclass
class DivergenceOutput:
    """Un-normalised result of a divergence, so a recipe can normalise by a global token count.

    Attributes:
        total: sum over valid tokens of the per-token divergence (scalar, float32 or float64,
            differentiable w.r.t. the student).
        num_tokens: number of valid tokens (scalar int64 tensor).
        stats: sums over valid tokens of per-token diagnostics (detached scalars); divide by
            ``num_tokens`` for their means.
    """

    total: Tensor
    num_tokens: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)

    def mean(self) -> Tensor:
        """``total / num_tokens``, and 0 (with zero gradient) when no token is valid."""
        return self.total / self.num_tokens.clamp(min=1)

    def stat_means(self) -> dict[str, float]:
        """Means over valid tokens of the diagnostics, as Python floats for logging."""
        n = max(int(self.num_tokens), 1)
        return {name: float(value) / n for name, value in self.stats.items()}


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def check_vocab_alignment(value: str) -> str:
    if value not in VOCAB_ALIGNMENTS:
        raise ValueError(
            f"vocab_alignment must be one of {VOCAB_ALIGNMENTS}, got {value!r}"
        )
    return value


def align_teacher_vocab(
    teacher_logits: Tensor, student_vocab_size: int, vocab_alignment: str
) -> Tensor:
    """Return teacher logits over the student's vocabulary.

    With ``vocab_alignment="truncate_teacher"`` a teacher whose vocabulary is larger than the
    student's (its first ``student_vocab_size`` ids being the student's vocabulary, as with padded
    embedding tables) is aligned by dropping its extra logits before any softmax. Any other
    mismatch raises.

    Args:
        teacher_logits: ``[..., V_T]``.
        student_vocab_size: ``V_S``.
        vocab_alignment: one of ``VOCAB_ALIGNMENTS``.

    Returns:
        ``[..., V_S]`` (a view, no copy).

    Raises:
        ValueError: if the sizes differ and cannot be aligned.
    """
    teacher_vocab_size = teacher_logits.shape[-1]
    if teacher_vocab_size == student_vocab_size:
        return teacher_logits
    if vocab_alignment == "truncate_teacher" and teacher_vocab_size > student_vocab_size:
        return teacher_logits[..., :student_vocab_size]
    hint = (
        "set vocab_alignment='truncate_teacher' if the teacher's first ids are the student's "
        "vocabulary"
        if teacher_vocab_size > student_vocab_size
        else "a teacher vocabulary smaller than the student's cannot be aligned"
    )
    raise ValueError(
        f"vocabulary size mismatch: teacher has {teacher_vocab_size} logits, student has "
        f"{student_vocab_size} (vocab_alignment={vocab_alignment!r}); {hint}"
    )


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
    if student_logits.is_floating_point() is False or teacher_logits.is_floating_point() is False:
        raise ValueError("student_logits and teacher_logits must be floating point tensors")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# A per-chunk divergence: (student [n, V], teacher [n, V], labels [n], *extras [n, ...]) ->
# (per-token value [n], {name: per-token diagnostic [n]}). Inputs are already scaled by the
# temperature, in the compute dtype, with invalid rows replaced by zeros.
ChunkFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def _reduce_chunk(
    fn: ChunkFn,
    temperature: float,
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    valid: Tensor,
    *extras: Tensor,
) -> tuple[Tensor, ...]:
    dtype = compute_dtype(student.dtype)
    rows = valid.unsqueeze(-1)
    # where(), not multiplication: NaN or inf in an ignored row must not reach any sum or grad.
    s = torch.where(rows, student.to(dtype), 0.0) / temperature
    t = torch.where(rows, teacher.detach().to(dtype), 0.0) / temperature
    per_token, stats = fn(s, t, torch.where(valid, labels, 0), *extras)
    zero = per_token.new_zeros(())
    total = torch.where(valid, per_token, zero).sum()
    names = sorted(stats)
    sums = [torch.where(valid, stats[k].to(per_token.dtype), zero).sum() for k in names]
    return (total, *sums)


def chunked_divergence(
    fn: ChunkFn,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int,
    temperature: float,
    chunk_size: int | None,
    stat_names: tuple[str, ...] = (),
    extras: tuple[Tensor, ...] = (),
) -> DivergenceOutput:
    """Sum ``fn`` over valid tokens, chunk by chunk.

    Args:
        fn: the per-chunk divergence (see ``ChunkFn``).
        student_logits: ``[..., V]``, any float dtype.
        teacher_logits: ``[..., V]`` (already aligned to the student's vocabulary).
        labels: ``[...]``; ``ignore_index`` marks tokens that do not count.
        ignore_index: label value of ignored tokens.
        temperature: both logits are divided by it.
        chunk_size: tokens per chunk; ``None`` processes all tokens at once.
        stat_names: names of the diagnostics ``fn`` returns.
        extras: per-token tensors ``[..., *]`` passed to ``fn`` chunk by chunk.

    Returns:
        A ``DivergenceOutput``.
    """
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)  # (N, V)
    t = teacher_logits.reshape(-1, vocab)  # (N, V)
    y = labels.reshape(-1)  # (N,)
    valid = y != ignore_index
    flat_extras = [e.reshape(y.shape[0], *e.shape[labels.dim():]) for e in extras]
    n = y.shape[0]
    step = max(1, n if not chunk_size or chunk_size >= n else chunk_size)
    # Backward then keeps only views of the inputs per chunk and recomputes the chunk's float32
    # intermediates, so peak memory is one chunk, not [N, V] float32.
    use_checkpoint = torch.is_grad_enabled() and s.requires_grad and step < n
    acc: list[Tensor] | None = None
    for start in range(0, max(n, 1), step):  # one (empty) chunk when n == 0
        args = (s[start : start + step], t[start : start + step], y[start : start + step],
                valid[start : start + step], *(e[start : start + step] for e in flat_extras))
        if use_checkpoint:
            out = checkpoint(_reduce_chunk, fn, temperature, *args, use_reentrant=False,
                             preserve_rng_state=False)
        else:
            out = _reduce_chunk(fn, temperature, *args)
        acc = list(out) if acc is None else [a + o for a, o in zip(acc, out)]
    assert acc is not None
    stats = {k: v.detach() for k, v in zip(sorted(stat_names), acc[1:])}
    return DivergenceOutput(total=acc[0], num_tokens=valid.sum(), stats=stats)
