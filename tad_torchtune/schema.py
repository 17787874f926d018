"""Each recipe's config keys in one place: their kinds, defaults, accepted values and one-line
docs. Validation runs from them (before any model or data loads, every error naming the key, its
value and what is accepted), the recipes read their values through them (``Schema.get``), and
the README's key table is generated from them (``python -m tad_torchtune.schema``; a test holds
the README to it).

Also here: ``pkg://`` paths and ``--config NAME`` resolution, shared by every recipe.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tad_torchtune.errors import ConfigError
from tad_torchtune.metrics import TAIL_KS

#: marks a key without a default
REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One config key.

    Attributes:
        name: the top-level key.
        doc: what it does, one line (the README's table).
        default: its value when absent (``REQUIRED``: it must be given; a component's None:
            optional).
        types: accepted Python types of a scalar (``type(None)`` for null); empty for a
            component (a mapping with a ``_component_`` dotpath).
        choices: the accepted values, when a fixed list.
        minimum: the least accepted value of a number.
        shown: how the README shows the default, when not the value itself.
    """

    name: str
    doc: str
    default: Any = None
    types: tuple[type, ...] = ()
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    shown: str | None = None

    @property
    def component(self) -> bool:
        return not self.types

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def type_names(self) -> str:
        """The accepted types, as the error messages say them (``int or float``, ``bool``)."""
        return " or ".join("null" if t is type(None) else t.__name__ for t in self.types)

    def bound(self) -> str:
        """The accepted range, as the error messages say it."""
        null = " or null" if type(None) in self.types else ""
        if self.types in ((int,), (int, type(None))):
            return f"an integer >= {self.minimum:g}{null}"
        return f">= {self.minimum:g}{null}"


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


class Schema:
    """The keys of one recipe's config.

    Args:
        recipe: the recipe's name (messages, the README's headings).
        keys: its keys, in the order the README lists them.
        closed: unknown top-level keys are errors (a recipe that reads another recipe's config,
            as ``tad_prepare`` reads ``tad_distill``'s, is not closed).
    """

    def __init__(self, recipe: str, keys: list[Key], *, closed: bool = True) -> None:
        self.recipe = recipe
        self.keys = {k.name: k for k in keys}
        self.closed = closed

    def __getitem__(self, name: str) -> Key:
        return self.keys[name]

    def get(self, cfg: DictConfig, name: str) -> Any:
        """The key's value in ``cfg``, or its default (plain Python containers)."""
        key = self.keys[name]
        value = cfg.get(name, None if key.required else key.default)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) and \
            not key.component else value

    def validate(self, cfg: DictConfig) -> None:
        """Check every key of ``cfg`` against the schema (the recipe adds its cross-key
        checks). An optional component switched off from the command line
        (``validation_dataset=null`` sets its ``_component_`` to null: torchtune's CLI cannot
        remove a node) is removed.

        Raises:
            ConfigError: naming the first offending key, its value and what is accepted.
        """
        for key in self.keys.values():
            node = cfg.get(key.name)
            if (key.component and not key.required and isinstance(node, DictConfig)
                    and "_component_" in node and node._component_ is None):
                cfg[key.name] = None
        if self.closed:
            unknown = sorted(set(cfg.keys()) - set(self.keys))
            if unknown:
                raise ConfigError(f"unknown top-level config key(s) {unknown}; accepted keys: "
                                  f"{sorted(self.keys)}")
        for key in self.keys.values():
            present = key.name in cfg and cfg[key.name] is not None
            if key.required and not present:
                what = f"a `{key.name}` component" if key.component else "a value"
                raise ConfigError(f"{key.name}: missing; the recipe needs {what} ({key.doc})")
            if not present:
                if key.name in cfg and not key.component and type(None) not in key.types:
                    raise ConfigError(f"{key.name}: must be {key.type_names()}, got null")
                continue
            if key.component:
                component_class(cfg, key.name)
                continue
            value = self.get(cfg, key.name)
            if not _type_ok(value, key.types):
                raise ConfigError(f"{key.name}: must be {key.type_names()}, got {value!r}")
            if key.choices is not None and value not in key.choices:
                raise ConfigError(f"{key.name}: must be one of {key.choices}, got {value!r}")
            if key.minimum is not None and value is not None and not value >= key.minimum:
                raise ConfigError(f"{key.name}: must be {key.bound()}, got {value!r}")

    def markdown(self) -> str:
        """The README's table of these keys: key, default, meaning."""
        rows = ["| key | default | meaning |", "|---|---|---|"]
        for key in self.keys.values():
            if key.shown is not None:
                shown = key.shown
            elif key.required:
                shown = "required"
            elif key.default is None:
                shown = "none" if key.component else "null"
            elif isinstance(key.default, bool):
                shown = str(key.default).lower()
            elif isinstance(key.default, str):
                shown = f"`{key.default}`"
            else:
                shown = f"{key.default:g}" if isinstance(key.default, float) else str(key.default)
            rows.append(f"| `{key.name}` | {shown} | {key.doc} |")
        return "\n".join(rows)


