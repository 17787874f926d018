"""Hidden-state cosine loss (DistilBERT-style), used by the paper for its larger teachers."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tad_torchtune.common import compute_dtype
from tad_torchtune.losses.engine import DivergenceOutput


class HiddenCosineLoss(nn.Module):
    """``1 - cos(h_S(t), h_T(t))`` averaged over valid tokens.

    Computed in float32 (float64 stays float64). Ignored positions (label ``ignore_index``) may hold
    any value; they contribute nothing. 0 with zero gradient when no token is valid.

    Args:
        ignore_index: label value of tokens that do not count.
    """

    def __init__(self, *, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)

    def sum_and_count(
        self, student_hidden: Tensor, teacher_hidden: Tensor, labels: Tensor
    ) -> DivergenceOutput:
        """Args and shapes as ``forward``; returns the un-normalised sum and the token count."""
        if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
            raise ValueError(
                f"hidden widths differ: student {student_hidden.shape[-1]}, teacher "
                f"{teacher_hidden.shape[-1]}; the cosine loss needs equal embed_dim"
            )
        if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
            raise ValueError(
                f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} must "
                f"be [B, T, D] with [B, T] = labels shape {tuple(labels.shape)}"
            )
        dtype = compute_dtype(student_hidden.dtype)
        valid = labels != self.ignore_index
        rows = valid.unsqueeze(-1)
        s = torch.where(rows, student_hidden.to(dtype), 1.0)
        t = torch.where(rows, teacher_hidden.detach().to(dtype), 1.0)
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        total = torch.where(valid, per_token, per_token.new_zeros(())).sum()
        return DivergenceOutput(total=total, num_tokens=valid.sum())

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, labels: Tensor) -> Tensor:
        """Mean cosine distance over valid tokens.

        Args:
            student_hidden: ``[B, T, D]``.
            teacher_hidden: ``[B, T, D]``.
            labels: ``[B, T]``.

        Returns:
            Scalar tensor.
        """
        return self.sum_and_count(student_hidden, teacher_hidden, labels).mean()
