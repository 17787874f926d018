"""The MFU formula against torch's FlopCounterMode on tiny models."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tad_torchtune.flops import model_flops, step_flops_per_token
from tad_torchtune.models import (
    forward_hidden,
    init_student_from_teacher,
    project_logits,
    pruned_student,
)

NODE = dict(_component_="torchtune.models.llama3.llama3", vocab_size=512, num_layers=4,
            num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=128)


def _cpu_attention_mapping():
    """FlopCounterMode counts the CUDA attention kernels; the CPU's flash attention, with the
    same formulas (torch's own: 2 products forward, 4 backward)."""
    aten = torch.ops.aten

    def fwd(query_shape, key_shape, value_shape, *args, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def counted_step_flops(student, teacher, tokens) -> int:
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping()) as counter:
        with torch.no_grad():
            t = project_logits(teacher, forward_hidden(teacher, tokens)[0])
        s = project_logits(student, forward_hidden(student, tokens)[0])
        (s.float() * t.float()).sum().backward()  # no matmul in the "loss"
    return counter.get_total_flops()


@pytest.mark.parametrize("freeze_embeddings", [True, False])
def test_step_flops_match_the_flop_counter(freeze_embeddings):
    from torchtune.models.llama3 import llama3

    torch.manual_seed(0)
    teacher = llama3(**{k: v for k, v in NODE.items() if k != "_component_"})
    student = pruned_student(teacher=NODE, num_layers=2, intermediate_dim=96,
                             freeze_embeddings=freeze_embeddings)
    init_student_from_teacher(student, teacher)
    student.layers[0].attn.q_proj.weight.requires_grad_(False)  # a frozen block weight too
    b, t = 2, 64
    tokens = torch.randint(0, NODE["vocab_size"], (b, t))
    counted = counted_step_flops(student, teacher, tokens)
    formula = step_flops_per_token(student, teacher, t) * b * t
    assert formula == pytest.approx(counted, rel=0.05)
    # the frozen output projection and q_proj really are left out of the weight gradients
    f = model_flops(student, t)
    assert f.output_trainable is not freeze_embeddings
    assert f.trainable_block_weights == f.block_weights - 64 * 64


def test_a_teacher_read_for_its_hidden_states_alone_has_no_projection():
    """With a hidden-state loss and no divergence the teacher runs no output projection: its
    FLOPs are the counter's of its blocks alone (before, 2 V D per token too: MFU +8%)."""
    from torchtune.models.llama3 import llama3

    teacher = llama3(**{k: v for k, v in NODE.items() if k != "_component_"})
    student = pruned_student(teacher=NODE, num_layers=2, intermediate_dim=96)
    tokens = torch.randint(0, NODE["vocab_size"], (2, 64))
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping()) as counter:
        with torch.no_grad():
            forward_hidden(teacher, tokens)
    hidden_only = step_flops_per_token(student, teacher, 64, teacher_projects=False)
    assert hidden_only - step_flops_per_token(student, None, 64) == pytest.approx(
        counter.get_total_flops() / tokens.numel(), rel=0.05)
    assert step_flops_per_token(student, teacher, 64) - hidden_only == 2 * 512 * 64


def test_flops_without_a_teacher_are_the_students_alone():
    student = pruned_student(teacher=NODE, num_layers=2, intermediate_dim=96)
    f = model_flops(student, 32)
    assert step_flops_per_token(student, None, 32) == f.forward + f.backward


@pytest.mark.parametrize("name,bf16,fp32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12), ("NVIDIA H100 PCIe", 756e12, 51.2e12),
    ("NVIDIA H100 NVL", 835e12, 60e12), ("NVIDIA H200", 989e12, 67e12),
    ("NVIDIA H200 NVL", 835e12, 60e12), ("NVIDIA L40S", 362e12, 91.6e12),
    ("NVIDIA L40", 181e12, 90.5e12), ("NVIDIA L4", 121e12, 30.3e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12), ("Tesla T4", None, None)])
def test_a_gpu_s_peak_is_its_own_not_a_name_it_contains(name, bf16, fp32):
    """By the name ``torch.cuda.get_device_name`` gives: a variant ("H100 PCIe", "L40") is not
    read as the GPU whose name it contains ("H100", "L4"); NVIDIA's dense figures."""
    from tad_torchtune.flops import peak_flops_of

    assert peak_flops_of(name, torch.bfloat16) == bf16
    assert peak_flops_of(name, torch.float32) == fp32
