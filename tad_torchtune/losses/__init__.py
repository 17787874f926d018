"""Distillation losses usable as torchtune ``_component_``s (``docs/design.md``).

Every divergence registers itself in ``DIVERGENCES`` (name -> class) when imported here; a new one
is a module with one ``Divergence`` subclass plus its line below.
"""

from tad_torchtune.losses.base import (
    CACHE_MODES,
    DIVERGENCES,
    CacheSpec,
    Divergence,
    DivergenceUse,
    TailWeight,
)
from tad_torchtune.losses.drkl import DRKLLoss
from tad_torchtune.losses.engine import DEFAULT_CHUNK_SIZE, DivergenceOutput
from tad_torchtune.losses.hidden import HiddenCosineLoss
from tad_torchtune.losses.kl import ForwardKLLoss, ReverseKLLoss
from tad_torchtune.losses.tad import TADLoss
from tad_torchtune.vocab import align_teacher_vocab

__all__ = [
    "CACHE_MODES",
    "DEFAULT_CHUNK_SIZE",
    "DIVERGENCES",
    "CacheSpec",
    "DRKLLoss",
    "Divergence",
    "DivergenceOutput",
    "DivergenceUse",
    "ForwardKLLoss",
    "HiddenCosineLoss",
    "ReverseKLLoss",
    "TADLoss",
    "TailWeight",
    "align_teacher_vocab",
]
