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

Every model is built on the meta device and its weights loaded after (``load_weights``): no random
initialisation of weights a checkpoint replaces (20 s for a 3B teacher on a 2-core CPU), and no
copy of the whole model on the device before FSDP shards it. ``prepare`` (``parallel.parallelize``)
runs on the empty model, so a rank then receives only its shards; with ``from_rank0`` rank 0
alone holds the checkpoint and broadcasts it (``docs/design.md``, "Loading").
"""

import json
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from tad_torchtune.errors import ConfigError, check_checkpoint_files, instantiate
from tad_torchtune.models._export import read_hf_checkpoint
from tad_torchtune.models._families import build_model, check_max_seq_len, model_from_hf_config
from tad_torchtune.models._forward import logit_softcap, output_weight
from tad_torchtune.models._student import init_student_from_teacher
from tad_torchtune.parallel import on_rank0


def _dtype_context(dtype: torch.dtype):
    from torchtune import training

    return training.set_default_dtype(dtype)


#: what ``load_teacher`` / ``load_student`` run on the model while it is still on the meta device
Prepare = Callable[[nn.Module], object]


def _local_shard(full: Tensor, like: DTensor, device: torch.device) -> DTensor:
    """This rank's part of ``full`` as a DTensor placed like ``like`` (a parameter sharded by
    ``fully_shard``), on ``device``: cut where ``full`` is (the host; the device, where rank 0
    broadcast it), so from the host only the shard reaches the mesh's device (the whole tensor
    does only for placements other than FSDP's ``Shard(0)``)."""
    mesh, placements = like.device_mesh, tuple(like.placements)
    on_mesh = torch.device(mesh.device_type)
    if mesh.ndim != 1 or placements != (Shard(0),):
        shard = distribute_tensor(full.to(on_mesh), mesh, placements, src_data_rank=None)
    else:
        # Shard(0)'s own split: torch.chunk, and an empty part for ranks past the last chunk
        parts = torch.chunk(full, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        local = parts[rank] if rank < len(parts) else full.new_empty((0, *full.shape[1:]))
        # a contiguous copy of its own (never a view keeping the whole host tensor alive), on
        # the mesh's device, where from_local would move it anyway
        local = torch.empty(local.shape, dtype=local.dtype, device=on_mesh).copy_(local)
        whole = torch.empty(full.shape, device="meta")  # the strides of a contiguous whole
        shard = DTensor.from_local(local, mesh, placements, run_check=False, shape=whole.shape,
                                   stride=whole.stride())
    # FSDP's CPU offload: a host shard of a GPU mesh, moved as a DTensor (its device is then the
    # host's, which FSDP checks at its first forward)
    return shard if shard.device.type == torch.device(device).type else shard.to(device)


def check_fits(entries: Mapping[str, tuple[int, ...]], targets: Mapping[str, Tensor],
               where: str) -> None:
    """Check that a state dict of these ``{name: shape}`` loads strictly into a model of
    ``targets`` (its ``state_dict()``; a DTensor's shape is the whole tensor's).

    Raises:
        ConfigError: naming ``where`` and up to three weights of each kind that do not fit:
            missing, unexpected, or of another shape.
    """
    problems = []
    missing = [n for n in targets if n not in entries]
    unexpected = [n for n in entries if n not in targets]
    shapes = [f"{n} {tuple(entries[n])} in the checkpoint, {tuple(t.shape)} in the model"
              for n, t in targets.items() if n in entries and tuple(entries[n]) != tuple(t.shape)]
    for what, names in (("missing", missing), ("unexpected", unexpected),
                        ("of another shape", shapes)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{len(names)} {what}: {', '.join(names[:3])}{more}")
    if problems:
        raise ConfigError(f"{where}: the checkpoint does not fit the model built for it ("
                          f"{'; '.join(problems)}); the model's arguments must be those of the "
                          f"checkpoint's config.json")


def _from_rank0(state: Mapping[str, Tensor] | None, targets: Mapping[str, Tensor],
                device: torch.device, where: str):
    """``state``'s items, read by rank 0 and broadcast one tensor at a time on ``device``: every
    rank gets rank 0's names in rank 0's order (so the same collectives run everywhere), each
    whole tensor in its target's dtype, held only while its shard is cut; first the names and
    shapes, which every rank checks (``check_fits``)."""
    names = [None]
    if dist.get_rank() == 0:
        names = [[(name, tuple(v.shape), v.dtype) for name, v in state.items()]]
    dist.broadcast_object_list(names, src=0)
    check_fits({name: shape for name, shape, _ in names[0]}, targets, where)
    for name, shape, dtype in names[0]:
        target = targets.get(name)
        if target is not None and dtype.is_floating_point:
            dtype = target.dtype
        if dist.get_rank() == 0:  # contiguous: a collective refuses a converted view
            full = state[name].to(device=device, dtype=dtype).contiguous()
        else:
            full = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(full, src=0)
        yield name, full
        del full  # before the next one is allocated (the caller drops its own reference)


@torch.no_grad()
def load_weights(model: nn.Module, state: Mapping[str, Tensor] | None, *, device: torch.device,
                 dtype: torch.dtype, shard_device: torch.device | None = None,
                 from_rank0: bool = False, where: str = "state dict") -> nn.Module:
    """Load a whole (torchtune-format) state dict into a model built on the meta device, strictly.

    Each parameter becomes the checkpoint's tensor in the meta parameter's dtype, on ``device``;
    a parameter ``fully_shard`` has sharded receives only this rank's shard, on
    ``shard_device`` (default ``device``). The buffers a state dict lacks (RoPE caches) are then
    built on ``device`` by their modules' ``rope_init``, under ``dtype`` as the default dtype, as
    a build on the device would have. The result equals building the model on the device and
    loading ``state`` into it, bit for bit, without the random initialisation or the whole model
    on any device.

    Args:
        model: parameters and buffers on the meta device (built under ``torch.device("meta")``),
            possibly sharded by ``fully_shard`` (the meta shards give each parameter's placement).
        state: the full state dict; host tensors, of any floating dtype. With ``from_rank0``,
            rank 0's (the other ranks' is not read: ``None``).
        device: where the parameters go and the buffers are built.
        dtype: the default dtype of the model's build.
        shard_device: where sharded parameters go instead (the host, for FSDP's CPU offload).
        from_rank0: rank 0 alone holds ``state`` and broadcasts it tensor by tensor on
            ``device``; every rank keeps its shards (host memory: one checkpoint per machine,
            not one per process).
        where: the config key of the checkpoint, named by errors.

    Raises:
        ConfigError: naming ``where``, for missing, unexpected or misshapen weights (on every
            rank alike), before any weight is placed (``check_fits``).
        RuntimeError: naming what is still on the meta device after the load.
    """
    shards_on = torch.device(shard_device if shard_device is not None else device)
    targets = model.state_dict()
    placed = {}
    if not from_rank0:
        check_fits({name: tuple(v.shape) for name, v in state.items()}, targets, where)
    items = (_from_rank0(state, targets, torch.device(device), where) if from_rank0
             else state.items())
    for name, value in items:
        target = targets.get(name)
        if target is not None and value.is_floating_point():
            value = value.to(target.dtype)
        if isinstance(target, DTensor):
            placed[name] = _local_shard(value, target, shards_on)
        else:  # contiguous, as a parameter built by the model (a converted view may not be)
            placed[name] = value.to(device).contiguous()
        del value  # a broadcast whole tensor: one on the device at a time
    model.load_state_dict(placed, strict=True, assign=True)
    with _dtype_context(dtype), torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    empty = [name for name, t in chain(model.named_parameters(), model.named_buffers())
             if t.is_meta]
    if empty:
        raise RuntimeError(f"still on the meta device after loading the weights: {empty[:4]} "
                           "(a buffer its module cannot rebuild with rope_init)")
    return model


def hf_config_of(checkpointer: Mapping[str, Any] | DictConfig) -> dict[str, Any] | None:
    """The ``config.json`` of a Hugging Face checkpointer node's folder, if it has one."""
    path = Path(str(checkpointer.get("checkpoint_dir", ""))).expanduser() / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


#: component-builder arguments a model must share with the config.json of the checkpoint loaded
#: into it: the weights' shapes, and what changes their function without changing a shape (the
#: norms' epsilon, RoPE's base and Llama 3's scaling); max_seq_len may differ
MUST_MATCH_CHECKPOINT = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim",
                         "intermediate_dim", "head_dim", "tie_word_embeddings", "norm_eps",
                         "rope_base", "scale_factor")


def check_checkpointer_model_type(checkpointer: Mapping[str, Any] | DictConfig,
                                  hf: Mapping[str, Any], *, checkpointer_key: str) -> None:
    """Check that a checkpointer node's ``model_type`` (when set) converts the weights of the
    Hugging Face ``model_type`` of its folder's config.json ``hf``: another family's conversion
    fails on a key, or loads silently reordered weights (Llama's q/k permutation under QWEN2).

    Raises:
        ConfigError: naming ``checkpointer_key.model_type``, its value, config.json's and the
            model types accepted for it.
    """
    from torchtune.training import ModelType

    from tad_torchtune.models._families import FAMILIES

    model_type = checkpointer.get("model_type")
    if model_type is None:
        return
    where = str(Path(str(checkpointer.get("checkpoint_dir"))).expanduser() / "config.json")
    kind = hf.get("model_type")
    fitting = sorted({f.checkpointer_model_type for f in FAMILIES.values()
                      if f.hf_model_type == kind})
    known = {m.name for m in ModelType} | {f.checkpointer_model_type for f in FAMILIES.values()}
    if str(model_type) not in known and str(model_type).upper() not in known:
        raise ConfigError(f"{checkpointer_key}.model_type: {model_type!r} is not a "
                          f"checkpointer model type; accepted: {sorted(known)}")
    converts = {f.hf_model_type for f in FAMILIES.values()
                if f.checkpointer_model_type == str(model_type).upper()}
    if converts and kind not in converts:
        raise ConfigError(
            f"{checkpointer_key}.model_type: {model_type} converts the weights of Hugging "
            f"Face model_type {' or '.join(map(repr, sorted(converts)))}, but {where} says "
            f"{kind!r}; accepted for it: {fitting or 'no registered family'}")


def check_student_source(model: Mapping[str, Any] | DictConfig,
                         teacher_checkpointer: Mapping[str, Any] | DictConfig) -> None:
    """Check, before anything is built, that a student without a checkpointer of its own can be
    exported: its export starts from the teacher's ``config.json`` (the architecture the
    student's), which cannot describe a model of another Hugging Face model type (that export
    would fail after training). A ``pruned_student`` is of its teacher's type.

    Raises:
        ConfigError: naming ``student_model``, both model types and what is accepted.
    """
    from tad_torchtune.models._families import resolve_teacher

    hf = hf_config_of(teacher_checkpointer)
    if str(model.get("_component_", "")).endswith("pruned_student") or hf is None:
        return
    try:
        family = resolve_teacher(model, key="student_model")[0]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if family.hf_model_type != hf.get("model_type"):
        raise ConfigError(
            f"student_model: a {family.name} student (Hugging Face model_type "
            f"{family.hf_model_type!r}) without a student_checkpointer is exported on the "
            f"teacher's config.json, of model_type {hf.get('model_type')!r}, which cannot "
            f"describe it; accepted: a student of the teacher's model type, or a "
            f"student_checkpointer with the student's own folder")


def check_model_fits_checkpoint(model: Mapping[str, Any] | DictConfig,
                                checkpointer: Mapping[str, Any] | DictConfig, *,
                                model_key: str, checkpointer_key: str
                                ) -> dict[str, Any] | None:
    """Check, before anything is read or built, that a checkpointer node's ``model_type`` and
    model node describe the Hugging Face checkpoint in its folder (its ``config.json``): a
    wrong one would otherwise load (a ``model_type`` that converts another family's weights
    reorders them; a wrong RoPE base or norm epsilon changes no shape) and train on a different
    model than the checkpoint's. A ``pruned_student`` node (whose arguments are its teacher's)
    and a folder without ``config.json`` are left to the load.

    Returns:
        The model node's component-builder arguments (``resolve_teacher``; None for a
        ``pruned_student``), for the caller's other checks.

    Raises:
        ConfigError: naming the checkpointer's ``model_type`` or the model node's key, the value
            and the checkpoint's.
    """
    from tad_torchtune.models._families import NotThisFamily, resolve_teacher

    pruned = str(model.get("_component_", "")).endswith("pruned_student")
    family, kwargs = None, None
    if not pruned:
        try:
            family, kwargs = resolve_teacher(model, key=model_key)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    hf = hf_config_of(checkpointer)
    if hf is None:
        return kwargs
    where = str(Path(str(checkpointer.get("checkpoint_dir"))).expanduser() / "config.json")
    kind = hf.get("model_type")
    check_checkpointer_model_type(checkpointer, hf, checkpointer_key=checkpointer_key)
    if pruned:
        return None
    component = model.get("_component_")
    if family.hf_model_type != kind:
        raise ConfigError(f"{model_key}._component_: {component} builds a {family.name} model "
                          f"(Hugging Face model_type {family.hf_model_type!r}), but {where} says "
                          f"{kind!r}")
    try:
        expected = family.kwargs_from_hf_config(hf)
    except NotThisFamily as err:
        raise ConfigError(f"{model_key}._component_: {component} cannot build the model of "
                          f"{where}: {err}") from None
    built = dict(kwargs)
    for side in (built, expected):  # a head_dim of None: embed_dim // num_heads
        if "head_dim" in side and side["head_dim"] is None and side.get("num_heads"):
            side["head_dim"] = side["embed_dim"] // side["num_heads"]
    for name in MUST_MATCH_CHECKPOINT:
        if name not in built or name not in expected:
            continue
        ours, theirs = built[name], expected[name]
        if ours is None or theirs is None:  # the builder's own rule (llama2's MLP width)
            continue
        same = (ours == theirs if isinstance(ours, (bool, str))
                else abs(float(ours) - float(theirs)) <= 1e-6 * abs(float(theirs)))
        if not same:
            key = f"{model_key}.{name}" if name in model else f"{model_key}._component_"
            raise ConfigError(f"{key}: {component} builds {name}={ours!r}, but {where} gives "
                              f"{theirs!r}: the model must be the checkpoint's")
    return kwargs


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
                 key: str = "teacher_checkpointer", prepare: Prepare | None = None,
                 shard_device: torch.device | None = None, from_rank0: bool = False
                 ) -> nn.Module:
    """A frozen teacher (eval mode, no gradients) on ``device`` in ``dtype``.

    Args:
        model: the teacher's model node (``teacher_model``).
        checkpointer: its checkpointer node; its folder's ``config.json`` feeds the fix-up.
        state: the state dict, when the caller has loaded it already (``checkpoint_state``).
        key: the checkpointer's config key, named by errors.
        prepare: run on the teacher while it is on the meta device, before its weights load
            (``parallel.parallelize``: each rank then loads only its FSDP shards).
        shard_device: where FSDP's shards go instead of ``device`` (``load_weights``).
        from_rank0: rank 0 alone holds ``state`` (the caller reads it there:
            ``parallel.on_rank0``; the other ranks pass None) and broadcasts it
            (``load_weights``); every rank calls this.
    """
    model_key = key.removesuffix("_checkpointer") + "_model"  # teacher_model
    if state is None and not from_rank0:
        state = checkpoint_state(checkpointer, key)
    with _dtype_context(dtype), torch.device("meta"):
        teacher, _ = build_model(model, hf_config_of(checkpointer), key=model_key)
    teacher.requires_grad_(False)
    if prepare is not None:
        prepare(teacher)
    load_weights(teacher, state, device=device, dtype=dtype, shard_device=shard_device,
                 from_rank0=from_rank0, where=key)
    return teacher.eval()


