"""Students built from their teacher's torchtune builder (``docs/design.md``, paper §3.2).

``pruned_student`` builds the student with the teacher's own component builder and the
teacher's hyperparameters, changing only depth and (optionally) width; it records how the student
maps onto the teacher in ``student.distill_spec``. ``init_student_from_teacher`` then copies the
teacher's weights into it:

- embeddings (and an untied output projection, with its bias when it has one): copied, first
  ``embed_dim`` columns when the student is narrower; frozen by default (``freeze_embeddings``);
- attention (weights and biases): copied from the chosen teacher layer; when the student has fewer
  heads it keeps the first ones, when its heads are smaller it keeps the first dimensions of each
  head (whole rotary pairs; with partial rotary embeddings, Phi-2's, the first pairs of the rotated
  part and the first of the unrotated ones), when its ``embed_dim`` is smaller it keeps the first
  input/output columns;
- norms (RMSNorm scales, LayerNorm weights and biases; Phi-2 has one per block): copied (first
  ``embed_dim`` entries);
- MLPs: left as freshly initialised by the builder (``mlp_init="fresh"``, the paper) or copied and
  truncated to ``intermediate_dim`` (``mlp_init="copy"``).
"""

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.tied_linear import TiedLinear

from tad_torchtune.common import full_tensor
from tad_torchtune.models._families import get_family, resolve_teacher
from tad_torchtune.models._phi2 import rotary_dim

MLP_INITS = ("fresh", "copy")
_ATTN_IN = ("q_proj", "k_proj", "v_proj")  # weights [heads * head_dim, embed_dim]


@dataclass(frozen=True)
class DistillSpec:
    """How a student built by ``pruned_student`` maps onto its teacher.

    Attributes:
        family: name of the ``ModelFamily`` (``tad_torchtune.models.FAMILIES``).
        teacher_kwargs: the teacher's component-builder kwargs.
        student_kwargs: the student's component-builder kwargs.
        teacher_layers: for each student layer, the teacher layer it starts from.
        mlp_init: ``"fresh"`` or ``"copy"``.
        freeze_embeddings: whether the embedding table (and an untied output projection) is frozen.
        teacher_width: ``(embed_dim, num_heads, num_kv_heads, head_dim)`` of the teacher.
        student_width: the same for the student; where it is smaller, weights are truncated.
    """

    family: str
    teacher_kwargs: dict[str, Any] = field(repr=False)
    student_kwargs: dict[str, Any] = field(repr=False)
    teacher_layers: tuple[int, ...]
    mlp_init: str
    freeze_embeddings: bool
    teacher_width: tuple[int, int, int, int]
    student_width: tuple[int, int, int, int]


