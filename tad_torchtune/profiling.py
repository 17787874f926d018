"""Where a training step's device time goes: torchtune's profiler with a summary of its own.

``tad_distill``'s ``profiler`` key is torchtune's (``torchtune.training.setup_torch_profiler``:
``enabled``, the schedule ``wait_steps`` / ``warmup_steps`` / ``active_steps`` / ``num_cycles``,
``output_dir``, ...), so a torchtune config's ``profiler`` block works unchanged and the traces
land where torchtune puts them (``iteration_N/`` with a Chrome / TensorBoard trace and the key
averages). ``StepProfiler`` adds, after each profiled cycle, a reading of the cycle's kernels
(``breakdown``): per active step, the time the device was busy against the step's time, the
kernels' time by kind (matmul, attention, inductor's kernels, ``topk``, the optimizer, copies,
...) and the kernels that took the most, logged as metrics (``profile_*``), so a run says
without a trace viewer whether it is bound by its matmuls, its element-wise kernels or its host.
The benchmarks read their steps the same way (``benchmarks/step_profile.py``).

Kernels: on CUDA the device's own activities (kernels, copies, fills, from CUPTI); on a CPU the
``aten::`` operators no other ``aten::`` operator called, which stand in for kernels, and the
rest of each compiled graph's call (its C++ kernels, which a CPU's profile does not record).
"""

import bisect
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from tad_torchtune.errors import ConfigError, instantiate

#: kind of a kernel by its name, the first pattern that matches (case-insensitive): inductor's
#: generated kernels (``triton_poi_`` / ``triton_red_`` / ``triton_per_`` / ``triton_tem_``; the
#: CPU's ``cpp_fused``) before the operators whose names they contain, except its templates of
#: attention and matmuls (flex attention's ``triton_tem_fused_flex_attention_0``, a tuned
#: ``triton_tem_fused_mm_1``: attention and matmul), attention before matmul
#: (memory-efficient attention's kernels are CUTLASS's)
KINDS: tuple[tuple[str, str], ...] = (
    ("inductor", r"^(?!triton_tem_\w*(attention|flex|mm_\d+$))triton_|^cpp_fused"),
    ("attention", r"flash|fmha|attention|sdpa|_scaled_dot_product"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|xmma|wgmma|s16816|^triton_tem_\w*mm_\d+$|"
               r"^aten::(mm|addmm_?|bmm|baddbmm_?|addbmm_?|matmul|linear|_addmm_activation)$"),
    ("topk/sort", r"topk|sort|radix|bitonic"),
    ("optimizer", r"multi_tensor|adam|_foreach_|^aten::_fused_"),
    ("copy/fill", r"memcpy|memset|copy|fill|zero_|catarray|"
                  r"^aten::(cat|clone|contiguous|to|_to_copy|empty_like|new_zeros)$"),
    ("nccl", r"nccl"),
)
_KINDS = tuple((kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KINDS)
#: what no pattern matches: eager element-wise and reduction kernels, mostly
OTHER = "other"
#: characters of a kernel's name kept (CUDA kernels' template arguments run to thousands)
NAME_CHARS = 120
#: the profiler's component: ``StepProfiler`` reads what it returns
TORCHTUNE_PROFILER = "torchtune.training.setup_torch_profiler"
#: the schedule's keys, each with the least value ``torch.profiler.schedule`` accepts
SCHEDULE_MINIMUM = {"wait_steps": 0, "warmup_steps": 0, "active_steps": 1, "num_cycles": 0}


def kind_of(name: str) -> str:
    """The kind (``KINDS``) of a kernel or operator called ``name``."""
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return OTHER


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one ran."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def breakdown(kernels: list[tuple[str, float, float]], top: int = 12) -> dict[str, Any]:
    """``kernels``: ``(name, start_us, end_us)`` of each kernel that ran. Returns the busy time
    (``busy_ms``, their union), their count, their time summed per kind (``kinds_ms``: every kind
    of ``KINDS`` and ``OTHER``; more than ``busy_ms`` where kernels overlapped) and the ``top``
    names by time with their calls."""
    kinds = dict.fromkeys([k for k, _ in KINDS] + [OTHER], 0.0)
    by_name: dict[str, list[float]] = {}
    for name, start, end in kernels:
        kinds[kind_of(name)] += (end - start) / 1e3
        total = by_name.setdefault(name, [0.0, 0])
        total[0] += (end - start) / 1e3
        total[1] += 1
    ranked = sorted(by_name.items(), key=lambda x: -x[1][0])[:top]
    return {
        "busy_ms": busy_us((s, e) for _, s, e in kernels) / 1e3,
        "kernels": len(kernels),
        "kinds_ms": kinds,
        "top": [{"name": name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "...",
                 "kind": kind_of(name), "ms": ms, "calls": calls}
                for name, (ms, calls) in ranked],
    }


#: the name given to a compiled graph's own time on a CPU (``device_kernels``)
CPU_COMPILED = "cpp_fused kernels of a compiled graph"


def device_kernels(events: Iterable[Any], device: str) -> list[tuple[str, float, float]]:
    """``(name, start_us, end_us)`` of the kernels among a profile's events (``FunctionEvent``s,
    ``prof.events()``): on CUDA the device's activities; elsewhere the ``aten::`` operators no
    other ``aten::`` operator called (their children's time is theirs), and, inside each call of
    a graph inductor compiled, the time none of them covers, named ``CPU_COMPILED``: its C++
    kernels, which the profiler does not record on a CPU."""
    events = list(events)
    if device == "cuda":
        # not the ranges user-scope annotations (``ProfilerStep#N``, ``Optimizer.step``, a
        # compiled graph's call with ``record_shapes``) leave on the GPU's timeline: CUPTI
        # records them as CUDA events spanning their kernels (torch's device totals skip them)
        return [(e.name, e.time_range.start, e.time_range.end) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False)]
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    ops = [(e.name, e.time_range.start, e.time_range.end) for e in cpu
           if e.name.startswith("aten::") and not _under_aten(e)]
    compiled = []
    for graph in cpu:
        if graph.name.startswith("## Call CompiledFxGraph"):
            start, end = graph.time_range.start, graph.time_range.end
            inside = [op for op in ops if start <= op[1] and op[2] <= end]
            for _, s, e in sorted(inside, key=lambda op: op[1]):
                if s > start:
                    compiled.append((CPU_COMPILED, start, s))
                start = max(start, e)
            if end > start:
                compiled.append((CPU_COMPILED, start, end))
    return ops + compiled


