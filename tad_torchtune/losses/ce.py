"""The student's causal-LM cross-entropy, chunked over tokens so no [N, V] float32 copy exists."""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tad_torchtune.losses._reduction import compute_dtype


def _ce_chunk(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(
        logits.to(compute_dtype(logits.dtype)), labels, ignore_index=ignore_index, reduction="sum"
    )


def _linear_ce_chunk(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, softcap: float | None
) -> Tensor:
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return _ce_chunk(logits, labels, ignore_index)


def chunked_cross_entropy(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, chunk_size: int | None = 1024
) -> tuple[Tensor, Tensor]:
    """Sum of the token cross-entropies over valid tokens, and their count.

    Each chunk is upcast to float32 on its own and recomputed in backward (activation
    checkpointing), so peak memory is one chunk's float32 logits, not the whole batch's.

    Args:
        logits: ``[..., V]``, any float dtype.
        labels: ``[...]``, ``ignore_index`` for tokens that do not count.
        ignore_index: label of ignored tokens.
        chunk_size: tokens per chunk; ``None`` for all at once.

    Returns:
        ``(sum [scalar float32], count [scalar int64])``.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    y = labels.reshape(-1)
    return _chunked_sum(_ce_chunk, (flat,), y, ignore_index, chunk_size), (y != ignore_index).sum()


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = 1024,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` (optionally soft-capped) without ever holding the
    full logits: each chunk's logits are computed, reduced and recomputed in backward.

    Args:
        hidden: ``[..., D]`` final (normed) hidden states.
        weight: ``[V, D]`` output projection.
        labels: ``[...]``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` when set.
        ignore_index, chunk_size: as ``chunked_cross_entropy``.

    Returns:
        ``(sum, count)`` as ``chunked_cross_entropy``.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    y = labels.reshape(-1)

    def fn(h: Tensor, yy: Tensor, ii: int) -> Tensor:
        return _linear_ce_chunk(h, weight, yy, ii, softcap)

    return _chunked_sum(fn, (flat,), y, ignore_index, chunk_size), (y != ignore_index).sum()


def _chunked_sum(fn, inputs: tuple[Tensor, ...], y: Tensor, ignore_index: int,
                 chunk_size: int | None) -> Tensor:
    n = y.shape[0]
    step = max(1, n if not chunk_size or chunk_size >= n else chunk_size)
    use_checkpoint = torch.is_grad_enabled() and step < n
    total = None
    for start in range(0, max(n, 1), step):
        args = (*(x[start : start + step] for x in inputs), y[start : start + step], ignore_index)
        part = (checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
                if use_checkpoint else fn(*args))
        total = part if total is None else total + part
    return total
