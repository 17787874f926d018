"""The bodies of ``tests/test_cuda.py`` that do not need a GPU's own kernels, run on the CPU.

A GPU comes to this project rarely, and the GPU check (``benchmarks/gpu_check.sh``) runs the CUDA
tests there once: a test that breaks for a reason of its own (a helper's signature, a case's
shape, a tolerance the CPU's math already misses) must break here first, not spend that run.
Each test below calls one of ``test_cuda.py``'s, with each of its parametrizations, with the
cases left on the CPU (``on_cuda``) and ``torch.compile`` through AOTAutograd without code
generation (the compiled heads' graphs and their guards; inductor's GPU code is the GPU's to
test). Not here: flex attention's kernels, cuBLAS's float32 sum of bf16 products, the recipe
run on the GPU and FSDP2's CPU offload.
"""

import functools
import itertools

import pytest
import torch

from tad_torchtune.losses import fused as fused_module
from tests import test_cuda

#: the CUDA tests whose bodies run on a CPU
ON_CPU = ("test_exact_bf16_case_has_exact_logits", "test_fused_equals_unfused_float32",
          "test_fused_equals_unfused_bf16", "test_fused_head_equals_unfused_float32",
          "test_fused_head_bf16", "test_compiled_fused_head_bf16",
          "test_compiled_fused_head_from_a_cache",
          # Liger's chunked losses are torch code (skipped where liger-kernel is not installed:
          # CI, whose test extras leave out its triton requirement)
          "test_liger_fused_jsd_is_forward_kl_at_the_benchmarked_beta")


def _parametrizations(fn) -> list[dict]:
    """The keyword arguments of every case ``fn``'s ``parametrize`` marks make (their product)."""
    axes = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = [v.values if hasattr(v, "marks") else v if len(names) > 1 else (v,)
                for v in values]  # a pytest.param's values, a tuple, or one value
        axes.append([dict(zip(names, row)) for row in rows])
    return [functools.reduce(lambda a, b: {**a, **b}, combo, {})
            for combo in itertools.product(*axes)]


CASES = [pytest.param(name, kwargs, id=f"{name}[{'-'.join(map(str, kwargs.values()))}]")
         for name in ON_CPU for kwargs in _parametrizations(getattr(test_cuda, name))]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_cuda_test_body_on_cpu(monkeypatch, name, kwargs):
    monkeypatch.setattr(test_cuda, "on_cuda", lambda case: tuple(case))
    monkeypatch.setattr(fused_module, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    getattr(test_cuda, name)(**kwargs)


def test_every_cuda_test_is_run_on_cpu_or_named_as_gpu_only():
    """A new CUDA test joins ``ON_CPU`` or the GPU-only list here: never neither."""
    gpu_only = {"test_flex_document_mask_equals_the_dense_one",
                # its CPU counterparts: tests/models/test_window.py (flex attention uncompiled)
                "test_flex_sliding_window_equals_the_dense_one",
                "test_compiled_bf16_recipe_matches_eager",
                "test_the_bf16_weight_gradient_accumulates_inside_the_matmul",
                # its body on a CPU without offload (which needs a GPU):
                # tests/models/test_loading.py::test_one_rank_loads_its_shards_and_trains
                "test_fsdp_loads_its_shards_on_the_gpu_or_the_host"}
    tests = {n for n in dir(test_cuda) if n.startswith("test_")}
    assert tests == set(ON_CPU) | gpu_only, tests ^ (set(ON_CPU) | gpu_only)


@pytest.mark.parametrize("a", [1, pytest.param(2, id="two")])
@pytest.mark.parametrize("b,c", [(3, 4), pytest.param(5, 6)])
def _parametrized(a, b, c):
    pass


def test_parametrizations_are_the_product_of_the_marks():
    assert sorted(map(sorted, (p.items() for p in _parametrizations(_parametrized)))) == sorted(
        sorted({"a": a, "b": b, "c": c}.items()) for a in (1, 2) for b, c in ((3, 4), (5, 6)))