def component_class(cfg: DictConfig, name: str) -> Any:
    """The object a component node's ``_component_`` names, imported.

    Raises:
        ConfigError: the node is not a mapping with a dotpath, or the dotpath does not import.
    """
    from torchtune.config._utils import _get_component_from_path

    node = cfg.get(name)
    if not isinstance(node, DictConfig) or "_component_" not in node:
        shown = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
        raise ConfigError(
            f"{name}: must be a mapping with a `_component_` dotpath (e.g. `{name}._component_: "
            f"package.module.name`), got {shown!r}")
    if not isinstance(node._component_, str):
        raise ConfigError(f"{name}._component_: must be a dotpath (package.module.name), got "
                          f"{node._component_!r}")
    try:
        return _get_component_from_path(node._component_)
    except Exception as e:  # torchtune raises its own InstantiationError
        raise ConfigError(f"{name}._component_: cannot import {node._component_!r} ({e})"
                          ) from None


_INT, _NUM, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_OPT_INT, _OPT_NUM, _OPT_STR = (int, type(None)), (int, float, type(None)), (str, type(None))

#: ``tad_distill``'s keys; ``tad_cache`` reads the same config
DISTILL = Schema("tad_distill", [
    Key("output_dir", "checkpoints, logs, exported student", REQUIRED, _STR),
    Key("seed", "model init, data order", 0, _INT),
    Key("device", "where the models run", "cpu", _STR, choices=("cpu", "cuda")),
    Key("dtype", "parameters and activations (losses accumulate in float32)", "fp32", _STR,
        choices=("bf16", "fp32")),
    Key("tokenizer", "the student's torchtune tokenizer component", REQUIRED),
    Key("teacher_tokenizer", "the teacher's, when it differs: ids of the shared vocabulary are "
        "checked to agree (the teacher reads the student's ids)"),
    Key("dataset", "dataset component called with the tokenizer "
        "(`tad_torchtune.data.text_block_dataset`, or a torchtune dataset builder)", REQUIRED),
    Key("validation_dataset", "held-out set for `val_kl`, `val_ce`, `val_ppl`"),
    Key("shuffle", "new sample order each epoch, fixed by `seed` and the epoch", True, _BOOL),
    Key("batch_size", "micro-batch per process", 1, _INT, minimum=1),
    Key("gradient_accumulation_steps", "micro-batches per optimizer step", 1, _INT, minimum=1),
    Key("teacher_model", "the teacher's torchtune model builder, or "
        "`tad_torchtune.models.hf_decoder` with `checkpoint_dir` (read from its config.json; "
        "`max_seq_len` to shorten it)",
        REQUIRED),
    Key("teacher_checkpointer", "e.g. `torchtune.training.FullModelHFCheckpointer`", REQUIRED),
    Key("student_model", "`tad_torchtune.models.pruned_student` (initialised from the teacher), "
        "any builder, or `hf_decoder`", REQUIRED),
    Key("student_checkpointer", "loads a pretrained student (e.g. TinyLlama)"),
    Key("vocab_alignment", "`truncate_teacher` for a teacher with a padded, larger vocabulary",
        "exact", _STR, choices=("exact", "truncate_teacher")),
    Key("teacher_id_merges", "`{teacher_id: student_id}`: teacher ids past the student's "
        "vocabulary whose probability is added to a student id's before `truncate_teacher` "
        "cuts them (e.g. `{32000: 2}`, Phi-3's end-of-text into Llama-2's)", None,
        (dict, type(None))),
    Key("kd_loss", "a divergence of `tad_torchtune.losses`", shown="required if `kd_weight > 0`"),
    Key("hidden_loss", "`tad_torchtune.losses.HiddenCosineLoss`",
        shown="required if `hidden_weight > 0`"),
    Key("hidden_layers", "`[student_layer, teacher_layer]` pairs for the hidden loss (input of "
        "that layer; -1 = final normed hidden state), summed over the pairs", None,
        (list, type(None)),
        shown="`[[-1, -1]]`"),
    Key("clm_weight", "weight of the student's cross-entropy (paper: 1)", 1.0, _NUM, minimum=0),
    Key("kd_weight", "weight of `kd_loss` (paper: 1)", 1.0, _NUM, minimum=0),
    Key("hidden_weight", "weight of `hidden_loss`", 0.0, _NUM, minimum=0),
    Key("fused", "the fused head: CE + divergence from hidden states and output weights, one "
        "student projection per chunk, no `[B, T, V]` logits", False, _BOOL),
    Key("fused_teacher_cache_mib", "fused TAD: MiB of teacher chunk projections kept between its "
        "two passes (0: recompute; null: every one, a row's `T x V` at a time)", 128, _OPT_NUM,
        minimum=0),
    Key("fused_float32_weight_grad", "fused: sum the output-weight gradient over chunks in "
        "float32; false sums it in the weight's dtype (bf16: saves a float32 `[V, D]`)", True,
        _BOOL),
    Key("loss_chunk_size", "tokens whose logits are upcast to float32 at once, on every loss "
        "path", 1024, _INT, minimum=1),
    Key("optimizer", "e.g. `torch.optim.AdamW` (`fused: true` on CUDA)", REQUIRED),
    Key("lr_scheduler", "e.g. `torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup`"),
    Key("clip_grad_norm", "max gradient norm, or null", 1.0, _OPT_NUM),
    Key("epochs", "passes over the data", 1, _INT, minimum=1),
    Key("max_steps_per_epoch", "cap on optimizer steps per epoch", None, _OPT_INT, minimum=1),
    Key("max_steps", "cap on optimizer steps", None, _OPT_INT, minimum=1),
    Key("compile", "`torch.compile` each block of student and teacher, and the loss (unfused: "
        "whole; fused: its per-chunk function)", False, _BOOL),
    Key("enable_activation_checkpointing", "recompute student blocks in backward", False, _BOOL),
    Key("fsdp_cpu_offload", "FSDP2 CPU offload of parameters, gradients and optimizer state",
        False, _BOOL),
    Key("save_every_n_steps", "training checkpoint (and HF export) period; always at the end",
        None, _OPT_INT, minimum=1),
    Key("keep_last_n_checkpoints", "older checkpoints are deleted", 2, _INT, minimum=1),
    Key("eval_every_n_steps", "validation period; always at the end", None, _OPT_INT, minimum=1),
    Key("max_eval_batches", "cap on validation batches per process (`validation_dataset."
        "max_blocks`: on rows, for any batch size)", None, _OPT_INT, minimum=1),
    Key("log_every_n_steps", "metric logging period", 1, _INT, minimum=1),
    Key("resume_from_checkpoint", "continue from `output_dir/checkpoints/latest`", False, _BOOL),
    Key("export_hf", "export the student with each checkpoint, to `checkpoints/step_N/hf` "
        "(always at the end, to `output_dir/student`)", True, _BOOL),
    Key("log_peak_memory_stats", "log peak GPU memory (peak RSS on CPU)", True, _BOOL),
    Key("metric_logger", "any torchtune metric logger (disk, TensorBoard, W&B)",
        shown="`DiskLogger` in `output_dir/logs`"),
    Key("document_mask", "attention stops at document boundaries and positions restart per "
        "document (rows of the token store hold several documents; flex attention on CUDA)",
        False, _BOOL),
    Key("resume_on_different_data", "resume even when the checkpoint's token store differs from "
        "this run's", False, _BOOL),
    Key("profiler", "torchtune's profiler (`torchtune.training.setup_torch_profiler`: "
        "`profiler.enabled=true`, its schedule): traces in `output_dir/profiling_outputs`, and "
        "per profiled cycle the device's busy time and kernel time by kind as `profile_*` "
        "metrics (`tad_cache`: a line per cycle, a step being a batch)", shown="off"),
    Key("peak_flops_per_device", "peak FLOP/s of one device, for `mfu` (known GPUs by default; "
        "none on a CPU unless given)", None, _OPT_NUM, minimum=0, shown="known GPUs"),
    Key("teacher_cache_dir", "train from a teacher cache written by `tad_cache` instead of "
        "running the teacher", None, _OPT_STR),
    Key("cache_mode", "`tad_cache`: `top_m` (the top ids plus one bucket: biased, serves every "
        "divergence) or `sampled` (the top ids plus draws from the rest: unbiased, TAD and "
        "forward KL); null: `sampled` when `kd_loss` can read it, else `top_m`", None, _OPT_STR,
        choices=("top_m", "sampled")),
    Key("cache_top_m", "`tad_cache`: teacher ids kept exactly per position (null: 48 for "
        "`top_m`, 12 for `sampled`)", None, _OPT_INT, minimum=1),
    Key("cache_samples", "`tad_cache` `sampled`: ids drawn from the rest per position", 32, _INT,
        minimum=1),
    Key("cache_seed", "`tad_cache` `sampled`: the seed of the draws", 0, _INT),
    Key("cache_logp_dtype", "`tad_cache`: dtype of their log-probabilities", "float16", _STR,
        choices=("float16", "bfloat16", "float32")),
    Key("cache_shard_blocks", "`tad_cache`: blocks per shard file", 256, _INT, minimum=1),
])


