"""Save a torchtune student as a Hugging Face checkpoint describing ITS architecture.

torchtune's ``FullModelHFCheckpointer.save_checkpoint`` converts weights with the numbers in the
TEACHER's (input) ``config.json`` and copies that file, so a pruned student would be written with
the teacher's depth, widths and head counts. ``save_hf_checkpoint`` reads the architecture from
the student module itself and writes ``model.safetensors`` plus a ``config.json`` that
``transformers.AutoModelForCausalLM.from_pretrained`` loads without extra code, and that
``FullModelHFCheckpointer`` (same ``model_type``) reads back, with the tokenizer files it needs
to encode text as training did (``prepended_bos_id``).
"""

import json
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torchtune.modules import TransformerDecoder
from torchtune.modules.tied_linear import TiedLinear

from tad_torchtune.common import DTYPES, full_tensor
from tad_torchtune.models._families import (
    FAMILIES,
    ModelFamily,
    family_for_model_type,
    get_family,
)

# Tokenizer and generation files worth carrying over from the teacher's (or base) folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
# One of them makes a tokenizer that transformers.AutoTokenizer can load.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Text encoded to see what a tokenizer puts around it.
_PROBE = "Hello world"


def prepended_bos_id(tokenizer: Any) -> int | None:
    """The BOS id a torchtune tokenizer puts first in every document it encodes for training
    (``encode(text, add_bos=True)``), or None where it puts none (Qwen2's tokenizer).

    ``save_hf_checkpoint(add_bos_id=...)`` takes it: torchtune's ``HuggingFaceBaseTokenizer``
    prepends its ``bos_id`` itself when the tokenizer.json does not (Phi-2's, the demo's), so the
    copied file alone would not.

    Args:
        tokenizer: a torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``bos_id``).

    Returns:
        The id, or None.
    """
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        return None
    return bos if tokenizer.encode(_PROBE, add_bos=True, add_eos=False)[:1] == [bos] else None


