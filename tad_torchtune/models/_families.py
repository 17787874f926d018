"""Model families a student can be built from, and how to read a teacher's architecture.

A *family* is one torchtune component builder (``torchtune.models.qwen2.qwen2``, ...) plus what
the package needs to know about it: which torchtune checkpointer ``model_type`` converts its
weights and how, which Hugging Face ``model_type`` that produces, how a ``config.json`` maps onto
the builder's arguments, any fix-up of torchtune's model (Gemma2's corrections, Phi-3's and
Mistral's sliding window), and how its rotary embedding pairs the dimensions of a head (needed
to truncate heads without splitting rotary pairs). Export, evaluation and the recipes dispatch
through it.

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
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
import torch
from torch import Tensor, nn
from torchtune.config._utils import _get_component_from_path

ROPE_LAYOUTS = ("interleaved", "half")

StateDict = dict[str, Tensor]


class NotThisFamily(ValueError):
    """Raised by a family's ``hf_kwargs`` for a ``config.json`` it cannot express."""


def _rope_theta(hf: Mapping[str, Any]) -> float | None:
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta") or params.get("rope_theta")


def rope_scaling(hf: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``config.json``'s RoPE scaling, or None for plain RoPE, in either layout: the Hub's
    (transformers 4: ``rope_scaling``, ``"type"`` in older files) or what transformers 5 writes
    (``rope_parameters``: ``rope_theta`` and ``rope_type``, ``"default"`` for plain RoPE, with the
    scaling's fields beside them). The result has ``rope_type`` and the scaling's fields only."""
    scaling = hf.get("rope_scaling")
    if not scaling:
        scaling = {k: v for k, v in (hf.get("rope_parameters") or {}).items()
                   if k not in ("rope_theta", "partial_rotary_factor")}
    scaling = dict(scaling)
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    return None if scaling.get("rope_type", "default") == "default" else scaling


def refuse_rope_scaling(hf: Mapping[str, Any], refusal: str) -> None:
    """Raise ``NotThisFamily("{refusal}, got {the scaling}")`` when ``config.json`` asks for a
    RoPE scaling (``rope_scaling``), for a family whose builder has none."""
    scaling = rope_scaling(hf)
    if scaling:
        raise NotThisFamily(f"{refusal}, got {scaling!r}")


def hf_common_kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The component-builder kwargs that every family reads the same way from a Hugging Face
    ``config.json`` (torchtune name <- HF name); a family keeps those its builder accepts."""
    heads = hf.get("num_attention_heads")
    kwargs = dict(
        vocab_size=hf.get("vocab_size"), num_layers=hf.get("num_hidden_layers"),
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        embed_dim=hf.get("hidden_size"), intermediate_dim=hf.get("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings"), norm_eps=hf.get("rms_norm_eps"),
        rope_base=_rope_theta(hf), head_dim=hf.get("head_dim"),
        tie_word_embeddings=hf.get("tie_word_embeddings"),
    )
    return {k: v for k, v in kwargs.items() if v is not None}


def _llama_convert(to_hf: bool):
    def convert(sd: StateDict, cfg: Mapping[str, Any]) -> StateDict:
        from torchtune.models import convert_weights

        fn = convert_weights.tune_to_hf if to_hf else convert_weights.hf_to_tune
        return fn(sd, num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                  dim=cfg["hidden_size"], head_dim=cfg.get("head_dim"))

    return convert


@dataclass(frozen=True)
class ModelFamily:
    """A torchtune component builder that students can be built with, and everything the package
    needs to know about it: the one place a family's knowledge lives (``docs/design.md``,
    "Model families").

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
            Hugging Face weights) or ``"half"`` (pairs ``(i, i + head_dim/2)``, Qwen2 and Phi3;
            Phi-2 rotates its first ``rotary_dim`` dimensions, pairs ``(i, i + rotary_dim/2)``).
        to_hf, from_hf: ``(state_dict, hf_config) -> state_dict`` between torchtune's and
            Hugging Face's keys (default: torchtune's Llama conversion, ``convert_weights``).
        hf_kwargs: ``hf_config -> component kwargs`` beyond ``hf_common_kwargs`` (default:
            none); raises ``NotThisFamily`` for a config this family cannot express.
        fixup: ``(model, hf_config | None) -> model``, applied to every model of the family
            right after it is built, with the ``config.json`` it is built from or loaded from
            when there is one (Gemma2: ``correct_gemma2``; Phi-3, Mistral: the sliding window).
        hf_config_extras: ``(model, hf_config) -> None``, writing the family's own fields into a
            student's exported ``config.json`` (Gemma2: soft-caps, sliding layers; Phi-3,
            Mistral: the model's sliding window).
    """

    name: str
    component: str
    checkpointer_model_type: str
    hf_model_type: str
    rope_layout: str = "interleaved"
    to_hf: Callable[[StateDict, Mapping[str, Any]], StateDict] = _llama_convert(True)
    from_hf: Callable[[StateDict, Mapping[str, Any]], StateDict] = _llama_convert(False)
    hf_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    fixup: Callable[[nn.Module, Mapping[str, Any] | None], nn.Module] | None = None
    hf_config_extras: Callable[[nn.Module, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(
                f"ModelFamily.rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r} "
                f"(family {self.name!r})"
            )

    def builder(self) -> Callable[..., Any]:
        return _get_component_from_path(self.component)

    def prepare(self, model: nn.Module, hf_config: Mapping[str, Any] | None = None) -> nn.Module:
        """``model`` (just built) with the family's fix-up applied; a no-op for most families."""
        return model if self.fixup is None else self.fixup(model, hf_config)

    def kwargs_from_hf_config(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """The component-builder kwargs of the model a ``config.json`` describes.

        Raises:
            NotThisFamily: when the config is of this family's ``model_type`` but uses a
                feature its torchtune builder cannot express (e.g. another RoPE scaling).
        """
        accepted = set(inspect.signature(self.builder()).parameters)
        kwargs = {**hf_common_kwargs(hf), **(self.hf_kwargs(hf) if self.hf_kwargs else {})}
        return {k: v for k, v in kwargs.items() if k in accepted}

    def build_from_hf_config(self, hf: Mapping[str, Any]) -> nn.Module:
        """A model (random weights, the family's fix-up applied) of ``config.json``'s shape.

        Raises:
            NotThisFamily: as ``kwargs_from_hf_config``, or when the builder's output projection
                is tied where the config's is not (or the reverse).
        """
        from torchtune.modules.tied_linear import TiedLinear

        model = self.builder()(**self.kwargs_from_hf_config(hf))
        tied = isinstance(model.output, TiedLinear)
        if tied != bool(hf.get("tie_word_embeddings", tied)):
            raise NotThisFamily(f"{self.name}: its builder's output projection is "
                                f"{'' if tied else 'un'}tied, config.json says "
                                f"tie_word_embeddings={hf.get('tie_word_embeddings')}")
        return self.prepare(model, hf)


def _no_rope_scaling(name: str):
    def kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
        refuse_rope_scaling(hf, f"{name}: no RoPE scaling")
        return {}

    return kwargs


def _llama3_scaled_rope(name: str, *, unscaled: bool = False):
    # torchtune's Llama3ScaledRoPE has these constants built in
    fixed = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}

    def kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
        scaling = rope_scaling(hf) or {}
        if unscaled and not scaling:  # scale factor 1 is plain RoPE (a tied unscaled Llama)
            return {"scale_factor": 1}
        if any(scaling.get(k) != v for k, v in fixed.items()):
            raise NotThisFamily(f"{name}: needs rope_scaling {fixed} and a factor, got "
                                f"{scaling or None!r}")
        return {"scale_factor": scaling["factor"]}

    return kwargs


def _qwen2_convert(to_hf: bool):
    def convert(sd: StateDict, cfg: Mapping[str, Any]) -> StateDict:
        from torchtune.models.qwen2 import _convert_weights as cw

        fn = cw.qwen2_tune_to_hf if to_hf else cw.qwen2_hf_to_tune
        return fn(sd, num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                  dim=cfg["hidden_size"], tie_word_embeddings=cfg["tie_word_embeddings"])

    return convert


def _qwen2_kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window") or rope_scaling(hf):
        raise NotThisFamily(f"qwen2: no sliding window or RoPE scaling in torchtune's qwen2, got "
                            f"use_sliding_window={hf.get('use_sliding_window')!r}, RoPE scaling "
                            f"{rope_scaling(hf)!r}")
    return {"tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))}


def _gemma2_convert(to_hf: bool):
    def convert(sd: StateDict, cfg: Mapping[str, Any]) -> StateDict:
        from torchtune.models.gemma2 import _convert_weights as cw

        fn = cw.gemma2_tune_to_hf if to_hf else cw.gemma2_hf_to_tune
        return fn(sd, num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                  dim=cfg["hidden_size"], head_dim=cfg.get("head_dim"))

    return convert


def _gemma2_kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
    refuse_rope_scaling(hf, "gemma2: no RoPE scaling in torchtune's gemma2")
    out = {"sliding_window_size": hf.get("sliding_window", 4096)}
    if hf.get("query_pre_attn_scalar") is not None:
        out["query_pre_attn_scalar"] = hf["query_pre_attn_scalar"]
    return out


def _gemma2_fixup(model: nn.Module, hf: Mapping[str, Any] | None) -> nn.Module:
    from tad_torchtune.models._gemma2 import (
        HF_ATTN_LOGIT_SOFTCAPPING,
        HF_FINAL_LOGIT_SOFTCAPPING,
        correct_gemma2,
    )

    hf = hf or {}
    return correct_gemma2(
        model,
        attn_logit_softcapping=hf.get("attn_logit_softcapping", HF_ATTN_LOGIT_SOFTCAPPING),
        final_logit_softcapping=hf.get("final_logit_softcapping", HF_FINAL_LOGIT_SOFTCAPPING))


def _gemma2_config_extras(model: nn.Module, cfg: dict[str, Any]) -> None:
    from tad_torchtune.models._gemma2 import gemma2_hf_config

    cfg.update(gemma2_hf_config(model, cfg))


def _phi3_convert(to_hf: bool):
    def convert(sd: StateDict, cfg: Mapping[str, Any]) -> StateDict:
        from torchtune.models.phi3 import _convert_weights as cw

        if to_hf:
            return cw.phi3_tune_to_hf(sd)
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        gqa = heads != kv
        return cw.phi3_hf_to_tune(sd, num_heads=heads if gqa else None,
                                  num_kv_heads=kv if gqa else None,
                                  dim=cfg["hidden_size"] if gqa else None)

    return convert


# Phi-3's config.json (sliding_window 2047) and Mistral-7B-v0.1's (4096) limit each position's
# attention to the W latest positions, which torchtune's phi3 and mistral builders do not: they
# attend over the whole row. The window is not a builder argument but the fix-up's: a model
# gets the window of the config.json it is built from (model_from_hf_config) or of the folder
# loaded into it (build_model: a YAML builder, a pruned student from its teacher's folder), and
# the export writes the model's own (models/_window.py; docs/design.md, "Model families").
# Without a config.json a model attends over the whole row, as torchtune's builder does.


def _hf_sliding_window(name: str, default: int | None):
    """``config.json -> window`` of a family whose Hugging Face config has ``sliding_window``
    (``default`` where the key is absent: transformers' ``MistralConfig`` has 4096, Phi-3 none).
    Raises ``NotThisFamily`` naming the value and what is accepted."""

    def window(hf: Mapping[str, Any]) -> int | None:
        value = hf.get("sliding_window", default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise NotThisFamily(f"{name}: sliding_window must be a positive integer or null, "
                                f"got {value!r}")
        return value

    return window


def _windowed_family(name: str, default: int | None):
    """The ``hf_kwargs``, ``fixup`` and ``hf_config_extras`` of a torchtune builder that lacks
    its Hugging Face model's sliding window (Phi-3, Mistral)."""
    window = _hf_sliding_window(name, default)

    def kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
        refuse_rope_scaling(hf, f"{name}: no RoPE scaling in torchtune's {name}")
        window(hf)  # refused here, where the config.json is named (check_model_fits_checkpoint)
        return {}

    def fixup(model: nn.Module, hf: Mapping[str, Any] | None) -> nn.Module:
        from tad_torchtune.models._window import set_sliding_window

        return set_sliding_window(model, None if hf is None else window(hf))

    def config_extras(model: nn.Module, cfg: dict[str, Any]) -> None:
        from tad_torchtune.models._window import sliding_window

        cfg["sliding_window"] = sliding_window(model)  # null, not absent: Mistral's is 4096

    return dict(hf_kwargs=kwargs, fixup=fixup, hf_config_extras=config_extras)


_BUILTIN_FAMILIES = (
    ModelFamily("llama2", "torchtune.models.llama2.llama2", "LLAMA2", "llama",
                hf_kwargs=_no_rope_scaling("llama2")),
    ModelFamily("llama3", "torchtune.models.llama3.llama3", "LLAMA3", "llama",
                hf_kwargs=_no_rope_scaling("llama3")),
    ModelFamily("llama3_1", "torchtune.models.llama3_1.llama3_1", "LLAMA3", "llama",
                hf_kwargs=_llama3_scaled_rope("llama3_1")),
    ModelFamily("llama3_2", "torchtune.models.llama3_2.llama3_2", "LLAMA3_2", "llama",
                hf_kwargs=_llama3_scaled_rope("llama3_2", unscaled=True)),
    ModelFamily("qwen2", "torchtune.models.qwen2.qwen2", "QWEN2", "qwen2", rope_layout="half",
                to_hf=_qwen2_convert(True), from_hf=_qwen2_convert(False),
                hf_kwargs=_qwen2_kwargs),
    ModelFamily("gemma2", "torchtune.models.gemma2.gemma2", "GEMMA2", "gemma2",
                to_hf=_gemma2_convert(True), from_hf=_gemma2_convert(False),
                hf_kwargs=_gemma2_kwargs, fixup=_gemma2_fixup,
                hf_config_extras=_gemma2_config_extras),
    ModelFamily("phi3", "torchtune.models.phi3.phi3", "PHI3_MINI", "phi3", rope_layout="half",
                to_hf=_phi3_convert(True), from_hf=_phi3_convert(False),
                **_windowed_family("phi3", None)),
    ModelFamily("mistral", "torchtune.models.mistral.mistral", "MISTRAL", "mistral",
                **_windowed_family("mistral", 4096)),
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in _BUILTIN_FAMILIES}


def register_family(family: ModelFamily) -> None:
    """Make ``family`` available to students, export, evaluation and the recipes (replaces a
    family of the same name)."""
    FAMILIES[family.name] = family
    _FOLDER_FAMILIES.clear()  # a folder's family may be this one now


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_model_type(model_type: str) -> ModelFamily:
    """The first registered family whose checkpointer ``ModelType`` is ``model_type``."""
    for family in FAMILIES.values():
        if family.checkpointer_model_type == model_type.upper():
            return family
    raise ValueError(
        f"model_type={model_type!r} is not a registered family's checkpointer model type; "
        f"accepted: {sorted({f.checkpointer_model_type for f in FAMILIES.values()})}"
    )


def model_from_hf_config(hf: Mapping[str, Any], *, where: str = "config.json"
                         ) -> tuple[nn.Module, ModelFamily]:
    """The torchtune model (random weights, fix-ups applied) and family of a Hugging Face
    ``config.json``: the first registered family of its ``model_type`` that can express it.

    Raises:
        ValueError: naming ``where``, when no registered family can.
    """
    kind = hf.get("model_type")
    reasons = []
    for family in FAMILIES.values():
        if family.hf_model_type != kind:
            continue
        try:
            return family.build_from_hf_config(hf), family
        except NotThisFamily as err:
            reasons.append(str(err))
    known = sorted({f.hf_model_type for f in FAMILIES.values()})
    detail = "; ".join(reasons) if reasons else f"registered model types: {known}"
    raise ValueError(f"{where}: no registered model family builds model_type={kind!r} ({detail})")


def build_model(node: Mapping[str, Any] | DictConfig,
                hf_config: Mapping[str, Any] | None = None, *, key: str = "model"
                ) -> tuple[nn.Module, ModelFamily]:
    """Instantiate a model config node and apply its family's fix-up (Gemma2's correction).

    The family is the one of a ``pruned_student`` (its ``distill_spec``) or of the registered
    component builder the node's builder calls (``resolve_teacher``).

    Args:
        node: a ``_component_`` config node (a mapping or an OmegaConf node).
        hf_config: the Hugging Face ``config.json`` of the checkpoint that will be loaded into
            it, when there is one (Gemma2 reads its soft-caps from it, Phi-3 and Mistral their
            sliding window).
        key: the node's config key, named by errors (``student_model``).

    Returns:
        ``(model, family)``.

    Raises:
        ConfigError: naming ``key``: an argument the builder does not take, or one it refuses.
    """
    from tad_torchtune.errors import ConfigError, instantiate

    node = node if isinstance(node, DictConfig) else OmegaConf.create(dict(node))
    model = instantiate(node, key)
    # hf_decoder's model: prepared as its own config.json says, whatever checkpoint's config
    # the caller has at hand (a student's is its teacher's without a student_checkpointer)
    hf_config = getattr(model, "source_hf_config", None) or hf_config
    spec = getattr(model, "distill_spec", None)
    if spec is not None:
        family = get_family(spec.family)
    else:
        try:
            family = resolve_teacher(node, key=key)[0]
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return family.prepare(model, hf_config), family


def _resolve_folder(node: dict[str, Any]) -> tuple[ModelFamily, dict[str, Any]]:
    """``hf_decoder``'s family and component-builder kwargs: those its folder's ``config.json``
    describes (the family built on the meta device to choose it: nothing allocated), with its
    ``max_seq_len`` when the node sets one."""
    from tad_torchtune.models.loading import read_folder_config

    unknown = [k for k in node if k not in HF_DECODER_ARGS]
    if unknown or node.get("checkpoint_dir") is None:
        raise ValueError(f"{unknown[0] if unknown else 'checkpoint_dir'}: "
                         f"{'not an argument of' if unknown else 'missing in'} "
                         f"tad_torchtune.models.hf_decoder; accepted: checkpoint_dir (a Hugging "
                         f"Face checkpoint folder), max_seq_len (default: its config.json's "
                         f"max_position_embeddings)")
    hf = read_folder_config(node["checkpoint_dir"], "")[1]
    max_seq_len = check_max_seq_len(node.get("max_seq_len"), hf)
    memo = json.dumps(hf, sort_keys=True)
    if memo not in _FOLDER_FAMILIES:  # a set-up resolves the same folder several times
        with torch.device("meta"):
            family = model_from_hf_config(hf, where="checkpoint_dir")[1]
        _FOLDER_FAMILIES[memo] = family, _bind(family.builder(), (),
                                               family.kwargs_from_hf_config(hf))
    family, kwargs = _FOLDER_FAMILIES[memo]
    return family, {**kwargs, **({"max_seq_len": max_seq_len} if max_seq_len else {})}


#: ``hf_decoder``'s arguments
HF_DECODER_ARGS = ("checkpoint_dir", "max_seq_len")
#: ``_resolve_folder``'s results by config.json's content
_FOLDER_FAMILIES: dict[str, tuple[ModelFamily, dict[str, Any]]] = {}


def check_max_seq_len(value: Any, hf: Mapping[str, Any]) -> int | None:
    """``hf_decoder``'s ``max_seq_len``: None, or a positive int at most ``config.json``'s
    ``max_position_embeddings`` (``hf``; a longer one would run RoPE past what the model was
    trained on).

    Raises:
        ValueError: ``max_seq_len: ...``.
    """
    if value is None:
        return None
    longest = hf.get("max_position_embeddings")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or \
            (longest is not None and value > longest):
        upto = f" up to its config.json's max_position_embeddings {longest}" if longest else ""
        raise ValueError(f"max_seq_len: {value!r}; accepted: a positive integer{upto} (the "
                         f"longest sequence the model takes, its RoPE table's length), or null "
                         f"for its config.json's max_position_embeddings")
    return value


class _Captured(Exception):
    def __init__(self, family: ModelFamily, kwargs: dict[str, Any]) -> None:
        super().__init__(family.name)
        self.family = family
        self.kwargs = kwargs


def _bind(builder: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    signature = inspect.signature(builder)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise _not_arguments(builder, kwargs, err) from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _not_arguments(builder: Callable[..., Any], kwargs: Mapping[str, Any],
                   err: TypeError) -> ValueError:
    """A ``name: not an argument of builder; accepted: ...`` error for a call that failed."""
    params = inspect.signature(builder).parameters
    unknown = [k for k in kwargs if k not in params]
    name = f"{builder.__module__}.{builder.__qualname__}"
    if not unknown:
        return ValueError(f"_component_: {name} cannot be called so: {err}")
    return ValueError(f"{unknown[0]}: not an argument of {name}; accepted: "
                      f"{', '.join(params) or 'none'}")


def _plain(node: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def resolve_teacher(teacher: Mapping[str, Any] | DictConfig, *, key: str = "teacher"
                    ) -> tuple[ModelFamily, dict[str, Any]]:
    """The family and full component-builder kwargs of a teacher, without building it.

    Args:
        teacher: the teacher's config node as a mapping with ``_component_`` and kwargs, either
            a family's component builder (``{"_component_": "torchtune.models.qwen2.qwen2",
            "vocab_size": 64, ...}``) or a model builder that calls one
            (``{"_component_": "torchtune.models.qwen2_5.qwen2_5_3b"}``).
        key: the node's name in errors (``teacher_model``; ``teacher``, the argument of
            ``pruned_student``).

    Returns:
        ``(family, kwargs)`` where ``kwargs`` holds every argument of the component builder
        (defaults filled in).

    Raises:
        ValueError: naming ``key``, if ``_component_`` is missing, the builder is not (and does
            not call) a registered family's component builder, or an argument is not the
            builder's.
    """
    node = _plain(teacher)
    path = node.pop("_component_", None)
    if not isinstance(path, str):
        raise ValueError(
            f"{key}: must be a config node with a '_component_' dotpath, got {teacher!r}"
        )
    try:
        builder = _get_component_from_path(path)
    except Exception as err:  # torchtune's InstantiationError, an import error
        raise ValueError(f"{key}._component_: {path!r} cannot be imported: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                         ) from None
    try:
        return _resolve(builder, node, path)
    except ValueError as err:  # "name: ..." of an argument becomes "key.name: ..."
        named = re.match(r"\w+:", str(err))
        raise ValueError(f"{key}.{err}" if named else f"{key}: {err}") from None


def _resolve(builder: Callable[..., Any], node: dict[str, Any], path: str
             ) -> tuple[ModelFamily, dict[str, Any]]:
    """``resolve_teacher``'s work; its errors start with the argument they concern."""
    from tad_torchtune.models.loading import hf_decoder  # lazy: loading imports this module

    for family in FAMILIES.values():
        if builder is family.builder():
            return family, _bind(builder, (), node)
    if builder is hf_decoder:
        return _resolve_folder(node)

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
    except TypeError as err:  # an argument the model builder does not take
        raise _not_arguments(builder, node, err) from None
    finally:
        for name, value in patched:
            module_globals[name] = value
    raise ValueError(
        f"_component_: {path!r} is neither a registered family's component builder nor a "
        f"model builder that calls one; registered families: "
        f"{ {f.name: f.component for f in FAMILIES.values()} } (add one with register_family)"
    )
