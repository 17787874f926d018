"""The shared log-space terms (``losses/terms.py``): the block-wise top-k against
``torch.topk``, the teacher's top-K split and the LSE outside a set against their definitions,
``D_KL1`` against a naive sum."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tad_torchtune.losses.terms import (
    IN_IDS_UNROLLED,
    TOP_K_BLOCK,
    SparseGrad,
    add_at_,
    in_ids,
    is_in,
    log1mexp,
    logsumexp,
    lse_outside,
    split_kl,
    teacher_top_k,
    top_k,
)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


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
    idx, lse, lse_tail = teacher_top_k(t, 10)
    ref_idx = t.topk(10, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(lse, t.logsumexp(-1), rtol=1e-12, atol=0)
    tail = t.scatter(-1, ref_idx, float("-inf")).logsumexp(-1)
    assert lse_tail[1] == float("-inf") and torch.isfinite(lse_tail[[0, 2, 3, 4, 5]]).all()
    torch.testing.assert_close(lse_tail, tail, rtol=1e-12, atol=0)


def test_lse_outside_both_ways_against_the_definition():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 300, generator=gen, dtype=torch.float64) * 4
    ids = torch.stack([torch.randperm(300, generator=gen)[:7] for _ in range(5)])
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(-1, ids, False)
    expected = torch.stack([x[r][keep[r]].logsumexp(-1) for r in range(5)])
    torch.testing.assert_close(lse_outside(x, ids), expected, rtol=1e-13, atol=0)
    outside_max = torch.stack([x[r][keep[r]].max() for r in range(5)])
    torch.testing.assert_close(lse_outside(x, ids, outside_max=outside_max), expected,
                               rtol=1e-13, atol=0)
    every = torch.arange(300).expand(2, 300)
    assert (lse_outside(x[:2], every) == float("-inf")).all()


def test_split_kl_is_the_kl_over_the_modes_and_one_bucket():
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(4, 50, generator=gen, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(4, 50, generator=gen, dtype=torch.float64), -1)
    k = 6
    top = p.topk(k, -1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    a_t, a_s = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    expected = (p_top * (p_top / q_top).log()).sum(-1) + a_t * (a_t / a_s).log()
    for differentiable in (True, False):
        got = split_kl(p_top.log(), q_top.log(), a_t.log(), a_s.log(),
                       differentiable=differentiable)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_log1mexp():
    """``exp(log1mexp(x)) + exp(x) = 1``; far below 0 it is ``-exp(x)`` to first order (where
    ``log(1 - exp(x))`` rounds to 0); at or above 0 nothing is left: ``-inf``."""
    x = torch.tensor([-1e-12, -0.1, -0.6931, -0.7, -5.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x).exp() + x.exp(), torch.ones_like(x), rtol=1e-15, atol=0)
    torch.testing.assert_close(log1mexp(torch.tensor([-1e-12], dtype=torch.float64)),
                               torch.tensor([-27.631021115871], dtype=torch.float64), rtol=1e-9,
                               atol=0)  # log(1e-12)
    far = torch.tensor([-40.0, -50.0, -700.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(far), -far.exp(), rtol=1e-12, atol=0)
    assert (log1mexp(torch.tensor([0.0, 1e-3])) == float("-inf")).all()


# ------------------------------------------------ traced by torch.compile: comparisons, no scatter


def traced(fn):
    """``fn`` through Dynamo and AOTAutograd without code generation: the branch that
    ``torch.compiler.is_compiling()`` selects, run as the same aten graph inductor receives."""
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)


@pytest.mark.parametrize("k", [1, 10, IN_IDS_UNROLLED + 3])
def test_in_ids_and_add_at_traced_equal_the_scatters(k):
    gen = torch.Generator().manual_seed(k)
    ids = torch.randint(0, 300, (7, k), generator=gen)
    ids[0, -1] = ids[0, 0]  # a repeated id
    x = torch.randn(7, 300, generator=gen, dtype=torch.float64)
    y = ids[:, 0]

    def both(ids, x, y):
        return in_ids(ids, x.shape[-1]), add_at_(x.clone(), y, -0.7)

    mask, added = both(ids, x, y)
    naive = torch.zeros(7, 300, dtype=torch.bool)
    for r in range(7):
        naive[r, ids[r]] = True
    assert torch.equal(mask, naive)
    expected = x.clone()
    expected[torch.arange(7), y] -= 0.7
    assert torch.equal(added, expected)
    t_mask, t_added = traced(both)(ids, x, y)
    assert torch.equal(t_mask, naive) and torch.equal(t_added, expected)


@pytest.mark.parametrize("mode", ["eager", "traced"])
def test_sparse_grad_finishes_each_entry_rounded_once(mode):
    """``SparseGrad.finish`` in bf16 is the float64 sum (the part, plus the values at the ids,
    repeats added up, then ``post``) rounded ONCE: every entry equal to the reference's cast.
    Rounding the part to bf16 first and adding the values there (a bf16 ``scatter_add``)
    differs at ids; the sum in a buffer of the part's dtype, cast afterwards, does not, but
    costs that ``[n, V]`` buffer and a pass to cast it."""
    gen = torch.Generator().manual_seed(5)
    n, v = 16, 300
    s = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    top = torch.randint(0, v, (n, 4), generator=gen)
    at = torch.cat([top, torch.randint(0, v, (n, 9), generator=gen)], dim=-1)
    at[:, -1] = at[:, 0]  # a repeated id, and one more in some rows
    at[::3, -2] = at[::3, -3]
    values = torch.randn(n, at.shape[-1], generator=gen, dtype=torch.float64) / 5
    rows = torch.arange(n).remainder(5).ne(0).unsqueeze(-1)  # every fifth row ignored

    def part(cols, sv):
        return torch.where(is_in(top, cols, v), (sv - 1).exp() * 1.5, (sv - 2).exp() * 0.25)

    def post(g, s_at):  # a weight, ignored rows, a soft-cap's derivative: what the head applies
        return g.mul_(0.7).masked_fill_(~rows, 0.0).mul_(s_at.mul_(0.2).square_().neg_().add_(1))

    def finish(s, top, at, values, rows):
        return SparseGrad(part, s, at, values).finish(torch.bfloat16, post)

    cap = 1 - (s * 0.2) ** 2
    want = (part(None, s).scatter_add(-1, at, values) * 0.7 * rows * cap)
    fn = traced(finish) if mode == "traced" else finish
    got = fn(s.clone(), top, at, values, rows)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    twice = (part(None, s) * 0.7 * rows * cap).to(torch.bfloat16).scatter_add(
        -1, at, (values * 0.7 * rows * cap.gather(-1, at)).to(torch.bfloat16))
    assert not torch.equal(twice, want.to(torch.bfloat16))  # the test can tell them apart
    plain = SparseGrad(part, s, at, values).finish()  # no post: in the part's dtype
    assert plain.dtype == torch.float64
    torch.testing.assert_close(plain, part(None, s).scatter_add(-1, at, values), rtol=1e-15,
                               atol=1e-15)


def test_lse_outside_traced_equals_eager():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 500, generator=gen, dtype=torch.float64) * 3
    x[1, 100:] = float("-inf")  # fewer finite entries outside the top ids
    x[2] = float("-inf")
    x[2, :4] = 1.0  # no mass outside them at all
    values, ids = x.topk(5, dim=-1)
    ids = ids[:, :4]

    def both(x, ids, outside_max):
        return lse_outside(x, ids), lse_outside(x, ids, outside_max=outside_max)

    eager = both(x, ids, values[:, 4])
    got = traced(both)(x, ids, values[:, 4])
    naive = torch.stack([r[[j for j in range(500) if j not in set(row.tolist())]].logsumexp(-1)
                         for r, row in zip(x, ids)])
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, naive, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(b, naive, atol=1e-12, rtol=1e-12)


def test_logsumexp_traced_equals_torch():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 700, generator=gen, dtype=torch.float64) * 4
    x[1, 50:] = float("-inf")  # some entries masked
    x[2] = float("-inf")  # all: -inf, not NaN
    x[3] += 1e4  # large logits
    for keepdim in (False, True):
        expected = x.logsumexp(-1, keepdim=keepdim)
        assert torch.equal(logsumexp(x, keepdim=keepdim), expected)  # eagerly torch's own
        got = traced(functools.partial(logsumexp, keepdim=keepdim))(x)
        assert got.shape == expected.shape and got[2].item() == float("-inf")
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


#: compiles ``terms.logsumexp`` and ``Tensor.logsumexp`` with inductor's GPU-only online softmax
#: rewrite let loose on a CPU graph (``head_kernels._emulate_gpu_softmax_rewrite``), and prints
#: which of the two graphs after inductor's rewrites hold its ``prepare_softmax_online``
_ONLINE_SOFTMAX_PROBE = """
import sys
import torch
from torch._inductor import config
sys.path.insert(0, sys.argv[1])
import head_kernels
from tad_torchtune.losses.terms import logsumexp

