"""Time and peak memory of one distillation-loss step (forward + backward), side by side.

    python benchmarks/loss_bench.py [--device cpu|cuda] [--shapes N,V,D[,dtype] ...]

One row per (implementation, divergence, N, V, hidden). Every case starts from the same inputs:
student and teacher final hidden states ``[B, N/B, D]`` (rows of 1024 tokens), their output
weights ``[V, D]``, labels with the first 5% of each row ignored. The student's hidden states and
output weight require grad; the teacher's do not. A step is: logits (or not, for the fused path),
loss, ``backward()``; gradients are dropped between steps.

Implementations:
- ``naive``: full float32 logits ``[N, V]`` for both models and plain autograd through our
  per-token function in one piece (``sum_and_count(..., chunk_size=None)`` on float32 logits).
- ``torchtune_chunked`` (forward KL only): torchtune 0.6.1's KD recipe path, the logits computed in
  8 pieces by ``TransformerDecoder.chunked_output`` (the model's dtype), then
  ``ForwardKLWithChunkedOutputLoss``.
- ``unfused``: our ``Divergence`` (checkpointed chunks of 1024 tokens) on logits materialised in
  the model's dtype, as the recipe's unfused path.
- ``torchtune_chunked_compiled``: the same, the loss through ``torchtune.training.compile_loss``
  (what torchtune's KD recipes do with ``compile: True``).
- ``fused``: ``tad_torchtune.losses.fused.fused_divergence`` on hidden states + weights, with its
  defaults (eager per-chunk functions; TAD keeps up to 128 MiB of teacher chunk projections
  between its two passes).
- ``fused_nocache``: ``fused`` with ``teacher_cache_mib=0`` (TAD projects the teacher twice).
- ``fused_compiled``: ``fused`` with ``compile_chunks=True`` (per-chunk functions through
  inductor; compilation happens in the warm-up steps).
- ``fused_step``: ``tad_torchtune.losses.fused.fused_head``, the recipe's fused head: the
  cross-entropy and the divergence from one student projection per chunk
  (``fused_step_compiled``: with ``compile_chunks=True``; ``fused_step_bf16_wgrad``: with
  ``float32_weight_grad=False``, the weight gradient summed in the weight's dtype, the recipe's
  ``fused_float32_weight_grad: false``).
- ``fused_step_recipe``: ``fused_head`` as the recipe runs it with the GPU configs' head
  settings (``RECIPE_HEAD``, read from ``RECIPE_CONFIG``, ``configs/qwen2_5_3b_to_half.yaml``;
  the Gemma2 config's are the same, a test holds them): chunks of ``loss_chunk_size`` tokens
  (1024) through inductor (``compile_chunks=True``, the recipe's ``compile: true``), every
  teacher projection kept between TAD's passes (``fused_teacher_cache_mib: null``) and the
  weight gradient summed in bf16 (``fused_float32_weight_grad: false``); ``--fused-chunk`` does
  not apply. Three variants of it, the alternatives to those settings (issue 19, item 5),
  whose compiled functions are the recipe head's (no compilation of their own):
  ``fused_step_recipe_default_cache`` with the schema's default teacher cache (128 MiB, which
  holds no 1024-token chunk of a 151936- or 256000-token bf16 vocabulary: TAD projects the
  teacher twice there), ``fused_step_recipe_fp32_wgrad`` with the float32 weight-gradient sum,
  ``fused_step_recipe_chunk_cache`` with a teacher cache of one chunk's projections
  (``ONE_CHUNK``: on rows of two chunks or more, the rest of a row projected again in TAD's
  second pass; less memory than keeping the row, more matmuls).
  Two more, ``fused_step_recipe_half_chunk`` and ``fused_step_recipe_double_chunk``, the
  recipe head at half and twice ``loss_chunk_size`` (512 and 2048 rows, the latter the other
  chunk size Liger's kernels run): chunks of other lengths, which the recipe head's compiled
  graph takes when its token dimension is dynamic (it is from the first call where the head
  runs chunks in halves, as on rows of two chunks or more; else they compile anew). The GPU
  check measures them in a step of its own, after the targets. No chunk crosses a row of kept
  teacher projections, so the double chunk needs rows of at least 2048 tokens
  (``--row-tokens 2048``, the Qwen2.5 pair's sequence length).
- ``two_pass``: the recipe's head before it, a checkpointed CE pass, then the fused divergence.
- ``liger_fused_jsd`` (forward KL only): Liger-Kernel's
  ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``, the fused linear distillation loss users
  pick today, as ``liger_jsd_loss`` builds it: the divergence alone (``weight_hard_loss=0``), at
  the ``beta`` that makes it ``KL(teacher || student)`` (``LIGER_FORWARD_KL_BETA``), with its
  defaults otherwise (``torch.compile`` of its chunk step, chunks of 1024 tokens).
- ``liger_fused_jsd_ce`` (forward KL only): the same loss with its cross-entropy,
  ``weight_hard_loss=1, weight_soft_loss=1``: CE + forward KL, what a TRL user runs with it and
  what ``recipe_bench.py``'s peer loop runs; the counterpart of ``fused_step*`` (CE + divergence).
  Without ``liger-kernel`` both Liger cases are reported unavailable with the reason (its chunked
  losses are torch code: they run on a CPU too, where it is installed), or, with
  ``--liger-stand-in`` (the GPU check's dry run), replaced by ``LigerStandIn`` (the same loss by
  plain autograd), their rows saying so.
- ``matmul_floor`` (divergence ``none``): the output-projection matmuls alone, no loss: per chunk
  of the fused path's size, the student's and the teacher's projections and the student's two
  backward matmuls (hidden-state and weight gradients), in the inputs' dtype.
- ``matmul_floor_unchunked`` (divergence ``none``): the same four products unchunked, ``[N, V]``
  at once, in the inputs' dtype: the floor no fused loss can beat. The chunked floor pays what
  small chunks cost (at (8192, 256000, 3584) bf16 on an H200, 183 ms for 128-token chunks
  against 88.7 ms unchunked), so ratios against it understate a head's gap; the GPU target is
  the recipe's head within 1.5x of this one.

``--profile [IMPL/DIVERGENCE ...]`` (the GPU check) adds to those cases' rows, under
``profile``, one more step under ``torch.profiler`` (``step_profile.profile_step``): the time the
device was busy against the step's, its kernels' time by kind and the kernels that took the most.

``--cases IMPL/DIVERGENCE ...`` picks cases instead of every ``--impls`` x ``--divergences``
pair; ``--json`` is rewritten after every row, so a run stopped part-way keeps the rows it
finished. ``--compile-backend eager`` makes every ``torch.compile`` of the process (ours,
Liger's) trace with Dynamo and run the traced graph eagerly: the compiled code paths without
inductor's code generation, which takes minutes on a 2-core CPU (the dry run's setting).

Time: median over ``--repeats`` steps after ``--warmup`` steps (CUDA: synchronised), all cases of
a shape in one process taking turns step by step, so that load from other users of a shared
machine hits them alike and the ratios stay fair. A time RATIO is the median over rounds of the
ratio within a round (paired), which a slow spell shared by both cases leaves alone.

Peak extra memory of one step after the timed ones (the warm-up compiled the compiled cases).
CUDA: in the timing process, case after case, ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` minus the memory allocated before the step. CPU, by default: one
step in a fresh subprocess per case, after a warm-up step, the process's peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up step and a
``malloc_trim(0)`` that hands its freed memory back to the OS) minus its resident size then, with
glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that every large tensor
is mapped on allocation and unmapped on free: the resident size then follows the live tensors, a
few MiB noisy. ``--cpu-memory allocations`` counts instead, in the timing process, the live torch
allocations of one step from the profiler's memory events (the quantity
``torch.cuda.max_memory_allocated`` reports): a GPU shape's memory in one CPU step, where the
CPU's bf16 matmuls allow (on the project's 2-core machine they do not, at Gemma2-9B's
vocabulary). Gradients (``[V, D]`` and ``[N, D]``) count as extra memory for every
implementation; a second column subtracts them (in the inputs' dtype, as the parameters'
``.grad`` holds them), which leaves what the loss costs beyond the gradients any step must
produce (for the fused path with bf16 inputs this still counts its float32 sums).
"""

