"""The fused head's element-wise work per chunk, counted: the kernels inductor generates for it
and the bytes they move over ``[chunk, V]``, and the same work run eagerly op by op. A measure
taken on a CPU that predicts the GPU, where this work is memory-bound (issue 19).

    python benchmarks/head_kernels.py [--chunk 1024] [--vocab 32000] [--hidden 64]
        [--dtype float32|bfloat16] [--cache none|sampled|top_m] [--backend cpp|triton]
        [--divergences tad forward_kl ce] [--json PATH]

For each divergence (``ce``: the cross-entropy alone), one chunk of ``fused_head`` as the recipe's
head runs it: ``chunk`` tokens in one row, CE + divergence, the GPU configs' head settings
(``RECIPE_HEAD`` of ``loss_bench.py``), random hidden states and weights in ``--dtype``
(``bfloat16``: the projections, and so the logits read and the gradient written, in bf16, as on
a GPU; the element-wise work in float32). Two runs:

- compiled (``compile_chunks=True``, the recipe's ``compile: true``): whatever ``fused_head``
  hands to ``torch.compile`` (today the chunk's element-wise function: CE, the divergence's value
  and closed-form gradient), generated afresh (inductor's caches off). Read off inductor's
  scheduler after fusion: ``kernels``, its nodes (a generated loop nest or a library call each;
  on a GPU a launch each), of which ``external`` are library calls (scatter, sort, ...);
  ``loops``, the passes over a row those kernels make, counting each inner loop of the C++
  backend's outer-loop fusions (one loop nest over the rows holding several loops over ``V``, each
  a kernel of its own on a GPU, where a 32K-wide float32 row does not fit on chip); ``bytes``,
  inductor's estimate of what the kernels read and write (each buffer once per kernel,
  ``num_bytes_accessed``); ``loop bytes``, the same per loop, the intermediates between the
  loops of an outer-loop fusion included, which a GPU's kernels read and write in memory.
- with ``--backend triton``, "compiled" is the Triton code inductor generates for a GPU
  instead, generated on this CPU (``triton_codegen``: the ``triton`` package is needed, no GPU,
  nothing compiled) and read kernel by kernel (``kernel_traffic``): ``kernels``, its launches
  (of which ``external`` library calls); ``loops``, its loops over a row (a reduction
  kernel's loops, or a whole element-wise or one-row-at-a-time kernel, over at least half a
  ``[chunk, V]`` buffer); ``bytes``, what each loop's loads and stores address, a loop reading
  its inputs again: what a GPU moves, up to its caches.
- eager (``compile_chunks=False``, the default): every aten op of the whole head (TAD's teacher
  pass, masks, casts and the chunk function; not the matmuls, not views) that reads or writes a
  tensor of at least half a ``[chunk, V]`` buffer: ``ops``, and ``bytes``, the sizes of those
  tensors among its inputs and outputs (an upper bound: an indexing op counts its whole input).

Bytes are given in passes: units of one ``[chunk, V]`` float32 buffer. ``min passes`` is what
any implementation must move: the student's and the teacher's chunk logits read once and the
logits' gradient written once, 3 (2 for the CE alone or from a cache); half that in bf16. On
a GPU, the element-wise time of a chunk is about ``passes * chunk * V * 4 bytes / memory
bandwidth`` (4.8 TB/s on an H200: 1024 x 256000 x 4 bytes is 0.2 ms a pass), beside its three
or four ``[chunk, V, D]`` matmuls.
"""

import argparse
import contextlib
import json
import logging
import re
import sys
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loss_bench  # noqa: E402  (the recipe's head settings)

from tad_torchtune.losses import DIVERGENCES  # noqa: E402
from tad_torchtune.losses.cached import teacher_sampled, teacher_top_m  # noqa: E402
from tad_torchtune.losses.fused import fused_head  # noqa: E402

#: the products of the head (projections, gradient products): not element-wise work
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
           torch.ops.aten.bmm.default, torch.ops.aten.linear.default,
           torch.ops.aten.matmul.default}
#: tensors read or written by every implementation of a chunk, in [chunk, V] float32 buffers
MIN_PASSES = {"ce": 2}
MIN_PASSES_WITH_TEACHER = 3
#: the shipped cache defaults: (K, S) of the sampled cache, M of the bucket cache
SAMPLED_CACHE, TOP_M_CACHE = (12, 32), 48


