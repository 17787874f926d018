"""The small shared facts (``common.py``): the compute dtype, the soft-cap, the label shift and
the gather of a tensor that is not sharded. (A sharded one: the FSDP2 tests of
``tests/losses/test_fused.py`` and ``tests/recipes/test_tad_distill.py``.)"""

import torch

from tad_torchtune.common import (
    DTYPES,
    IGNORE_INDEX,
    apply_softcap,
    compute_dtype,
    full_tensor,
    shift_labels,
)


def test_compute_dtype_upcasts_half_precision_only():
    assert [compute_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32,
                                       torch.float64)] == [torch.float32] * 3 + [torch.float64]
    assert DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def test_softcap_is_cap_tanh_of_the_ratio():
    z = torch.tensor([-100.0, -1.0, 0.0, 2.0, 1e4])
    assert apply_softcap(z, None) is z
    expected = torch.tensor([30 * torch.tanh(torch.tensor(v / 30)).item() for v in z.tolist()])
    torch.testing.assert_close(apply_softcap(z, 30.0), expected, rtol=1e-6, atol=0)
    assert apply_softcap(z, 30.0).abs().max() <= 30.0


def test_shift_labels_predicts_the_next_token_and_ignores_the_last():
    labels = torch.tensor([[5, 6, 7, 8], [1, IGNORE_INDEX, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, 7, 8, -100], [-100, 3, 4, -100]]
    assert shift_labels(labels, ignore_index=-1)[:, -1].tolist() == [-1, -1]


def test_full_tensor_of_a_plain_tensor_is_itself():
    t = torch.randn(3)
    assert full_tensor(t) is t and full_tensor(t, differentiable=True) is t
