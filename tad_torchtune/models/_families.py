"""Model families a student can be built from, and how to read a teacher's architecture.

A *family* is one torchtune component builder (``torchtune.models.qwen2.qwen2``, ...) plus the
few facts the student code needs about it: which torchtune checkpointer ``model_type`` converts
its weights to and from Hugging Face, which Hugging Face ``model_type`` that produces, and how its
rotary embedding pairs the dimensions of a head (needed to truncate heads without splitting
rotary pairs).

Adding a family is one call (or one entry in ``_BUILTIN_FAMILIES``)::

    register_family(ModelFamily(
        name="gemma",
        component="torchtune.models.gemma.gemma",
        checkpointer_model_type="GEMMA",
        hf_model_type="gemma",
        rope_layout="interleaved",
    ))

after which ``pruned_student(teacher={"_component_": "torchtune.models.gemma.gemma_2b"}, ...)``
works, because any model builder that calls a registered component builder is recognised.
"""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

ROPE_LAYOUTS = ("interleaved", "half")


@dataclass(frozen=True)
class ModelFamily:
    """A torchtune component builder that students can be built with.

    Args:
        name: short name, e.g. ``"qwen2"`` (also used for Qwen2.5 and Qwen1.5 models).
        component: dotpath of the torchtune component builder. It must accept ``num_layers``,
            ``num_heads``, ``num_kv_heads``, ``embed_dim`` and ``intermediate_dim``, and build
            a ``TransformerDecoder`` whose layers are named like torchtune's
            (``layers.{i}.attn.{q,k,v,output}_proj``, ``layers.{i}.mlp``, ...).
        checkpointer_model_type: the ``torchtune.training.ModelType`` name that
            ``FullModelHFCheckpointer`` uses to convert this family's weights (``"QWEN2"``).
        hf_model_type: the Hugging Face ``config.json`` ``model_type`` (``"qwen2"``).
        rope_layout: how torchtune's rotary embedding for this family pairs the dimensions of a
            head in the ``q_proj``/``k_proj`` weights: ``"interleaved"`` (pairs ``(2i, 2i+1)``,
            torchtune's ``RotaryPositionalEmbeddings``, whose checkpoint conversion permutes the
            Hugging Face weights) or ``"half"`` (pairs ``(i, i + head_dim/2)``, Qwen2 and Phi3).
    """

    name: str
    component: str
    checkpointer_model_type: str
    hf_model_type: str
    rope_layout: str = "interleaved"

    def __post_init__(self) -> None:
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(
                f"ModelFamily.rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r} "
                f"(family {self.name!r})"
            )

    def builder(self) -> Callable[..., Any]:
        return _get_component_from_path(self.component)


_BUILTIN_FAMILIES = (
    ModelFamily("llama2", "torchtune.models.llama2.llama2", "LLAMA2", "llama"),
    ModelFamily("llama3", "torchtune.models.llama3.llama3", "LLAMA3", "llama"),
    ModelFamily("llama3_1", "torchtune.models.llama3_1.llama3_1", "LLAMA3", "llama"),
    ModelFamily("llama3_2", "torchtune.models.llama3_2.llama3_2", "LLAMA3_2", "llama"),
    ModelFamily("qwen2", "torchtune.models.qwen2.qwen2", "QWEN2", "qwen2", rope_layout="half"),
    ModelFamily("gemma2", "torchtune.models.gemma2.gemma2", "GEMMA2", "gemma2"),
    ModelFamily("phi3", "torchtune.models.phi3.phi3", "PHI3_MINI", "phi3", rope_layout="half"),
    ModelFamily("mistral", "torchtune.models.mistral.mistral", "MISTRAL", "mistral"),
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in _BUILTIN_FAMILIES}


def register_family(family: ModelFamily) -> None:
    """Make ``family`` available to ``pruned_student`` and the exporter (replaces a same name)."""
    FAMILIES[family.name] = family


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)}")
    return FAMILIES[name]


class _Captured(Exception):
    def __init__(self, family: ModelFamily, kwargs: dict[str, Any]) -> None:
        super().__init__(family.name)
        self.family = family
        self.kwargs = kwargs


def _bind(builder: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(builder).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _plain(node: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def resolve_teacher(teacher: Mapping[str, Any] | DictConfig) -> tuple[ModelFamily, dict[str, Any]]:
    """The family and full component-builder kwargs of a teacher, without building it.

    Args:
        teacher: the teacher's config node as a mapping with ``_component_`` and kwargs, either
            a family's component builder (``{"_component_": "torchtune.models.qwen2.qwen2",
            "vocab_size": 64, ...}``) or a model builder that calls one
            (``{"_component_": "torchtune.models.qwen2_5.qwen2_5_3b"}``).

    Returns:
        ``(family, kwargs)`` where ``kwargs`` holds every argument of the component builder
        (defaults filled in).

    Raises:
        ValueError: if ``_component_`` is missing, or the builder is not (and does not call)
            a registered family's component builder.
    """
    node = _plain(teacher)
    path = node.pop("_component_", None)
    if not isinstance(path, str):
        raise ValueError(
            f"teacher must be a config node with a '_component_' dotpath, got {teacher!r}"
        )
    builder = _get_component_from_path(path)
    for family in FAMILIES.values():
        if builder is family.builder():
            return family, _bind(builder, (), node)

    # A model builder: run it with each registered component builder it references swapped for
    # a function that records its arguments and stops, so nothing is allocated.
    module_globals = getattr(builder, "__globals__", None)
    patched: list[tuple[str, Any]] = []
    if module_globals is not None:
        for family in FAMILIES.values():
            component = family.builder()
            for name, value in list(module_globals.items()):
                if value is component:

                    def capture(*args, _family=family, _component=component, **kwargs):
                        raise _Captured(_family, _bind(_component, args, kwargs))

                    patched.append((name, value))
                    module_globals[name] = capture
    try:
        if patched:
            builder(**node)
    except _Captured as captured:
        return captured.family, captured.kwargs
    finally:
        for name, value in patched:
            module_globals[name] = value
    raise ValueError(
        f"teacher _component_ {path!r} is neither a registered family's component builder nor a "
        f"model builder that calls one; registered families: "
        f"{ {f.name: f.component for f in FAMILIES.values()} } (add one with register_family)"
    )
