"""The fused head's element-wise work per chunk, counted: the kernels inductor generates for it
and the bytes they move over ``[chunk, V]``, and the same work run eagerly op by op. A measure
taken on a CPU that predicts the GPU, where this work is memory-bound (issue 19).

    python benchmarks/head_kernels.py [--chunk 1024] [--vocab 32000] [--hidden 64]
        [--dtype float32|bfloat16] [--cache none|sampled|top_m]
        [--divergences tad forward_kl ce] [--json PATH]

For each divergence (``ce``: the cross-entropy alone), one chunk of ``fused_head`` as the recipe's
head runs it: ``chunk`` tokens in one row, CE + divergence, the recipe's defaults
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
- eager (``compile_chunks=False``, the default): every aten op of the whole head (TAD's teacher
  pass, masks, casts and the chunk function; not the matmuls, not views) that reads or writes a
  tensor of at least half a ``[chunk, V]`` buffer: ``ops``, and ``bytes``, the sizes of those
  tensors among its inputs and outputs (an upper bound: an indexing op counts its whole input).

Bytes are given in passes: units of one ``[chunk, V]`` float32 buffer. ``min passes`` is what
any implementation must move: the student's and the teacher's chunk logits read once and the
logits' gradient written once, 3 (2 for the CE alone or from a cache); half that in bf16. On a GPU, the element-wise time of a
chunk is about ``passes * chunk * V * 4 bytes / memory bandwidth`` (4.8 TB/s on an H200:
1024 x 256000 x 4 bytes is 0.2 ms a pass), beside its three or four ``[chunk, V, D]`` matmuls.
"""

import argparse
import contextlib
import json
import logging
import sys
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
    from torch._inductor import compile_fx
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


class _CountOps(TorchDispatchMode):
    """Aten ops (not matmuls, not views) touching a tensor of at least ``big`` elements, each
    marked as run inside a function ``fused_head`` compiled (``_INSIDE``) or around it."""

    def __init__(self, big: int) -> None:
        super().__init__()
        self.big = big
        self.ops: list[tuple[str, int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS or func.is_view:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
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


def measure(names: list[str], chunk: int, vocab: int, hidden: int,
            dtype: torch.dtype = torch.float32, cache: str = "none") -> list[dict]:
    rows = []
    buffer = chunk * vocab * 4  # one [chunk, V] float32 buffer
    for name in names:
        inputs = head_inputs(chunk, vocab, hidden, dtype=dtype, cache=cache)
        with marking_compiled_functions():
            compiled = compiled_counts(name, inputs)
            eager = eager_counts(name, inputs)
        if not compiled["kernels"] or not eager["compiled_fn_ops"]:  # our own invariant
            raise RuntimeError(
                f"{name}: inductor generated {compiled['kernels']} kernels and the compiled "
                f"function ran {eager['compiled_fn_ops']} ops: fused_head's compiled function "
                f"was made before this measurement (run it in a fresh process)")
        rows.append({
            "divergence": name, "chunk": chunk, "vocab": vocab, "hidden": hidden,
            "dtype": str(dtype).removeprefix("torch."), "cache": cache,
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
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.cache != "none" and "ce" in args.divergences:
        parser.error("--cache: the CE alone reads no teacher; name the divergences")
    rows = measure(args.divergences, args.chunk, args.vocab, args.hidden,
                   getattr(torch, args.dtype), args.cache)
    source = "" if args.cache == "none" else f", from the {args.cache} teacher cache"
    print(f"one chunk of the recipe's fused head, CE + divergence{source}, ({args.chunk}, "
          f"{args.vocab}) {args.dtype}, torch {torch.__version__}, CPU; passes: [chunk, V] "
          "float32 buffers moved")
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