def load_student(model: DictConfig, *, teacher_state: dict[str, Tensor] | None,
                 teacher_checkpointer: DictConfig, student_checkpointer: DictConfig | None,
                 device: torch.device, dtype: torch.dtype, seed: int,
                 prepare: Prepare | None = None, shard_device: torch.device | None = None,
                 from_rank0: bool = False) -> tuple[nn.Module, Path, str]:
    """The student in training mode: a ``pruned_student`` initialised from its teacher's
    weights (``init_student_from_teacher``), or any builder loaded from its own checkpointer.

    The student is built on the meta device, given to ``prepare`` and loaded like the teacher
    (``load_weights``), from its own checkpoint, or from fresh weights (a ``pruned_student``'s
    fresh MLPs, a builder's own initialisation): those are made by a build on the host after
    ``torch.manual_seed(seed)`` (torchtune's ``set_seed`` gives each rank seed + rank),
    initialised from the teacher, by every rank alike, or with ``from_rank0`` by rank 0 alone,
    which then broadcasts them; either way each rank receives its shards of the same weights.
    The host build's frozen parameters (a pruned student's embeddings) are frozen in the meta
    model before ``prepare``.

    Args:
        teacher_state: the teacher's state dict (with ``from_rank0``, rank 0's; others None).
        prepare: run on the student while it is on the meta device, before its weights load
            (``parallel.parallelize``).
        shard_device: where FSDP's shards go instead of ``device`` (``load_weights``).
        from_rank0: rank 0 alone reads or builds the weights and broadcasts them.

    Returns:
        ``(student, hf_dir, model_type)``: the Hugging Face folder (config.json, tokenizer files)
        and checkpointer model type its export derives from.
    """
    source = student_checkpointer or teacher_checkpointer
    with _dtype_context(dtype), torch.device("meta"):
        student, _ = build_model(model, hf_config_of(source), key="student_model")
    pruned = getattr(student, "distill_spec", None) is not None

    def weights() -> tuple[dict[str, Tensor], set[str]]:
        """The student's weights and the names of its frozen parameters."""
        if student_checkpointer is not None and not pruned:
            return checkpoint_state(student_checkpointer, "student_checkpointer"), set()
        torch.manual_seed(seed)  # fresh weights, built on the host
        with _dtype_context(dtype):
            built, _ = build_model(model, hf_config_of(source), key="student_model")
        if pruned:
            init_student_from_teacher(built, teacher_state)
        return built.state_dict(), {n for n, p in built.named_parameters() if not p.requires_grad}

    if from_rank0:
        got, frozen_names = on_rank0(weights, lambda got: got[1])
        state = got[0] if got is not None else None
    else:
        state, frozen_names = weights()
    for name, param in student.named_parameters():
        if name in frozen_names:
            param.requires_grad_(False)
    if pruned:
        source = teacher_checkpointer
    if prepare is not None:
        prepare(student)
    load_weights(student, state, device=device, dtype=dtype, shard_device=shard_device,
                 from_rank0=from_rank0,
                 where="student_checkpointer" if student_checkpointer is not None and not pruned
                 else "student_model")
    return student.train(), Path(str(source.checkpoint_dir)), str(source.model_type)