import argparse
import bisect
import functools
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import torch

# the installed project where there is one (the GPU check installs its wheel: the checkout's
# tad_torchtune/ has no configs/ subpackage, which only an install maps), else this checkout
if importlib.util.find_spec("tad_torchtune") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_profile import describe, profile_step, sync  # noqa: E402
from tad_torchtune.demo import bundled_config  # noqa: E402
from tad_torchtune.schema import DISTILL  # noqa: E402  (the recipe's defaults)
from tad_torchtune.losses import DIVERGENCES  # noqa: E402  (every registered divergence)
from tad_torchtune.losses.fused import (  # noqa: E402
    default_chunk_size,
    fused_divergence,
    fused_head,
    teacher_projection_bytes,
)

IMPLS = ("naive", "torchtune_chunked", "torchtune_chunked_compiled", "unfused", "fused",
         "fused_nocache", "fused_compiled", "matmul_floor", "matmul_floor_unchunked",
         "fused_step", "fused_step_compiled", "fused_step_bf16_wgrad", "fused_step_recipe",
         "fused_step_recipe_default_cache", "fused_step_recipe_fp32_wgrad",
         "fused_step_recipe_chunk_cache", "fused_step_recipe_half_chunk",
         "fused_step_recipe_double_chunk", "two_pass",
         "liger_fused_jsd", "liger_fused_jsd_ce")
#: the shipped GPU config whose fused-head settings the recipe's head takes (read from the
#: checkout's ``configs/``, which an installed project's wheel also holds)
RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen2_5_3b_to_half.yaml"


#: the recipe's keys that set its fused head, and the ``fused_head`` option each one is
HEAD_KEYS = {"loss_chunk_size": "chunk_size", "fused_teacher_cache_mib": "teacher_cache_mib",
             "fused_float32_weight_grad": "float32_weight_grad"}


def config_head_settings(config: str | Path) -> dict:
    """``HEAD_KEYS`` as the shipped config ``config`` (a name or a file) sets them, the
    schema's default where it does not."""
    cfg = bundled_config(str(config))
    return {key: cfg[key] if key in cfg else DISTILL[key].default for key in HEAD_KEYS}


#: ``fused_head``'s options as the recipe runs them with ``RECIPE_CONFIG`` and ``compile: true``
RECIPE_HEAD = {"compile_chunks": True, **{HEAD_KEYS[key]: value for key, value
                                          in config_head_settings(RECIPE_CONFIG).items()}}
