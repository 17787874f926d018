"""tad_torchtune.hardware: the bf16-on-a-slow-CPU warning, both branches on any CPU (the flags are
passed in), and the reading of /proc/cpuinfo."""

import pytest
import torch

from tad_torchtune import hardware
from tad_torchtune.hardware import read_cpu_flags, warn_if_slow_bf16

# The flags of this project's Zen 4 EPYC (lscpu), cut to the vector extensions, with and without
# its AVX-512 ones: the latter is what an AVX2-only EPYC (Zen 2/3) lists.
ZEN4 = ("fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512ifma avx512cd "
        "avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni")
AVX2_ONLY = " ".join(f for f in ZEN4.split() if not f.startswith("avx512"))
SAPPHIRE_RAPIDS_AMX = "avx2 amx_bf16 amx_tile amx_int8"  # AMX without listing avx512_bf16 here


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not warned yet."""
    monkeypatch.setattr(hardware, "_warned", False)


def test_warns_once_on_a_cpu_without_native_bf16(fresh, capsys):
    first = warn_if_slow_bf16("cpu", "bf16", cpu_flags=AVX2_ONLY)
    again = warn_if_slow_bf16(torch.device("cpu"), torch.bfloat16, cpu_flags=AVX2_ONLY)
    assert first == again and first is not None
    assert "\n" not in first
    # the measured slowdown (issue 21's AVX2 EPYC) and the fix
    assert "4.9 vs 34.6 GFLOP/s" in first and "7x" in first and "dtype=fp32" in first
    assert capsys.readouterr().err == first + "\n"  # printed once, to stderr, as one line


@pytest.mark.parametrize("flags", [ZEN4, SAPPHIRE_RAPIDS_AMX])
def test_silent_on_a_cpu_with_native_bf16(fresh, capsys, flags):
    assert warn_if_slow_bf16("cpu", "bf16", cpu_flags=flags) is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("device, dtype", [
    ("cuda", "bf16"), ("cuda:1", torch.bfloat16), ("cpu", "fp32"), ("cpu", torch.float32),
])
def test_silent_off_the_cpu_or_in_fp32(fresh, capsys, device, dtype):
    assert warn_if_slow_bf16(device, dtype, cpu_flags=AVX2_ONLY) is None
    assert capsys.readouterr().err == ""


def test_a_flag_counts_as_a_whole_word(fresh):
    # "avx512_bf16" inside a longer made-up flag is not the flag
    assert warn_if_slow_bf16("cpu", "bf16", cpu_flags=AVX2_ONLY + " xavx512_bf16") is not None


def test_reads_the_flags_line_of_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {ZEN4}\n\n"
                       f"processor\t: 1\nflags\t\t: {ZEN4}\n")
    assert read_cpu_flags(cpuinfo) == ZEN4
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert read_cpu_flags(arm) is None  # not judged: nothing is printed there
    assert read_cpu_flags(tmp_path / "missing") is None


def test_default_reads_this_machine(fresh):
    """Without cpu_flags, the branch follows /proc/cpuinfo, read here independently."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = [line.split(":", 1)[1].split() for line in text.splitlines()
             if line.split(":", 1)[0].strip() == "flags"]
    if not flags:
        pytest.skip("no x86 flags line")
    native = bool({"avx512_bf16", "amx_bf16"} & set(flags[0]))
    assert (warn_if_slow_bf16("cpu", "bf16") is None) == native
