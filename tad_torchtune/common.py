"""Small facts every part of the package shares: the ignored-label value, dtype names, the label
shift of causal LM training and the gather of an FSDP2-sharded tensor."""

import torch
from torch import Tensor

#: label of a position that counts in no loss, metric or token count (torchtune's convention)
IGNORE_INDEX = -100

#: dtype names of configs and CLI arguments
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}

try:  # DTensor is what FSDP2 (fully_shard) leaves in a sharded parameter.
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Partial = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def apply_softcap(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` (Gemma2's logit soft-cap), or ``logits`` when ``cap`` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``[B, T]`` labels moved one position left: position t predicts token t+1, and the last
    position, which has no next token, is ignored."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def full_tensor(t: Tensor, *, differentiable: bool = False) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a plain tensor as it is.

    Args:
        t: a tensor or a ``DTensor``.
        differentiable: gather so that the gradient flows back as ``Partial("avg")``:
            reduce-scattered AND averaged over the ranks, which is what FSDP2 does with the
            gradients of every other parameter.
    """
    if DTensor is None or not isinstance(t, DTensor):
        return t
    if differentiable:
        return t.full_tensor(grad_placements=[Partial("avg")] * len(t.placements))
    return t.full_tensor()


def provenance() -> dict[str, str]:
    """What a report records of how it was made: the versions of this package, torch and
    torchtune, the host and the time."""
    import platform
    import time
    from importlib.metadata import PackageNotFoundError, version

    import tad_torchtune

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"tad_torchtune": tad_torchtune.__version__, "torch": torch.__version__,
            "torchtune": installed("torchtune"), "host": platform.node(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