def evenly_spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``num_layers`` teacher layer indices, evenly spaced, including the first and the last.

    Example: 36 teacher layers, 18 student layers -> ``[0, 2, 4, ..., 33, 35]``.
    """
    if num_layers == 1:
        return [0]
    span = num_teacher_layers - 1
    # round(i * span / (num_layers - 1)) with halves rounded up, in exact integer arithmetic
    return [(2 * i * span + num_layers - 1) // (2 * (num_layers - 1)) for i in range(num_layers)]


def _width(kwargs: Mapping[str, Any]) -> tuple[int, int, int, int]:
    head_dim = kwargs.get("head_dim") or kwargs["embed_dim"] // kwargs["num_heads"]
    return kwargs["embed_dim"], kwargs["num_heads"], kwargs["num_kv_heads"], head_dim


def _rotary_dim(kwargs: Mapping[str, Any]) -> int:
    """Leading dimensions of a head that the rotary embedding turns: all of them, or, for a
    builder with ``partial_rotary_factor`` (Phi-2), its share."""
    head_dim = _width(kwargs)[3]
    factor = kwargs.get("partial_rotary_factor")
    return head_dim if factor is None else rotary_dim(head_dim, factor)


def pruned_student(
    *,
    teacher: Mapping[str, Any] | DictConfig,
    num_layers: int,
    intermediate_dim: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    max_seq_len: int | None = None,
    tie_word_embeddings: bool | None = None,
    teacher_layers: Sequence[int] | None = None,
    mlp_init: str = "fresh",
    freeze_embeddings: bool = True,
) -> TransformerDecoder:
    """A smaller model of the teacher's family, to be initialised by ``init_student_from_teacher``.

    The teacher is not built: its architecture is read from its config node (see
    ``resolve_teacher``). Unset sizes are the teacher's. The student's weights are the builder's
    random initialisation until ``init_student_from_teacher`` runs; its embedding (and untied
    output) parameters already have ``requires_grad=False`` when ``freeze_embeddings``.

    Args:
        teacher: the teacher's config node, e.g. ``{"_component_":
            "torchtune.models.qwen2_5.qwen2_5_3b"}`` (YAML: ``teacher: ${teacher_model}``).
        num_layers: student depth.
        intermediate_dim: student MLP width (default: the teacher's).
        embed_dim: student hidden size, at most the teacher's (default: the teacher's).
        num_heads: query heads, at most the teacher's (default: the teacher's).
        num_kv_heads: key/value heads, at most the teacher's (default: the teacher's).
        head_dim: per-head size; only for families whose builder takes it (Gemma2, Phi-2).
            Elsewhere it is ``embed_dim // num_heads`` and may only be passed with that value.
        max_seq_len: RoPE cache length (default: the teacher's).
        tie_word_embeddings: tie the output projection to the embedding table (default: as the
            teacher); only for families whose builder takes it (Qwen2, Llama3.2). A tied student
            of an untied teacher starts from the teacher's input embeddings; an untied student of
            a tied teacher starts its output projection from them too.
        teacher_layers: teacher layer each student layer starts from (``num_layers`` entries,
            repeats allowed). Default: evenly spaced, first and last included.
        mlp_init: ``"fresh"`` (paper: MLPs randomly initialised) or ``"copy"`` (copied from the
            teacher layer, truncated to ``intermediate_dim``/``embed_dim``).
        freeze_embeddings: freeze the embedding table and an untied output projection.

    Returns:
        The student ``TransformerDecoder`` with a ``distill_spec`` attribute (``DistillSpec``).
        The family's fix-up is applied (Gemma2 students are corrected).

    Raises:
        ValueError: for an unknown teacher builder, or sizes the teacher cannot be cut down to.
    """
    family, t_kwargs = resolve_teacher(teacher)
    builder = family.builder()
    accepts = set(t_kwargs)
    if mlp_init not in MLP_INITS:
        raise ValueError(f"mlp_init must be one of {MLP_INITS}, got {mlp_init!r}")
    t_layers = t_kwargs["num_layers"]
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")

    s_kwargs = dict(t_kwargs)
    s_kwargs["num_layers"] = num_layers
    for name, value in (
        ("intermediate_dim", intermediate_dim),
        ("embed_dim", embed_dim),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("max_seq_len", max_seq_len),
    ):
        if value is not None:
            s_kwargs[name] = value
    if tie_word_embeddings is not None:
        if "tie_word_embeddings" not in accepts:
            raise ValueError(
                f"tie_word_embeddings: {tie_word_embeddings} is not supported for family "
                f"{family.name!r}: its builder {family.component} has a fixed output projection"
            )
        s_kwargs["tie_word_embeddings"] = bool(tie_word_embeddings)
    if head_dim is not None:
        if "head_dim" in accepts:
            s_kwargs["head_dim"] = head_dim
        elif head_dim != s_kwargs["embed_dim"] // s_kwargs["num_heads"]:
            raise ValueError(
                f"head_dim: {head_dim} is not supported for family {family.name!r}: its builder "
                f"{family.component} uses embed_dim // num_heads = "
                f"{s_kwargs['embed_dim'] // s_kwargs['num_heads']}; leave head_dim unset"
            )

    if s_kwargs.get("head_dim") is None and s_kwargs["embed_dim"] % s_kwargs["num_heads"]:
        raise ValueError(f"num_heads: {s_kwargs['num_heads']} does not divide the student's "
                         f"embed_dim {s_kwargs['embed_dim']} (its head_dim is their quotient)")
    t_width = _width(t_kwargs)
    s_width = _width(s_kwargs)
    for name, t, s in zip(("embed_dim", "num_heads", "num_kv_heads", "head_dim"), t_width, s_width):
        if s > t:
            raise ValueError(
                f"{name}: the student's {s} exceeds the teacher's {t}: a student can only be as "
                f"wide as its teacher or narrower"
            )
    if s_width[1] % s_width[2] != 0:
        raise ValueError(
            f"num_kv_heads: {s_width[2]} must divide num_heads {s_width[1]}"
        )
    # With one partial_rotary_factor, a smaller head has at most the teacher's rotated and
    # unrotated dimensions each (int(f * h) grows by at most 1 when h does), so both fit.
    s_rot = _rotary_dim(s_kwargs)
    if s_rot % 2 != 0:
        partial = "" if s_rot == s_width[3] else f" (of which {s_rot} rotated)"
        raise ValueError(f"head_dim must rotate an even number of dimensions (rotary pairs), got "
                         f"{s_width[3]}{partial}")
    if mlp_init == "copy":
        s_inter, t_inter = s_kwargs.get("intermediate_dim"), t_kwargs.get("intermediate_dim")
        if s_inter is not None and t_inter is not None and s_inter > t_inter:
            raise ValueError(
                f"intermediate_dim: {s_inter} exceeds the teacher's {t_inter}, which "
                f"mlp_init='copy' needs at most; use mlp_init='fresh' for a wider MLP"
            )

    if teacher_layers is None:
        if num_layers > t_layers:
            raise ValueError(
                f"num_layers: {num_layers} exceeds the teacher's {t_layers} layers; pass "
                f"teacher_layers explicitly (repeats allowed) to build a deeper student"
            )
        chosen = evenly_spaced_layers(t_layers, num_layers)
    else:
        try:
            chosen = [operator.index(i) for i in teacher_layers]
        except TypeError:
            raise ValueError(f"teacher_layers must list integers, got {teacher_layers!r}"
                             ) from None
        if len(chosen) != num_layers or any(not 0 <= i < t_layers for i in chosen):
            raise ValueError(
                f"teacher_layers must list num_layers={num_layers} indices in [0, {t_layers}), "
                f"got {list(teacher_layers)}"
            )

    student = family.prepare(builder(**s_kwargs))
    student.distill_spec = DistillSpec(
        family=family.name,
        teacher_kwargs=t_kwargs,
        student_kwargs=s_kwargs,
        teacher_layers=tuple(chosen),
        mlp_init=mlp_init,
        freeze_embeddings=freeze_embeddings,
        teacher_width=t_width,
        student_width=s_width,
    )
    if freeze_embeddings:
        _freeze_embeddings(student)
    return student


def _freeze_embeddings(student: TransformerDecoder) -> None:
    for p in student.tok_embeddings.parameters():
        p.requires_grad_(False)
    if not isinstance(student.output, TiedLinear):
        for p in student.output.parameters():
            p.requires_grad_(False)


def _head_dims(spec: DistillSpec, rope_layout: str) -> Tensor:
    """Indices of the dimensions of a teacher head that a narrower student head keeps: whole
    rotary pairs of the teacher's rotated part (the first ``rotary_dim`` dimensions; all of
    them unless the builder rotates a share, Phi-2), then the first unrotated dimensions."""
    s_hd = spec.student_width[3]
    t_rot, s_rot = _rotary_dim(spec.teacher_kwargs), _rotary_dim(spec.student_kwargs)
    if rope_layout == "half":  # rotary pairs (i, i + rotary_dim / 2): keep whole pairs
        first = torch.arange(s_rot // 2)
        rotated = torch.cat([first, first + t_rot // 2])
    else:  # pairs (2i, 2i + 1): a prefix keeps whole pairs
        rotated = torch.arange(s_rot)
    return torch.cat([rotated, torch.arange(t_rot, t_rot + s_hd - s_rot)])


def _prefix(t: Tensor, shape: torch.Size) -> Tensor:
    return t[tuple(slice(0, n) for n in shape)]


def _truncate_attention(proj: str, kind: str, t: Tensor, spec: DistillSpec, dims: Tensor
                        ) -> Tensor:
    """Per-head truncation of one attention projection (``kind`` is ``weight`` or ``bias``),
    keeping the head dimensions ``dims`` (``_head_dims``)."""
    t_dim, t_heads, t_kv, t_hd = spec.teacher_width
    s_dim, s_heads, s_kv, s_hd = spec.student_width
    dims = dims.to(t.device)
    if proj == "output_proj":  # [embed_dim, heads * head_dim], bias [embed_dim] (Phi-2)
        if kind != "weight":
            return t[:s_dim]
        w = t.reshape(t_dim, t_heads, t_hd)[:s_dim, :s_heads].index_select(2, dims)
        return w.reshape(s_dim, s_heads * s_hd)
    heads, s_n = (t_heads, s_heads) if proj == "q_proj" else (t_kv, s_kv)
    if kind == "bias":  # [heads * head_dim]
        return t.reshape(heads, t_hd)[:s_n].index_select(1, dims).reshape(s_n * s_hd)
    w = t.reshape(heads, t_hd, t_dim)[:s_n].index_select(1, dims)[:, :, :s_dim]
    return w.reshape(s_n * s_hd, s_dim)


@torch.no_grad()
def init_student_from_teacher(
    student: TransformerDecoder, teacher: nn.Module | Mapping[str, Tensor]
) -> None:
    """Copy the teacher's weights into a ``pruned_student`` per its ``distill_spec``.

    Args:
        student: built by ``pruned_student`` (has ``distill_spec``), with real (not meta)
            parameters; modified in place.
        teacher: the teacher model with its weights loaded, or its torchtune-format state dict
            (e.g. ``teacher_checkpointer.load_checkpoint()["model"]``).

    Raises:
        ValueError: if ``student`` has no ``distill_spec``, or the teacher lacks a weight or has
            a shape that does not match its recorded architecture.
    """
    spec = getattr(student, "distill_spec", None)
    if not isinstance(spec, DistillSpec):
        raise ValueError(
            "student has no distill_spec: build it with tad_torchtune.models.pruned_student"
        )
    dims = _head_dims(spec, get_family(spec.family).rope_layout)
    t_sd = teacher.state_dict() if isinstance(teacher, nn.Module) else teacher
    s_params = dict(student.named_parameters())
    for name, param in student.state_dict().items():
        src = name
        leaf = name.split(".")
        if leaf[0] == "layers":
            i, rest = int(leaf[1]), leaf[2:]
            if rest[0] == "mlp" and spec.mlp_init == "fresh":
                continue
            src = ".".join(["layers", str(spec.teacher_layers[i]), *rest])
        if src == "output.weight" and src not in t_sd:  # tied teacher, untied student
            src = "tok_embeddings.weight"
        if src not in t_sd:
            raise ValueError(
                f"teacher has no weight {src!r} for student weight {name!r}: is it the model "
                f"the student was built from (family {spec.family!r})?"
            )
        t = full_tensor(t_sd[src])  # a DTensor (FSDP-sharded teacher) is gathered
        try:
            if leaf[0] == "layers" and rest[0] == "attn" and rest[1] in (*_ATTN_IN, "output_proj"):
                value = _truncate_attention(rest[1], rest[-1], t, spec, dims)
            else:
                value = _prefix(t, param.shape)
        except (RuntimeError, IndexError):  # a reshape that does not fit the recorded widths
            value = t
        if value.shape != param.shape:
            raise ValueError(
                f"teacher weight {src!r} of shape {tuple(t.shape)} cannot be cut to the student's "
                f"{name!r} shape {tuple(param.shape)}"
            )
        target = s_params.get(name, param)
        target.copy_(value.to(dtype=target.dtype, device=target.device))
    if spec.freeze_embeddings:
        _freeze_embeddings(student)