#: ``teacher_cache_mib`` of a case whose cache holds one chunk's teacher projections
ONE_CHUNK = "chunk"
FUSED_OPTIONS = {"fused": {}, "fused_nocache": {"teacher_cache_mib": 0},
                 "fused_compiled": {"compile_chunks": True}, "fused_step": {},
                 "fused_step_compiled": {"compile_chunks": True},
                 "fused_step_bf16_wgrad": {"float32_weight_grad": False},
                 "fused_step_recipe": RECIPE_HEAD,
                 "fused_step_recipe_default_cache": {
                     **RECIPE_HEAD,
                     "teacher_cache_mib": DISTILL["fused_teacher_cache_mib"].default},
                 "fused_step_recipe_fp32_wgrad": {**RECIPE_HEAD, "float32_weight_grad": True},
                 "fused_step_recipe_chunk_cache": {**RECIPE_HEAD, "teacher_cache_mib": ONE_CHUNK},
                 "fused_step_recipe_half_chunk": {**RECIPE_HEAD,
                                                  "chunk_size": RECIPE_HEAD["chunk_size"] // 2},
                 "fused_step_recipe_double_chunk": {**RECIPE_HEAD,
                                                    "chunk_size": 2 * RECIPE_HEAD["chunk_size"]},
                 "two_pass": {}}
#: implementations of one divergence only (the others have every registered divergence)
ONLY_DIVERGENCE = {"torchtune_chunked": "forward_kl", "torchtune_chunked_compiled": "forward_kl",
                   "liger_fused_jsd": "forward_kl", "liger_fused_jsd_ce": "forward_kl",
                   "matmul_floor": "none", "matmul_floor_unchunked": "none"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHAPES = {
    "cpu": ["2048,32000,512,fp32"],
    "cuda": ["2048,32000,512,bf16", "8192,151936,2048,bf16", "8192,256000,3584,bf16"],
}
#: tokens per row of the batch (``--row-tokens``): the teacher projections the recipe's head
#: keeps (``fused_teacher_cache_mib: null``) are one row's, and no chunk crosses them
ROW_TOKENS = 1024
_TORCH_COMPILE = torch.compile


class Unavailable(Exception):
    """A case that cannot run here (its library or its device is missing); the message says
    why, and the case's row carries it as its note."""


def set_compile_backend(backend: str) -> None:
    """Every later ``torch.compile`` of this process (the fused head's chunks, Liger's chunk
    step, the recipe's blocks, the peer's layers) with ``backend``: ``"inductor"`` (torch's
    default) or ``"eager"`` (Dynamo traces and the traced graph runs eagerly: the compiled code
    paths, without inductor's code generation, minutes of C++ compilation on a 2-core CPU)."""
    torch.compile = (_TORCH_COMPILE if backend == "inductor"
                     else functools.partial(_TORCH_COMPILE, backend=backend))


#: the case whose step runs now (``time_round_robin``): names the code ``save_inductor_code``
#: writes, ``NxVxD__IMPL__DIVERGENCE__K.py``
_RUNNING = ["setup"]


def save_inductor_code(folder: Path) -> None:
    """From here on, write the code of every graph inductor compiles (its wrapper: on a GPU the
    Triton kernels and their launches) into ``folder``, named after the case whose step compiled
    it; ``head_kernels.graph_traffic`` reads it (``gpu_check.py``'s ``head_code``). Inductor's
    graph cache is off, so that every graph is generated and written."""
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    folder.mkdir(parents=True, exist_ok=True)
    count = itertools.count()

    def save(code: str) -> None:
        (folder / f"{_RUNNING[0]}__{next(count):03d}.py").write_text(code)

    inductor_config.fx_graph_cache = False
    GraphLowering.save_output_code = save


def parse_case(text: str) -> tuple[str, str]:
    """``IMPL/DIVERGENCE`` (``matmul_floor*/none``; ``torchtune_chunked*`` and ``liger_*`` take
    ``forward_kl`` only)."""
    impl, _, name = text.partition("/")
    allowed = [ONLY_DIVERGENCE[impl]] if impl in ONLY_DIVERGENCE else list(DIVERGENCES)
    if impl not in IMPLS or name not in allowed:
        raise ValueError(f"--cases takes IMPL/DIVERGENCE with IMPL one of {IMPLS} and "
                         f"DIVERGENCE one of {allowed if impl in IMPLS else list(DIVERGENCES)}, "
                         f"got {text!r}")
    return impl, name


def parse_shape(text: str) -> tuple[int, int, int, str]:
    parts = text.split(",")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in DTYPES):
        raise ValueError(f"--shapes takes N,V,D[,fp32|bf16], got {text!r}")
    n, v, d = (int(p) for p in parts[:3])
    return n, v, d, parts[3] if len(parts) == 4 else "fp32"


def row_length(n: int) -> int:
    """Tokens per row of ``make_inputs``' batch of ``n`` tokens: ``ROW_TOKENS``, or all ``n``
    in one row where they are fewer."""
    return n // max(1, n // ROW_TOKENS)


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (n // row_length(n), row_length(n), d)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    h_s = randn(*shape).requires_grad_(True)
    w_s = randn(v, d, scale=d**-0.5).requires_grad_(True)
    h_t = randn(*shape, scale=1.5)
    w_t = randn(v, d, scale=d**-0.5)
    labels = torch.randint(0, v, shape[:2], generator=gen, device=device)
    labels[:, : shape[1] // 20] = -100  # a masked prompt in every row
    return h_s, w_s, h_t, w_t, labels


#: ``LigerFusedLinearJSDLoss``'s ``beta`` at which its loss is ``KL(teacher || student)``. In
#: liger-kernel 0.8.5 (``chunked_loss/jsd_loss.py``) beta == 0 exactly is
#: ``F.kl_div(log q_student, log p_teacher, log_target=True)``, i.e. sum_i p_i log(p_i / q_i),
#: forward KL; beta == 1 is reverse KL; in between, the generalized JSD
#: ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
#: (tests/test_cuda.py checks both ends against our ForwardKLLoss and ReverseKLLoss).
LIGER_FORWARD_KL_BETA = 0.0
#: the version the GPU check installs (benchmarks/gpu_check.sh's header)
LIGER_VERSION = "0.8.5"


class LigerStandIn:
    """What ``LigerFusedLinearJSDLoss`` computes at beta 0, ``(weight_hard_loss * CE +
    weight_soft_loss * KL(teacher || student))`` summed over valid tokens and divided by their
    count, by plain autograd on whole float32 (float64 for float64 inputs) logits: where
    ``liger-kernel`` is not installed (CI's dry run of the GPU check), the code around Liger's
    loss still runs. Never a measurement of Liger: rows and loops that use it say so
    (``stand_in``)."""

    stand_in = True

    def __init__(self, *, weight_hard_loss: float, weight_soft_loss: float,
                 ignore_index: int = -100) -> None:
        self.weights = (weight_hard_loss, weight_soft_loss)
        self.ignore_index = ignore_index

    def __call__(self, h_s, w_s, h_t, w_t, labels):
        """``h_s [N, D]``, ``w_s [V, D]``, ``h_t [N, D_T]``, ``w_t [V, D_T]``, ``labels [N]``."""
        import torch.nn.functional as F

        dtype = torch.promote_types(h_s.dtype, torch.float32)
        z = (h_s @ w_s.T).to(dtype)  # (N, V)
        with torch.no_grad():
            t = (h_t @ w_t.T).to(dtype)
        valid = labels != self.ignore_index
        ce = F.cross_entropy(z, labels, ignore_index=self.ignore_index, reduction="sum")
        kl = F.kl_div(z.log_softmax(-1), t.log_softmax(-1), log_target=True,
                      reduction="none").sum(-1)
        hard, soft = self.weights
        return (hard * ce + soft * torch.where(valid, kl, 0.0).sum()) / valid.sum().clamp_min(1)


def liger_jsd_loss(device: torch.device | str, *, beta: float = LIGER_FORWARD_KL_BETA,
                   compiled: bool = True, ce: bool = False, stand_in: bool = False):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` at ``beta``: the divergence alone
    (``weight_hard_loss=0``: it then skips its CE), or with ``ce`` CE + divergence
    (``weight_hard_loss=1``, what the peer loop of ``recipe_bench.py`` runs); its own defaults
    otherwise (chunks of 1024 tokens, ``torch.compile`` of its chunk step, the weight gradient
    summed in the weight's dtype, computed even for a frozen weight). Called as
    ``loss(h_s [N, D], w_s [V, D], h_t [N, D_T], w_t [V, D_T], labels [N])``, it returns the sum
    over valid tokens divided by their count. Unlike ours, its divergence takes the log-softmax
    of the logits in their own dtype (bf16 for bf16 inputs; only its CE upcasts to float32), and
    it has no logit soft-cap (Gemma2's final cap is not applied).

    Args:
        device: where it runs (any: its chunked losses are torch code; the GPU check measures
            it on CUDA).
        beta, compiled: ``LigerFusedLinearJSDLoss``'s.
        ce: add its cross-entropy (``weight_hard_loss=1``).
        stand_in: without ``liger-kernel``, return a ``LigerStandIn`` (beta 0 only) instead of
            raising.

    Raises:
        Unavailable: when ``liger-kernel`` does not import (and no stand-in is asked for).
    """
    del device  # Liger's chunked losses follow their inputs' device
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as err:
        if stand_in and beta == LIGER_FORWARD_KL_BETA:
            return LigerStandIn(weight_hard_loss=float(ce), weight_soft_loss=1.0)
        raise Unavailable(f"liger-kernel does not import ({err}); pip install --no-deps "
                          f"liger-kernel=={LIGER_VERSION}") from err
    return LigerFusedLinearJSDLoss(weight_hard_loss=float(ce), weight_soft_loss=1.0, beta=beta,
                                   compiled=compiled)


def make_step(impl: str, name: str, h_s, w_s, h_t, w_t, labels, fused_chunk: int | None = None,
              teacher_cache_mib: float | None = None, liger_stand_in: bool = False):
    """A closure running one forward + backward, or None if the combination does not exist. A
    step that stands in for the case (``LigerStandIn``) carries a ``note`` attribute saying so.

    Raises:
        Unavailable: when the case cannot run here (``liger_fused_jsd*`` without
            ``liger-kernel`` and without ``liger_stand_in``).
    """
    if impl == "matmul_floor":
        return _matmul_floor_step(h_s, w_s, h_t, w_t, fused_chunk)
    if impl == "matmul_floor_unchunked":
        return _unchunked_floor_step(h_s, w_s, h_t, w_t)
    if impl.startswith("liger_fused_jsd"):
        loss_fn = liger_jsd_loss(h_s.device, ce=impl == "liger_fused_jsd_ce",
                                 stand_in=liger_stand_in)
        d_s, d_t = h_s.shape[-1], h_t.shape[-1]

        def step():  # Liger takes [N, D] hidden states and [N] labels
            loss_fn(h_s.view(-1, d_s), w_s, h_t.view(-1, d_t), w_t, labels.view(-1)).backward()

        if getattr(loss_fn, "stand_in", False):
            step.note = "stand-in (liger-kernel not installed): the same loss by plain autograd"
        return step
    if impl.startswith("torchtune_chunked"):
        if name != "forward_kl":
            return None
        from torchtune.modules import TransformerDecoder
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss
        from torchtune.training import compile_loss

        loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
        if impl.endswith("_compiled"):
            loss_fn = compile_loss(loss_fn, verbose=False)

        def head(w):  # what TransformerDecoder.chunked_output needs from the model
            return SimpleNamespace(output=lambda x: x @ w.T, num_output_chunks=8)

        def step():
            logits = TransformerDecoder.chunked_output(head(w_s), h_s)
            with torch.no_grad():
                teacher_logits = TransformerDecoder.chunked_output(head(w_t), h_t)
            loss_fn(logits, teacher_logits, labels).backward()

        return step
    if impl == "naive":
        div = DIVERGENCES[name]()

        def step():
            with torch.no_grad():
                teacher_logits = (h_t @ w_t.T).float()
            div.sum_and_count(((h_s @ w_s.T).float()), teacher_logits, labels,
                              chunk_size=None).mean().backward()

        return step
    if impl == "unfused":
        div = DIVERGENCES[name]()  # default chunk_size=1024, checkpointed

        def step():
            with torch.no_grad():
                teacher_logits = h_t @ w_t.T
            div(h_s @ w_s.T, teacher_logits, labels).backward()

        return step
    div = DIVERGENCES[name]()

    options = dict(FUSED_OPTIONS[impl])
    if teacher_cache_mib is not None and "teacher_cache_mib" not in options:
        options["teacher_cache_mib"] = teacher_cache_mib
    if impl.startswith("fused_step"):  # CE + divergence from one projection (the recipe's head)
        chunk = options.pop("chunk_size", fused_chunk)
        if options.get("teacher_cache_mib") == ONE_CHUNK:  # one chunk of teacher projections
            options["teacher_cache_mib"] = teacher_projection_bytes(chunk, h_t, w_t) / 2**20

        def step():
            fused_head(h_s, w_s, labels, divergence=div, teacher_hidden=h_t, teacher_weight=w_t,
                       chunk_size=chunk, compute_ce=True, **options).objective.backward()

        return step
    if impl == "two_pass":  # the recipe's head before it: a CE pass of its own, then the divergence
        ce_chunk = fused_chunk or default_chunk_size(labels.numel(), w_s.shape[0], h_s.shape[-1],
                                                     h_s.device)

        def step():
            ce = _checkpointed_linear_ce(h_s, w_s, labels, ce_chunk)
            kd = fused_divergence(div, h_s, w_s, h_t, w_t, labels, chunk_size=fused_chunk,
                                  **options)
            (ce + kd.total).backward()

        return step

    def step():
        fused_divergence(div, h_s, w_s, h_t, w_t, labels, chunk_size=fused_chunk,
                         **options).mean().backward()

    return step


def _checkpointed_linear_ce(h_s, w_s, labels, chunk: int):
    """The cross-entropy as the recipe computed it before its fused head: chunks of
    ``F.cross_entropy(h @ w.T)`` under activation checkpointing (projection, recomputed
    projection, two gradient matmuls per chunk)."""
    from torch.utils.checkpoint import checkpoint

    h, y = h_s.reshape(-1, h_s.shape[-1]), labels.reshape(-1)

    def chunk_ce(hc, yc):
        return torch.nn.functional.cross_entropy((hc @ w_s.T).float(), yc, reduction="sum")

    return sum(checkpoint(chunk_ce, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
               for i in range(0, h.shape[0], chunk))


def _matmul_floor_step(h_s, w_s, h_t, w_t, chunk: int | None):
    """The four ``[chunk, V] x [V, D]``-sized matmuls of a fused step and nothing else; the
    student's logits stand in for their gradient."""
    d = h_s.shape[-1]
    hs, ht = h_s.detach().reshape(-1, d), h_t.reshape(-1, h_t.shape[-1])
    chunk = chunk or default_chunk_size(hs.shape[0], w_s.shape[0], d, hs.device)

    def step():
        with torch.no_grad():
            grad_h = torch.empty_like(hs)
            grad_w = torch.zeros_like(w_s)
            for start in range(0, hs.shape[0], chunk):
                h = hs[start : start + chunk]
                z = h @ w_s.T  # student projection
                ht[start : start + chunk] @ w_t.T  # teacher projection
                grad_h[start : start + chunk] = z @ w_s
                grad_w.addmm_(z.t(), h)

    return step


def _unchunked_floor_step(h_s, w_s, h_t, w_t):
    """The same four products unchunked (``[N, V]`` at once), each one library call."""
    d = h_s.shape[-1]
    hs, ht = h_s.detach().reshape(-1, d), h_t.reshape(-1, h_t.shape[-1])

    def step():
        with torch.no_grad():
            z = hs @ w_s.T  # (N, V): student projection, standing in for its gradient too
            ht @ w_t.T  # teacher projection
            z @ w_s  # hidden-state gradient (N, D)
            z.t() @ hs  # weight gradient (V, D)

    return step


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_memory() -> None:
    """glibc's ``malloc_trim(0)``: return freed heap memory to the OS, so that a step after a
    warm-up step pays its peak resident size again."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


#: matrix products whose CPU kernels may allocate a workspace of their own inside the op (oneDNN's
#: bf16 matmuls on CPUs with AMX do: packed copies of the operands), which depends on the CPU and
#: says nothing about the loss's own buffers
_MATMUL_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
    "aten::linear", "aten::_addmm_activation", "aten::addmv", "aten::mv", "aten::dot",
})


def peak_allocated_bytes(fn) -> int:
    """Peak of the CPU bytes that ``fn()``'s code allocates and keeps live at once, from the
    profiler's memory events (every allocation and free, in order): the quantity
    ``torch.cuda.max_memory_allocated`` reports for the same tensors on a GPU.

    A matrix product's own workspace is not counted: the memory events inside a matmul op are
    taken at the op's end, so what it allocates and frees internally nets out while its output
    (still live at its end) counts. The figure is then the same on every CPU, whatever its matmul
    backend does inside the op (e.g. oneDNN on an AMX CPU, which packs bf16 operands)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                   if e.name() in _MATMUL_OPS)
    outer: list[list[int]] = []  # outermost matmul spans (linear > matmul > mm nest)
    for start, end in spans:
        if outer and start <= outer[-1][1]:
            outer[-1][1] = max(outer[-1][1], end)
        else:
            outer.append([start, end])
    ends = [end for _, end in outer]
    starts = [start for start, _ in outer]

    def when(t: int) -> int:
        i = bisect.bisect_right(starts, t) - 1
        return ends[i] if i >= 0 and t <= ends[i] else t

    memory = sorted(((when(e.start_ns()), e.nbytes()) for e in events if e.name() == "[memory]"),
                    key=lambda x: x[0])
    live = peak = 0
    i = 0
    while i < len(memory):  # events at the same instant (an op's end) net out first
        t = memory[i][0]
        while i < len(memory) and memory[i][0] == t:
            live += memory[i][1]
            i += 1
        peak = max(peak, live)
    return peak


def measure_memory(impl: str, name: str, shape: tuple, device: str,
                   fused_chunk: int | None = None, teacher_cache_mib: float | None = None,
                   cpu_memory: str = "rss", liger_stand_in: bool = False) -> dict:
    """Peak extra memory of one step in a process of its own (CPU with ``cpu_memory="rss"``):
    the second step (the first compiles the compiled cases; the memory it freed is handed back
    to the OS first, so that it counts again). Elsewhere ``measure_times(memory=True)`` measures
    it in the timing process."""
    n, v, d, dtype_name = shape
    inputs = make_inputs(n, v, d, DTYPES[dtype_name], device)
    try:
        step = make_step(impl, name, *inputs, fused_chunk=fused_chunk,
                         teacher_cache_mib=teacher_cache_mib, liger_stand_in=liger_stand_in)
    except Unavailable as why:
        return {"peak_mib": None, "note": str(why)}
    if device == "cpu" and cpu_memory == "rss":
        step()  # warm-up: compiles the compiled cases, whose compiler memory is not the loss's
        inputs[0].grad = inputs[1].grad = None
        _release_free_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = _vm_kib("VmRSS") * 1024
        step()
        return {"peak_mib": (_vm_kib("VmHWM") * 1024 - base) / 2**20}
    if "compiled" in impl or impl.startswith(("fused_step_recipe", "liger")):
        step()  # compiles
        inputs[0].grad = inputs[1].grad = None
    return step_memory(step, device, cpu_memory)


def step_memory(step, device: str, cpu_memory: str = "allocations") -> dict:
    """Peak extra memory of ``step()`` measured in this process: CUDA,
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory
    allocated before; CPU, ``peak_allocated_bytes`` (the CPU's peak RSS cannot be reset
    per step in a process that has already freed memory)."""
    if device == "cpu":
        if cpu_memory != "allocations":
            raise ValueError(f"step_memory on a CPU counts allocations, got {cpu_memory!r}")
        return {"peak_mib": peak_allocated_bytes(step) / 2**20}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"peak_mib": None, "note": "OOM"}
    return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


def time_round_robin(steps: dict, inputs: tuple, device: str, warmup: int,
                     repeats: int, tag: str = "") -> tuple[dict, dict]:
    """Step times (ms) of every ``steps`` entry, the entries taking turns step by step (round
    robin) so that a change in the machine's load hits them all alike; ratios are then fair on a
    shared box. Gradients of the student inputs are dropped before each step.

    Returns:
        ``(times, failed)``: key -> times after the warm-up, key -> "OOM" for steps that ran out
        of memory (and were not run again).
    """
    h_s, w_s = inputs[:2]
    times = {c: [] for c in steps}
    failed = {}
    for i in range(warmup + repeats):
        for c, step in steps.items():
            if c in failed:
                continue
            h_s.grad = w_s.grad = None
            _RUNNING[0] = "__".join((tag, *c))
            sync(device)
            start = time.perf_counter()
            try:
                step()
                sync(device)
            except torch.OutOfMemoryError:
                failed[c] = "OOM"
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if i >= warmup:
                times[c].append(1e3 * (time.perf_counter() - start))
    return times, failed


def measure_times(cases: list[tuple[str, str]], shape: tuple, device: str, warmup: int,
                  repeats: int, fused_chunk: int | None = None,
                  teacher_cache_mib: float | None = None, *, memory: bool = False,
                  cpu_memory: str = "allocations", liger_stand_in: bool = False,
                  profile: Iterable[tuple[str, str]] = (),
                  before_profile: Callable[[dict], None] | None = None) -> dict:
    """Median step time of each case, timed by ``time_round_robin``; with ``memory``, then the
    peak extra memory of one more step of each case (``step_memory``), case after case, in this
    process (the warm-up steps compiled the compiled cases). Then, for each case of ``profile``
    that ran, one more step under the profiler (``step_profile.profile_step``: where its device
    time goes), after ``before_profile`` was handed the results so far (a caller that saves
    them keeps them if the profiling is stopped)."""
    n, v, d, dtype_name = shape
    inputs = make_inputs(n, v, d, DTYPES[dtype_name], device)
    steps, unavailable = {}, {}
    for c in cases:
        try:
            steps[c] = make_step(*c, *inputs, fused_chunk=fused_chunk,
                                 teacher_cache_mib=teacher_cache_mib,
                                 liger_stand_in=liger_stand_in)
        except Unavailable as why:
            unavailable[c] = str(why)
    times, failed = time_round_robin(steps, inputs, device, warmup, repeats, f"{n}x{v}x{d}")
    failed.update(unavailable)
    peaks = {}
    for c, step in steps.items() if memory else ():
        if c not in failed:
            inputs[0].grad = inputs[1].grad = None
            peaks[c] = step_memory(step, device, cpu_memory)
    out = {}
    for c in cases:
        notes = [failed.get(c), getattr(steps.get(c), "note", None), peaks.get(c, {}).get("note")]
        out["/".join(c)] = {
            "ms": statistics.median(times[c]) if times.get(c) else None,
            "times_ms": [round(t, 1) for t in times.get(c, [])],
            "note": " ".join(x for x in notes if x),
            **({"peak_mib": peaks.get(c, {}).get("peak_mib")} if memory else {}),
            **({"unavailable": True} if c in unavailable else {}),
            **({"stand_in": True} if hasattr(steps.get(c), "note") else {}),
        }
    profile = [c for c in profile if c in steps and c not in failed]
    if profile and before_profile is not None:
        before_profile(out)
    for c in profile:
        inputs[0].grad = inputs[1].grad = None
        out["/".join(c)]["profile"] = profile_step(steps[c], device)
    return out


def paired_time_ratio(times_a: list[float], times_b: list[float]) -> float:
    """Median over rounds of ``a / b`` within each round of ``time_round_robin``; the ratio of
    the medians when the rounds do not pair up (a case that ran out of memory)."""
    if len(times_a) == len(times_b) and times_a:
        return statistics.median(a / b for a, b in zip(times_a, times_b))
    return statistics.median(times_a) / statistics.median(times_b)


def beyond_gradients(row: dict) -> float | None:
    """``peak_mib`` minus the student's ``[V, D]`` and ``[N, D]`` gradients in the inputs' dtype."""
    if row["peak_mib"] is None:
        return None
    itemsize = DTYPES[row["dtype"]].itemsize
    return row["peak_mib"] - (row["V"] + row["N"]) * row["D"] * itemsize / 2**20


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _subprocess(args, task: dict) -> dict:
    """Run one measurement in a fresh Python process (its own peak memory, no history)."""
    cmd = [sys.executable, __file__, "--device", args.device, "--_task", json.dumps(task)]
    if args.fused_chunk:
        cmd += ["--fused-chunk", str(args.fused_chunk)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.teacher_cache_mib is not None:
        cmd += ["--teacher-cache-mib", str(args.teacher_cache_mib)]
    cmd += ["--cpu-memory", args.cpu_memory, "--compile-backend", args.compile_backend,
            "--row-tokens", str(args.row_tokens)]
    if args.liger_stand_in:
        cmd += ["--liger-stand-in"]
    env = dict(os.environ)
    if task["kind"] == "memory" and args.device == "cpu" and args.cpu_memory == "rss":
        # a fixed mmap threshold: every large tensor is its own mapping, returned to the OS when
        # freed, so the resident size follows the live tensors (glibc's dynamic threshold would
        # serve them from a heap that stays resident after the warm-up step)
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": proc.stderr[-400:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    """Exit code 1 when a measurement's subprocess failed (its row says how); an OOM or an
    unavailable case is a result, not a failure."""
    global ROW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", help="N,V,D[,fp32|bf16] (default: per device)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES),
                        choices=list(DIVERGENCES))
    parser.add_argument("--cases", nargs="+", metavar="IMPL/DIVERGENCE",
                        help="these cases instead of --impls x --divergences (e.g. fused/tad "
                             "matmul_floor/none liger_fused_jsd/forward_kl)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fused-chunk", type=int, default=None,
                        help="tokens per chunk of the fused path (default: default_chunk_size)")
    parser.add_argument("--teacher-cache-mib", type=float, default=None,
                        help="teacher_cache_mib of the fused and fused_compiled cases "
                             "(default: fused_divergence's)")
    parser.add_argument("--row-tokens", type=int, default=ROW_TOKENS,
                        help="tokens per row of the batch (default %(default)s); N a multiple")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--cpu-memory", choices=("rss", "allocations"), default="rss",
                        help="CPU peak memory: peak RSS of a subprocess per case (default), or "
                             "the peak of live torch allocations (profiler) in the timing "
                             "process: what a GPU's allocator would be asked for")
    parser.add_argument("--compile-backend", choices=("inductor", "eager"), default="inductor",
                        help="backend of every torch.compile (eager: Dynamo only, the dry run)")
    parser.add_argument("--liger-stand-in", action="store_true",
                        help="without liger-kernel, run the Liger cases' loss by plain autograd "
                             "(LigerStandIn, rows marked) instead of reporting them unavailable")
    parser.add_argument("--inductor-code", type=Path, metavar="DIR",
                        help="write the code of every graph inductor compiles into DIR, named "
                             "after the case (save_inductor_code)")
    parser.add_argument("--profile", nargs="*", metavar="IMPL/DIVERGENCE",
                        help="after the timed and memory steps, profile one more step of these "
                             "cases (none named: every case) and add where its device time "
                             "goes to its row (step_profile.py; on a CPU: with --cpu-memory "
                             "allocations)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--_task", help=argparse.SUPPRESS)  # internal: one subprocess's work
    args = parser.parse_args()
    if args.row_tokens < 1:
        parser.error(f"argument --row-tokens: must be >= 1, got {args.row_tokens}")
    ROW_TOKENS = args.row_tokens  # make_inputs' rows
    if args.threads:
        torch.set_num_threads(args.threads)
    set_compile_backend(args.compile_backend)
    if args.inductor_code:
        save_inductor_code(args.inductor_code)

    if args._task:
        task = json.loads(args._task)
        shape = tuple(task["shape"])
        if task["kind"] == "memory":
            result = measure_memory(task["impl"], task["name"], shape, args.device,
                                    args.fused_chunk, args.teacher_cache_mib, args.cpu_memory,
                                    liger_stand_in=args.liger_stand_in)
        else:
            result = measure_times([tuple(c) for c in task["cases"]], shape, args.device,
                                   task["warmup"], task["repeats"], args.fused_chunk,
                                   args.teacher_cache_mib, liger_stand_in=args.liger_stand_in)
        print("RESULT " + json.dumps(result))
        return 0

    try:
        shapes = [parse_shape(s) for s in (args.shapes or DEFAULT_SHAPES[args.device])]
        cases = [parse_case(c) for c in args.cases or ()]
    except ValueError as err:
        parser.error(str(err))
    if not cases:
        cases = [(impl, name) for name in args.divergences for impl in args.impls
                 if ONLY_DIVERGENCE.get(impl, name) == name]
        cases += [(impl, "none") for impl in args.impls if ONLY_DIVERGENCE.get(impl) == "none"]
    # CUDA, or CPU allocations: everything in this process (memory after the timed steps);
    # CPU peak RSS: a fresh process for the times and one per case for the memory
    in_process = args.device == "cuda" or args.cpu_memory == "allocations"
    profiled = []
    if args.profile is not None:
        if not in_process:
            parser.error("argument --profile: on a CPU it needs --cpu-memory allocations (the "
                         "profile is taken in the timing process)")
        try:
            profiled = [parse_case(c) for c in args.profile] or cases
        except ValueError as err:
            parser.error(str(err))
        missing = [c for c in profiled if c not in cases]
        if missing:
            parser.error(f"argument --profile: {', '.join(map('/'.join, missing))} must be "
                         f"among the measured cases: {', '.join(map('/'.join, cases))}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    rows, failed = [], False

    def add_rows(shape: tuple, timing: dict) -> None:
        nonlocal failed
        n, v, d, dtype_name = shape
        print(f"# times {shape}: {timing}", file=sys.stderr, flush=True)
        for impl, name in cases:
            t = timing.get(f"{impl}/{name}", {"ms": None, "note": timing.get("error", "")})
            memory = ({"peak_mib": t.get("peak_mib")} if in_process
                      else {"peak_mib": None} if t.get("unavailable")
                      else _subprocess(args, dict(kind="memory", shape=shape, impl=impl,
                                                  name=name)))
            failed = failed or "error" in timing or "error" in memory
            note = " ".join(dict.fromkeys(x for x in (t.get("note"), memory.get("note"),
                                                      memory.get("error", "")[-200:]) if x))
            rows.append(dict(impl=impl, divergence=name, N=n, V=v, D=d, dtype=dtype_name,
                             row_tokens=row_length(n),
                             ms=t["ms"], times_ms=t.get("times_ms"),
                             peak_mib=memory.get("peak_mib"), note=note,
                             stand_in=bool(t.get("stand_in"))))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
            if args.json:  # after every row: a run stopped part-way keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))

    for shape in shapes:
        if not in_process:
            add_rows(shape, _subprocess(args, dict(kind="time", shape=shape, cases=cases,
                                                   warmup=args.warmup, repeats=args.repeats)))
            continue
        torch._dynamo.reset()  # every shape compiles afresh, static, as in a process of its own
        first = len(rows)
        timing = measure_times(cases, shape, args.device, args.warmup, args.repeats,
                               args.fused_chunk, args.teacher_cache_mib, memory=True,
                               cpu_memory=args.cpu_memory, liger_stand_in=args.liger_stand_in,
                               profile=profiled,
                               before_profile=functools.partial(add_rows, shape))
        if len(rows) == first:  # nothing was profiled
            add_rows(shape, timing)
            continue
        for row in rows[first:]:
            got = timing[f"{row['impl']}/{row['divergence']}"].get("profile")
            if got is not None:
                row["profile"] = got
                print(f"# profile {row['impl']}/{row['divergence']} {shape}: "
                      f"{describe(got, row['ms'])}", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    mem_how = ("torch.cuda.max_memory_allocated" if args.device == "cuda"
               else "peak of live torch allocations, profiler" if in_process
               else "peak RSS (VmHWM) of a subprocess per case")
    print(f"\ndevice={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"warmup={args.warmup} repeats={args.repeats} row_tokens={ROW_TOKENS} "
          f"(timed round robin in one process)\n")
    print(f"| impl | divergence | N | V | D | dtype | fused chunk | fwd+bwd ms (median) | "
          f"peak extra MiB ({mem_how}) | beyond the gradients MiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chunk = (FUSED_OPTIONS[r["impl"]]["chunk_size"]
                 if r["impl"].startswith("fused_step_recipe")
                 else "" if not r["impl"].startswith(("fused", "matmul_floor"))
                 or r["impl"] == "matmul_floor_unchunked"
                 else args.fused_chunk or default_chunk_size(r["N"], r["V"], r["D"], args.device))
        print(f"| {r['impl']} | {r['divergence']} | {r['N']} | {r['V']} | {r['D']} | "
              f"{r['dtype']} | {chunk} | {fmt(r['ms'], '.0f')} | {fmt(r['peak_mib'], '.0f')} | "
              f"{fmt(beyond_gradients(r), '.0f')} | {r['note']} |")

    print("\nRatios (same run, same shape):\n")
    for n, v, d, dtype_name in shapes:
        got = {(r["impl"], r["divergence"]): r for r in rows
               if (r["N"], r["V"], r["D"], r["dtype"]) == (n, v, d, dtype_name)}

        def ratio(a, b, key):
            x, y = got.get(a), got.get(b)
            if not x or not y or x[key] is None or y[key] is None:
                return "—"
            if key == "ms":
                return f"{paired_time_ratio(x['times_ms'], y['times_ms']):.2f}"
            return f"{x[key] / y[key]:.2f}"

        shape = f"({n}, {v}, {d}, {dtype_name})"
        tt = ("torchtune_chunked", "forward_kl")
        floor, unchunked = ("matmul_floor", "none"), ("matmul_floor_unchunked", "none")
        for mode in ("fused", "fused_compiled", "fused_step", "fused_step_bf16_wgrad"):
            tad, same_fkl = (mode, "tad"), (mode, "forward_kl")
            if tad not in got:
                continue
            if same_fkl in got:
                print(f"- {shape} {mode} TAD / {mode} forward-KL time: "
                      f"{ratio(tad, same_fkl, 'ms')} (target <= 1.2, goal 1.1)")
            if tt in got:
                print(f"- {shape} {mode} TAD / torchtune chunked forward-KL peak extra memory: "
                      f"{ratio(tad, tt, 'peak_mib')} (CPU target <= 0.25); time: "
                      f"{ratio(tad, tt, 'ms')} (CPU target <= 1.0)")
            print(f"- {shape} {mode} TAD / chunked matmul floor time: {ratio(tad, floor, 'ms')}, "
                  f"/ unchunked floor: {ratio(tad, unchunked, 'ms')}; peak extra MiB "
                  f"{fmt(got[tad]['peak_mib'], '.0f')}, beyond the gradients "
                  f"{fmt(beyond_gradients(got[tad]), '.0f')}")
        liger_ce = ("liger_fused_jsd_ce", "forward_kl")
        for mode in (impl for impl in IMPLS if impl.startswith("fused_step")):
            for name in args.divergences:
                head = (mode, name)
                if head not in got:
                    continue
                print(f"- {shape} {mode} (CE + {name}) / chunked matmul floor time: "
                      f"{ratio(head, floor, 'ms')}; / unchunked floor: "
                      f"{ratio(head, unchunked, 'ms')} (GPU target, CE + TAD at the recipe's "
                      f"settings: <= 1.5); / Liger CE + forward KL time: "
                      f"{ratio(head, liger_ce, 'ms')}, peak extra memory: "
                      f"{ratio(head, liger_ce, 'peak_mib')} (GPU targets at the recipe's "
                      f"settings: CE + TAD <= 1.15 and <= 1.0, CE + forward KL <= 1.0); / "
                      f"two_pass: {ratio(head, ('two_pass', name), 'ms')}")
        liger, ours = ("liger_fused_jsd", "forward_kl"), ("fused", "forward_kl")
        for case, mine in ((liger, ours), (liger_ce, ("fused_step", "forward_kl"))):
            if case in got:
                note = f" ({got[case]['note']})" if got[case]["note"] else ""
                print(f"- {shape} {case[0]} at beta {LIGER_FORWARD_KL_BETA} (forward KL) / "
                      f"{mine[0]} forward-KL time: {ratio(case, mine, 'ms')}, peak extra memory: "
                      f"{ratio(case, mine, 'peak_mib')}; / unchunked floor: "
                      f"{ratio(case, unchunked, 'ms')}{note}")
        for name in args.divergences:
            f, u = ("fused", name), ("unfused", name)
            if f in got and u in got:
                print(f"- {shape} {name}: fused / unfused time {ratio(f, u, 'ms')}, "
                      f"peak extra memory {ratio(f, u, 'peak_mib')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
