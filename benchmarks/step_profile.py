"""Where one step's device time goes: the step once under ``torch.profiler``, its kernels' time
summed by kind, the time the device was busy, the kernels that took the most.

    from step_profile import profile_step
    profile_step(step, "cuda")  # {"wall_ms", "busy_ms", "kernels", "kinds_ms", "top"}

The benchmarks' timed steps say how long a step takes; this says what the device did in it, so
that one GPU run also says where a ratio's gap lies: the matmuls (chunk shape, layout, a copy of
a weight), the element-wise kernels inductor generated, library calls (``topk``), copies, or
the device waiting for the host (``busy_ms`` well below the step's time: launch-bound). The GPU
check (``loss_bench.py --profile``, ``recipe_bench.py --profile``) records it beside the times;
not a target.

On CUDA the intervals are the device's own activities (kernels, copies, fills), from CUPTI. On a
CPU (the GPU check's dry run) the outermost ``aten::`` operators stand in for kernels: the same
reading of intervals, kinds and names, on what a CPU runs. A profiler that cannot start (no
CUPTI) gives ``{"error": ...}``, never an exception: the measurement it sits beside goes on.
"""

import re
import time
from typing import Any, Callable, Iterable

import torch

#: kind of a kernel by its name, the first pattern that matches (case-insensitive): attention
#: before matmul (memory-efficient attention's kernels are CUTLASS's), inductor's generated
#: kernels (``triton_poi_`` / ``triton_red_`` / ``triton_per_`` / ``triton_tem_``) before the
#: operators whose names they contain
KINDS: tuple[tuple[str, str], ...] = (
    ("inductor", r"^triton_|^cpp_fused"),
    ("attention", r"flash|fmha|attention|sdpa|_scaled_dot_product"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|xmma|wgmma|s16816|"
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
#: characters of a kernel's name kept in ``top`` (CUDA kernels' template arguments run to
#: thousands)
NAME_CHARS = 120


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
    """``kernels``: ``(name, start_us, end_us)`` of each kernel a step ran. Returns the busy time
    (``busy_ms``, the union), the kernels' count, their time summed per kind (``kinds_ms``, every
    kind of ``KINDS`` and ``OTHER``; more than ``busy_ms`` where kernels overlapped) and the
    ``top`` names by time with their calls."""
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


def device_kernels(events: Iterable[Any], device: str) -> list[tuple[str, float, float]]:
    """``(name, start_us, end_us)`` of the kernels among a profile's events (``FunctionEvent``s,
    ``prof.events()``): on CUDA the device's activities; on a CPU the ``aten::`` operators no
    other ``aten::`` operator called (their children's time is theirs)."""
    if device == "cuda":
        picked = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        picked = [e for e in events
                  if e.device_type == torch.autograd.DeviceType.CPU
                  and e.name.startswith("aten::") and not _under_aten(e)]
    return [(e.name, e.time_range.start, e.time_range.end) for e in picked]


def _under_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_step(step: Callable[[], Any], device: str, top: int = 12) -> dict[str, Any]:
    """Run ``step()`` once under ``torch.profiler`` and return ``breakdown`` of its kernels plus
    ``wall_ms``, the step's time under the profiler (synchronised; the profiler's own overhead
    included, so compare ``busy_ms`` with an unprofiled time), and ``device``. The step should
    be warm (compiled): a first call's compile would be profiled with it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        _sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step()
            _sync(device)
            wall = time.perf_counter() - start
        kernels = device_kernels(prof.events(), device)
    except Exception as err:  # noqa: BLE001  (a diagnostic: the measurement beside it goes on)
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    return {"device": device, "wall_ms": wall * 1e3, **breakdown(kernels, top)}


def describe(profile: dict[str, Any] | None, step_ms: float | None = None,
             names: int = 3) -> str:
    """One line of a profile: busy time (against ``step_ms``, an unprofiled step's time, where
    given), kernels, the kinds that took time, the ``names`` kernels that took the most."""
    if not profile:
        return "not profiled"
    if "error" in profile:
        return f"not profiled ({profile['error']})"
    busy = profile["busy_ms"]
    of = (f" of a {step_ms:.1f} ms step ({busy / step_ms:.0%} busy)"
          if step_ms else f" (profiled step {profile['wall_ms']:.1f} ms)")
    kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in
                      sorted(profile["kinds_ms"].items(), key=lambda x: -x[1]) if ms >= 0.05)
    top = "; ".join(f"{x['name'][:60]} {x['ms']:.1f} ms x{x['calls']}"
                    for x in profile["top"][:names])
    return (f"device busy {busy:.1f} ms{of}, {profile['kernels']} kernels; ms by kind: "
            f"{kinds or 'none'}; most: {top or 'none'}")