head_kernels._emulate_gpu_softmax_rewrite()
head_kernels._EMULATING[0] = True

class Seen(Exception):
    pass

def probe(fn):
    found = []
    def record(graph):
        found.extend(str(node.target) for node in graph.nodes)
        raise Seen  # the graph is all this needs: no code generation
    torch._dynamo.reset()
    with config.patch(post_grad_custom_post_pass=record, fx_graph_cache=False):
        try:
            torch.compile(fn)(torch.randn(4, 3000))
        except Exception:
            pass
    assert found, "no graph reached inductor's post-grad passes"
    return any("prepare_softmax_online" in op for op in found)

print(probe(logsumexp), probe(lambda x: x.logsumexp(-1)))
"""


def test_traced_logsumexp_is_what_inductor_rewrites_into_one_loop_on_a_gpu():
    """``Tensor.logsumexp``'s guard against an infinite maximum keeps inductor's online softmax
    rewrite (maximum and sum of exponentials in one loop over the row) from matching it, so a
    GPU reads the row twice for it; ``terms.logsumexp`` traced is the pattern the rewrite
    matches. In a process of its own: the rewrite is registered once per process."""
    proc = subprocess.run([sys.executable, "-c", _ONLINE_SOFTMAX_PROBE, str(BENCHMARKS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "False"], proc.stdout
