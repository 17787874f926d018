"""``engine.top_k``: the block-wise top-k that TAD's teacher statistics use, against
``torch.topk``."""

import pytest
import torch

from tad_torchtune.losses.engine import TOP_K_BLOCK, top_k
from tad_torchtune.losses.tad import tad_teacher_stats


@pytest.mark.parametrize("vocab,k", [(32000, 11), (32001, 10), (4 * TOP_K_BLOCK * 3 + 5, 3),
                                     (4 * TOP_K_BLOCK * 3 - 1, 3), (300, 10), (70000, 49)])
def test_top_k_is_torch_topk(vocab, k):
    gen = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(9, vocab, generator=gen, dtype=torch.float64)
    # the best entries crowded into one block, in the ids past the last whole block, and -inf
    x[0, 5 * TOP_K_BLOCK : 5 * TOP_K_BLOCK + k] += 50.0
    x[1, -k:] += 50.0
    x[2, : vocab // 2] = float("-inf")
    x[3] = float("-inf")
    values, ids = top_k(x, k)
    ref_values, ref_ids = x.topk(k, dim=-1)
    assert torch.equal(values, ref_values)
    # ids are those of topk (a row all -inf ties everywhere: any k ids are its top-k)
    assert torch.equal(ids[[0, 1, 2, 4, 5, 6, 7, 8]], ref_ids[[0, 1, 2, 4, 5, 6, 7, 8]])
    assert torch.equal(x.gather(-1, ids), values)
    assert ids[3].unique().numel() == k


def test_top_k_takes_the_block_path(monkeypatch):
    """The comparison above must exercise the block path, not the fallback to ``topk``."""
    calls = []
    real = torch.Tensor.topk

    def spy(self, k, *args, **kwargs):
        calls.append(self.shape[-1])
        return real(self, k, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    top_k(torch.randn(3, 32000), 10)
    assert 32000 not in calls and calls == [32000 // TOP_K_BLOCK, 10 * TOP_K_BLOCK]


def test_ties_give_a_valid_top_k():
    x = torch.zeros(4, 8192)
    x[:, 100:120] = 1.0  # 20 tied maxima, 10 taken
    values, ids = top_k(x, 10)
    assert torch.equal(values, torch.ones(4, 10))
    assert ((ids >= 100) & (ids < 120)).all() and all(r.unique().numel() == 10 for r in ids)


def test_teacher_stats_are_those_of_a_naive_tail():
    """Top-K ids, LSE and tail LSE (shifted by the (K+1)-th logit, no copy of the tail) against
    the definitions, with a tail all -inf (no tail mass) and a tail far below the top-K."""
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(6, 5000, generator=gen, dtype=torch.float64) * 3
    t[1, 10:] = float("-inf")  # K = 10 finite logits: no tail
    t[2, :10] += 1e4  # the tail 1e4 below the top-K: its LSE must not underflow
    idx, lse, lse_tail = tad_teacher_stats(t, 10)
    ref_idx = t.topk(10, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(lse, t.logsumexp(-1), rtol=1e-12, atol=0)
    tail = t.scatter(-1, ref_idx, float("-inf")).logsumexp(-1)
    assert lse_tail[1] == float("-inf") and torch.isfinite(lse_tail[[0, 2, 3, 4, 5]]).all()
    torch.testing.assert_close(lse_tail, tail, rtol=1e-12, atol=0)