def head_inputs(chunk: int, vocab: int, hidden: int, seed: int = 0,
                dtype: torch.dtype = torch.float32, cache: str = "none"):
    """One row of ``chunk`` tokens (its first 5% ignored, as loss_bench's rows): student hidden
    states and weight (requiring grad), teacher hidden states and weight, labels, and the
    teacher's cache entries (None with ``cache="none"``)."""
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(1, chunk, hidden, generator=gen).to(dtype).requires_grad_(True)
    w_s = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(dtype).requires_grad_(True)
    h_t = (torch.randn(1, chunk, hidden, generator=gen) * 1.5).to(dtype)
    w_t = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (1, chunk), generator=gen)
    labels[:, : chunk // 20] = -100
    entries = None
    if cache != "none":
        teacher = (h_t @ w_t.T).float()
        entries = (teacher_sampled(teacher, *SAMPLED_CACHE, seed=0, blocks=torch.arange(1))
                   if cache == "sampled" else teacher_top_m(teacher, labels, TOP_M_CACHE))
    return h_s, w_s, h_t, w_t, labels, entries


def run_head(name: str, inputs, compile_chunks: bool) -> None:
    """One forward (and, in it, backward) of the recipe's fused head on ``inputs``, one chunk."""
    h_s, w_s, h_t, w_t, labels, cache = inputs
    div = None if name == "ce" else DIVERGENCES[name]()
    options = {**loss_bench.RECIPE_HEAD, "compile_chunks": compile_chunks,
               "chunk_size": labels.numel()}
    teacher = {} if div is None else (
        {"teacher_cache": cache} if cache is not None else
        {"teacher_hidden": h_t, "teacher_weight": w_t})
    fused_head(h_s, w_s, labels, divergence=div, compute_ce=True, **teacher, **options)


def _loops(node) -> list:
    """The loops over a row inside one scheduler node: the inner loops of a C++ outer-loop
    fusion, else the node itself."""
    if type(node).__name__ == "OuterLoopFusedSchedulerNode":
        return list(node.get_outer_nodes())
    return [node]


@contextlib.contextmanager
def inductor_accounting():
    """Inductor generating every graph afresh (no cache hit skips code generation), each
    graph's scheduler nodes recorded after fusion: ``(kind, bytes, [bytes of each loop])``.
    Inductor sizes its kernels' reads and writes (``GraphLowering.count_bytes``) when its
    metrics log is enabled; the record is taken there, while the graph is current."""
    from torch._inductor import compile_fx, ir, scheduler
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    records: list[tuple[str, int, list[int]]] = []
    count_bytes = GraphLowering.count_bytes

    def counted(graph):
        out = count_bytes(graph)
        for node in graph.scheduler.nodes:
            records.append((type(node).__name__, node.get_read_write_buffers_sizes(),
                            [loop.get_read_write_buffers_sizes() for loop in _loops(node)]))
        return out

    log = compile_fx.inductor_metrics_log
    level = log.level
    log.setLevel(logging.INFO)
    GraphLowering.count_bytes = counted
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fx_graph_cache=False):
            yield records
    finally:
        GraphLowering.count_bytes = count_bytes
        log.setLevel(level)
        torch._dynamo.reset()


def compiled_counts(name: str, inputs) -> dict:
    """Kernels, loops and bytes of what inductor generates for one chunk (module docstring)."""
    with inductor_accounting() as records:
        run_head(name, inputs, compile_chunks=True)
    return {
        "kernels": len(records),
        "external": sum(kind == "ExternKernelSchedulerNode" for kind, _, _ in records),
        "loops": sum(len(loops) for _, _, loops in records),
        "bytes": sum(size for _, size, _ in records),
        "loop_bytes": sum(sum(loops) for _, _, loops in records),
        "kernel_list": [[kind, size, loops] for kind, size, loops in records],
    }


#: ops that read their first argument only at the addresses of an index: what they move is
#: their index and output, not their source
GATHERS = (torch.ops.aten.gather.default,)


