"""Loading a checkpoint into a model: the one home every recipe, config and benchmark calls.

- ``checkpoint_state``: the torchtune-format state dict a checkpointer node loads, its files
  checked first (a missing or truncated file named in one line).
- ``load_teacher``: a frozen teacher from its model and checkpointer nodes (the family's fix-up,
  Gemma2's, applied with the checkpoint's own ``config.json``).
- ``load_student``: a student initialised from its teacher's weights (a ``pruned_student``) or
  from a checkpoint of its own, with the Hugging Face folder its export derives from.
- ``load_hf_folder`` / ``hf_decoder``: any Hugging Face folder of a registered family (an
  exported student, a teacher), built from its ``config.json`` alone.
- ``vocab_size_of``: the output vocabulary of a model node, built on the meta device.
"""

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from tad_torchtune.errors import check_checkpoint_files, instantiate
from tad_torchtune.models._export import load_hf_checkpoint
from tad_torchtune.models._families import build_model, model_from_hf_config
from tad_torchtune.models._forward import output_weight
from tad_torchtune.models._student import init_student_from_teacher


def _dtype_context(dtype: torch.dtype):
    from torchtune import training

    return training.set_default_dtype(dtype)


def hf_config_of(checkpointer: Mapping[str, Any] | DictConfig) -> dict[str, Any] | None:
    """The ``config.json`` of a Hugging Face checkpointer node's folder, if it has one."""
    path = Path(str(checkpointer.get("checkpoint_dir", ""))).expanduser() / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_state(checkpointer: DictConfig, key: str) -> dict[str, Tensor]:
    """The torchtune-format state dict of a checkpointer node (``teacher_checkpointer``, ...).

    Raises:
        ConfigError: naming ``key``, for a missing or truncated file or a bad argument.
    """
    from torchtune import training

    check_checkpoint_files(checkpointer, key)
    return instantiate(checkpointer, key).load_checkpoint()[training.MODEL_KEY]


def state_vocab_size(state: Mapping[str, Tensor]) -> int:
    """Rows of a torchtune state dict's output projection (its embedding table when tied)."""
    return state.get("output.weight", state.get("tok_embeddings.weight")).shape[0]


def load_teacher(model: DictConfig, checkpointer: DictConfig, *, device: torch.device,
                 dtype: torch.dtype, state: dict[str, Tensor] | None = None,
                 key: str = "teacher_checkpointer") -> nn.Module:
    """A frozen teacher (eval mode, no gradients) on ``device`` in ``dtype``.

    Args:
        model: the teacher's model node (``teacher_model``).
        checkpointer: its checkpointer node; its folder's ``config.json`` feeds the fix-up.
        state: the state dict, when the caller has loaded it already (``checkpoint_state``).
        key: the checkpointer's config key, named by errors.
    """
    state = checkpoint_state(checkpointer, key) if state is None else state
    with _dtype_context(dtype):
        teacher, _ = build_model(model, hf_config_of(checkpointer))
    teacher.load_state_dict(state)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def load_student(model: DictConfig, *, teacher_state: dict[str, Tensor],
                 teacher_checkpointer: DictConfig, student_checkpointer: DictConfig | None,
                 device: torch.device, dtype: torch.dtype, seed: int
                 ) -> tuple[nn.Module, Path, str]:
    """The student in training mode: a ``pruned_student`` initialised from its teacher's
    weights (``init_student_from_teacher``), or any builder loaded from its own checkpointer.

    Fresh weights come from ``torch.manual_seed(seed)``: the same on every rank, because FSDP
    shards each rank's local copy (torchtune's ``set_seed`` gives each rank seed + rank).

    Returns:
        ``(student, hf_dir, model_type)``: the Hugging Face folder (config.json, tokenizer files)
        and checkpointer model type its export derives from.
    """
    torch.manual_seed(seed)
    source = student_checkpointer or teacher_checkpointer
    with _dtype_context(dtype):
        student, _ = build_model(model, hf_config_of(source))
    if getattr(student, "distill_spec", None) is not None:
        source = teacher_checkpointer
        init_student_from_teacher(student, teacher_state)
    elif student_checkpointer is not None:
        student.load_state_dict(checkpoint_state(student_checkpointer, "student_checkpointer"))
    student.to(device).train()
    return student, Path(str(source.checkpoint_dir)), str(source.model_type)


def vocab_size_of(model: DictConfig) -> int:
    """The output vocabulary of a model node, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        built, _ = build_model(model)
    return output_weight(built).shape[0]


def _folder(checkpoint_dir: str | Path, where: str) -> tuple[Path, dict[str, Any]]:
    from tad_torchtune.data import resolve_asset

    folder = Path(resolve_asset(str(checkpoint_dir))).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{where}.checkpoint_dir: {str(folder)!r} has no config.json")
    return folder, json.loads((folder / "config.json").read_text())


def hf_decoder(checkpoint_dir: str) -> nn.Module:
    """The torchtune decoder (random weights) that the ``config.json`` in ``checkpoint_dir``
    describes, for any registered model family: a model ``_component_`` for configs of other
    recipes (``tad_eleuther_eval``) that load the weights with a checkpointer themselves."""
    _, hf = _folder(checkpoint_dir, "model")
    return model_from_hf_config(hf, where="model.checkpoint_dir")[0]


def load_hf_folder(spec: Mapping[str, Any] | DictConfig | str | Path, *, where: str,
                   device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model of a Hugging Face folder, in eval mode on ``device`` in ``dtype``.

    Args:
        spec: the folder, or ``{checkpoint_dir, checkpoint_files?, model?, model_type?}``:
            by default the model is built from ``config.json`` by its registered family and
            every ``*.safetensors`` file is converted by that family; with ``model`` (a builder
            node) and ``model_type`` (a torchtune checkpointer model type) torchtune's
            ``FullModelHFCheckpointer`` converts the files instead.
        where: the config key of ``spec``, named by errors.

    Raises:
        ValueError: naming ``where``, for a folder without config.json or weights, or a model
            no registered family builds.
    """
    if isinstance(spec, (str, Path)):
        spec = {"checkpoint_dir": str(spec)}
    if spec is None or spec.get("checkpoint_dir") is None:
        raise ValueError(f"{where}.checkpoint_dir: required (a Hugging Face checkpoint folder)")
    folder, hf = _folder(spec["checkpoint_dir"], where)
    files = spec.get("checkpoint_files")
    files = list(files) if files is not None else sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{where}.checkpoint_dir: no *.safetensors file in {str(folder)!r}")
    check_checkpoint_files({"checkpoint_dir": str(folder), "checkpoint_files": files}, where)
    if spec.get("model") is None:
        model, family = model_from_hf_config(hf, where=f"{where}.checkpoint_dir")
        load_hf_checkpoint(model, folder, files=files, family=family)
    else:
        if spec.get("model_type") is None:
            raise ValueError(f"{where}.model_type: required when {where}.model is given "
                             "(e.g. LLAMA3)")
        node = spec["model"]
        model, _ = build_model(node if isinstance(node, DictConfig) else OmegaConf.create(node), hf)
        model.load_state_dict(_torchtune_hf_state(folder, files, str(spec["model_type"])))
    return model.to(device=device, dtype=dtype).eval()


def _torchtune_hf_state(folder: Path, files: list[str], model_type: str) -> dict[str, Tensor]:
    import tempfile

    from torchtune import training

    # The checkpointer insists on an output folder; nothing is written there while loading.
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(folder), checkpoint_files=files, model_type=model_type,
            output_dir=tmp)
        return checkpointer.load_checkpoint()[training.MODEL_KEY]
