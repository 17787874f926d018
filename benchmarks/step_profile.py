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

The reading of the kernels (kinds, busy time, names) is the library's,
``tad_torchtune.profiling``, which ``tad_distill``'s ``profiler`` key logs the same way: on CUDA
the device's own activities (kernels, copies, fills, from CUPTI); on a CPU (the GPU check's dry
run) the outermost ``aten::`` operators stand in for kernels. A profiler that cannot start (no
CUPTI) gives ``{"error": ...}``, never an exception: the measurement it sits beside goes on.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

# the installed project where there is one (the GPU check installs its wheel), else this checkout
if importlib.util.find_spec("tad_torchtune") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tad_torchtune.profiling import breakdown, device_kernels  # noqa: E402


def sync(device: "str | torch.device") -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere. The benchmarks' timers stop
    after it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


#: environment variable: the time (seconds since the epoch) after which ``profile_step`` profiles
#: nothing; the GPU check sets it for each step, some seconds before the step's cap, so that a
#: profile (a diagnostic) never makes a step that measured its targets run out of time
DEADLINE_ENV = "GPU_CHECK_STEP_DEADLINE"


def profile_step(step: Callable[[], Any], device: str, top: int = 12) -> dict[str, Any]:
    """Run ``step()`` once under ``torch.profiler`` and return ``breakdown`` of its kernels plus
    ``wall_ms``, the step's time under the profiler (synchronised; the profiler's own overhead
    included, so compare ``busy_ms`` with an unprofiled time), and ``device``. The step should
    be warm (compiled): a first call's compile would be profiled with it. After the time in
    ``DEADLINE_ENV``, it does not run the step and says so (``{"error": ...}``)."""
    from torch.profiler import ProfilerActivity, profile

    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        return {"error": f"not run: past {DEADLINE_ENV}, the step's cap is near"}

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step()
            sync(device)
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