def validate_config(cfg: DictConfig) -> None:
    """Check a ``tad_distill`` (or ``tad_cache``) config before anything heavy is built: every
    key (``DISTILL``), then what keys say of each other.

    Raises:
        ConfigError: naming the first offending key, its value and what is accepted.
    """
    from tad_torchtune.losses import DIVERGENCES, Divergence
    from tad_torchtune.profiling import validate_profiler

    profiler = cfg.get("profiler")
    if profiler is not None and not (isinstance(profiler, DictConfig)
                                     and "_component_" in profiler
                                     and profiler._component_ is None):
        validate_profiler(profiler)  # first: it gives the node torchtune's default component
    DISTILL.validate(cfg)
    weights = {k: DISTILL.get(cfg, k) for k in ("clm_weight", "kd_weight", "hidden_weight")}
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"clm_weight, kd_weight, hidden_weight: at least one must be > 0, got "
                          f"{weights}")
    clip = DISTILL.get(cfg, "clip_grad_norm")
    if clip is not None and clip <= 0:
        raise ConfigError(f"clip_grad_norm: must be > 0 or null, got {clip!r}")
    if weights["kd_weight"] > 0:
        if cfg.get("kd_loss") is None:
            raise ConfigError("kd_loss: missing while kd_weight > 0; give a divergence component "
                              "(e.g. tad_torchtune.losses.TADLoss) or set kd_weight: 0")
        kd_cls = component_class(cfg, "kd_loss")
        if not (isinstance(kd_cls, type) and issubclass(kd_cls, Divergence)):
            shipped = ", ".join(f"{c.__module__.rsplit('.', 1)[0]}.{c.__name__}"
                                for c in DIVERGENCES.values())
            raise ConfigError(
                f"kd_loss._component_: {cfg.kd_loss._component_!r} is not a divergence; "
                f"accepted: {shipped}, or another subclass of tad_torchtune.losses.Divergence")
    if weights["hidden_weight"] > 0 and cfg.get("hidden_loss") is None:
        raise ConfigError("hidden_loss: missing while hidden_weight > 0; give e.g. "
                          "tad_torchtune.losses.HiddenCosineLoss or set hidden_weight: 0")
    if weights["hidden_weight"] > 0:
        hidden_cls = component_class(cfg, "hidden_loss")
        if isinstance(hidden_cls, type) and issubclass(hidden_cls, Divergence):
            raise ConfigError(
                f"hidden_loss._component_: {cfg.hidden_loss._component_!r} is a divergence of "
                f"logits, not a loss of hidden states; accepted: "
                f"tad_torchtune.losses.HiddenCosineLoss (a divergence goes in kd_loss)")
    layers = DISTILL.get(cfg, "hidden_layers")
    if layers is not None:
        for pair in layers:
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
                raise ConfigError(
                    f"hidden_layers: must be a list of [student_layer, teacher_layer] integer "
                    f"pairs (-1 = final hidden state), got {layers!r}")
    if cfg.get("teacher_cache_dir") and weights["hidden_weight"] > 0:
        raise ConfigError("hidden_weight: the hidden-state loss needs the live teacher's hidden "
                          f"states, which a teacher cache does not hold (teacher_cache_dir="
                          f"{cfg.teacher_cache_dir!r}); set hidden_weight: 0 or drop "
                          "teacher_cache_dir")
    if DISTILL.get(cfg, "device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but torch.cuda.is_available() is False; "
                              "use 'cpu'")
    elif DISTILL.get(cfg, "fsdp_cpu_offload"):
        # FSDP2 pins the offloaded shards in page-locked memory, which needs a GPU
        raise ConfigError(f"fsdp_cpu_offload: true offloads a GPU's shards to the host; with "
                          f"device={DISTILL.get(cfg, 'device')!r} set it to false")


