"""benchmarks/step_profile.py: kernel kinds on recorded CUDA kernel names, the busy time against a
brute-force union, the kernel filters on stand-in events, a CPU step's profile."""

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import step_profile  # noqa: E402
from step_profile import breakdown, busy_us, device_kernels, kind_of, profile_step  # noqa: E402

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
    assert len(long) == step_profile.NAME_CHARS and long.endswith("...")


def event(name, start, end, device_type, parent=None):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=device_type, cpu_parent=parent)


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


def test_a_cpu_step_s_profile_finds_its_matmul():
    a = torch.randn(768, 768, requires_grad=True)
    b = torch.randn(768, 768)

    def step():
        for _ in range(4):
            (a @ b).sum().backward()

    step()
    got = profile_step(step, "cpu")
    assert got["device"] == "cpu" and got["kernels"] >= 8
    assert 0 < got["busy_ms"] <= got["wall_ms"]
    # 8 products of 768^3 against sums and fills of 768^2: the matmuls are most of the time
    assert got["kinds_ms"]["matmul"] > 0.5 * got["busy_ms"]
    assert got["top"][0]["kind"] == "matmul"
    assert sum(x["calls"] for x in got["top"] if x["kind"] == "matmul") == 8


def test_a_failing_step_gives_its_error_not_an_exception():
    def step():
        raise RuntimeError("no CUPTI")

    got = profile_step(step, "cpu")
    assert got == {"error": "RuntimeError: no CUPTI"}
    assert step_profile.describe(got) == "not profiled (RuntimeError: no CUPTI)"