def vocab_size_of(model: DictConfig, key: str = "student_model") -> int:
    """The output vocabulary of a model node (config key ``key``), built on the meta device
    (nothing allocated)."""
    return sizes_of(model, key)[0]


def softcap_of(model: DictConfig | None, hf: Mapping[str, Any] | None,
               key: str = "teacher_model") -> float | None:
    """The logit soft-cap of the model a config node builds, prepared with the checkpoint's
    ``config.json`` ``hf`` (Gemma2 reads its caps there), or without a node the model of
    ``hf`` itself; built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        built = build_model(model, hf, key=key)[0] if model is not None else \
            model_from_hf_config(hf)[0]
    return logit_softcap(built)


def sizes_of(model: DictConfig, key: str = "student_model") -> tuple[int, int, int, int]:
    """``(output vocabulary, layers, max_seq_len, embed_dim)`` of a model node (config key
    ``key``), built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        built, _ = build_model(model, key=key)
    return (output_weight(built).shape[0], len(built.layers), built.max_seq_len,
            built.tok_embeddings.embedding_dim)


def read_folder_config(checkpoint_dir: str | Path, where: str) -> tuple[Path, dict[str, Any]]:
    """A Hugging Face checkpoint folder and its ``config.json``.

    Raises:
        ValueError: naming ``where.checkpoint_dir`` (``checkpoint_dir`` when ``where`` is
            empty): not a folder, or no ``config.json``.
    """
    from tad_torchtune.data import resolve_asset

    key = f"{where}.checkpoint_dir" if where else "checkpoint_dir"
    folder = Path(resolve_asset(str(checkpoint_dir))).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{key}: {str(folder)!r} is not a folder; accepted: a Hugging Face "
                         f"checkpoint folder")
    if not (folder / "config.json").is_file():
        raise ValueError(no_config_json(folder, key))
    return folder, json.loads((folder / "config.json").read_text())