#: ``tad_eval``'s keys
EVAL = Schema("tad_eval", [
    Key("output_dir", "the report (`eval.json`) and the plots", REQUIRED, _STR),
    Key("device", "where the models run", "cpu", _STR, choices=("cpu", "cuda")),
    Key("dtype", "the models' dtype (metrics accumulate in float32/float64)", "fp32", _STR,
        choices=("bf16", "fp32", "fp16")),
    Key("seed", "random state", 0, _INT),
    Key("tokenizer", "the tokenizer component the dataset is built with", REQUIRED),
    Key("teacher_tokenizer", "the teacher's, when it differs: ids of the shared vocabulary are "
        "checked to agree, other splits and a cut end-of-text told (as `tad_distill`)"),
    Key("dataset", "held-out rows: a `tad_torchtune.data.text_block_dataset`, or a torchtune "
        "dataset builder (instruct, chat, packed)",
        REQUIRED),
    Key("teacher", "`{checkpoint_dir, checkpoint_files?, model?, model_type?}`: a Hugging Face "
        "folder", REQUIRED, (dict,)),
    Key("students", "name -> the same kind of mapping, one per student", REQUIRED, (dict,)),
    Key("batch_size", "blocks per batch", 8, _INT, minimum=1),
    Key("max_batches", "cap on batches (null: the whole set)", None, _OPT_INT, minimum=1),
    Key("chunk_size", "tokens whose logits are upcast to float32 at once by the metrics", 1024,
        _INT, minimum=1),
    Key("num_bins", "Full-ECE bins over [0, 1]", 10, _INT, minimum=1),
    Key("tail_ks", "the K of the teacher's tail masses (the paper's Figure 2)", list(TAIL_KS),
        (list,), shown=f"`{list(TAIL_KS)}`"),
    Key("vocab_alignment", "`truncate_teacher` for a teacher with a padded, larger vocabulary",
        "exact", _STR, choices=("exact", "truncate_teacher")),
    Key("teacher_id_merges", "`{teacher_id: student_id}`: teacher ids past the student's "
        "vocabulary whose probability is added to a student id's before `truncate_teacher` "
        "cuts them (e.g. `{32000: 2}`, Phi-3's end-of-text into Llama-2's)", None,
        (dict, type(None))),
    Key("document_mask", "attention stops at document boundaries, as `tad_distill`'s "
        "`document_mask` (set it as the run did: the KL and CE are then its `val_kl`, `val_ce`)",
        False, _BOOL),
])


