"""Validation of a ``tad_distill`` config, run once before any model or data is loaded.

Every error names the field, the value it has and what would be accepted.
"""

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from tad_torchtune.losses import DIVERGENCES, VOCAB_ALIGNMENTS, Divergence

REQUIRED_COMPONENTS = (
    "tokenizer", "dataset", "teacher_model", "teacher_checkpointer", "student_model", "optimizer",
)
OPTIONAL_COMPONENTS = (
    "teacher_tokenizer", "validation_dataset", "student_checkpointer", "kd_loss", "hidden_loss",
    "lr_scheduler", "metric_logger",
)
SCALARS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    # name: (accepted types, default)
    "output_dir": (str, None),
    "seed": (int, 0),
    "device": (str, "cpu"),
    "dtype": (str, "fp32"),
    "shuffle": (bool, True),
    "batch_size": (int, 1),
    "gradient_accumulation_steps": (int, 1),
    "vocab_alignment": (str, "exact"),
    "clm_weight": ((int, float), 1.0),
    "kd_weight": ((int, float), 1.0),
    "hidden_weight": ((int, float), 0.0),
    "hidden_layers": ((list, type(None)), None),
    "fused": (bool, False),
    "fused_teacher_cache_mib": ((int, float), 128),
    "fused_float32_weight_grad": (bool, True),
    "loss_chunk_size": (int, 1024),
    "clip_grad_norm": ((int, float, type(None)), 1.0),
    "epochs": (int, 1),
    "max_steps_per_epoch": ((int, type(None)), None),
    "max_steps": ((int, type(None)), None),
    "compile": (bool, False),
    "enable_activation_checkpointing": (bool, False),
    "fsdp_cpu_offload": (bool, False),
    "save_every_n_steps": ((int, type(None)), None),
    "keep_last_n_checkpoints": (int, 2),
    "eval_every_n_steps": ((int, type(None)), None),
    "max_eval_batches": ((int, type(None)), None),
    "log_every_n_steps": (int, 1),
    "resume_from_checkpoint": (bool, False),
    "export_hf": (bool, True),
    "log_peak_memory_stats": (bool, True),
    "peak_flops_per_device": ((int, float, type(None)), None),
    "document_mask": (bool, False),
    "resume_on_different_data": (bool, False),
    "teacher_cache_dir": ((str, type(None)), None),
    "cache_top_m": (int, 48),
    "cache_logp_dtype": (str, "float16"),
    "cache_shard_blocks": (int, 256),
}
ALLOWED_KEYS = set(REQUIRED_COMPONENTS) | set(OPTIONAL_COMPONENTS) | set(SCALARS)
CHOICES = {"device": ("cpu", "cuda"), "dtype": ("bf16", "fp32"), "vocab_alignment": VOCAB_ALIGNMENTS,
           "cache_logp_dtype": ("float16", "bfloat16", "float32")}
AT_LEAST_ONE = (
    "batch_size", "gradient_accumulation_steps", "epochs", "max_steps_per_epoch", "max_steps",
    "save_every_n_steps", "eval_every_n_steps", "log_every_n_steps", "loss_chunk_size",
    "keep_last_n_checkpoints", "max_eval_batches", "cache_top_m", "cache_shard_blocks",
)


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_component(cfg: DictConfig, key: str) -> Any:
    node = cfg.get(key)
    if not isinstance(node, DictConfig) or "_component_" not in node:
        raise ValueError(
            f"{key}: must be a mapping with a `_component_` dotpath (e.g. `{key}._component_: "
            f"package.module.name`), got {OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}"
        )
    if not isinstance(node._component_, str):
        raise ValueError(f"{key}._component_: must be a dotpath (package.module.name), got "
                         f"{node._component_!r}")
    try:
        return _get_component_from_path(node._component_)
    except Exception as e:  # torchtune raises its own InstantiationError
        raise ValueError(f"{key}._component_: cannot import {node._component_!r} ({e})") from None