class _CountOps(TorchDispatchMode):
    """Aten ops (not matmuls, not views) touching a tensor of at least ``big`` elements, each
    marked as run inside a function ``fused_head`` compiled (``_INSIDE``) or around it; a
    gather counts what it reads at its index, not its whole source."""

    def __init__(self, big: int) -> None:
        super().__init__()
        self.big = big
        self.ops: list[tuple[str, int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS or func.is_view:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if func in GATHERS:  # the output's elements read, the index read, the output written
            tensors = tensors[1:]
            big = [t for t in tensors if t.numel() >= self.big]
            moved = sum(t.numel() * t.element_size() for t in big) + (
                out.numel() * out.element_size() if out.numel() >= self.big else 0)
        else:
            moved = sum(t.numel() * t.element_size() for t in tensors if t.numel() >= self.big)
        if moved:
            self.ops.append((str(func), moved, _INSIDE[0]))
        return out


#: whether a function handed to torch.compile is running (``marking_compiled_functions``)
_INSIDE = [False]


@contextlib.contextmanager
def marking_compiled_functions():
    """``torch.compile`` that marks its function's calls in ``_INSIDE``: for the functions
    ``fused_head`` compiles from here on (it keeps them for the process). Under a
    ``TorchDispatchMode`` Dynamo runs them eagerly, so their ops are counted, as inside."""
    compile_ = torch.compile

    def marking(fn, *args, **kwargs):
        compiled = compile_(fn, *args, **kwargs)

        def run(*a, **k):
            _INSIDE[0] = True
            try:
                return compiled(*a, **k)
            finally:
                _INSIDE[0] = False

        return run

    torch.compile = marking
    try:
        yield
    finally:
        torch.compile = compile_


def eager_counts(name: str, inputs) -> dict:
    """Ops and bytes of the compiled head's element-wise work on one chunk run eagerly (under
    a dispatch mode Dynamo does not compile), split into the ops inside the compiled function
    and those around it (module docstring)."""
    chunk, vocab = inputs[4].numel(), inputs[1].shape[0]
    counter = _CountOps(chunk * vocab // 2)
    with counter:
        run_head(name, inputs, compile_chunks=True)
    inside = [(op, b) for op, b, flag in counter.ops if flag]
    outside = [(op, b) for op, b, flag in counter.ops if not flag]
    return {"ops": len(counter.ops), "bytes": sum(b for _, b, _ in counter.ops),
            "compiled_fn_ops": len(inside), "compiled_fn_bytes": sum(b for _, b in inside),
            "outside_ops": len(outside), "outside_bytes": sum(b for _, b in outside),
            "op_list": counter.ops}


# --- Inductor's Triton backend, the code a CUDA GPU runs, generated on this CPU ---------------

#: bytes per element of a Triton pointer type in a kernel's signature
TRITON_BYTES = {"*fp64": 8, "*i64": 8, "*u64": 8, "*fp32": 4, "*i32": 4, "*u32": 4,
                "*bf16": 2, "*fp16": 2, "*i16": 2, "*u16": 2, "*i8": 1, "*u8": 1, "*i1": 1,
                "*fp8e4nv": 1, "*fp8e5": 1}
#: addresses evaluated at a time when counting an access's distinct addresses (128 MiB)
_BLOCK_ELEMENTS = 1 << 24


class _Generated(Exception):
    """Raised by the code hook once a graph's wrapper code is recorded: nothing is compiled."""


#: whether ``triton_codegen`` is generating code (inductor's rewrites then act as on a GPU)
_EMULATING = [False]


def _emulate_gpu_softmax_rewrite() -> None:
    """Let inductor's online softmax rewrite, registered with a check that the device is a GPU,
    apply to the graphs ``triton_codegen`` generates. Inductor registers its rewrites, and so
    that check, once per process: this has to come first."""
    from torch._inductor import config as inductor_config
    from torch._inductor.fx_passes import post_grad

    if getattr(post_grad.prepare_softmax_extra_check, "emulates_gpu", False):
        return
    if post_grad.lazy_init.cache_info().currsize:
        raise RuntimeError("triton_codegen: inductor has compiled in this process already; "
                           "measure the Triton code in a fresh process")
    on_gpu_only = post_grad.prepare_softmax_extra_check

    def check(match) -> bool:
        return inductor_config.online_softmax if _EMULATING[0] else on_gpu_only(match)

    check.emulates_gpu = True
    post_grad.prepare_softmax_extra_check = check


@contextlib.contextmanager
def gpu_emulation():
    """Inductor, from here on, decides what it decides by the device as for a GPU, on this CPU:
    its online softmax rewrite (``amax`` and ``sum(exp(x - amax))`` in one loop) applies; its
    store-or-recompute heuristics (which on a CPU store every reused value computed with an
    ``exp`` or a ``log``, and allow larger expressions) and its loop reordering in fusion take
    their GPU branches (``ir.is_cpu`` and ``BaseSchedulerNode.is_cpu`` answer False); the head's
    own settings for a GPU apply (``fused.INDUCTOR_OPTIONS`` and a divergence's
    ``gpu_inductor_options``, as ``fused._gpu_settings`` answers True); the Triton backend's
    hash, which asks a GPU driver, is a constant. What ``triton_codegen`` and
    ``triton_interpreted`` share. Needs a fresh process: inductor registers its pattern
    rewrites once per process, before this can emulate the GPU's (``RuntimeError`` otherwise)."""
    from torch._inductor import ir, scheduler

    from tad_torchtune.losses import fused

    _emulate_gpu_softmax_rewrite()
    hash_ = torch.utils._triton.triton_hash_with_backend
    is_cpu, node_is_cpu = ir.is_cpu, scheduler.BaseSchedulerNode.is_cpu
    gpu_settings = fused._gpu_settings
    _EMULATING[0] = True
    fused._gpu_settings = lambda z: True
    ir.is_cpu = lambda node: False
    scheduler.BaseSchedulerNode.is_cpu = lambda node: False
    torch.utils._triton.triton_hash_with_backend = lambda: "triton-on-cpu-as-on-cuda"
    fused._COMPILED.clear()
    torch._dynamo.reset()
    try:
        yield
    finally:
        _EMULATING[0] = False
        fused._gpu_settings = gpu_settings
        ir.is_cpu, scheduler.BaseSchedulerNode.is_cpu = is_cpu, node_is_cpu
        torch.utils._triton.triton_hash_with_backend = hash_
        fused._COMPILED.clear()
        torch._dynamo.reset()


@contextlib.contextmanager
def triton_codegen():
    """``torch.compile`` from here on generates each graph's code with inductor's Triton
    backend, as for a CUDA GPU, records it and runs the graph eagerly: yields the list of the
    graphs' wrapper codes (their Triton kernels and the calls that launch them).

    On a CPU inductor generates Triton code when ``cpu_backend="triton"``. It schedules and fuses
    with the same ``SIMDScheduling`` it runs for CUDA, under ``gpu_emulation``; the code is
    recorded before anything compiles it (no GPU, no Triton compiler needed, only the
    ``triton`` package). Left out: autotuned block sizes, split reductions sized by the GPU's
    multiprocessor count, and the mixed-order reductions inductor skips on a CPU."""
    from torch._inductor import compile_fx
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    records: list[str] = []

    def save(code: str) -> None:
        records.append(code)
        raise _Generated

    def backend(gm, example_inputs):
        count = len(records)
        try:
            with inductor_config.patch({"cpu_backend": "triton", "fx_graph_cache": False}):
                compile_fx.compile_fx(gm, example_inputs)
        except Exception:  # noqa: BLE001  (the hook's _Generated, wrapped by inductor)
            if len(records) == count:
                raise
        return gm.forward

    compile_ = torch.compile
    with gpu_emulation():
        GraphLowering.save_output_code = save
        torch.compile = lambda fn, *args, **kwargs: compile_(fn, backend=backend)
        try:
            yield records
        finally:
            GraphLowering.save_output_code = None
            torch.compile = compile_


class _InterpretedLibdevice(types.ModuleType):
    """The ``libdevice`` inductor's Triton kernels call, for Triton's interpreter, which runs
    ``triton.language.math`` but not the GPU's device library: its functions, and those of the
    device library the head's code calls beyond them, in float32 with their accuracy (Kahan's
    forms: no cancellation for tiny arguments)."""

    def __getattr__(self, name: str):
        import triton.language as tl

        return getattr(tl.math, name)

    @staticmethod
    def log1p(x):
        import triton.language as tl

        u = 1.0 + x
        return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))

    @staticmethod
    def expm1(x):
        import triton.language as tl

        u = tl.exp(x)
        return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * x / tl.log(u)))

    @staticmethod
    def tanh(x):  # the soft-caps' (Gemma2)
        import triton.language as tl

        e = _InterpretedLibdevice.expm1(-2.0 * tl.abs(x))
        t = -e / (2.0 + e)
        return tl.where(x < 0, -t, t)