def no_config_json(folder: Path, key: str) -> str:
    """The error line of ``key`` naming a ``folder`` without ``config.json``: a tad_distill
    training checkpoint (``step_N``, weights in torch.distributed.checkpoint's format) is
    pointed to its Hugging Face exports."""
    from tad_torchtune.checkpointing import META

    accepted = "accepted: a Hugging Face checkpoint folder"
    if (folder / META).is_file():
        accepted = (f"it is a tad_distill training checkpoint (for resuming); accepted: its "
                    f"Hugging Face export {str(folder / 'hf')!r} (written when export_hf: true), "
                    f"or the run's output_dir/student")
    return f"{key}: {str(folder)!r} has no config.json; {accepted}"


def hf_decoder(checkpoint_dir: str, max_seq_len: int | None = None) -> nn.Module:
    """The torchtune decoder (random weights) that the ``config.json`` in ``checkpoint_dir``
    describes, for any registered model family: a model ``_component_`` for configs that load
    the weights with a checkpointer themselves (``tad_eleuther_eval``'s ``model``,
    ``tad_distill``'s ``student_model`` with a ``student_checkpointer``), and a ``teacher_model``
    whose builder arguments come from its folder (``pruned_student`` and the recipes' checks read
    them through ``resolve_teacher``). The model keeps that config.json as ``source_hf_config``,
    which ``build_model`` prepares it with, and which an export writes unchanged.

    Args:
        checkpoint_dir: the Hugging Face checkpoint folder.
        max_seq_len: the longest sequence the model takes (the length of its RoPE tables);
            None: config.json's ``max_position_embeddings`` (131072 for Llama 3.1, whose
            tables then take 64 MiB). Students pruned from it inherit it.

    Raises:
        ValueError: ``max_seq_len: ...`` or ``model.checkpoint_dir: ...``.
    """
    _, hf = read_folder_config(checkpoint_dir, "model")
    max_seq_len = check_max_seq_len(max_seq_len, hf)
    shape = {**hf, "max_position_embeddings": max_seq_len} if max_seq_len else hf
    model = model_from_hf_config(shape, where="model.checkpoint_dir")[0]
    model.source_hf_config = hf
    return model


