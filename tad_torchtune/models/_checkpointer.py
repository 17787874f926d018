"""A read-only Hugging Face checkpointer for every registered model family.

torchtune's ``FullModelHFCheckpointer`` converts weights by its own ``ModelType`` enum, so it
cannot read a family torchtune does not have (Phi-2). ``HFCheckpointer`` takes the same
constructor keywords and converts by the registered family (``ModelFamily.from_hf``) instead,
so a config swaps one ``_component_`` line::

    teacher_checkpointer:
      _component_: tad_torchtune.models.HFCheckpointer
      checkpoint_dir: /tmp/phi-2
      checkpoint_files: [model-00001-of-00002.safetensors, model-00002-of-00002.safetensors]
      model_type: PHI2
      output_dir: ${output_dir}/teacher
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
import torch
from torch import Tensor
from torchtune import training
from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

from tad_torchtune.models._export import read_hf_checkpoint
from tad_torchtune.models._families import (
    FAMILIES,
    ModelFamily,
    family_for_model_type,
    model_from_hf_config,
)


def _family(folder: Path, model_type: str | None) -> ModelFamily:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"checkpoint_dir: {str(folder)!r} has no config.json")
    hf = json.loads(path.read_text())
    if model_type is None:
        with torch.device("meta"):  # the family is what is wanted: build nothing real
            return model_from_hf_config(hf, where=str(path))[1]
    try:
        family = family_for_model_type(model_type)
    except ValueError:
        accepted = sorted({f.checkpointer_model_type for f in FAMILIES.values()})
        raise ValueError(f"model_type: {model_type!r} is not a registered family's; accepted: "
                         f"{accepted} or null (from config.json)") from None
    if hf.get("model_type") != family.hf_model_type:
        raise ValueError(f"model_type: {model_type} converts Hugging Face model_type "
                         f"{family.hf_model_type!r}, but {str(path)!r} says "
                         f"{hf.get('model_type')!r}")
    return family


def checkpoint_file_names(files: Sequence[str] | Mapping[str, str] | None) -> list[str]:
    """A checkpointer's ``checkpoint_files``, a list or torchtune's ``{filename_format,
    max_filename}`` form, as the names of the files it reads."""
    if isinstance(files, Mapping):
        files = FormattedCheckpointFiles.from_dict(dict(files)).build_checkpoint_filenames()
    if isinstance(files, str):  # one name, not its letters (errors.check_checkpoint_files
        return [files]  # refuses it where the checkpointer is built)
    return [str(f) for f in files or []]


class HFCheckpointer:
    """Read a Hugging Face checkpoint folder into torchtune's keys, for any registered family.

    A drop-in for ``torchtune.training.FullModelHFCheckpointer`` where only the model weights are
    read (a teacher, a student's starting point); saving is ``save_hf_checkpoint``'s.

    Args:
        checkpoint_dir: folder with ``config.json`` and the weight files.
        checkpoint_files: the weight files (``*.safetensors``, or ``*.bin``), or torchtune's
            ``{filename_format, max_filename}`` form.
        model_type: a registered family's checkpointer model type (``"PHI2"``, ``"QWEN2"``, ...);
            None: the family that builds the folder's ``config.json``
            (``model_from_hf_config``).
        output_dir: accepted for torchtune's signature; nothing is written.
        adapter_checkpoint, recipe_checkpoint, resume_from_checkpoint, should_load_recipe_state:
            torchtune's resume options; refused when set (nothing but weights is read here).
        safe_serialization: accepted for torchtune's signature (it concerns saving).

    Raises:
        ValueError: naming the argument: an unknown ``model_type``, one of another Hugging Face
            ``model_type`` than ``config.json``'s, a folder without ``config.json``, a resume
            option.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Sequence[str] | Mapping[str, str],
        model_type: str | None = None,
        output_dir: str | None = None,
        adapter_checkpoint: str | None = None,
        recipe_checkpoint: str | None = None,
        resume_from_checkpoint: bool = False,
        safe_serialization: bool = True,
        should_load_recipe_state: bool = False,
    ) -> None:
        resume = {"adapter_checkpoint": adapter_checkpoint, "recipe_checkpoint": recipe_checkpoint,
                  "resume_from_checkpoint": resume_from_checkpoint,
                  "should_load_recipe_state": should_load_recipe_state}
        for name, value in resume.items():
            if value:
                raise ValueError(f"{name}: HFCheckpointer reads model weights only, got {value!r}; "
                                 f"use torchtune's FullModelHFCheckpointer to resume its runs")
        self._folder = Path(checkpoint_dir).expanduser()
        self._files = checkpoint_file_names(checkpoint_files)
        self.family = _family(self._folder, model_type)

    def load_checkpoint(self) -> dict[str, dict[str, Tensor]]:
        """``{"model": state dict in torchtune's keys}``, as torchtune's checkpointers return."""
        return {training.MODEL_KEY: read_hf_checkpoint(self._folder, self.family, self._files)}
