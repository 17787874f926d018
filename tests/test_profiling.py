"""tad_torchtune.profiling: kernel kinds on recorded CUDA kernel names, the busy time against a
brute-force union, the kernel filters and a cycle's metrics on stand-in events, the profiler
key's checks, and a profiled recipe run."""

import random
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tad_torchtune import profiling
from tad_torchtune.errors import ConfigError
from tad_torchtune.profiling import (
    StepProfiler,
    breakdown,
    busy_us,
    device_kernels,
    kind_of,
    step_metrics,
    validate_profiler,
)

#: names as CUPTI reports them on H100s (cuBLAS, FlashAttention, inductor, ATen), and the CPU
#: stand-ins' operators
NAMES = {
    "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_"
    "segment_k_off_kernel__5x_cublas": "matmul",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>"
    "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)": "matmul",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>(...)": "matmul",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, "
    "true, false, false, false, true, false, false>(pytorch_flash::Flash_fwd_params)":
        "attention",
    "fmha_cutlassB_bf16_aligned_128x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel"
    "<cutlass::arch::Sm80, cutlass::bfloat16_t, true, false, true, 128, 64, 128, false>::Params)":
        "attention",
    "triton_red_fused__log_softmax_exp_sub_sum_0": "inductor",
    "triton_poi_fused__to_copy_add_mul_1": "inductor",
    "triton_per_fused_topk_2": "inductor",
    "triton_tem_fused_mm_3": "matmul",  # matmul templates (max-autotune)
    "triton_tem_fused_addmm_4": "matmul",
    "triton_tem_fused_addmm_relu_5": "inductor",  # with an epilogue: inductor's own
    # flex attention's template kernels (inductor names them after the fused nodes)
    "triton_tem_fused_flex_attention_0": "attention",
    "triton_tem_fused_flex_attention_backward_1": "attention",
    "void at::native::sbtopk::gatherTopK<c10::BFloat16, unsigned int, 2, false>(...)": "topk/sort",
    "void at::native::(anonymous namespace)::radixSortKVInPlace<-2, -1, 32, 4, float, long, "
    "unsigned int>(...)": "topk/sort",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous "
    "namespace)::FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::"
    "FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>, double*, double, double, "
    "double, double, double, bool const*, float const*>(...)": "optimizer",
    "Memcpy DtoD (Device -> Device)": "copy/fill",
    "Memset (Device)": "copy/fill",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::BFloat16>, "
    "std::array<char*, 1ul> >(int, at::native::FillFunctor<c10::BFloat16>, "
    "std::array<char*, 1ul>)": "copy/fill",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
    "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::"
    "{lambda()#7}::operator()() const::{lambda(c10::BFloat16)#1}> >(int, ...)": "copy/fill",
    "void (anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, (anonymous "
    "namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)": "other",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::"
    "func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()"
    "(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4> >(...)": "other",
    "ncclDevKernel_AllGather_RING_LL(ncclDevComm*, unsigned long, ncclWork*)": "nccl",
    "aten::mm": "matmul",
    "aten::addmm_": "matmul",
    "aten::linear": "matmul",
    "aten::scaled_dot_product_attention": "attention",
    "aten::topk": "topk/sort",
    "aten::_fused_adamw_": "optimizer",
    "aten::copy_": "copy/fill",
    "aten::to": "copy/fill",
    "aten::exp": "other",
    "aten::tolist": "other",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kernel_kinds(name):
    assert kind_of(name) == NAMES[name]


def test_busy_time_is_the_union_of_the_intervals():
    rng = random.Random(0)
    for _ in range(50):
        spans = [(s, s + rng.randint(0, 30)) for s in (rng.randint(0, 200) for _ in range(12))]
        covered = {t for s, e in spans for t in range(s, e)}  # unit steps of [s, e)
        assert busy_us(spans) == len(covered)
    assert busy_us([]) == 0


def test_breakdown_sums_each_kernel_once_per_kind_and_ranks_names():
    kernels = [("aten::mm", 0.0, 4000.0), ("triton_red_fused_0", 3000.0, 5000.0),
               ("aten::mm", 6000.0, 7000.0), ("aten::exp", 7000.0, 7500.0),
               ("x" * 500, 8000.0, 8100.0)]
    got = breakdown(kernels, top=3)
    assert got["busy_ms"] == pytest.approx(6.6)  # 0-5, 6-7.5, 8-8.1 ms
    assert got["kernels"] == 5
    assert got["kinds_ms"]["matmul"] == pytest.approx(5.0)
    assert got["kinds_ms"]["inductor"] == pytest.approx(2.0)
    assert got["kinds_ms"]["other"] == pytest.approx(0.6)
    assert sum(got["kinds_ms"].values()) == pytest.approx(7.6)  # overlap counted in each kind
    assert [(x["name"], x["kind"], x["calls"]) for x in got["top"]] == [
        ("aten::mm", "matmul", 2), ("triton_red_fused_0", "inductor", 1),
        ("aten::exp", "other", 1)]
    long = breakdown(kernels[-1:])["top"][0]["name"]
    assert len(long) == profiling.NAME_CHARS and long.endswith("...")


def event(name, start, end, device_type, parent=None, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=device_type, cpu_parent=parent,
                           is_user_annotation=annotation)


def test_device_kernels_take_the_gpu_s_activities_or_the_cpu_s_outermost_operators():
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    linear = event("aten::linear", 0, 10, cpu)
    mm = event("aten::mm", 1, 9, cpu, parent=linear)
    backward = event("MmBackward0", 20, 40, cpu)
    mm_backward = event("aten::mm", 21, 39, cpu, parent=backward)
    launch = event("cudaLaunchKernel", 2, 3, cpu, parent=mm)
    kernel = event("nvjet_tst_128x128", 5, 8, cuda)
    events = [linear, mm, backward, mm_backward, launch, kernel]
    assert device_kernels(events, "cuda") == [("nvjet_tst_128x128", 5, 8)]
    assert device_kernels(events, "cpu") == [("aten::linear", 0, 10), ("aten::mm", 21, 39)]


def test_a_cpu_s_compiled_graph_call_counts_what_its_operators_leave():
    cpu = torch.autograd.DeviceType.CPU
    graph = event("## Call CompiledFxGraph abc ##", 100, 200, cpu)
    mm = event("aten::mm", 120, 150, cpu, parent=graph)
    inner = event("aten::empty", 121, 122, cpu, parent=mm)
    addmm = event("aten::addmm", 150, 180, cpu, parent=graph)
    outside = event("aten::exp", 300, 310, cpu)
    got = device_kernels([graph, mm, inner, addmm, outside], "cpu")
    compiled = profiling.CPU_COMPILED
    assert sorted(got, key=lambda k: k[1]) == [
        (compiled, 100, 120), ("aten::mm", 120, 150), ("aten::addmm", 150, 180),
        (compiled, 180, 200), ("aten::exp", 300, 310)]
    assert kind_of(compiled) == "inductor"
    assert breakdown(got)["busy_ms"] == pytest.approx(0.11)  # the call and the exp


def test_a_cycle_s_metrics_are_per_active_step():
    cpu = torch.autograd.DeviceType.CPU
    events = [event("ProfilerStep*", 0, 10_000, cpu), event("ProfilerStep*", 10_000, 30_000, cpu),
              event("aten::mm", 1_000, 5_000, cpu), event("aten::exp", 5_000, 6_000, cpu),
              event("aten::mm", 12_000, 20_000, cpu), event("aten::copy_", 25_000, 26_000, cpu),
              # the range a run's end leaves open after its last step: no kernel, not a step
              event("ProfilerStep*", 30_000, 30_050, cpu)]
    got = step_metrics(events, "cpu")
    assert got == pytest.approx({
        "profile_step_ms": 15.0, "profile_busy_ms": 7.0, "profile_busy_share": 7 / 15,
        "profile_kernels": 2.0, "profile_matmul_ms": 6.0, "profile_other_ms": 0.5,
        "profile_copy_fill_ms": 0.5})
    assert profiling.describe(got) == (
        "profiled: 15.0 ms a step, the device busy 7.0 ms (47%), 2 kernels; ms by kind: "
        "matmul 6.0, copy_fill 0.5, other 0.5")


def test_a_validation_between_steps_is_not_a_step_s():
    """A validation (or a checkpoint) runs after ``step()``, inside the next step's range, and
    after the last step in a range of its own: its time, its kernels and a range holding only
    it are left out (before, a 6.4 s validation made a 1.5 s step 3.7 s, and the range after
    the last step counted as a step)."""
    cpu = torch.autograd.DeviceType.CPU
    events = [event("ProfilerStep*", 0, 10_000, cpu), event("aten::mm", 1_000, 5_000, cpu),
              # step 2's range: a validation (its own mm), then the step
              event("ProfilerStep*", 10_000, 70_000, cpu),
              event(profiling.OUTSIDE_STEPS, 10_000, 60_000, cpu),
              event("aten::mm", 20_000, 50_000, cpu), event("aten::mm", 61_000, 65_000, cpu),
              # after the last step: a validation alone
              event("ProfilerStep*", 70_000, 90_000, cpu),
              event(profiling.OUTSIDE_STEPS, 70_000, 89_000, cpu),
              event("aten::mm", 71_000, 80_000, cpu)]
    assert step_metrics(events, "cpu") == pytest.approx({
        "profile_step_ms": 10.0, "profile_busy_ms": 4.0, "profile_busy_share": 0.4,
        "profile_kernels": 1.0, "profile_matmul_ms": 4.0})


def test_a_gpu_s_annotation_ranges_are_neither_kernels_nor_steps():
    """On CUDA a user-scope range (``record_function``: the schedule's ``ProfilerStep#N``, the
    optimizer's ``Optimizer.step#AdamW.step``) is recorded twice: on the host, and as a CUDA
    event spanning its kernels on the GPU's timeline (``is_user_annotation``). Neither is a
    kernel; the steps are the host's ranges."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = []
    for step, start in enumerate((0, 10_000)):  # two steps, each: a matmul, a gap, Adam
        events += [event(f"ProfilerStep#{step}", start, start + 10_000, cpu, annotation=True),
                   event(f"ProfilerStep#{step}", start + 500, start + 9_000, cuda,
                         annotation=True),
                   event("Optimizer.step#AdamW.step", start + 7_000, start + 9_500, cpu,
                         annotation=True),
                   event("Optimizer.step#AdamW.step", start + 7_500, start + 9_000, cuda,
                         annotation=True),
                   event("nvjet_tst_128x128", start + 500, start + 4_500, cuda),
                   event("multi_tensor_apply_kernel", start + 7_500, start + 9_000, cuda)]
    assert [k[0] for k in device_kernels(events, "cuda")] == [
        "nvjet_tst_128x128", "multi_tensor_apply_kernel"] * 2
    assert step_metrics(events, "cuda") == pytest.approx({
        "profile_step_ms": 10.0, "profile_busy_ms": 5.5, "profile_busy_share": 0.55,
        "profile_kernels": 2.0, "profile_matmul_ms": 4.0, "profile_optimizer_ms": 1.5})


PROFILER_ERRORS = [
    ({"enabled": "yes"}, "profiler.enabled: must be bool, got 'yes'"),
    ({"enabled": True, "active_steps": 0},
     "profiler.active_steps: must be an integer >= 1 or null, got 0"),
    ({"wait_steps": -1}, "profiler.wait_steps: must be an integer >= 0 or null, got -1"),
    ({"num_cycles": 1.5}, "profiler.num_cycles: must be an integer >= 0 or null, got 1.5"),
    ({"every": 3}, "profiler.every: not an argument of torchtune.training.setup_torch_profiler; "
                   "accepted: enabled, cpu, cuda, xpu, profile_memory, with_stack, record_shapes, "
                   "with_flops, wait_steps, warmup_steps, active_steps, num_cycles, output_dir"),
    ({"_component_": "torch.profiler.profile"},
     "profiler._component_: must be torchtune.training.setup_torch_profiler, got "
     "'torch.profiler.profile'"),
]


@pytest.mark.parametrize("node,message", PROFILER_ERRORS,
                         ids=[m.split(":")[0] for _, m in PROFILER_ERRORS])
def test_profiler_key_errors_name_the_key(node, message):
    with pytest.raises(ConfigError) as err:
        validate_profiler(OmegaConf.create(node))
    assert str(err.value) == message


def test_a_profiler_node_gets_torchtune_s_component():
    node = OmegaConf.create({"enabled": True, "active_steps": 2})
    validate_profiler(node)
    assert node._component_ == "torchtune.training.setup_torch_profiler"


@pytest.mark.parametrize("node", [None, {"enabled": False}])
def test_a_profiler_that_is_off_does_nothing(tmp_path, node):
    profiler = StepProfiler(None if node is None else OmegaConf.create(node),
                            output_dir=tmp_path, device="cpu")
    profiler.start()
    assert not profiler.enabled and profiler.step() is None
    profiler.stop()
    assert list(tmp_path.iterdir()) == []