@contextlib.contextmanager
def triton_interpreted():
    """``torch.compile`` from here on runs each graph as the Triton code inductor generates
    for a GPU (``gpu_emulation``), executed on this CPU by Triton's interpreter (the kernels run
    block by block on NumPy): the GPU code's numerics without a GPU. Slow, tiny shapes only.
    Needs the ``triton`` package, a fresh process and ``TRITON_INTERPRET=1`` in the environment
    before inductor's runtime is imported (its helper kernels are decorated then): set it at the
    process's start.

    Raises:
        RuntimeError: inductor's helper kernels were not made for the interpreter.
    """
    import numpy as np
    import triton.language as tl
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime import triton_helpers
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder, TensorHandle

    if not isinstance(triton_helpers.max2, InterpretedFunction):
        raise RuntimeError("triton_interpreted: set TRITON_INTERPRET=1 at the process's start, "
                           "before torch's inductor runtime is imported")
    saved = (triton_helpers.libdevice, triton_helpers.max2, triton_helpers.min2,
             InterpreterBuilder.cast_impl)
    cast = saved[3]

    def cast_rounding_to_nearest(self, src, dst_type):
        # float32 -> bf16 rounded to nearest even, as a GPU rounds a store or ``.to`` of float32
        # into bf16 (the interpreter truncates: a gradient written in bf16 would then carry up
        # to a whole unit of error where a GPU's carries half)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16),
                                dst_type.scalar)
        return cast(self, src, dst_type)

    triton_helpers.libdevice = _InterpretedLibdevice("libdevice")
    # inductor's max2 and min2 reduce by tl.reduce with a combine function, which the
    # interpreter applies pair by pair in Python (a minute a case); its tl.max and tl.min are
    # NumPy's, which propagate NaN as the combine functions do
    triton_helpers.max2 = lambda a, dim: tl.max(a, dim)
    triton_helpers.min2 = lambda a, dim: tl.min(a, dim)
    InterpreterBuilder.cast_impl = cast_rounding_to_nearest
    try:
        with gpu_emulation(), inductor_config.patch({"cpu_backend": "triton",
                                                     "fx_graph_cache": False}):
            yield
    finally:
        (triton_helpers.libdevice, triton_helpers.max2, triton_helpers.min2,
         InterpreterBuilder.cast_impl) = saved


