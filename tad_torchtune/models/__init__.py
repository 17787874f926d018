"""Students built from teachers, model families, loading checkpoints into models, forward
helpers and Hugging Face export."""

from tad_torchtune.models._checkpointer import HFCheckpointer, checkpoint_file_names
from tad_torchtune.models._export import (
    hf_config_for,
    load_hf_checkpoint,
    prepended_bos_id,
    read_hf_checkpoint,
    save_hf_checkpoint,
)
from tad_torchtune.common import apply_softcap
from tad_torchtune.models._families import (
    FAMILIES,
    ModelFamily,
    NotThisFamily,
    build_model,
    family_for_model_type,
    get_family,
    model_from_hf_config,
    register_family,
    resolve_teacher,
)
from tad_torchtune.models._forward import (
    forward_hidden,
    logit_softcap,
    output_bias,
    output_weight,
    project_logits,
    supports_flex_attention,
)
from tad_torchtune.models._gemma2 import Gemma2HFLayer, correct_gemma2
from tad_torchtune.models._window import sliding_window
from tad_torchtune.models.loading import (
    checkpoint_state,
    hf_decoder,
    load_hf_folder,
    load_student,
    load_teacher,
    vocab_size_of,
)
from tad_torchtune.models._phi2 import (
    PartialRotaryPositionalEmbeddings,
    PhiParallelLayer,
    phi2,
    phi2_2_7b,
)
from tad_torchtune.models._student import (
    DistillSpec,
    evenly_spaced_layers,
    init_student_from_teacher,
    pruned_student,
)
from tad_torchtune.vocab import check_vocab_compat

__all__ = [
    "FAMILIES",
    "DistillSpec",
    "Gemma2HFLayer",
    "HFCheckpointer",
    "ModelFamily",
    "NotThisFamily",
    "PartialRotaryPositionalEmbeddings",
    "PhiParallelLayer",
    "apply_softcap",
    "build_model",
    "check_vocab_compat",
    "correct_gemma2",
    "evenly_spaced_layers",
    "family_for_model_type",
    "forward_hidden",
    "get_family",
    "checkpoint_file_names",
    "checkpoint_state",
    "hf_decoder",
    "load_hf_folder",
    "load_student",
    "load_teacher",
    "vocab_size_of",
    "hf_config_for",
    "init_student_from_teacher",
    "load_hf_checkpoint",
    "logit_softcap",
    "model_from_hf_config",
    "output_bias",
    "output_weight",
    "phi2",
    "phi2_2_7b",
    "prepended_bos_id",
    "project_logits",
    "pruned_student",
    "read_hf_checkpoint",
    "register_family",
    "resolve_teacher",
    "save_hf_checkpoint",
    "sliding_window",
    "supports_flex_attention",
]
