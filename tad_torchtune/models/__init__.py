"""Students built from teachers, model forward helpers and Hugging Face export."""

from tad_torchtune.models._forward import (
    apply_softcap,
    forward_hidden,
    logit_softcap,
    output_weight,
    project_logits,
)

__all__ = ["apply_softcap", "forward_hidden", "logit_softcap", "output_weight", "project_logits"]
