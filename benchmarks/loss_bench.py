"""Time and peak memory of one distillation-loss step (forward + backward), side by side.

    python benchmarks/loss_bench.py [--device cpu|cuda] [--shapes N,V,D[,dtype] ...]

One row per (implementation, divergence, N, V, hidden). Every case starts from the same inputs:
student and teacher final hidden states ``[B, N/B, D]`` (rows of 1024 tokens), their output
weights ``[V, D]``, labels with the first 5% of each row ignored. The student's hidden states and
output weight require grad; the teacher's do not. A step is: logits (or not, for the fused path),
loss, ``backward()``; gradients are dropped between steps.

Implementations:
- ``naive``: full float32 logits ``[N, V]`` for both models and plain autograd through our
  per-token function in one piece (``Divergence(chunk_size=None)`` on float32 logits).
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
- ``two_pass``: the recipe's head before it, a checkpointed CE pass, then the fused divergence.
- ``liger_fused_jsd`` (forward KL only, CUDA only): Liger-Kernel's
  ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``, the fused linear distillation loss users
  pick today, as ``liger_jsd_loss`` builds it: the divergence alone (``weight_hard_loss=0``), at
  the ``beta`` that makes it ``KL(teacher || student)`` (``LIGER_FORWARD_KL_BETA``), with its
  defaults otherwise (``torch.compile`` of its chunk step, its own chunk size). On a CPU, or
  without ``liger-kernel`` installed, the case is reported unavailable with the reason.
- ``matmul_floor`` (divergence ``none``): the output-projection matmuls alone, no loss: per chunk
  of the fused path's size, the student's and the teacher's projections and the student's two
  backward matmuls (hidden-state and weight gradients), in the inputs' dtype. No fused loss can
  be faster; the GPU target is TAD within 1.5x of it.

``--cases IMPL/DIVERGENCE ...`` picks cases instead of every ``--impls`` x ``--divergences``
pair; ``--json`` is rewritten after every row, so a run stopped part-way keeps the rows it
finished.

Time: median over ``--repeats`` steps after ``--warmup`` steps (CUDA: synchronised), all cases of
a shape in one process taking turns step by step, so that load from other users of a shared
machine hits them alike and the ratios stay fair. A time RATIO is the median over rounds of the
ratio within a round (paired), which a slow spell shared by both cases leaves alone. Peak extra memory, one step in a fresh
subprocess per case, the second step (the first is a warm-up that also compiles the compiled
cases): CUDA, ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the step;
CPU, the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``
after the warm-up step and a ``malloc_trim(0)`` that hands its freed memory back to the OS)
minus its resident size then, with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``) so that every large tensor is mapped on allocation and unmapped on
free: the resident size then follows the live tensors, a few MiB noisy. ``--cpu-memory
allocations`` counts instead the live torch allocations of one step from the profiler's memory
events (the quantity ``torch.cuda.max_memory_allocated`` reports), which needs no warm-up step
for the eager cases: a GPU shape's memory in one CPU step, where the CPU's bf16 matmuls allow
(on the project's 2-core machine they do not, at Gemma2-9B's vocabulary). Gradients (``[V, D]`` and ``[N, D]``) count as
extra memory for every implementation; a second column subtracts them (in the inputs' dtype, as
the parameters' ``.grad`` holds them), which leaves what the loss costs beyond the gradients any
step must produce (for the fused path with bf16 inputs this still counts its float32 sums).
"""

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tad_torchtune.losses import DIVERGENCES  # noqa: E402  (every registered divergence)
from tad_torchtune.losses.fused import (  # noqa: E402
    default_chunk_size,
    fused_divergence,
    fused_head,
)

IMPLS = ("naive", "torchtune_chunked", "torchtune_chunked_compiled", "unfused", "fused",
         "fused_nocache", "fused_compiled", "matmul_floor", "fused_step", "fused_step_compiled",
         "fused_step_bf16_wgrad", "two_pass", "liger_fused_jsd")
FUSED_OPTIONS = {"fused": {}, "fused_nocache": {"teacher_cache_mib": 0},
                 "fused_compiled": {"compile_chunks": True}, "fused_step": {},
                 "fused_step_compiled": {"compile_chunks": True},
                 "fused_step_bf16_wgrad": {"float32_weight_grad": False}, "two_pass": {}}
