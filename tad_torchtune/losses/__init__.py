"""Distillation losses usable as torchtune ``_component_``s (``docs/design.md``).

Every divergence registers itself in ``DIVERGENCES`` (name -> class) when imported here; a new one
is a module with one ``Divergence`` subclass plus its line below.
"""

from tad_torchtune.losses.base import DIVERGENCES, Divergence
from tad_torchtune.losses.drkl import DRKLLoss
from tad_torchtune.losses.engine import DivergenceOutput
from tad_torchtune.losses.hidden import HiddenCosineLoss
from tad_torchtune.losses.kl import ForwardKLLoss, ReverseKLLoss
from tad_torchtune.losses.tad import TADLoss
from tad_torchtune.vocab import VOCAB_ALIGNMENTS, align_teacher_vocab

__all__ = [
    "DIVERGENCES",
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