def _under_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


#: the ``record_function`` range of what a training loop runs between its steps (a validation,
#: a checkpoint), which ``step_metrics`` leaves out of the steps it measures
OUTSIDE_STEPS = "tad_torchtune/outside_steps"


def step_metrics(events: list[Any], device: str) -> dict[str, float]:
    """Metrics of one profiled cycle, per active step: ``profile_step_ms`` (the host's time of a
    step, the range of its ``ProfilerStep#N``), ``profile_busy_ms`` and ``profile_busy_share``
    (the device busy against it; the rest it waited for the host), ``profile_kernels`` and
    ``profile_<kind>_ms`` for every kind that took time (``/`` in a kind's name as ``_``). A
    step is a ``ProfilerStep`` range in which a kernel started: a cycle the run's end cut short
    ends with an empty one (the next step's, opened by the last ``step()``, closed by
    ``stop()``). ``OUTSIDE_STEPS`` ranges (a validation, a checkpoint between two steps) are
    left out: their time, their kernels (those that start inside them; on a GPU, whose
    kernels run after their launch, approximately), and a step range holding nothing else."""
    outside = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.name == OUTSIDE_STEPS and e.device_type == torch.autograd.DeviceType.CPU)

    def covered(start: float, end: float) -> float:  # of [start, end] by the outside ranges
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in outside)

    kernels = [k for k in device_kernels(events, device) if not covered(k[1], k[1] + 1e-3)]
    starts = sorted(start for _, start, _ in kernels)
    steps = [e for e in events if e.name.startswith("ProfilerStep")  # "ProfilerStep*"
             and e.device_type == torch.autograd.DeviceType.CPU  # not its range on the GPU
             and bisect.bisect_left(starts, e.time_range.start)
             < bisect.bisect_left(starts, e.time_range.end)]
    count = max(len(steps), 1)
    got = breakdown(kernels)
    step_ms = sum(e.time_range.end - e.time_range.start
                  - covered(e.time_range.start, e.time_range.end) for e in steps) / 1e3 / count
    out = {"profile_step_ms": step_ms, "profile_busy_ms": got["busy_ms"] / count,
           "profile_busy_share": got["busy_ms"] / count / step_ms if step_ms else 0.0,
           "profile_kernels": got["kernels"] / count}
    for kind, ms in got["kinds_ms"].items():
        if ms > 0:
            out[f"profile_{kind.replace('/', '_')}_ms"] = ms / count
    return out


