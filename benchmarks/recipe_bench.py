"""The recipe's training step against a minimal loop doing the same work and against what a user
of another stack runs instead (transformers + Liger-Kernel): tokens/s, the ratios, MFU, peak
memory and where a recipe step's time goes.

    python benchmarks/recipe_bench.py [--device cpu|cuda] [--archs demo small ...]
        [--variants unfused fused ...] [--loops minimal peer peer_eager] [--steps 20]
        [--warmup 3] [--seq N] [--batch B] [--peer-compile layers|body]
        [--compile-backend inductor|eager] [--liger-stand-in] [--json PATH]

Per architecture (``ARCHS``: tiny ones for the CPU, the shipped configs' real teacher/student
pairs for a GPU) and variant (``VARIANTS``: fused or unfused head, compile, activation
checkpointing; the fused head's chunk, teacher cache and weight-gradient sum are those of the
pair's shipped config, ``loss_bench.HEAD_KEYS``, and the tiny Qwen2 and Gemma2 pairs take
those of the GPU pairs they stand in for), on random weights and synthetic token blocks (no
download), up to four loops over the same batches take turns step by step (recipe, minimal,
peer, peer_eager, recipe, ...), so that all of them see the same machine:

- ``recipe``: ``TADDistillRecipe`` set up from a config (``setup``) and stepped by its own
  ``train_step`` (preparation, the teacher and student heads, the step's one host
  synchronisation, throughput, a metrics line every step). Its ``teacher_checkpointer`` is this
  benchmark's ``RandomCheckpointer`` (random teacher weights, no file); nothing but the config,
  ``setup``, ``train_step`` and ``cleanup`` is used. On a GPU, ``setup`` runs under
  ``torch.device("cuda")``, so the models it builds are initialised there: a 9B teacher's random
  initialisation on the CPU's serial generator would take a minute of the GPU check.
- ``minimal``: the same work as a hand-written loop over the library: its own teacher and
  student, built as the recipe builds them (``build_model``, ``init_student_from_teacher``,
  ``parallelize``), teacher forward without autograd, student forward, the same loss functions
  (``fused_head``, or chunked CE + the divergence), backward, clipping, the same optimizer. The
  recipe / minimal ratio is the recipe's overhead.
- ``peer`` and ``peer_eager``: what a TRL user runs instead, ``PeerModels``: the same teacher
  and student as transformers models (``AutoModelForCausalLM`` from configs of the same sizes,
  ``hf_config_for`` of the torchtune models: ``Qwen2ForCausalLM``, ``Gemma2ForCausalLM``, ...),
  random weights, attention ``sdpa`` (``eager`` for Gemma2, whose soft-capped attention sdpa
  cannot compute: transformers refuses it), the student's embedding frozen (and tied) as the
  recipe's; the loss Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=1,
  weight_soft_loss=1)`` (CE + forward KL; its chunks of 1024 tokens, compiled) on the final hidden
  states and the ``lm_head`` weights; the config's optimizer (AdamW, fused on CUDA) and gradient
  clipping. ``peer`` compiles every decoder layer of both models (``torch.compile`` per block,
  as the recipe compiles its models; ``--peer-compile body``: each base model whole, as a
  Trainer's ``torch_compile`` does, minutes more to compile); ``peer_eager`` does not; both share
  models and optimizer.
  Liger has no logit soft-cap: the Gemma2 peer's loss reads uncapped logits (the recipe caps them
  at 30, one element-wise pass more). Without ``liger-kernel``, ``--liger-stand-in`` (the GPU
  check's dry run) gives the peer ``loss_bench.LigerStandIn`` instead, and its row says so.

Reported per loop: tokens/s (valid tokens of a step over its median time), MFU
(``tad_torchtune.flops``, model FLOPs of the architecture, the same for every loop; peak FLOP/s:
the known GPU's, or on a CPU the best float32 matmul rate measured in this process) and peak
memory: on CUDA the loop's own, what it allocated at set-up and kept from its first step
(models, optimizer state) plus the most any of its steps allocated beyond what was allocated
before the step, i.e. what it would need alone; on a CPU the process's peak RSS, all loops
together. Ratios, paired per round: ``recipe_over_LOOP`` is the median of the loop's step time
over the recipe's step time of the same round (> 1: the recipe is faster). The time split of a
recipe step into teacher forward, student forward + losses, backward, optimizer and the rest is
measured in a separate pass with synchronised timers (``TeacherHead``, ``StudentHead``,
``Tensor.backward``, torch.optim's global step hooks). With ``--profile`` (the GPU check), one
more step of each loop runs under ``torch.profiler`` (``step_profile.profile_step``): the time
the device was busy, its kernels' time by kind (matmul, attention, inductor's kernels, the
optimizer, copies, ...) and the kernels that took the most, per loop in the row's ``profiles``.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

ROOT = Path(__file__).resolve().parents[1]
# The installed project where there is one (an installed wheel holds tad_torchtune.configs, which
# the shipped configs' architectures read; a checkout has configs/ beside the package), else
# this checkout and its recipes.
if importlib.util.find_spec("tad_torchtune") is None:
    sys.path.insert(0, str(ROOT))
if importlib.util.find_spec("tad_distill") is None:
    sys.path.insert(0, str(ROOT / "recipes"))

import loss_bench  # noqa: E402  (Liger's loss as the loss benchmark builds it; the compile backend)
from step_profile import describe, profile_step, sync  # noqa: E402
import tad_distill  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torchtune import config, training  # noqa: E402

from tad_torchtune.common import IGNORE_INDEX  # noqa: E402
from tad_torchtune.data import Batch, collate  # noqa: E402
from tad_torchtune.schema import DISTILL, validate_config  # noqa: E402
from tad_torchtune.flops import peak_flops, step_flops_per_token  # noqa: E402
from tad_torchtune.head import StudentHead, TeacherHead  # noqa: E402
from tad_torchtune.losses.ce import chunked_cross_entropy  # noqa: E402
from tad_torchtune.losses.fused import fused_head  # noqa: E402
from tad_torchtune.models import (  # noqa: E402
    build_model,
    forward_hidden,
    hf_config_for,
    init_student_from_teacher,
    logit_softcap,
    output_weight,
    project_logits,
    resolve_teacher,
)
from tad_torchtune.parallel import parallelize  # noqa: E402

_LLAMA = "torchtune.models.llama3._component_builders.llama3"
_QWEN2 = "torchtune.models.qwen2._component_builders.qwen2"
_GEMMA2 = "torchtune.models.gemma2._component_builders.gemma2"
_TINY = {"vocab_size": 1024, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64,
         "intermediate_dim": 128, "max_seq_len": 128}
ARCHS: dict[str, dict[str, Any]] = {
    # the bundled demo's models and batches (configs/demo.yaml)
    "demo": dict(teacher={"_component_": _LLAMA, "vocab_size": 2048, "num_layers": 4,
                          "num_heads": 4, "num_kv_heads": 2, "embed_dim": 192,
                          "intermediate_dim": 512, "max_seq_len": 256, "rope_base": 500000},
                 student=dict(num_layers=2, intermediate_dim=256), seq=128, batch=8,
                 chunk=4096),
    # a larger CPU-sized pair: 8K vocabulary, 6 -> 3 layers of width 384
    "small": dict(teacher={"_component_": _LLAMA, "vocab_size": 8192, "num_layers": 6,
                           "num_heads": 6, "num_kv_heads": 2, "embed_dim": 384,
                           "intermediate_dim": 1024, "max_seq_len": 512, "rope_base": 500000},
                  student=dict(num_layers=3, intermediate_dim=768), seq=256, batch=4,
                  chunk=1024),
    # the GPU pairs' families at a CPU's size (the GPU check's dry run): Qwen2 with tied
    # embeddings; Gemma2 with its soft-caps and a sliding window shorter than the sequence; each
    # with the fused head's settings of the GPU pair's config (head_of)
    "tiny_qwen2": dict(teacher={"_component_": _QWEN2, **_TINY, "norm_eps": 1e-6,
                                "rope_base": 1e6, "tie_word_embeddings": True},
                       student=dict(num_layers=2, intermediate_dim=96), seq=64, batch=2,
                       chunk=None, head_of="qwen2_5_3b_to_half"),
    "tiny_gemma2": dict(teacher={"_component_": _GEMMA2, **_TINY, "head_dim": 16,
                                 "sliding_window_size": 32},
                        student=dict(num_layers=2, intermediate_dim=96), seq=64, batch=2,
                        chunk=None, head_of="gemma2_9b_to_third"),
    # the shipped configs' teacher/student pairs (GPU)
    "qwen2_5_3b_half": dict(config="qwen2_5_3b_to_half", seq=2048, batch=4, chunk=None),
    "qwen1_5_1_8b_to_1_2b": dict(config="qwen1_5_1_8b_to_1_2b", seq=2048, batch=4, chunk=None),
    # Gemma2-9B -> a third (gemma2_9b_to_third: 42 -> 14 layers, the paper's flagship) on ONE
    # GPU with sequences of 1024 ("short"; the config's are 2048): the recipe's and the peer's
    # teacher and student, with the student's gradients and AdamW state, 27.5 GiB per pair (a
    # 9.24B teacher, a 2.07B student of which 1.16B trainable; counted on the meta device), 55.1
    # GiB for both, plus one loop's activations and loss head at a time: expected within an
    # H100's 78 GiB (not yet run there), well within an H200's
    "gemma2_9b_third_short": dict(config="gemma2_9b_to_third", seq=1024, batch=2, chunk=None),
}
VARIANTS = {
    "unfused": {}, "fused": {"fused": True},
    "unfused_compiled": {"compile": True}, "fused_compiled": {"fused": True, "compile": True},
    "unfused_ac": {"enable_activation_checkpointing": True},
    "fused_ac": {"fused": True, "enable_activation_checkpointing": True},
    "fused_compiled_ac": {"fused": True, "compile": True,
                          "enable_activation_checkpointing": True},
}
#: the loops that can run beside the recipe, in their turn order
LOOPS = ("minimal", "peer", "peer_eager")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------ components the config points at


class NullTokenizer:
    """The tokenizer of synthetic data: nothing to encode."""

    pad_id = 0
    bos_id, eos_id = 0, 1


def null_tokenizer() -> NullTokenizer:
    return NullTokenizer()


class SyntheticBlocks(torch.utils.data.Dataset):
    """Random token blocks of ``max_seq_len`` (the recipe batches them like a token store's)."""

    fingerprint = "synthetic"

    def __init__(self, tokenizer: Any, *, vocab_size: int, max_seq_len: int, num_blocks: int,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        # on the CPU also under a torch.device("cuda") context (the recipe's set-up on a GPU)
        self.tokens = torch.randint(0, vocab_size, (num_blocks, max_seq_len), generator=gen,
                                    device="cpu")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.tokens[i]
        return {"tokens": t, "labels": t, "document_ids": torch.zeros_like(t)}


def synthetic_blocks(tokenizer: Any, **kwargs: Any) -> SyntheticBlocks:
    return SyntheticBlocks(tokenizer, **kwargs)


class RandomCheckpointer:
    """A ``teacher_checkpointer`` that reads no file: the teacher of ``ARCHS[arch]`` with
    torchtune's random initialisation (seeded), built on ``device`` in ``dtype``, handed out as
    torchtune's checkpointers hand out a checkpoint (``load_checkpoint()["model"]``, torchtune
    keys). The other keys of a checkpointer node (``checkpoint_dir``, whose ``config.json``
    names the model type, ``checkpoint_files``, ``model_type``, ``output_dir``) are accepted and
    left to the recipe."""

    def __init__(self, *, arch: str, dtype: str, device: str, seed: int = 0,
                 **checkpointer_keys: Any) -> None:
        self.arch, self.dtype, self.device, self.seed = arch, DTYPES[dtype], device, seed

    def load_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        teacher, _, _ = arch_nodes(self.arch)
        torch.manual_seed(self.seed)
        with training.set_default_dtype(self.dtype), torch.device(self.device):
            model, _ = build_model(teacher)
        return {training.MODEL_KEY: model.state_dict()}


# --------------------------------------------------------------------------------- the config


def arch_nodes(name: str) -> tuple[dict, dict, dict]:
    """(teacher node, student node, shapes) of an architecture."""
    arch = ARCHS[name]
    if "config" in arch:
        from tad_torchtune.demo import bundled_config

        cfg = OmegaConf.create(bundled_config(arch["config"]))
        teacher = OmegaConf.to_container(cfg.teacher_model, resolve=True)
        student = OmegaConf.to_container(cfg.student_model, resolve=False)
        student.pop("teacher", None)
    else:
        teacher, student = dict(arch["teacher"]), dict(arch["student"])
    student = {"_component_": "tad_torchtune.models.pruned_student", "teacher": teacher, **student}
    return teacher, student, arch


def config_head_settings(name: str) -> dict[str, Any]:
    """The fused head's settings (``loss_bench.HEAD_KEYS``) of the shipped config of an
    architecture (its ``config``, or the ``head_of`` a stand-in takes them from); none for the
    others."""
    arch = ARCHS[name]
    if "config" not in arch and "head_of" not in arch:
        return {}
    return loss_bench.config_head_settings(arch.get("config") or arch["head_of"])


def recipe_config(arch_name: str, variant: str, device: str, out: Path, *, num_blocks: int,
                  seq: int | None, batch: int | None, peak: float | None) -> dict:
    teacher, student, arch = arch_nodes(arch_name)
    seq, batch = seq or arch["seq"], batch or arch["batch"]
    family, kwargs = resolve_teacher(teacher)
    hf = out / "teacher_hf"
    hf.mkdir(parents=True, exist_ok=True)
    # the teacher's config.json, as a checkpoint's would be (the recipe checks the model node
    # against it)
    (hf / "config.json").write_text(json.dumps(peer_configs(teacher, student)[0]))
    dtype = "bf16" if device == "cuda" else "fp32"
    cfg = {
        "output_dir": str(out / "run"), "seed": 0, "device": device, "dtype": dtype,
        "tokenizer": {"_component_": "recipe_bench.null_tokenizer"},
        "dataset": {"_component_": "recipe_bench.synthetic_blocks",
                    "vocab_size": kwargs["vocab_size"], "max_seq_len": seq,
                    "num_blocks": num_blocks},
        "batch_size": batch, "gradient_accumulation_steps": 1,
        "teacher_model": teacher,
        "teacher_checkpointer": {"_component_": "recipe_bench.RandomCheckpointer",
                                 "arch": arch_name, "dtype": dtype, "device": device,
                                 "checkpoint_dir": str(hf), "checkpoint_files": [],
                                 "model_type": family.checkpointer_model_type,
                                 "output_dir": str(out / "unused")},
        "student_model": student,
        "kd_loss": {"_component_": "tad_torchtune.losses.TADLoss", "k": 10, "beta": 2.0},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-5,
                      **({"fused": True} if device == "cuda" else {})},
        "clip_grad_norm": 1.0, "max_steps": 10**6, "log_every_n_steps": 1, "export_hf": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(out / "logs")},
        "peak_flops_per_device": peak,
        **config_head_settings(arch_name),  # the head as the shipped config runs it
        **VARIANTS[variant],
    }
    if arch.get("chunk"):
        cfg["loss_chunk_size"] = arch["chunk"]
    return cfg


