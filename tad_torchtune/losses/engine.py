"""The loss engine: how every loss and metric of the package walks over tokens.

A divergence is written once as a per-chunk function of ``[n, V]`` logits (``Divergence``); this
module runs such functions over a batch (``docs/design.md``, "The loss engine"):

- ``chunk_slices`` / ``chunks_with_ignored``: THE chunk iterator. Every consumer (the unfused
  losses, the cross-entropy, the fused head, the evaluation metrics, the teacher caches) walks
  the flat ``[N]`` tokens in the same slices, so no ``[N, V]`` float32 copy of the logits ever
  exists.
- ``scaled_chunk``: a chunk as a divergence sees it: upcast, ignored rows zeroed (a ``where``,
  not a multiplication: NaN or inf there must not reach a sum or a gradient), divided by the
  temperature.
- ``teacher_pass`` / ``top_k_extras``: for a divergence with a ``top_k``, the teacher's top-K
  split of every position (``terms.teacher_top_k``) and what the divergence derives from all of
  them (TAD's ``abar``), before any per-token term; on materialised logits, on the fused path's
  projections and from a teacher cache alike.
- ``reduce_chunks``: the unfused reduction, summing a per-chunk function over the valid tokens,
  each chunk recomputed in backward (activation checkpointing), so backward keeps only views of
  the input logits.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tad_torchtune.common import compute_dtype
from tad_torchtune.losses.terms import TopK, teacher_top_k

#: tokens upcast to float32 at once when nobody says otherwise (the recipe's ``loss_chunk_size``)
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class DivergenceOutput:
    """Un-normalised result of a loss, so a recipe can normalise by a global token count.

    Attributes:
        total: sum over valid tokens of the per-token value (scalar, float32 or float64,
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


# A per-chunk function: (logits [n, V], ..., labels [n], *extras [n, ...]) -> (per-token value
# [n], {name: per-token diagnostic [n]}). Inputs are scaled by the temperature, in the compute
# dtype, with ignored rows replaced by zeros.
ChunkFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def chunk_slices(num_tokens: int, chunk_size: int | None) -> list[slice]:
    """The token slices ``[start, stop)`` of ``chunk_size`` tokens (the last one shorter) that
    every loop of the package walks; all tokens at once for ``None``; none for 0 tokens."""
    step = max(1, num_tokens if not chunk_size or chunk_size >= num_tokens else chunk_size)
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def chunks_with_ignored(valid: Tensor, slices: Sequence[slice]) -> list[bool]:
    """Per slice, whether it holds an ignored token, with ONE host synchronisation for all: the
    chunks without one skip their masking passes over ``[n, V]``."""
    if not slices:
        return []
    step = slices[0].stop - slices[0].start
    pad = -valid.shape[0] % step
    ignored = torch.nn.functional.pad(~valid, (0, pad), value=False)
    return ignored.view(-1, step).any(-1).tolist()


def scaled_chunk(x: Tensor, rows: Tensor, temperature: float, *, detach: bool = False) -> Tensor:
    """A chunk of logits ``[n, V]`` as a divergence sees it, out of place (autograd flows):
    upcast to the compute dtype, rows where ``rows [n, 1]`` is False set to 0, divided by the
    temperature."""
    if detach:
        x = x.detach()
    x = torch.where(rows, x.to(compute_dtype(x.dtype)), 0.0)
    return x / temperature if temperature != 1.0 else x


def row_layout(labels: Tensor) -> tuple[int, int]:
    """``(rows, tokens per row)`` of ``[B, T]`` labels (``[N]``: one row; ``[..., T]``: the
    leading dimensions are rows): the unit over which TAD's ``abar`` is a mean."""
    if labels.dim() == 1:
        return 1, labels.shape[0]
    return math.prod(labels.shape[:-1]), labels.shape[-1]


def check_logits(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> None:
    """The shape checks of a divergence on materialised logits: ``[..., V]`` each, the same
    vocabulary (a larger teacher's is aligned first: ``tad_torchtune.vocab``), labels ``[...]``."""
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [B, T, V] or [N, V], got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} does not match student_logits "
            f"shape {tuple(student_logits.shape)} (align a larger teacher vocabulary first: "
            f"tad_torchtune.vocab.align_teacher_vocab)"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError("student_logits and teacher_logits must be floating point tensors")


def top_k_extras(divergence, tops: Sequence[TopK], valid: Tensor, lead: tuple[int, int],
                 groups: Tensor | None = None) -> tuple[Tensor, ...]:
    """The per-token extras ``[N, ...]`` of a divergence with a ``top_k``: the ``TopK`` of every
    position (given chunk by chunk, in order) followed by the divergence's ``sequence_extras``.

    Args:
        divergence: the ``Divergence``.
        tops: the ``TopK`` of each chunk of the ``N = rows * T`` positions.
        valid: ``[N]`` bool.
        lead: ``(rows, T)``.
        groups: ``[N]`` ids of the normaliser's groups within a row (document ids), or None.
    """
    if not tops:
        return ()
    top = TopK(*(torch.cat(parts) for parts in zip(*tops)))  # (N, ...)
    n = valid.shape[0]
    extras = divergence.sequence_extras(
        TopK(*(x.reshape(*lead, *x.shape[1:]) for x in top)), valid.reshape(lead),
        None if groups is None else groups.reshape(lead))
    return (*top, *(e.reshape(n, *e.shape[2:]) for e in extras))


def teacher_pass(
    divergence, chunk_top: Callable[[int, slice], TopK], slices: Sequence[slice],
    valid: Tensor, lead: tuple[int, int], groups: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The first, teacher-only pass of a divergence with a ``top_k`` (none otherwise).

    Args:
        divergence: the ``Divergence``.
        chunk_top: ``(i, slice) -> TopK``, the teacher's top-K split of chunk ``i``
            (``terms.teacher_top_k`` of its scaled logits, as ``scaled_chunk`` gives them), from
            materialised logits or from projections.
        slices: the chunks (``chunk_slices``) of the ``N = rows * T`` tokens.
        valid, lead, groups: as ``top_k_extras``.

    Returns:
        ``top_k_extras``: the per-token extras of the divergence's chunk functions.
    """
    if divergence.top_k is None:
        return ()
    with torch.no_grad():
        tops = [chunk_top(i, sl) for i, sl in enumerate(slices)]
        return top_k_extras(divergence, tops, valid, lead, groups)


def logits_teacher_pass(divergence, teacher_logits: Tensor, labels: Tensor,
                        document_ids: Tensor | None = None, *,
                        chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, ...]:
    """``teacher_pass`` on materialised teacher logits ``[..., V]`` and their labels."""
    if divergence.top_k is None:
        return ()
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    valid = (labels != divergence.ignore_index).reshape(-1)

    def chunk_top(_: int, sl: slice) -> TopK:
        return teacher_top_k(scaled_chunk(t[sl], valid[sl].unsqueeze(-1), divergence.temperature,
                                          detach=True), divergence.top_k)

    return teacher_pass(divergence, chunk_top, chunk_slices(valid.shape[0], chunk_size), valid,
                        row_layout(labels), None if document_ids is None else document_ids.reshape(-1))


def _reduce_chunk(fn: ChunkFn, temperature: float, detach: tuple[bool, ...], names: tuple[str, ...],
                  labels: Tensor, valid: Tensor, num_logits: int, *tensors: Tensor
                  ) -> tuple[Tensor, ...]:
    rows = valid.unsqueeze(-1)
    logits = [scaled_chunk(x, rows, temperature, detach=d)
              for x, d in zip(tensors[:num_logits], detach)]
    per_token, stats = fn(*logits, torch.where(valid, labels, 0), *tensors[num_logits:])
    if per_token.shape != valid.shape:  # a scalar would be broadcast: n times the value
        raise ValueError(f"chunk_fn returned a per-token value of shape {tuple(per_token.shape)} "
                         f"for a chunk of {valid.shape[0]} rows; accepted: one value per row")
    if tuple(sorted(stats)) != names:
        raise ValueError(f"chunk_fn returned the diagnostics {sorted(stats)} where its "
                         f"stat_names declare {list(names)}; accepted: exactly the declared ones")
    zero = per_token.new_zeros(())
    total = torch.where(valid, per_token, zero).sum()
    sums = [torch.where(valid, stats[k].to(per_token.dtype), zero).sum() for k in sorted(stats)]
    return (total, *sums)


def reduce_chunks(
    fn: ChunkFn,
    logits: Sequence[Tensor],
    labels: Tensor,
    *,
    ignore_index: int,
    temperature: float = 1.0,
    chunk_size: int | None,
    stat_names: Sequence[str] = (),
    extras: Sequence[Tensor] = (),
    detach: Sequence[bool] | None = None,
) -> DivergenceOutput:
    """Sum ``fn`` over valid tokens, chunk by chunk (the unfused path).

    Args:
        fn: the per-chunk function (see ``ChunkFn``), called with one ``[n, V]`` chunk of each
            tensor of ``logits``, then the labels and the extras.
        logits: ``[..., V]`` tensors, any float dtype (the student's first; a teacher's already
            aligned to the student's vocabulary).
        labels: ``[...]``; ``ignore_index`` marks tokens that do not count.
        ignore_index: label value of ignored tokens.
        temperature: every logits tensor is divided by it.
        chunk_size: tokens per chunk; ``None`` processes all tokens at once.
        stat_names: names of the diagnostics ``fn`` returns.
        extras: per-token tensors ``[N, ...]`` passed to ``fn`` chunk by chunk.
        detach: per logits tensor, whether it gets no gradient (default: all but the first).

    Returns:
        A ``DivergenceOutput``.
    """
    vocab = logits[0].shape[-1]
    flat = [x.reshape(-1, vocab) for x in logits]  # (N, V) views
    y = labels.reshape(-1)  # (N,)
    valid = y != ignore_index
    detach = tuple(detach) if detach is not None else (False,) + (True,) * (len(flat) - 1)
    slices = chunk_slices(y.shape[0], chunk_size) or [slice(0, 0)]  # an empty chunk: a 0 total
    # Backward then keeps only views of the inputs per chunk and recomputes the chunk's float32
    # intermediates, so peak memory is one chunk, not [N, V] float32.
    use_checkpoint = torch.is_grad_enabled() and flat[0].requires_grad and len(slices) > 1
    acc: list[Tensor] | None = None
    for sl in slices:
        args = (fn, temperature, detach, tuple(sorted(stat_names)), y[sl], valid[sl], len(flat),
                *(x[sl] for x in flat), *(e[sl] for e in extras))
        out = (checkpoint(_reduce_chunk, *args, use_reentrant=False, preserve_rng_state=False)
               if use_checkpoint else _reduce_chunk(*args))
        acc = list(out) if acc is None else [a + o for a, o in zip(acc, out)]
    assert acc is not None and len(acc) == 1 + len(stat_names)
    stats = {k: v.detach() for k, v in zip(sorted(stat_names), acc[1:])}
    return DivergenceOutput(total=acc[0], num_tokens=valid.sum(), stats=stats)