def validate_profiler(node: Any) -> None:
    """Check ``tad_distill``'s ``profiler`` node: torchtune's component (the one
    ``StepProfiler`` reads; added where the node has no ``_component_``, as torchtune's recipes
    do), its keyword arguments, the schedule's counts.

    Raises:
        ConfigError: naming the key, its value and what is accepted.
    """
    import inspect

    from torchtune.training import setup_torch_profiler

    if not isinstance(node, DictConfig):
        raise ConfigError(f"profiler: must be a mapping of {TORCHTUNE_PROFILER}'s arguments "
                          f"(e.g. profiler.enabled=true), got {node!r}")
    if "_component_" not in node:
        node._component_ = TORCHTUNE_PROFILER
    if node._component_ != TORCHTUNE_PROFILER:
        raise ConfigError(f"profiler._component_: must be {TORCHTUNE_PROFILER}, got "
                          f"{node._component_!r}")
    parameters = inspect.signature(setup_torch_profiler).parameters
    accepted = list(parameters)
    for key in node:
        if key != "_component_" and key not in accepted:
            raise ConfigError(f"profiler.{key}: not an argument of {TORCHTUNE_PROFILER}; "
                              f"accepted: {', '.join(accepted)}")
    for key, minimum in SCHEDULE_MINIMUM.items():
        value = node.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < minimum):
            raise ConfigError(f"profiler.{key}: must be an integer >= {minimum} or null, got "
                              f"{value!r}")
    for key in (name for name, parameter in parameters.items() if parameter.annotation is bool):
        if key in node and not isinstance(node[key], bool):
            raise ConfigError(f"profiler.{key}: must be bool, got {node[key]!r}")


def describe(metrics: dict[str, float]) -> str:
    """One line of ``step_metrics``' metrics."""
    kinds = sorted(((k[len("profile_"):-len("_ms")], v) for k, v in metrics.items()
                    if k.endswith("_ms") and k not in ("profile_step_ms", "profile_busy_ms")),
                   key=lambda x: -x[1])
    return (f"profiled: {metrics['profile_step_ms']:.1f} ms a step, the device busy "
            f"{metrics['profile_busy_ms']:.1f} ms ({metrics['profile_busy_share']:.0%}), "
            f"{metrics['profile_kernels']:.0f} kernels; ms by kind: "
            + (", ".join(f"{k} {v:.1f}" for k, v in kinds) or "none"))


class StepProfiler:
    """torchtune's profiler as a recipe steps it, with ``step_metrics`` after each cycle.

    Args:
        node: the config's ``profiler`` node (validated by ``validate_profiler``), or None: off.
        output_dir: where the traces go when the node names no ``output_dir``
            (``OUTPUT_DIR/profiling_outputs``, as torchtune's configs put them).
        device: ``"cuda"`` or ``"cpu"``: what ``device_kernels`` reads.

    ``start()`` before the first step, ``step()`` after each (it returns the cycle's metrics on
    the step that ends a cycle, else None), ``stop()`` at the end.
    """

    def __init__(self, node: DictConfig | None, *, output_dir: Path, device: str) -> None:
        self.device = device
        self.enabled = node is not None and bool(node.get("enabled", False))
        self._profiler = None
        self._ready: dict[str, float] | None = None
        if not self.enabled:
            return
        kwargs = OmegaConf.to_container(node, resolve=True)
        if kwargs.get("output_dir") is None:
            kwargs["output_dir"] = str(output_dir / "profiling_outputs")
        if device != "cuda":  # no device activities to record on a CPU
            kwargs["cuda"] = kwargs["xpu"] = False
        self._profiler, self.settings = instantiate(DictConfig(kwargs), "profiler")
        export = self._profiler.on_trace_ready

        def on_trace_ready(prof) -> None:
            export(prof)  # torchtune's traces and tables
            self._ready = step_metrics(list(prof.events()), self.device)

        self._profiler.on_trace_ready = on_trace_ready

    def start(self) -> None:
        if self._profiler is not None:
            self._profiler.start()

    def step(self) -> dict[str, float] | None:
        if self._profiler is None:
            return None
        self._profiler.step()
        return self._take()

    def stop(self) -> dict[str, float] | None:
        """Stop profiling; returns the metrics of a cycle the run's end cut short (else None)."""
        if self._profiler is None:
            return None
        self._profiler.stop()
        self._profiler = None
        return self._take()

    def _take(self) -> dict[str, float] | None:
        """The metrics ``on_trace_ready`` left, once."""
        ready, self._ready = self._ready, None
        return ready