def validate_config(cfg: DictConfig) -> None:
    """Check a ``tad_distill`` config before anything heavy is built. An optional component
    whose ``_component_`` is null (``validation_dataset=null`` on the command line) is removed.

    Raises:
        ValueError: naming the first offending field, its value and what is accepted.
    """
    for key in OPTIONAL_COMPONENTS:
        # `tune run ... validation_dataset=null` sets the node's _component_ (torchtune's CLI
        # cannot remove a component): an optional component so switched off is absent
        node = cfg.get(key)
        if isinstance(node, DictConfig) and "_component_" in node and node._component_ is None:
            cfg[key] = None
    unknown = sorted(set(cfg.keys()) - ALLOWED_KEYS)
    if unknown:
        raise ValueError(
            f"unknown top-level config key(s) {unknown}; accepted keys: {sorted(ALLOWED_KEYS)}"
        )
    for key in REQUIRED_COMPONENTS:
        if key not in cfg or cfg[key] is None:
            raise ValueError(f"{key}: missing; the recipe needs a `{key}` component")
        _check_component(cfg, key)
    for key in OPTIONAL_COMPONENTS:
        if cfg.get(key) is not None:
            _check_component(cfg, key)
    if not cfg.get("output_dir"):
        raise ValueError("output_dir: missing; give a folder for checkpoints and logs")
    for key, (types, _) in SCALARS.items():
        value = cfg.get(key)
        if value is None and key in cfg and type(None) not in (types if isinstance(types, tuple) else (types,)):
            raise ValueError(f"{key}: must be {_type_name(types)}, got null")
        if key not in cfg or value is None:
            continue
        if isinstance(value, (ListConfig, DictConfig)):
            value = OmegaConf.to_container(value)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)))
        if not ok:
            raise ValueError(f"{key}: must be {_type_name(types)}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{key}: must be one of {CHOICES[key]}, got {value!r}")
        if key in AT_LEAST_ONE and value < 1:
            raise ValueError(f"{key}: must be an integer >= 1, got {value!r}")
    for key in ("clm_weight", "kd_weight", "hidden_weight", "fused_teacher_cache_mib",
                "peak_flops_per_device"):
        value = cfg.get(key, SCALARS[key][1])
        if value is not None and value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value!r}")
    weights = {k: cfg.get(k, SCALARS[k][1]) for k in ("clm_weight", "kd_weight", "hidden_weight")}
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"clm_weight, kd_weight, hidden_weight: at least one must be > 0, got {weights}")
    if cfg.get("clip_grad_norm") is not None and cfg.clip_grad_norm <= 0:
        raise ValueError(f"clip_grad_norm: must be > 0 or null, got {cfg.clip_grad_norm!r}")
    if weights["kd_weight"] > 0:
        if cfg.get("kd_loss") is None:
            raise ValueError("kd_loss: missing while kd_weight > 0; give a divergence component "
                             "(e.g. tad_torchtune.losses.TADLoss) or set kd_weight: 0")
        kd_cls = _check_component(cfg, "kd_loss")
        if not (isinstance(kd_cls, type) and issubclass(kd_cls, Divergence)):
            shipped = ", ".join(f"{c.__module__.rsplit('.', 1)[0]}.{c.__name__}"
                                for c in DIVERGENCES.values())
            raise ValueError(
                f"kd_loss._component_: {cfg.kd_loss._component_!r} is not a divergence; accepted: "
                f"{shipped}, or another subclass of tad_torchtune.losses.Divergence"
            )
    if weights["hidden_weight"] > 0 and cfg.get("hidden_loss") is None:
        raise ValueError("hidden_loss: missing while hidden_weight > 0; give e.g. "
                         "tad_torchtune.losses.HiddenCosineLoss or set hidden_weight: 0")
    layers = cfg.get("hidden_layers")
    if layers is not None:
        for pair in layers:
            if not (len(pair) == 2 and all(isinstance(i, int) for i in pair)):
                raise ValueError(
                    f"hidden_layers: must be a list of [student_layer, teacher_layer] integer "
                    f"pairs (-1 = final hidden state), got {OmegaConf.to_container(layers)!r}"
                )
    if cfg.get("teacher_cache_dir") and weights["hidden_weight"] > 0:
        raise ValueError("hidden_weight: the hidden-state loss needs the live teacher's hidden "
                         f"states, which a teacher cache does not hold (teacher_cache_dir="
                         f"{cfg.teacher_cache_dir!r}); set hidden_weight: 0 or drop "
                         "teacher_cache_dir")
    if cfg.get("device") == "cuda" and not _cuda_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False; use 'cpu'")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_package_paths(node: DictConfig | ListConfig) -> None:
    """Replace, in place, every string ``pkg://PATH`` by the path of the file or folder PATH
    shipped in ``tad_torchtune/assets`` (the bundled demo teacher, tokenizer and corpus)."""
    from tad_torchtune.data import resolve_asset

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if OmegaConf.is_interpolation(node, key):
            continue  # resolved where it points to
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            resolve_package_paths(value)
        elif isinstance(value, str) and value.startswith("pkg://"):
            node[key] = resolve_asset(value)


def resolve_config_argv(argv: list[str]) -> list[str]:
    """Map ``--config NAME`` to a config shipped in ``tad_torchtune.configs`` when NAME is not a
    file, so ``tune run tad_distill --config demo`` works from any folder."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if i < len(argv) and not Path(argv[i]).exists():
            from tad_torchtune.cli import shipped_configs

            name = argv[i][:-5] if argv[i].endswith(".yaml") else argv[i]
            shipped = shipped_configs()
            if name in shipped:
                argv[i] = str(shipped[name])
            else:
                print(f"--config: {argv[i]!r} is neither a file nor a bundled config; bundled: "
                      f"{sorted(shipped)}", file=sys.stderr)
                raise SystemExit(2)
    return argv
