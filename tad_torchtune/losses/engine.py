"""The loss engine: how every loss and metric of the package walks over tokens.

A divergence is written once as a per-chunk function of ``[n, V]`` logits (``Divergence``); this
module runs such functions over a batch (``docs/design.md``, "The loss engine"):

- ``chunk_slices`` / ``chunks_with_ignored``: THE chunk iterator. Every consumer (the unfused
  losses, the cross-entropy, the fused head, the evaluation metrics) walks the flat ``[N]``
  tokens in the same slices, so no ``[N, V]`` float32 copy of the logits ever exists.
- ``scaled_chunk``: a chunk as a divergence sees it: upcast, ignored rows zeroed (a ``where``,
  not a multiplication: NaN or inf there must not reach a sum or a gradient), divided by the
  temperature.
- ``teacher_pass``: the teacher-only first pass of a divergence that needs row statistics of
  every token before any per-token term (TAD's ``abar``), on materialised logits (here) and on
  the fused path's projections (``fused.py``) alike.
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


def teacher_pass(
    divergence, teacher_chunk: Callable[[int, slice], Tensor], slices: Sequence[slice],
    valid: Tensor, lead: tuple[int, int], groups: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The first, teacher-only pass of a divergence with ``needs_teacher_pass``.

    Args:
        divergence: the ``Divergence`` (its ``teacher_chunk_stats`` and ``teacher_extras``).
        teacher_chunk: ``(i, slice) -> [n, V]`` scaled teacher logits of chunk ``i`` (as
            ``scaled_chunk`` gives), from materialised logits or from projections.
        slices: the chunks (``chunk_slices``) of the ``N = rows * T`` tokens.
        valid: ``[N]`` bool.
        lead: ``(rows, T)``.
        groups: ``[N]`` ids of the normaliser's groups within a row (document ids), or None.

    Returns:
        The per-token extras of the divergence's chunk functions, each ``[N, ...]``.
    """
    pieces = [divergence.teacher_chunk_stats(teacher_chunk(i, sl)) for i, sl in enumerate(slices)]
    if not pieces:
        return ()
    stats = tuple(torch.cat(p).reshape(*lead, *p[0].shape[1:]) for p in zip(*pieces))
    extras = divergence.teacher_extras(
        stats, valid.reshape(lead), None if groups is None else groups.reshape(lead))
    n = valid.shape[0]
    return tuple(e.reshape(n, *e.shape[2:]) for e in extras)


def _reduce_chunk(fn: ChunkFn, temperature: float, detach: tuple[bool, ...], labels: Tensor,
                  valid: Tensor, num_logits: int, *tensors: Tensor) -> tuple[Tensor, ...]:
    rows = valid.unsqueeze(-1)
    logits = [scaled_chunk(x, rows, temperature, detach=d)
              for x, d in zip(tensors[:num_logits], detach)]
    per_token, stats = fn(*logits, torch.where(valid, labels, 0), *tensors[num_logits:])
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
        args = (fn, temperature, detach, y[sl], valid[sl], len(flat),
                *(x[sl] for x in flat), *(e[sl] for e in extras))
        out = (checkpoint(_reduce_chunk, *args, use_reentrant=False, preserve_rng_state=False)
               if use_checkpoint else _reduce_chunk(*args))
        acc = list(out) if acc is None else [a + o for a, o in zip(acc, out)]
    assert acc is not None and len(acc) == 1 + len(stat_names)
    stats = {k: v.detach() for k, v in zip(sorted(stat_names), acc[1:])}
    return DivergenceOutput(total=acc[0], num_tokens=valid.sum(), stats=stats)


#: ``top_k`` works by blocks of this many ids (a row's block maxima, then the best blocks)
TOP_K_BLOCK = 64


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
