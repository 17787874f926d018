"""What the host computes natively, read before a run, and the one warning a slow choice gets.

A recipe calls ``warn_if_slow_bf16(cfg.device, cfg.dtype)`` once at start: bf16 on an x86 CPU
whose ``/proc/cpuinfo`` flags have neither ``avx512_bf16`` nor ``amx_bf16`` runs its matmuls
several times slower than fp32 and says nothing, so a laptop try of a bf16 config looks hung.
"""

import sys
from pathlib import Path

import torch

#: x86 flags (``/proc/cpuinfo``, ``lscpu``) of the instructions that compute bf16 natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

#: The slowdown the warning quotes: one-thread matmuls, bf16 against fp32, measured on the
#: project's AVX2-only AMD EPYC development machine (issue 21). On a Zen 4 EPYC with avx512_bf16,
#: 1024^3 in torch 2.13: bf16 ~205, fp32 ~85 GFLOP/s; with oneDNN capped to AVX-512 without bf16
#: (ONEDNN_MAX_CPU_ISA=AVX512_CORE, as on Skylake-X) bf16 ~37, 2.2x slower than fp32.
BF16_GFLOPS, FP32_GFLOPS = 4.9, 34.6

#: the same on a CPU with AVX-512 but no bf16 instructions (Skylake-X class): oneDNN capped to
#: AVX512_CORE on this project's Zen 4 EPYC, 1024^3, one thread
AVX512_BF16_GFLOPS, AVX512_FP32_GFLOPS = 37.0, 82.0

SLOW_BF16_WARNING = (
    "tad_torchtune: warning: dtype=bf16 on a CPU without {flags} (its /proc/cpuinfo flags): "
    f"matmuls run {AVX512_FP32_GFLOPS / AVX512_BF16_GFLOPS:.0f}x (AVX-512) to "
    f"{FP32_GFLOPS / BF16_GFLOPS:.0f}x (AVX2) slower than in fp32 (one thread: "
    f"{AVX512_BF16_GFLOPS:g} vs {AVX512_FP32_GFLOPS:g}, {BF16_GFLOPS} vs {FP32_GFLOPS} GFLOP/s); "
    "pass dtype=fp32"
).format(flags=" or ".join(NATIVE_BF16_FLAGS))

_warned = False  # printed once per process, however many times it is asked


def read_cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The ``flags`` line of ``cpuinfo`` (x86 Linux), or None where there is none to read (another
    OS, another architecture: ARM lists ``Features`` instead, whose bf16 we do not judge)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return value.strip()
    except OSError:
        return None
    return None


def _is_bf16(dtype: str | torch.dtype) -> bool:
    return dtype == torch.bfloat16 or (isinstance(dtype, str) and dtype.lower() in ("bf16", "bfloat16"))


def warn_if_slow_bf16(device: str | torch.device, dtype: str | torch.dtype, *,
                      cpu_flags: str | None = None) -> str | None:
    """Warn, once per process, that bf16 on this CPU is slow, when it is.

    Args:
        device: the run's device (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``).
        dtype: the run's dtype, as a config writes it (``"bf16"``, ``"fp32"``) or a
            ``torch.dtype``.
        cpu_flags: the CPU's flags, space-separated as in ``/proc/cpuinfo``; None reads them from
            ``/proc/cpuinfo`` (tests pass both kinds of CPU).

    Returns:
        The warning line (also printed to stderr the first time) when the device is a CPU, the
        dtype bf16 and the flags known but without ``avx512_bf16`` or ``amx_bf16``; else None
        (GPU, fp32, a CPU computing bf16 natively, or flags that cannot be read).
    """
    if torch.device(device).type != "cpu" or not _is_bf16(dtype):
        return None
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    if flags is None or set(flags.split()) & set(NATIVE_BF16_FLAGS):
        return None
    global _warned
    if not _warned:
        _warned = True
        print(SLOW_BF16_WARNING, file=sys.stderr, flush=True)
    return SLOW_BF16_WARNING
