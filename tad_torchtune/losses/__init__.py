"""Distillation losses usable as torchtune ``_component_``s (DESIGN.md §1)."""

from tad_torchtune.losses._reduction import (
    VOCAB_ALIGNMENTS,
    DivergenceOutput,
    align_teacher_vocab,
)
from tad_torchtune.losses.base import Divergence
from tad_torchtune.losses.drkl import DRKLLoss
from tad_torchtune.losses.hidden import HiddenCosineLoss
from tad_torchtune.losses.kl import ForwardKLLoss, ReverseKLLoss
from tad_torchtune.losses.tad import TADLoss

__all__ = [
    "VOCAB_ALIGNMENTS",
    "DRKLLoss",
    "Divergence",
    "DivergenceOutput",
    "ForwardKLLoss",
    "HiddenCosineLoss",
    "ReverseKLLoss",
    "TADLoss",
    "align_teacher_vocab",
]