_KERNEL = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)''', device_str", re.S)
_NUMEL = re.compile(r"^    (x|r0_)numel = (\d+)$", re.M)
_DEFINE = re.compile(r"^\s+((?:x|r0_)\d+) = (.+)$")
_ACCESS = re.compile(r"tl\.(load|store)\((\w+) \+ \((.*?)\), ")
_SIGNATURE = re.compile(r"'signature': \{(.*?)\}")


def _distinct(index: str | list[str], defs: dict[str, str], xnumel: int, rnumel: int,
              sizes: dict[str, int] | None = None) -> int | None:
    """How many distinct elements ``index`` (an index expression of a Triton kernel, over its
    index variables ``defs`` and its integer arguments ``sizes``, e.g. a dynamic size ``ks0``)
    addresses over an ``xnumel x rnumel`` iteration space; for a list of expressions, how many
    distinct tuples of their values; None where one is not a plain expression of them (or the
    tuples are too many to mark). Evaluated a block of ``x`` at a time (at most
    ``_BLOCK_ELEMENTS`` addresses), the addresses marked in a bitmap."""
    import numpy as np

    indexes = [index] if isinstance(index, str) else list(index)
    if not indexes:
        return 1
    r_index = np.arange(max(rnumel, 1), dtype=np.int64)[None, :]
    block = max(1, _BLOCK_ELEMENTS // max(rnumel, 1))

    def blocks():
        for start in range(0, xnumel, block):
            env = {**(sizes or {}),
                   "xindex": np.arange(start, min(start + block, xnumel), dtype=np.int64)[:, None],
                   "r0_index": r_index}
            for name, expr in defs.items():
                env[name] = eval(expr, {"__builtins__": {}}, env)  # noqa: S307 (inductor's)
            shape = np.broadcast_shapes(env["xindex"].shape, r_index.shape if rnumel else (1,))
            yield [np.broadcast_to(np.asarray(eval(i, {"__builtins__": {}}, env)),  # noqa: S307
                                   shape).ravel() for i in indexes]

    try:
        strides = [1]
        if len(indexes) > 1:  # a tuple as one mixed-radix number: each value's range first
            tops = [0] * len(indexes)
            for values in blocks():
                if any(v.size and v.min() < 0 for v in values):
                    return None
                tops = [max(t, int(v.max()) + 1 if v.size else 0) for t, v in zip(tops, values)]
            for top in tops[:-1]:
                strides.append(strides[-1] * max(top, 1))
            if strides[-1] * max(tops[-1], 1) > 1 << 32:
                return None
        seen = np.zeros(0, dtype=bool)
        for values in blocks():
            address = sum(v * stride for v, stride in zip(values, strides))
            if address.size and address.max() >= seen.size:
                seen = np.concatenate([seen, np.zeros(int(address.max()) + 1 - seen.size, bool)])
            seen[address] = True
    except Exception:  # noqa: BLE001  (a name or function of Triton's: not plain)
        return None
    return int(seen.sum())


_TMP = re.compile(r"^\s+(tmp\d+) = (.+)$")
_NAME = re.compile(r"(?<![\w.])(tmp\d+|xindex|r0_index|(?:x|r0_)\d+)\b")
_LOAD = re.compile(r"tl\.load\(\w+ \+ \((.*?)\), ")


def _index_variables(expr: str, tmps: dict[str, frozenset | None]) -> frozenset | None:
    """The index variables (``x0``, ``r0_1``...) that the value of ``expr`` is a function of,
    through the loaded values (``tmp``) it reads; None where it reads one that is not such a
    function (an accumulator, a reduction's result)."""
    out: set[str] = set()
    for name in _NAME.findall(expr):
        if name.startswith("tmp"):
            if tmps.get(name) is None:
                return None
            out |= tmps[name]
        else:
            out.add(name)
    return frozenset(out)


def kernel_traffic(source: str, sizes: dict[str, int] | None = None) -> dict:
    """What one generated Triton kernel moves: its iteration space, its loops over the
    reduction dimension (``r0``), and per load and store, the distinct elements it addresses
    times their size: bytes read and written, each loop reading its inputs again. An indirect
    access (through a loaded value) counts one element per distinct value of the index variables
    its address is a function of (a row's label read through its id: one per row), or per
    iteration that runs it where that is not known (an index computed by a reduction). ``sizes``:
    the integer arguments of its launch (``xnumel``, ``r0_numel``, ``ks0``...), which a kernel
    of a dynamic dimension takes where a static one has them written in."""
    sizes = sizes or {}
    numels = {kind: int(n) for kind, n in _NUMEL.findall(source)}
    xnumel = numels.get("x", sizes.get("xnumel"))
    rnumel = numels.get("r0_", sizes.get("r0_numel", 0))
    if xnumel is None:
        raise ValueError("a kernel of a dynamic size launched with no value for it (the "
                         "graph's rows)")
    signature = dict(_signature(source))
    defs: dict[str, str] = {}
    accesses: set[tuple[int, str, str, str]] = set()
    tmps: dict[str, frozenset | None] = {}  # a loaded or computed value's index variables
    loop, loops, in_loop_indent = 0, 0, None
    body = source[source.index("def triton_"):]
    for line in body.splitlines():
        indent = len(line) - len(line.lstrip())
        if in_loop_indent is not None and line.strip() and indent <= in_loop_indent:
            in_loop_indent = None
        if line.lstrip().startswith("for r0_offset in"):
            loops += 1
            loop, in_loop_indent = loops, indent
        defined = _DEFINE.match(line)
        if defined and not defined.group(2).startswith("tl."):
            defs[defined.group(1)] = defined.group(2)
        value = _TMP.match(line)
        if value:
            expr = value.group(2)
            load = _LOAD.search(expr)
            tmps[value.group(1)] = (
                None if "_tmp" in expr or re.search(r"\btl\.(sum|max|min|reduce|argm)", expr)
                else _index_variables(load.group(1) if load else expr, tmps))
        for kind, pointer, index in _ACCESS.findall(line):
            accesses.add((loop if in_loop_indent is not None else 0, kind, pointer, index))
    persistent = rnumel > 0 and loops == 0
    moved = {"load": 0, "store": 0}
    for where, kind, pointer, index in accesses:
        iterations = xnumel * (rnumel if (where or persistent) and rnumel else 1)
        space = (xnumel, rnumel if (where or persistent) else 0)
        if "tmp" in index:  # indirect: the distinct values of what the address depends on
            names = _index_variables(index, tmps)
            exact = None if names is None else _distinct(sorted(names), defs, *space, sizes)
        else:
            exact = _distinct(index, defs, *space, sizes)
        moved[kind] += (iterations if exact is None else exact) * TRITON_BYTES[signature[pointer]]
    return {"xnumel": xnumel, "rnumel": rnumel, "loops": loops, "persistent": persistent,
            "read": moved["load"], "written": moved["store"]}


_LAUNCH = re.compile(r"^\s+(\w+)\.run\((.*)\)\s*$", re.M)
_EXTERN = re.compile(r"^\s+(?:\w+ = )?((?:torch\.ops|aten|extern_kernels)\.[\w.]+)\(", re.M)
_ASSIGN = re.compile(r"^\s+(\w+) = ([^;#\n]+)$", re.M)


def _signature(source: str) -> list[tuple[str, str]]:
    """A generated kernel's parameters with their Triton types, in order."""
    return re.findall(r"'(\w+)': '([^']+)'", _SIGNATURE.search(source).group(1))


def _int_value(expr: str, env: dict[str, int]) -> int | None:
    """``expr`` (of a graph's ``call``) evaluated over the integers ``env``; None where it is
    not an integer of them (a buffer, a call)."""
    try:
        value = eval(expr, {"__builtins__": {}}, dict(env))  # noqa: S307 (inductor's code)
    except Exception:  # noqa: BLE001
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _call_sizes(calls: str, rows: int | None) -> dict[str, int]:
    """The integers a graph's ``call`` computes: its symbolic sizes (``s10 = arg3_1``; the
    head's graphs have one, the chunk's tokens, under many names) bound to ``rows``, and what
    it computes from them (``..._r0_numel = (1 + s10) // 2``)."""
    env: dict[str, int] = {}
    for name, expr in _ASSIGN.findall(calls):
        expr = expr.strip()
        if re.fullmatch(r"s\d+", name) and re.fullmatch(r"arg\d+_\d+", expr):
            if rows is not None:
                env[name] = rows
            continue
        value = _int_value(expr, env)
        if value is not None:
            env[name] = value
    return env


def _arguments(text: str) -> list[str]:
    """A launch's positional arguments (``a, (b + 1) // 2, 4, stream=s`` -> the first three)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    return [a for a in out if a and not re.match(r"\w+=(?!=)", a)]


def _launch_sizes(source: str, arguments: list[str], env: dict[str, int]) -> dict[str, int]:
    """A kernel's integer parameters as one launch passes them: its signature's parameters
    (not the ``constexpr`` ones) in order, each argument evaluated in ``env``."""
    params = [name for name, kind in _signature(source) if kind != "constexpr"]
    values = {name: _int_value(arg, env) for name, arg in zip(params, arguments)}
    return {name: value for name, value in values.items() if value is not None}


def graph_traffic(code: str, rows: int | None = None) -> list[dict]:
    """The kernels one graph's wrapper code launches, in order: each generated Triton kernel
    with ``kernel_traffic``, each library call (``extern``) by name only (in the head: ``topk``
    over a chunk's ``[chunk, K * 64]`` block candidates, a cache's sparse ``scatter`` of
    ``chunk x (K + S)`` entries). A graph of a dynamic token dimension (the fused head's, once
    it runs chunks of two lengths) is read as a chunk of ``rows`` tokens runs it."""
    sources = dict(_KERNEL.findall(code))
    calls = code[code.index("def call("):]
    env = _call_sizes(calls, rows)
    launches = sorted([(m.start(), "triton", m.group(1), m.group(2))
                       for m in _LAUNCH.finditer(calls)] +
                      [(m.start(), "extern", m.group(1), "") for m in _EXTERN.finditer(calls)])
    out = []
    for _, kind, name, arguments in launches:
        row = {"kind": kind, "name": name}
        if kind == "triton" and name in sources:
            sizes = _launch_sizes(sources[name], _arguments(arguments), env)
            row.update(kernel_traffic(sources[name], sizes))
        out.append(row)
    return out


def kernel_totals(kernels: list[dict], chunk: int, vocab: int) -> dict:
    """The launches of ``graph_traffic`` (of every graph a chunk runs) summed: ``kernels``, of
    which ``external`` library calls; ``loops``, each loop over the reduction dimension of a
    kernel whose iteration space is at least half a ``[chunk, V]`` buffer, or the kernel itself
    when it covers it in one go (element-wise, or a whole row at a time); ``bytes`` read and
    written, and ``passes``, those in ``[chunk, V]`` float32 buffers."""
    big = [k for k in kernels if k["kind"] == "triton"
           and k["xnumel"] * max(k["rnumel"], 1) * 2 >= chunk * vocab]
    moved = sum(k.get("read", 0) + k.get("written", 0) for k in kernels)
    return {"kernels": len(kernels), "external": sum(k["kind"] == "extern" for k in kernels),
            "loops": sum(max(k["loops"], 1) for k in big), "bytes": moved,
            "passes": moved / (chunk * vocab * 4)}


def triton_counts(name: str, inputs) -> dict:
    """Kernels, loops over the row and bytes of the Triton code inductor generates for one chunk
    as for a GPU (``triton_codegen``, ``kernel_totals``)."""
    chunk, vocab = inputs[4].numel(), inputs[1].shape[0]
    with triton_codegen() as records:
        run_head(name, inputs, compile_chunks=True)
    kernels = [k for code in records for k in graph_traffic(code, chunk)]
    totals = kernel_totals(kernels, chunk, vocab)
    return {"graphs": len(records), **totals, "loop_bytes": totals["bytes"],
            "kernel_list": kernels}


def measure(names: list[str], chunk: int, vocab: int, hidden: int,
            dtype: torch.dtype = torch.float32, cache: str = "none",
            backend: str = "cpp") -> list[dict]:
    """One row per divergence; ``backend``: the code inductor generates for this CPU
    (``cpp``) or for a GPU (``triton``, ``triton_counts``)."""
    counts = triton_counts if backend == "triton" else compiled_counts
    rows = []
    buffer = chunk * vocab * 4  # one [chunk, V] float32 buffer
    for name in names:
        inputs = head_inputs(chunk, vocab, hidden, dtype=dtype, cache=cache)
        with marking_compiled_functions():
            compiled = counts(name, inputs)
            eager = eager_counts(name, inputs)
        if not compiled["kernels"] or not eager["compiled_fn_ops"]:  # our own invariant
            raise RuntimeError(
                f"{name}: inductor generated {compiled['kernels']} kernels and the compiled "
                f"function ran {eager['compiled_fn_ops']} ops: fused_head's compiled function "
                f"was made before this measurement (run it in a fresh process)")
        rows.append({
            "divergence": name, "chunk": chunk, "vocab": vocab, "hidden": hidden,
            "dtype": str(dtype).removeprefix("torch."), "cache": cache, "backend": backend,
            "compiled": {**compiled, "passes": compiled["bytes"] / buffer,
                         "loop_passes": compiled["loop_bytes"] / buffer},
            "eager": {**eager, **{f"{k}passes": eager[f"{k}bytes"] / buffer
                                  for k in ("", "compiled_fn_", "outside_")}},
            # the recipe's compiled head: inductor's loops, and the eager ops around them
            "compiled_head_passes": (compiled["loop_bytes"] + eager["outside_bytes"]) / buffer,
            "min_passes": (MIN_PASSES["ce"] if cache != "none" else
                           MIN_PASSES.get(name, MIN_PASSES_WITH_TEACHER))
            * torch.finfo(dtype).bits / 32,
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--cache", choices=["none", "sampled", "top_m"], default="none")
    parser.add_argument("--divergences", nargs="+", default=["tad", "forward_kl", "ce"],
                        choices=[*DIVERGENCES, "ce"])
    parser.add_argument("--backend", choices=["cpp", "triton"], default="cpp",
                        help="the code inductor generates for this CPU, or for a GPU (Triton, "
                             "generated on this CPU; needs the triton package)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.cache != "none" and "ce" in args.divergences:
        parser.error("--cache: the CE alone reads no teacher; name the divergences")
    rows = measure(args.divergences, args.chunk, args.vocab, args.hidden,
                   getattr(torch, args.dtype), args.cache, args.backend)
    source = "" if args.cache == "none" else f", from the {args.cache} teacher cache"
    print(f"one chunk of the recipe's fused head, CE + divergence{source}, ({args.chunk}, "
          f"{args.vocab}) {args.dtype}, torch {torch.__version__}, inductor's "
          f"{'Triton code for a GPU' if args.backend == 'triton' else 'C++ code for this CPU'}; "
          "passes: [chunk, V] float32 buffers moved")
    print("| divergence | compiled function: inductor kernels (external) | loops over V | "
          "passes | loop passes | eager ops around it | their passes | compiled head, passes "
          "(loops + around) | eager head: ops | passes | min passes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, e = r["compiled"], r["eager"]
        print(f"| {r['divergence']} | {c['kernels']} ({c['external']}) | {c['loops']} | "
              f"{c['passes']:.1f} | {c['loop_passes']:.1f} | {e['outside_ops']} | "
              f"{e['outside_passes']:.1f} | {r['compiled_head_passes']:.1f} | {e['ops']} | "
              f"{e['passes']:.1f} | {r['min_passes']:g} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