#: implementations of one divergence only (the others have every registered divergence)
ONLY_DIVERGENCE = {"torchtune_chunked": "forward_kl", "torchtune_chunked_compiled": "forward_kl",
                   "liger_fused_jsd": "forward_kl", "matmul_floor": "none"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHAPES = {
    "cpu": ["2048,32000,512,fp32"],
    "cuda": ["2048,32000,512,bf16", "8192,151936,2048,bf16", "8192,256000,3584,bf16"],
}
ROW_TOKENS = 1024


class Unavailable(Exception):
    """A case that cannot run here (its library or its device is missing); the message says
    why, and the case's row carries it as its note."""


def parse_case(text: str) -> tuple[str, str]:
    """``IMPL/DIVERGENCE`` (``matmul_floor/none``; ``torchtune_chunked*`` and ``liger_fused_jsd``
    take ``forward_kl`` only)."""
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


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    rows = max(1, n // ROW_TOKENS)
    shape = (rows, n // rows, d)

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


def liger_jsd_loss(device: torch.device | str, *, beta: float = LIGER_FORWARD_KL_BETA,
                   compiled: bool = True):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` as a divergence alone: ``weight_hard_loss=0``
    (it then skips its CE), ``weight_soft_loss=1``, its own defaults otherwise (chunks of 1024
    tokens, ``torch.compile`` of its chunk step, the weight gradient summed in the weight's
    dtype). Called as ``loss(h_s [N, D], w_s [V, D], h_t [N, D_T], w_t [V, D_T], labels [N])``,
    it returns the mean over valid tokens. Unlike ours, its divergence takes the log-softmax of
    the logits in their own dtype (bf16 for bf16 inputs; only its CE upcasts to float32).

    Raises:
        Unavailable: on a CPU (its chunked loss would run there, but what users pick it for
            and the GPU check measures is CUDA), or when ``liger-kernel`` does not import.
    """
    if torch.device(device).type != "cuda":
        raise Unavailable("Liger-Kernel is measured on CUDA only (the GPU library users pick); "
                          f"not run on {torch.device(device).type}")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as err:
        raise Unavailable(f"liger-kernel does not import ({err}); pip install "
                          f"liger-kernel=={LIGER_VERSION}") from err
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                   compiled=compiled)


def make_step(impl: str, name: str, h_s, w_s, h_t, w_t, labels, fused_chunk: int | None = None,
              teacher_cache_mib: float | None = None):
    """A closure running one forward + backward, or None if the combination does not exist.

    Raises:
        Unavailable: when the case cannot run here (``liger_fused_jsd`` on a CPU or without
            ``liger-kernel``).
    """
    if impl == "matmul_floor":
        return _matmul_floor_step(h_s, w_s, h_t, w_t, fused_chunk)
    if impl == "liger_fused_jsd":
        loss_fn = liger_jsd_loss(h_s.device)
        d_s, d_t = h_s.shape[-1], h_t.shape[-1]

        def step():  # Liger takes [N, D] hidden states and [N] labels
            loss_fn(h_s.view(-1, d_s), w_s, h_t.view(-1, d_t), w_t, labels.view(-1)).backward()

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
        div = DIVERGENCES[name](chunk_size=None)

        def step():
            with torch.no_grad():
                teacher_logits = (h_t @ w_t.T).float()
            div(((h_s @ w_s.T).float()), teacher_logits, labels).backward()

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

        def step():
            fused_head(h_s, w_s, labels, divergence=div, teacher_hidden=h_t, teacher_weight=w_t,
                       chunk_size=fused_chunk, compute_ce=True, **options).objective.backward()

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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory(impl: str, name: str, shape: tuple, device: str,
                   fused_chunk: int | None = None, teacher_cache_mib: float | None = None,
                   cpu_memory: str = "rss") -> dict:
    """Peak extra memory of the second step (the first compiles the compiled cases; CPU: the
    memory it freed is handed back to the OS first, so that it counts again). CPU with
    ``cpu_memory="allocations"``: ``peak_allocated_bytes`` of one step, after a warm-up step for
    the compiled cases only, to read off a GPU shape's memory on a machine without one."""
    n, v, d, dtype_name = shape
    inputs = make_inputs(n, v, d, DTYPES[dtype_name], device)
    try:
        step = make_step(impl, name, *inputs, fused_chunk=fused_chunk,
                         teacher_cache_mib=teacher_cache_mib)
    except Unavailable as why:
        return {"peak_mib": None, "note": str(why)}
    by_allocations = device == "cpu" and cpu_memory == "allocations"
    if not by_allocations or "compiled" in impl:
        step()  # warm-up: compiles the compiled cases, whose compiler memory is not the loss's
        inputs[0].grad = inputs[1].grad = None
    if by_allocations:
        return {"peak_mib": peak_allocated_bytes(step) / 2**20}
    if device == "cpu":
        _release_free_memory()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = _vm_kib("VmRSS") * 1024
    try:
        step()
        _sync(device)
    except torch.OutOfMemoryError:
        return {"peak_mib": None, "note": "OOM"}
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _vm_kib("VmHWM") * 1024
    return {"peak_mib": (peak - base) / 2**20}


def time_round_robin(steps: dict, inputs: tuple, device: str, warmup: int,
                     repeats: int) -> tuple[dict, dict]:
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
            _sync(device)
            start = time.perf_counter()
            try:
                step()
                _sync(device)
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
                  teacher_cache_mib: float | None = None) -> dict:
    """Median step time of each case, timed by ``time_round_robin``."""
    n, v, d, dtype_name = shape
    inputs = make_inputs(n, v, d, DTYPES[dtype_name], device)
    steps, unavailable = {}, {}
    for c in cases:
        try:
            steps[c] = make_step(*c, *inputs, fused_chunk=fused_chunk,
                                 teacher_cache_mib=teacher_cache_mib)
        except Unavailable as why:
            unavailable[c] = str(why)
    times, failed = time_round_robin(steps, inputs, device, warmup, repeats)
    failed.update(unavailable)
    return {f"{impl}/{name}": {"ms": statistics.median(times[(impl, name)])
                               if times.get((impl, name)) else None,
                               "times_ms": [round(t, 1) for t in times.get((impl, name), [])],
                               **({"note": failed[(impl, name)]} if (impl, name) in failed else {}),
                               **({"unavailable": True} if (impl, name) in unavailable else {})}
            for impl, name in cases}


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
    cmd += ["--cpu-memory", args.cpu_memory]
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
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--cpu-memory", choices=("rss", "allocations"), default="rss",
                        help="CPU peak memory: peak RSS of a subprocess (default), or the peak of "
                             "live torch allocations (profiler), one step without warm-up for "
                             "the eager cases: what a GPU's allocator would be asked for")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--_task", help=argparse.SUPPRESS)  # internal: one subprocess's work
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args._task:
        task = json.loads(args._task)
        shape = tuple(task["shape"])
        if task["kind"] == "memory":
            result = measure_memory(task["impl"], task["name"], shape, args.device,
                                    args.fused_chunk, args.teacher_cache_mib, args.cpu_memory)
        else:
            result = measure_times([tuple(c) for c in task["cases"]], shape, args.device,
                                   task["warmup"], task["repeats"], args.fused_chunk,
                                   args.teacher_cache_mib)
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
        if "matmul_floor" in args.impls:
            cases.append(("matmul_floor", "none"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    rows, failed = [], False
    for shape in shapes:
        n, v, d, dtype_name = shape
        timing = _subprocess(args, dict(kind="time", shape=shape, cases=cases,
                                        warmup=args.warmup, repeats=args.repeats))
        print(f"# times {shape}: {timing}", file=sys.stderr, flush=True)
        for impl, name in cases:
            t = timing.get(f"{impl}/{name}", {"ms": None, "note": timing.get("error", "")})
            memory = {"peak_mib": None} if t.get("unavailable") else _subprocess(
                args, dict(kind="memory", shape=shape, impl=impl, name=name))
            failed = failed or "error" in timing or "error" in memory
            note = " ".join(dict.fromkeys(x for x in (t.get("note"), memory.get("note"),
                                                      memory.get("error", "")[-200:]) if x))
            rows.append(dict(impl=impl, divergence=name, N=n, V=v, D=d, dtype=dtype_name,
                             ms=t["ms"], times_ms=t.get("times_ms"),
                             peak_mib=memory.get("peak_mib"), note=note))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
            if args.json:  # after every row: a run stopped part-way keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))

    mem_how = ("torch.cuda.max_memory_allocated" if args.device == "cuda"
               else "peak RSS (VmHWM) of a subprocess per case" if args.cpu_memory == "rss"
               else "peak of live torch allocations, profiler")
    print(f"\ndevice={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"warmup={args.warmup} repeats={args.repeats} (timed round robin in one process)\n")
    print(f"| impl | divergence | N | V | D | dtype | fused chunk | fwd+bwd ms (median) | "
          f"peak extra MiB ({mem_how}) | beyond the gradients MiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chunk = (args.fused_chunk or default_chunk_size(r["N"], r["V"], r["D"], args.device)
                 if r["impl"].startswith(("fused", "matmul_floor")) else "")
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
        floor = ("matmul_floor", "none")
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
            print(f"- {shape} {mode} TAD / matmul floor time: {ratio(tad, floor, 'ms')} "
                  f"(GPU target <= 1.5); peak extra MiB {fmt(got[tad]['peak_mib'], '.0f')}, "
                  f"beyond the gradients {fmt(beyond_gradients(got[tad]), '.0f')} "
                  f"(GPU target <= 2048)")
        for mode in ("fused_step", "fused_step_compiled"):
            for name in args.divergences:
                head = (mode, name)
                if head not in got:
                    continue
                print(f"- {shape} {mode} (CE + {name}, the recipe's head) / matmul floor time: "
                      f"{ratio(head, floor, 'ms')} (CE + TAD: CPU target <= 1.25); / two_pass "
                      f"(a CE pass of its own, then the divergence): "
                      f"{ratio(head, ('two_pass', name), 'ms')}")
        liger, ours = ("liger_fused_jsd", "forward_kl"), ("fused", "forward_kl")
        if liger in got:
            note = f" ({got[liger]['note']})" if got[liger]["note"] else ""
            print(f"- {shape} Liger fused linear JSD at beta {LIGER_FORWARD_KL_BETA} (forward KL) "
                  f"/ fused forward-KL time: {ratio(liger, ours, 'ms')}, peak extra memory: "
                  f"{ratio(liger, ours, 'peak_mib')}{note}")
        for name in args.divergences:
            f, u = ("fused", name), ("unfused", name)
            if f in got and u in got:
                print(f"- {shape} {name}: fused / unfused time {ratio(f, u, 'ms')}, "
                      f"peak extra memory {ratio(f, u, 'peak_mib')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