def _prepend_bos(folder: Path, bos_id: int) -> str | None:
    """Give ``folder``'s tokenizer.json a post-processor that puts ``bos_id`` first, where it
    adds no special token; its own post-processor (Phi-2's ``ByteLevel``) runs before.

    Returns:
        Why the folder's tokenizer cannot be made to prepend ``bos_id``, or None when it does.
    """
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        return "has no tokenizer.json in which to make transformers.AutoTokenizer prepend it"
    tok = Tokenizer.from_file(str(path))
    ids, bare = tok.encode(_PROBE).ids, tok.encode(_PROBE, add_special_tokens=False).ids
    if ids[:1] == [bos_id]:
        return None
    if ids != bare:
        return f"has a tokenizer.json that adds {sorted(set(ids) - set(bare))} instead"
    bos = tok.id_to_token(bos_id)
    if bos is None:
        return "has a tokenizer.json without that id"
    # the tokenizers JSON form of TemplateProcessing("<bos> $A", pair "<bos> $A <bos>:1 $B:1"),
    # written as such so that a token holding a space or a colon needs no template syntax
    def piece(kind: str, name: str, type_id: int) -> dict[str, Any]:
        return {kind: {"id": name, "type_id": type_id}}

    template = {
        "type": "TemplateProcessing",
        "single": [piece("SpecialToken", bos, 0), piece("Sequence", "A", 0)],
        "pair": [piece("SpecialToken", bos, 0), piece("Sequence", "A", 0),
                 piece("SpecialToken", bos, 1), piece("Sequence", "B", 1)],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    data = json.loads(path.read_text(encoding="utf-8"))
    old = data.get("post_processor")
    data["post_processor"] = (template if old is None
                              else {"type": "Sequence", "processors": [old, template]})
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return None


def _family_of(model: TransformerDecoder, model_type: str | None) -> ModelFamily:
    """The family that converts ``model``: from ``model_type`` (a checkpointer ``ModelType``
    name) or, for a ``pruned_student``, from its ``distill_spec``."""
    if model_type is not None:
        return family_for_model_type(model_type)
    spec = getattr(model, "distill_spec", None)
    if spec is None:
        raise ValueError(
            "model_type is required for a model not built by pruned_student (a torchtune "
            f"checkpointer ModelType name, e.g. one of "
            f"{sorted({f.checkpointer_model_type for f in FAMILIES.values()})})"
        )
    return get_family(spec.family)


# Wrapper prefixes that activation checkpointing, FSDP1 and torch.compile insert in module paths.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    for part in _WRAPPER_PARTS:
        while hasattr(module, part) and isinstance(getattr(module, part), torch.nn.Module):
            module = getattr(module, part)
    return module


def _clean_key(key: str) -> str:
    return ".".join(p for p in key.split(".") if p not in _WRAPPER_PARTS)


def hf_config_for(model: TransformerDecoder, base_config: Mapping[str, Any],
                  family: ModelFamily | None = None) -> dict[str, Any]:
    """``base_config`` with every architecture field replaced by ``model``'s own.

    Args:
        model: a torchtune ``TransformerDecoder`` (its modules are read, not its weights, so a
            meta or FSDP-sharded model works).
        base_config: the teacher's (or the pretrained student's) Hugging Face ``config.json``.
        family: the model's family (default: a ``pruned_student``'s), whose
            ``hf_config_extras`` add its own fields (Gemma2's soft-caps).

    Returns:
        The student's ``config.json`` as a dict.
    """
    layers = [_unwrap(layer) for layer in model.layers]
    attn = layers[0].attn
    dropped = ("_name_or_path", "transformers_version")
    cfg = {k: v for k, v in base_config.items() if k not in dropped}
    cfg.update(
        num_hidden_layers=len(layers),
        hidden_size=attn.embed_dim,
        num_attention_heads=attn.num_heads,
        num_key_value_heads=attn.num_kv_heads,
        intermediate_size=layers[0].mlp.w1.out_features,
        vocab_size=model.tok_embeddings.num_embeddings,
        tie_word_embeddings=isinstance(model.output, TiedLinear),
    )
    if "head_dim" in cfg or attn.head_dim != attn.embed_dim // attn.num_heads:
        cfg["head_dim"] = attn.head_dim
    cfg.pop("layer_types", None)  # per-layer list of the base depth; rebuilt below or by HF
    if family is None and getattr(model, "distill_spec", None) is not None:
        family = get_family(model.distill_spec.family)
    if family is not None and family.hf_config_extras is not None:
        family.hf_config_extras(model, cfg)
    return cfg


def _gathered_cpu_copy(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    t = full_tensor(t)  # a DTensor from an FSDP-sharded model is gathered
    # copy=True: never hand out (and later convert or cast) storage shared with a live parameter
    return t.detach().to(device="cpu", dtype=dtype or t.dtype, copy=True)


def save_hf_checkpoint(
    model: TransformerDecoder,
    output_dir: str | Path,
    *,
    base_config: Mapping[str, Any] | str | Path,
    model_type: str | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | str | None = None,
    copy_files_from: str | Path | Sequence[str | Path] | None = None,
    add_bos_id: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` for ``model`` in Hugging Face format.

    Args:
        model: the torchtune student. Its modules give the architecture; its weights are saved
            unless ``state_dict`` is given.
        output_dir: folder to write (created).
        base_config: the teacher's (or pretrained student's) HF config, as a dict, a path to a
            ``config.json`` or a folder holding one. Fields other than the architecture (rope
            scaling, eps, activation, token ids, ...) are kept from it.
        model_type: torchtune checkpointer ``ModelType`` name (``"QWEN2"``, ``"LLAMA3_2"``, ...);
            default: from ``model.distill_spec``.
        state_dict: torchtune-format weights to save instead of ``model.state_dict()``, e.g. the
            full state dict of an FSDP model gathered on rank 0 with
            ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
            cpu_offload=True))``. Without it, a sharded model's DTensors are gathered here, a
            collective that every rank must then enter.
        dtype: cast floating tensors to this (``torch.bfloat16`` or ``"bf16"``/``"fp32"``);
            None keeps their dtype.
        copy_files_from: folder, or folders in order of preference, whose tokenizer files
            (``TOKENIZER_FILES``) are copied alongside, so that the export opens with
            ``AutoTokenizer`` too: those of the first folder holding a vocabulary file
            (``VOCABULARY_FILES``); a warning when none does.
        add_bos_id: the BOS id that training's tokenizer put first in every document
            (``prepended_bos_id(tokenizer)``). Where the copied tokenizer.json adds nothing, it
            gets a post-processor that prepends it, so that ``AutoTokenizer(text).input_ids``
            equals the torchtune tokenizer's ``encode(text, add_eos=False)``; a tokenizer.json
            that already prepends it is copied unchanged, and one that cannot be made to (none
            copied, another special token added) gives a warning. None: files copied as they are.
        warn: called with each warning about the tokenizer files (a recipe's one-line warning);
            default: ``warnings.warn``, the message prefixed with ``save_hf_checkpoint:``.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        ValueError: if ``base_config`` is for another model family, ``dtype`` is unknown, or
            the model is an uncorrected torchtune Gemma2.
    """
    if isinstance(base_config, (str, Path)):
        path = Path(base_config)
        base_config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(
                f"dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}"
            )
        dtype = DTYPES[dtype]
    family = _family_of(model, model_type)
    if base_config.get("model_type") not in (None, family.hf_model_type):
        raise ValueError(
            f"base_config model_type={base_config.get('model_type')!r} does not match the "
            f"student's family {family.name!r} (Hugging Face model_type {family.hf_model_type!r})"
        )
    cfg = hf_config_for(model, base_config, family)

    source = model.state_dict() if state_dict is None else state_dict
    tensors = {
        _clean_key(k): _gathered_cpu_copy(v, dtype if v.is_floating_point() else None)
        for k, v in source.items()
    }
    hf_sd = {k: v.contiguous() for k, v in family.to_hf(tensors, cfg).items()}
    out_dtype = dtype or next(v.dtype for v in hf_sd.values() if v.is_floating_point())
    cfg["torch_dtype"] = cfg["dtype"] = str(out_dtype).removeprefix("torch.")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if warn is None:
        def warn(message: str) -> None:
            warnings.warn(f"save_hf_checkpoint: {message}", stacklevel=3)

    if copy_files_from is not None:
        folders = ([copy_files_from] if isinstance(copy_files_from, (str, Path))
                   else list(copy_files_from))
        # one tokenizer's files, never some of one and some of another
        source = next((Path(f) for f in folders
                       if any((Path(f) / name).is_file() for name in VOCABULARY_FILES)), None)
        if source is None:
            named = " nor ".join(repr(str(f)) for f in folders)
            warn(f"{named} holds none of {VOCABULARY_FILES}, so {str(out)!r} will not open "
                 f"with transformers.AutoTokenizer; put the tokenizer's files in "
                 f"{str(folders[0])!r}")
        else:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, out / name)
            problem = None if add_bos_id is None else _prepend_bos(out, add_bos_id)
            if problem is not None:
                warn(f"training's tokenizer put the BOS id {add_bos_id} before every document "
                     f"and {str(out)!r} {problem}; check that the exported model's inputs "
                     f"begin with it")
    return out


def read_hf_checkpoint(
    checkpoint_dir: str | Path, family: ModelFamily, files: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """The weights of a Hugging Face checkpoint folder in torchtune's keys, converted by
    ``family.from_hf`` with the folder's ``config.json``.

    Args:
        checkpoint_dir: folder with ``config.json`` and the weight files.
        family: the model family that converts the keys.
        files: weight files in the folder (``*.safetensors``, or ``*.bin``/``*.pt`` read with
            ``weights_only``); default: every ``*.safetensors`` there.

    Returns:
        The torchtune-format state dict.
    """
    folder = Path(checkpoint_dir)
    cfg = json.loads((folder / "config.json").read_text())
    paths = sorted(folder.glob("*.safetensors")) if files is None else [folder / f for f in files]
    hf_sd: dict[str, Tensor] = {}
    for path in paths:
        if path.suffix == ".safetensors":
            hf_sd.update(load_file(str(path)))
        else:
            hf_sd.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return family.from_hf(hf_sd, cfg)


def load_hf_checkpoint(
    model: TransformerDecoder, checkpoint_dir: str | Path, *, model_type: str | None = None,
    files: list[str] | None = None, family: ModelFamily | None = None,
) -> None:
    """Load a checkpoint written by ``save_hf_checkpoint`` (or any single-folder HF checkpoint
    in safetensors) into a torchtune model of the same architecture, strictly.

    ``tad_torchtune.models.HFCheckpointer(checkpoint_dir, checkpoint_files=["model.safetensors"],
    model_type=..., output_dir=...)`` reads the same folder (and, for the families torchtune
    knows, so does ``FullModelHFCheckpointer``); this is the short form.

    Args:
        model: torchtune model built with the checkpoint's architecture.
        checkpoint_dir: folder with ``config.json`` and ``*.safetensors``.
        model_type: a registered family's checkpointer model type (``"QWEN2"``, ``"PHI2"``);
            default from ``model.distill_spec``.
        files: the weight files to read (default: every ``*.safetensors`` in the folder).
        family: the family that converts the weights (default: from ``model_type``).
    """
    family = family if family is not None else _family_of(model, model_type)
    model.load_state_dict(read_hf_checkpoint(checkpoint_dir, family, files), strict=True)