def _setting(cfg: DictConfig, key: str) -> Any:
    """A recipe setting of ``cfg``, or the recipe's default for it."""
    return DISTILL.get(cfg, key)


# ------------------------------------------------------------------------------------ loops


class MinimalLoop:
    """The recipe's work as a hand-written loop over the library, on models of its own built
    as the recipe builds them (see the module docstring)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.device = device
        node = OmegaConf.to_container(cfg.teacher_checkpointer, resolve=True)
        node.pop("_component_")
        state = RandomCheckpointer(**node).load_checkpoint()[training.MODEL_KEY]
        compile = bool(_setting(cfg, "compile"))
        with training.set_default_dtype(DTYPES[cfg.dtype]), torch.device(device):
            self.teacher, _ = build_model(cfg.teacher_model)
            self.teacher.load_state_dict(state)
            torch.manual_seed(cfg.seed)
            self.student, _ = build_model(cfg.student_model)
            init_student_from_teacher(self.student, state)
        del state
        self.teacher.eval().requires_grad_(False)
        self.student.train()
        parallelize(self.teacher, compile=compile)
        parallelize(self.student, compile=compile, activation_checkpointing=bool(
            _setting(cfg, "enable_activation_checkpointing")))
        self.kd = config.instantiate(cfg.kd_loss)
        self.fused = bool(_setting(cfg, "fused"))
        self.chunk = int(_setting(cfg, "loss_chunk_size"))
        self.fused_options = {
            "teacher_cache_mib": _setting(cfg, "fused_teacher_cache_mib"),
            "float32_weight_grad": bool(_setting(cfg, "fused_float32_weight_grad")),
            "compile_chunks": compile}
        # as the recipe's head: the unfused divergence compiled whole
        self.kd_sum = (torch.compile(self.kd.sum_and_count) if compile and not self.fused
                       else self.kd.sum_and_count)
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, self.trainable)
        self.clip = float(cfg.clip_grad_norm)

    def step(self, batch: Batch) -> None:
        batch = batch.to(self.device)
        tokens, labels = batch.tokens, batch.labels
        n = (labels != IGNORE_INDEX).sum()
        teacher, student = self.teacher, self.student
        with torch.no_grad():
            t_hidden, _ = forward_hidden(teacher, tokens)
            t_logits = None if self.fused else project_logits(teacher, t_hidden)
        hidden, _ = forward_hidden(student, tokens)
        if self.fused:
            loss = fused_head(hidden, output_weight(student), labels, divergence=self.kd,
                              teacher_hidden=t_hidden, teacher_weight=output_weight(teacher),
                              teacher_softcap=logit_softcap(teacher),
                              student_softcap=logit_softcap(student), compute_ce=True,
                              chunk_size=self.chunk, **self.fused_options).objective
        else:
            logits = project_logits(student, hidden)
            ce, _ = chunked_cross_entropy(logits, labels, chunk_size=self.chunk)
            loss = ce + self.kd_sum(logits, t_logits, labels).total
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def peer_configs(teacher_node: dict, student_node: dict) -> tuple[dict, dict, Any, Any]:
    """The Hugging Face configs of the teacher and the student, read off the torchtune models
    (built on the meta device: no memory, no initialisation) by ``hf_config_for``, and those
    meta models (their FLOPs, which parameters are frozen)."""
    family, kwargs = resolve_teacher(teacher_node)
    base = {"model_type": family.hf_model_type, "rope_theta": kwargs.get("rope_base"),
            "rms_norm_eps": kwargs.get("norm_eps"),
            "max_position_embeddings": kwargs.get("max_seq_len"),
            "head_dim": None,  # present, so hf_config_for writes the model's (Gemma2's differs)
            "use_cache": False}
    base = {k: v for k, v in base.items() if v is not None or k == "head_dim"}
    with torch.device("meta"):
        teacher, _ = build_model(teacher_node)
        student, _ = build_model(student_node)
    return (hf_config_for(teacher, base, family), hf_config_for(student, base, family), teacher,
            student)


class PeerModels:
    """What a TRL user runs instead (see the module docstring): transformers models of the same
    sizes, Liger-Kernel's fused linear JSD as CE + forward KL, the config's optimizer. ``step``
    runs eagerly or, with ``compiled``, with every decoder layer of both models compiled (the
    layers swapped for ``torch.compile`` wrappers of themselves: one set of weights for both;
    the recipe's compile scope, and a few graphs to compile), or with ``compile_scope="body"``
    each base model compiled whole (``torch.compile(model.model)``, as a Trainer's
    ``torch_compile`` would; one graph of every layer: minutes of compilation on a GPU)."""

    def __init__(self, cfg: DictConfig, device: torch.device, *, attention: str | None,
                 stand_in: bool, compile_scope: str = "layers") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device, self.compile_scope = device, compile_scope
        t_cfg, s_cfg, _, meta_student = peer_configs(
            OmegaConf.to_container(cfg.teacher_model, resolve=True),
            OmegaConf.to_container(cfg.student_model, resolve=True))
        # transformers' Gemma2 refuses sdpa (it cannot soft-cap attention scores)
        self.attention = attention or ("eager" if t_cfg["model_type"] == "gemma2" else "sdpa")
        dtype = DTYPES[cfg.dtype]
        models = []
        with torch.device(device):
            for hf in (t_cfg, s_cfg):
                hf = AutoConfig.for_model(**hf)
                models.append(AutoModelForCausalLM.from_config(
                    hf, attn_implementation=self.attention, dtype=dtype))
        self.teacher, self.student = models
        self.teacher.eval().requires_grad_(False)
        self.student.train()
        # frozen as the recipe's student (its embedding; its output projection, when untied)
        self.student.get_input_embeddings().weight.requires_grad_(
            meta_student.tok_embeddings.weight.requires_grad)
        self.student.get_output_embeddings().weight.requires_grad_(
            output_weight(meta_student).requires_grad)
        self.layers = {m: {False: m.base_model.layers} for m in models}
        self.bodies: dict = {}  # compile_scope "body": the compiled base models
        self.loss = loss_bench.liger_jsd_loss(device, ce=True, stand_in=stand_in)
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, self.trainable)
        self.clip = float(cfg.clip_grad_norm)

    @property
    def loss_name(self) -> str:
        if getattr(self.loss, "stand_in", False):
            return "LigerStandIn (liger-kernel not installed: the same loss by plain autograd)"
        return f"liger-kernel {importlib.metadata.version('liger-kernel')} " \
               f"LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=1, weight_soft_loss=1)"

    def _body(self, model, compiled: bool):
        """``model``'s base model (embedding, layers, final norm) as this step runs it: eager,
        with compiled layers (``compile_scope="layers"``) or compiled whole (``"body"``)."""
        versions = self.layers[model]
        if compiled and self.compile_scope == "layers" and True not in versions:
            versions[True] = torch.nn.ModuleList(torch.compile(layer) for layer in versions[False])
        model.base_model.layers = versions[compiled and self.compile_scope == "layers"]
        if compiled and self.compile_scope == "body":
            if model not in self.bodies:
                self.bodies[model] = torch.compile(model.base_model)
            return self.bodies[model]
        return model.base_model

    def step(self, batch: Batch, compiled: bool) -> None:
        batch = batch.to(self.device)
        tokens, labels = batch.tokens, batch.labels
        with torch.no_grad():
            h_t = self._body(self.teacher, compiled)(input_ids=tokens).last_hidden_state
        h_s = self._body(self.student, compiled)(input_ids=tokens).last_hidden_state  # (B, T, D)
        loss = self.loss(h_s.flatten(0, 1), self.student.get_output_embeddings().weight,
                         h_t.flatten(0, 1), self.teacher.get_output_embeddings().weight,
                         labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------- measurement


def cpu_matmul_peak(repeats: int = 5, n: int = 2048) -> float:
    """The best float32 matmul rate (FLOP/s) of this CPU with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


class Loop:
    """One loop's step and what it measured. Loops of the same ``owner`` (the two peers) share
    their set-up's memory."""

    def __init__(self, name: str, step, owner: str) -> None:
        self.name, self.step, self.owner = name, step, owner
        self.times: list[float] = []
        self.step_peak = 0  # bytes a step allocated beyond what was allocated before it


def run_rounds(loops: list[Loop], batches: list[dict], device: torch.device, warmup: int,
               steps: int, kept: dict[str, int]) -> None:
    """``warmup + steps`` rounds, every loop one step on the round's batch, in turn; what the
    first step of a loop leaves allocated (optimizer state) is added to ``kept[owner]``."""
    for i in range(warmup + steps):
        for loop in loops:
            sync(device)
            before = _allocated(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loop.step(batches[i])
            sync(device)
            seconds = time.perf_counter() - t0
            if device.type == "cuda":
                loop.step_peak = max(loop.step_peak, torch.cuda.max_memory_allocated() - before)
                if i == 0:
                    kept[loop.owner] += torch.cuda.memory_allocated() - before
            if i >= warmup:
                loop.times.append(seconds)


def time_split(recipe, batches, device: torch.device) -> dict[str, float]:
    """Mean seconds per step in each part of a recipe step, with synchronised timers around the
    teacher head, the student head, backward and the optimizer step; "other" is the rest (data,
    preparation, clipping, the host synchronisation, logging)."""
    parts = {"teacher_forward": 0.0, "student_forward_and_losses": 0.0, "backward": 0.0,
             "optimizer": 0.0}

    def timed(name, fn):
        def run(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            parts[name] += time.perf_counter() - t0
            return out

        return run

    started = []

    def before_step(optimizer, args, kwargs):
        sync(device)
        started.append(time.perf_counter())

    def after_step(optimizer, args, kwargs):
        sync(device)
        parts["optimizer"] += time.perf_counter() - started.pop()

    saved = (TeacherHead.__call__, StudentHead.forward, torch.Tensor.backward)
    TeacherHead.__call__ = timed("teacher_forward", TeacherHead.__call__)
    StudentHead.forward = timed("student_forward_and_losses", StudentHead.forward)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    hooks = (register_optimizer_step_pre_hook(before_step),
             register_optimizer_step_post_hook(after_step))
    try:
        t0 = time.perf_counter()
        for batch in batches:
            recipe.train_step(iter([batch]))
        sync(device)
        total = time.perf_counter() - t0
    finally:
        TeacherHead.__call__, StudentHead.forward, torch.Tensor.backward = saved
        for hook in hooks:
            hook.remove()
    out = {k: v / len(batches) for k, v in parts.items()}
    out["other"] = total / len(batches) - sum(out.values())
    return out


def bench(arch: str, variant: str, device: str, *, loops: list[str], steps: int, warmup: int,
          seq: int | None, batch: int | None, peak: float | None, attention: str | None = None,
          stand_in: bool = False, compile_scope: str = "layers", profile: bool = False,
          before_profile: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """One architecture and variant: the loops' rounds, the recipe's time split, and with
    ``profile`` one profiled step of each loop, after ``before_profile`` was handed the row
    (a caller that saves it keeps the figures if the profiling is stopped)."""
    split_steps = max(1, steps // 3)
    rows_per_batch = batch or ARCHS[arch]["batch"]
    num_blocks = rows_per_batch * (warmup + steps + split_steps)
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.create(recipe_config(arch, variant, device, Path(tmp),
                                             num_blocks=num_blocks, seq=seq, batch=batch,
                                             peak=peak))
        validate_config(cfg)
        data = synthetic_blocks(None, **{k: v for k, v in cfg.dataset.items()
                                         if k != "_component_"})
        batches = [collate([data[j] for j in range(i, i + cfg.batch_size)])
                   for i in range(0, len(data), cfg.batch_size)]
        kept: dict[str, int] = {}

        def setup(owner: str, build):
            sync(dev)
            before = _allocated(dev)
            out = build()
            sync(dev)
            kept[owner] = _allocated(dev) - before
            return out

        def setup_recipe():
            recipe = tad_distill.TADDistillRecipe(cfg)
            with torch.device(dev):  # the models it builds start on the device
                recipe.setup(cfg)
            return recipe

        recipe = setup("recipe", setup_recipe)
        try:
            todo = [Loop("recipe", lambda b: recipe.train_step(iter([b])), "recipe")]
            if "minimal" in loops:
                minimal = setup("minimal", lambda: MinimalLoop(cfg, dev))
                todo.append(Loop("minimal", minimal.step, "minimal"))
            peer = None
            if "peer" in loops or "peer_eager" in loops:
                peer = setup("peer", lambda: PeerModels(cfg, dev, attention=attention,
                                                        stand_in=stand_in,
                                                        compile_scope=compile_scope))
                todo += [Loop(name, lambda b, c=name == "peer": peer.step(b, c), "peer")
                         for name in ("peer", "peer_eager") if name in loops]
            run_rounds(todo, batches, dev, warmup, steps, kept)
            memory_kind = ("cuda: the loop's own allocations (set-up, first step, step peak)"
                           if dev.type == "cuda" else "peak RSS of the process, all loops")
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            split = time_split(recipe, batches[warmup + steps:], dev)
            out = _row(arch, variant, cfg, dev, todo, kept, rss, memory_kind, split, peak, peer,
                       compile_scope)
            if profile:  # one more step of each loop under the profiler, the figures saved
                if before_profile is not None:
                    before_profile(out)
                out["profiles"] = {loop.name: profile_step(
                    lambda loop=loop: loop.step(batches[warmup + steps]), device)
                    for loop in todo}
        finally:
            recipe.cleanup()
    return out


def _row(arch: str, variant: str, cfg: DictConfig, dev: torch.device, todo: list[Loop],
         kept: dict[str, int], rss: int, memory_kind: str, split: dict[str, float],
         peak: float | None, peer: "PeerModels | None", compile_scope: str) -> dict[str, Any]:
    """``bench``'s row: per loop tokens/s, MFU, memory; the recipe over each loop, paired."""
    _, _, meta_teacher, meta_student = peer_configs(*arch_nodes(arch)[:2])
    rows, length = cfg.batch_size, cfg.dataset.max_seq_len
    tokens = rows * (length - 1)  # valid (predicted) tokens of a batch
    flops = step_flops_per_token(meta_student, meta_teacher, length) * rows * length
    rec = todo[0]
    out = {
        "arch": arch, "variant": variant, "device": str(dev), "batch": rows, "seq": length,
        "flops_per_step": flops, "peak_flops": peak, "memory_kind": memory_kind,
        "loops": {}, "split_seconds": split,
    }
    for loop in todo:
        seconds = statistics.median(loop.times)
        out["loops"][loop.name] = {
            "tokens_per_second": tokens / seconds, "step_seconds": seconds,
            "step_times": loop.times,
            "mfu": flops / seconds / peak if peak else None,
            "peak_memory_gib": ((kept[loop.owner] + loop.step_peak) if dev.type == "cuda"
                                else rss) / 2**30,
        }
        if loop is not rec:
            out[f"recipe_over_{loop.name}"] = statistics.median(
                t / r for r, t in zip(rec.times, loop.times))
    if peer is not None:
        import transformers

        out["peer"] = {"transformers": transformers.__version__, "attention": peer.attention,
                       "loss": peer.loss_name,
                       "compile": {"layers": "torch.compile of every decoder layer",
                                   "body": "torch.compile of each base model"}[compile_scope]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=None, choices=list(ARCHS))
    parser.add_argument("--variants", nargs="+", default=["unfused", "fused"],
                        choices=list(VARIANTS))
    parser.add_argument("--loops", nargs="*", default=list(LOOPS), choices=LOOPS,
                        help="loops beside the recipe (default: all; none: the recipe alone)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--peer-attention", default=None,
                        help="attn_implementation of the peer's models (default: sdpa; eager "
                             "for Gemma2)")
    parser.add_argument("--peer-compile", choices=("layers", "body"), default="layers",
                        help="what the compiled peer compiles: each decoder layer (default, the "
                             "recipe's scope) or each base model whole")
    parser.add_argument("--compile-backend", choices=("inductor", "eager"), default="inductor",
                        help="backend of every torch.compile (eager: Dynamo only, the dry run)")
    parser.add_argument("--liger-stand-in", action="store_true",
                        help="without liger-kernel, give the peer loss_bench.LigerStandIn")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, one more step of each loop under the "
                             "profiler: where its device time goes (step_profile.py)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    loss_bench.set_compile_backend(args.compile_backend)
    archs = args.archs or (["demo", "small"] if args.device == "cpu" else ["qwen2_5_3b_half"])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = peak_flops(torch.device(args.device), dtype)
    if args.device == "cpu":
        peak = cpu_matmul_peak()
    rows = []

    def save(done: list[dict]) -> None:  # after every row: a run stopped part-way keeps them
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"peak_flops": peak, "rows": done}, indent=2) + "\n")

    for arch in archs:
        for variant in args.variants:
            row = bench(arch, variant, args.device, loops=args.loops, steps=args.steps,
                        warmup=args.warmup, seq=args.seq, batch=args.batch, peak=peak,
                        attention=args.peer_attention, stand_in=args.liger_stand_in,
                        compile_scope=args.peer_compile, profile=args.profile,
                        before_profile=lambda got: save([*rows, got]))
            rows.append(row)
            loops = "  ".join(
                f"{name} {x['tokens_per_second']:.0f} tok/s"
                + (f" (x{row['recipe_over_' + name]:.3f})" if name != "recipe" else "")
                + f" MFU {x['mfu']:.1%}" * (x["mfu"] is not None)
                + f" {x['peak_memory_gib']:.2f} GiB" for name, x in row["loops"].items())
            split = " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in row["split_seconds"].items())
            print(f"{arch:<22}{variant:<18} {loops}  | {split}", flush=True)
            for name, got in row.get("profiles", {}).items():
                print(f"  profile {name}: "
                      f"{describe(got, 1e3 * row['loops'][name]['step_seconds'])}", flush=True)
            save(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