#: the keys ``tad_prepare`` reads, from any recipe's config (the others are left alone)
PREPARE = Schema("tad_prepare", [
    Key("tokenizer", "the tokenizer the stores are built with", REQUIRED),
    Key("dataset", "a `tad_torchtune.data.text_block_dataset`: its `source`, `column`, "
        "`store_dir`, `token_dtype`", REQUIRED),
    Key("validation_dataset", "another one, when it reads other files"),
    Key("num_workers", "tokenizer processes (null: every core; a Hugging Face tokenizer uses "
        "its own threads)", None, _OPT_INT, minimum=1),
], closed=False)


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
    file, so ``tune run tad_distill --config demo`` works from any folder (a FOLDER named
    ``demo`` there included: the demo's ``--out demo`` makes one)."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if i < len(argv) and not Path(argv[i]).is_file():
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


if __name__ == "__main__":  # the README's key tables
    for schema in (DISTILL, EVAL, PREPARE):
        print(f"### `{schema.recipe}`\n\n{schema.markdown()}\n")


def check_hidden_layers(student: tuple[int, ...], teacher: tuple[int, ...], *,
                        student_layers: int, teacher_layers: int) -> None:
    """Check that ``hidden_layers``' pairs name layers the two models have: ``-1`` or an index
    ``0..layers`` (``layers``: the final normed hidden state), once their sizes are known.

    Raises:
        ConfigError: naming ``hidden_layers``, the pair and the model's number of layers.
    """
    for s_i, t_i in zip(student, teacher):
        for index, layers, model in ((s_i, student_layers, "student_model"),
                                     (t_i, teacher_layers, "teacher_model")):
            if not -1 <= index <= layers:
                raise ConfigError(
                    f"hidden_layers: the pair {[s_i, t_i]} names layer {index} of {model}, which "
                    f"has {layers} layers; accepted: 0 to {layers} (the input of that layer; "
                    f"{layers}: the final normed hidden state) or -1 (the same)")


def divergence_node(cfg: DictConfig, key: str = "kd_loss") -> tuple[DictConfig, list[str]]:
    """The divergence node ``key`` without the keys that another registered divergence takes and
    its own does not: a loss swapped on the command line (``kd_loss._component_=...ForwardKLLoss``
    on a TAD config) leaves the config file's ``k``, ``beta`` and ``abar_scope`` beside it. A key
    no divergence takes (a typo) stays, for the builder to refuse.

    Returns:
        ``(node, the keys left out)``.
    """
    import inspect

    from tad_torchtune.losses import DIVERGENCES

    def arguments(cls: Any) -> set[str]:
        """The keyword arguments ``cls`` takes, those it passes on with ``**kwargs`` to the
        classes it derives from included."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            names.update(p.name for p in params
                         if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self")
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names

    own = arguments(component_class(cfg, key))
    others = set().union(*(arguments(cls) for cls in DIVERGENCES.values()))
    node = cfg[key]
    dropped = [k for k in node if k != "_component_" and k not in own and k in others]
    kept = OmegaConf.create({k: v for k, v in node.items() if k not in dropped})
    return kept, dropped


def instantiate_loss(cfg: DictConfig, key: str, prog: str, *, warn: bool = True) -> Any:
    """The loss of ``key`` (``kd_loss``, ``hidden_loss``) as the recipes build it: ``kd_loss``
    without the keys of another divergence (``divergence_node``, with one warning line when
    ``warn``), its ``ignore_index`` that of the recipe's labels.

    Raises:
        ConfigError: naming ``key``: an argument its component refuses, or another
            ``ignore_index`` (the recipes mark the positions that do not count with
            ``IGNORE_INDEX``, so another value would count them, or index with it).
    """
    from tad_torchtune.common import IGNORE_INDEX
    from tad_torchtune.errors import instantiate

    node = cfg[key]
    if key == "kd_loss":
        node, dropped = divergence_node(cfg, key)
        if dropped and warn:
            print(f"{prog}: warning: {key}: {', '.join(dropped)} left out: {node._component_} "
                  f"takes no such argument (another divergence's, left by swapping the loss)",
                  file=sys.stderr, flush=True)
    loss = instantiate(node, key)
    ignore_index = getattr(loss, "ignore_index", IGNORE_INDEX)
    if ignore_index != IGNORE_INDEX:
        raise ConfigError(f"{key}.ignore_index: {ignore_index} differs from the labels' "
                          f"{IGNORE_INDEX}, which mark the positions that do not count; "
                          f"accepted: {IGNORE_INDEX}")
    return loss
