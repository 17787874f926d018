"""The student's causal-LM cross-entropy, chunked over tokens so no [N, V] float32 copy exists.

Per token ``CE = LSE(z) - z_y`` on the student's logits ``z`` (no temperature). On materialised
logits it runs through the engine's unfused reduction (``engine.reduce_chunks``); from hidden
states it is the fused head's cross-entropy term (``fused.fused_head``), computed in the same
chunk as the divergence, from one projection.
"""

import torch.nn.functional as F
from torch import Tensor

from tad_torchtune.common import IGNORE_INDEX
from tad_torchtune.losses.engine import DEFAULT_CHUNK_SIZE, reduce_chunks


def ce_chunk(s: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token cross-entropy ``[n]`` of a chunk ``[n, V]`` of (upcast) logits."""
    return F.cross_entropy(s, labels, reduction="none"), {}


def chunked_cross_entropy(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
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
    out = reduce_chunks(ce_chunk, (logits,), labels, ignore_index=ignore_index,
                        chunk_size=chunk_size)
    return out.total, out.num_tokens


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` (optionally soft-capped) without ever holding the
    full logits: the fused head with the cross-entropy alone (one projection per chunk, both
    gradients in the forward pass).

    Args:
        hidden: ``[..., D]`` final (normed) hidden states.
        weight: ``[V, D]`` output projection.
        labels: ``[...]``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` when set.
        ignore_index, chunk_size: as ``chunked_cross_entropy``.

    Returns:
        ``(sum, count)`` as ``chunked_cross_entropy``.
    """
    from tad_torchtune.losses.fused import fused_head

    out = fused_head(hidden, weight, labels, student_softcap=softcap, ignore_index=ignore_index,
                     chunk_size=chunk_size)
    return out.objective, out.num_tokens
