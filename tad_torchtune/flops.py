"""Model FLOPs of a distillation step, read from the architectures, and MFU.

Per token of a sequence of length ``T`` (every position processed, valid or not), counting the
multiply-adds of matrix products as 2 FLOPs and nothing else (norms, activations, softmaxes are
a few percent at most):

- a model's forward: ``F = 2 P + 2 V D + A``, with ``P`` the weights of the linear layers of
  its blocks, ``V D`` its output projection and ``A = 4 sum_layers(heads * head_dim) T`` its
  attention scores and weighted values (``QK^T`` and ``AV``, each ``2 T head_dim`` per head and
  token; the full ``T x T`` product, as ``FlopCounterMode`` and the usual MFU convention count
  it, whatever the causal or sliding mask);
- the student's backward: the input gradient of every product, ``2 P + 2 V D + 2 A``, plus the
  weight gradient of the TRAINABLE ones, ``2 P_trainable (+ 2 V D if the output projection
  trains)``: frozen embeddings and output projections cost no weight gradient;
- the frozen teacher: its forward only.

``step_flops_per_token = F_student + B_student + F_teacher``: "model FLOPs", so activation
checkpointing's recomputation is not counted (it lowers MFU, as it should). A test holds the
formula against ``torch.utils.flop_counter.FlopCounterMode`` on a tiny model within 5%.
``MFU = step_flops_per_token * tokens / seconds / (devices * peak FLOP/s)``.
"""

from dataclasses import dataclass

import torch
from torch import nn

from tad_torchtune.models import output_weight

#: dense peak FLOP/s of known accelerators, ``(name, bf16, fp32)``, matched as a substring of
#: ``torch.cuda.get_device_name()`` in this order, so that a variant's name ("NVIDIA H100
#: PCIe", "NVIDIA L40") is met before the name it contains ("H100", "L4"); NVIDIA's figures
#: without sparsity. A config key (``peak_flops_per_device``) overrides them.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 51.2e12),
    ("H100 NVL", 835e12, 60e12),
    ("H200 NVL", 835e12, 60e12),
    ("H200", 989e12, 67e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L40", 181e12, 90.5e12),
    ("A10G", 125e12, 31.2e12),
    ("L4", 121e12, 30.3e12),
    ("4090", 165e12, 82.6e12),
)


def peak_flops_of(name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the device called ``name`` for ``dtype`` matmuls (``PEAK_FLOPS``),
    or None for a device the table does not know."""
    column = 2 if dtype == torch.float32 else 1
    return next((row[column] for row in PEAK_FLOPS if row[0] in name), None)


@dataclass(frozen=True)
class ModelFlops:
    """Per-token FLOPs of one model (see the module docstring).

    Attributes:
        block_weights: ``P``, weights of the blocks' linear layers.
        trainable_block_weights: ``P_trainable``.
        output_weights: ``V D``.
        output_trainable: whether the output projection gets a weight gradient.
        attention: ``A`` for the sequence length it was computed with.
    """

    block_weights: int
    trainable_block_weights: int
    output_weights: int
    output_trainable: bool
    attention: int

    @property
    def forward(self) -> int:
        return 2 * self.block_weights + 2 * self.output_weights + self.attention

    @property
    def backward(self) -> int:
        return (2 * self.block_weights + 2 * self.output_weights + 2 * self.attention
                + 2 * self.trainable_block_weights
                + (2 * self.output_weights if self.output_trainable else 0))


def model_flops(model: nn.Module, seq_len: int) -> ModelFlops:
    """``ModelFlops`` of a torchtune ``TransformerDecoder`` for sequences of ``seq_len``."""
    weights = trainable = attention = 0
    for layer in model.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                weights += module.weight.numel()
                trainable += module.weight.numel() if module.weight.requires_grad else 0
        attention += 4 * layer.attn.num_heads * layer.attn.head_dim * seq_len
    out = output_weight(model)
    return ModelFlops(weights, trainable, out.numel(), bool(out.requires_grad), attention)


def step_flops_per_token(student: nn.Module, teacher: nn.Module | None, seq_len: int, *,
                         teacher_projects: bool = True) -> int:
    """FLOPs per processed token of one training step: the student's forward and backward and
    the teacher's forward (None: a step without a live teacher, e.g. from a teacher cache;
    ``teacher_projects`` False: its hidden states alone, for a hidden-state loss without a
    divergence, so no output projection)."""
    s = model_flops(student, seq_len)
    total = s.forward + s.backward
    if teacher is not None:
        t = model_flops(teacher, seq_len)
        total += t.forward - (0 if teacher_projects else 2 * t.output_weights)
    return total


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device for ``dtype`` matmuls when it is a known GPU, else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), dtype)