#: the keys of a checkpoint folder's entry (``tad_eval``'s ``teacher`` and ``students.NAME``)
FOLDER_KEYS = ("checkpoint_dir", "checkpoint_files", "model", "model_type")
#: a torchtune checkpointer node's other keys, accepted and unused in such an entry (a training
#: config's ``${teacher_checkpointer}``)
CHECKPOINTER_KEYS = ("_component_", "output_dir", "adapter_checkpoint", "recipe_checkpoint",
                     "resume_from_checkpoint", "safe_serialization", "should_load_recipe_state")


def check_hf_folder(spec: Mapping[str, Any] | DictConfig | str | Path, *, where: str
                    ) -> tuple[Path, dict[str, Any], list[str]]:
    """What ``load_hf_folder`` checks before it builds anything (cheap: the folder, its
    ``config.json``, its weight files whole), so that a command loading several folders can
    check them all first. Returns ``(folder, config.json, weight file names)``.

    Raises:
        ValueError: naming ``where``, as ``load_hf_folder``.
    """
    if isinstance(spec, (str, Path)):
        spec = {"checkpoint_dir": str(spec)}
    # a misspelt key first: it is why checkpoint_dir is missing (students.x.chekpoint_dir)
    unknown = [k for k in spec or {} if k not in FOLDER_KEYS and k not in CHECKPOINTER_KEYS]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not a key of a checkpoint folder's entry; "
                         f"accepted: {', '.join(FOLDER_KEYS)}")
    if spec is None or spec.get("checkpoint_dir") is None:
        raise ValueError(f"{where}.checkpoint_dir: required (a Hugging Face checkpoint folder)")
    folder, hf = read_folder_config(spec["checkpoint_dir"], where)
    # the conversion a model_type names must be of config.json's family, with a model or not
    check_checkpointer_model_type({**spec, "checkpoint_dir": str(folder)}, hf,
                                  checkpointer_key=where)
    files = spec.get("checkpoint_files")
    if isinstance(files, str):
        raise ValueError(f"{where}.checkpoint_files: a list of file names, got the string "
                         f"{files!r}; write [{files}]")
    files = list(files) if files is not None else sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{where}.checkpoint_dir: no *.safetensors file in {str(folder)!r}")
    check_checkpoint_files({"checkpoint_dir": str(folder), "checkpoint_files": files}, where)
    return folder, hf, files


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
    folder, hf, files = check_hf_folder(spec, where=where)
    if spec.get("model") is None:
        with _dtype_context(dtype), torch.device("meta"):
            model, family = model_from_hf_config(hf, where=f"{where}.checkpoint_dir")
        state = read_hf_checkpoint(folder, family, files)
    else:
        if spec.get("model_type") is None:
            raise ValueError(f"{where}.model_type: required when {where}.model is given "
                             "(e.g. LLAMA3)")
        node = spec["model"]
        # before the build, whose fix-up reads config.json too (a bad sliding_window is named
        # with its file here)
        check_model_fits_checkpoint(node, spec, model_key=f"{where}.model", checkpointer_key=where)
        with _dtype_context(dtype), torch.device("meta"):
            model, _ = build_model(
                node if isinstance(node, DictConfig) else OmegaConf.create(node), hf,
                key=f"{where}.model")
        state = _torchtune_hf_state(folder, files, str(spec["model_type"]))
    # buffers as a float32 build converted to ``dtype`` (what this function always returned)
    load_weights(model, state, device=device, dtype=torch.float32, where=where)
    return model.to(dtype=dtype).eval()


def _torchtune_hf_state(folder: Path, files: list[str], model_type: str) -> dict[str, Tensor]:
    import tempfile

    from torchtune import training

    # The checkpointer insists on an output folder; nothing is written there while loading.
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(folder), checkpoint_files=files, model_type=model_type,
            output_dir=tmp)
        return checkpointer.load_checkpoint()[training.MODEL_KEY]
