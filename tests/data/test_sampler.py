"""ResumableBatchSampler by its properties, not by a copy of its code: every sample once per
epoch (the trailing partial global batch dropped), ranks disjoint, N processes giving the global
batches of one, a resume equal to the run it continues (on another number of processes too), an
order that is the seed's and the epoch's, computed without a table of the samples (a shuffle
as good as a uniform one by its statistics), and earlier versions' order kept for their
checkpoints."""

import itertools
import math
import time
import tracemalloc
from collections import Counter

import pytest
import torch

from tad_torchtune.data import SAMPLE_ORDERS, FeistelPermutation, ResumableBatchSampler

N = 1001  # not a multiple of any global batch below


def _batches(world_size, *, batch_size, epoch=0, start=0, seed=7, shuffle=True, order="feistel"):
    """Per rank, the batches of one epoch from sample ``start`` on."""
    out = []
    for rank in range(world_size):
        s = ResumableBatchSampler(N, batch_size=batch_size, rank=rank, world_size=world_size,
                                  shuffle=shuffle, seed=seed, order=order)
        s.set_position(epoch, start)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(type(i) is int and len(b) == batch_size for b in batches for i in b)
        out.append(batches)
    return out


def _global(per_rank):
    """The global batches: step b is rank 0's b-th batch, then rank 1's, ..."""
    return [sum(step, []) for step in zip(*per_rank)]


@pytest.mark.parametrize("order", SAMPLE_ORDERS)
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (3, 4), (2, 7)])
def test_every_sample_once_per_epoch_on_disjoint_ranks(world_size, batch_size, shuffle, order):
    per_rank = _batches(world_size, batch_size=batch_size, shuffle=shuffle, order=order)
    seen = [i for batches in per_rank for b in batches for i in b]
    g = world_size * batch_size
    assert len(seen) == len(set(seen)) == N // g * g  # once each; the partial batch dropped
    assert set(seen) <= set(range(N))
    for a, b in itertools.combinations(per_rank, 2):
        assert not {i for x in a for i in x} & {i for x in b for i in x}
    assert len({len(batches) for batches in per_rank}) == 1  # every rank steps as often
    if not shuffle:
        assert _global(per_rank) == [list(range(s * g, (s + 1) * g)) for s in range(N // g)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_processes_share_the_global_batches_of_one(shuffle):
    """2 x 6, 3 x 4 and 12 x 1 processes step on the global batches of 1 process of 12."""
    one = _global(_batches(1, batch_size=12, shuffle=shuffle))
    for world_size, batch_size in ((2, 6), (3, 4), (12, 1)):
        assert _global(_batches(world_size, batch_size=batch_size, shuffle=shuffle)) == one


@pytest.mark.parametrize("order", SAMPLE_ORDERS)
@pytest.mark.parametrize("start", [0, 12, 36, 996])
def test_a_resume_continues_the_epoch_on_any_number_of_processes(start, order):
    whole = _global(_batches(1, batch_size=12, epoch=2, order=order))
    assert _global(_batches(1, batch_size=12, epoch=2, start=start, order=order)) == \
        whole[start // 12:]
    assert _global(_batches(3, batch_size=4, epoch=2, start=start, order=order)) == \
        whole[start // 12:]


@pytest.mark.parametrize("order", SAMPLE_ORDERS)
def test_the_order_is_the_seed_and_the_epoch(order):
    epoch0 = _global(_batches(1, batch_size=4, epoch=0, order=order))
    assert _global(_batches(1, batch_size=4, epoch=0, order=order)) == epoch0  # reproducible
    epoch1 = _global(_batches(1, batch_size=4, epoch=1, order=order))
    other_seed = _global(_batches(1, batch_size=4, epoch=0, seed=8, order=order))
    assert epoch1 != epoch0 and other_seed != epoch0
    assert sum(epoch0, []) != sorted(sum(epoch0, []))  # shuffled, not in the dataset's order
    # without shuffling every epoch is the same
    assert _global(_batches(1, batch_size=4, epoch=3, shuffle=False)) == \
        _global(_batches(1, batch_size=4, epoch=0, shuffle=False))


def test_a_position_inside_a_global_batch_is_refused():
    s = ResumableBatchSampler(N, batch_size=4, rank=1, world_size=3)
    with pytest.raises(ValueError) as err:
        s.set_position(1, 18)
    assert str(err.value) == ("cannot resume at sample 18 of epoch 1: it is not a multiple of the "
                              "global batch 12 (batch_size 4 x 3 processes); keep batch_size * "
                              "processes a divisor of it")


def test_the_randperm_order_is_that_of_earlier_versions():
    """``order="randperm"`` (checkpoints that record no order) steps on the slices of
    ``torch.randperm`` under the generator seeded ``seed + epoch``, as earlier versions did."""
    for epoch, seed in ((0, 7), (3, 7), (1, 123)):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert _global(_batches(3, batch_size=4, epoch=epoch, seed=seed, order="randperm")) == \
            [perm[b * 12 : (b + 1) * 12] for b in range(N // 12)]
        assert _global(_batches(1, batch_size=12, epoch=epoch, seed=seed)) != \
            [perm[b * 12 : (b + 1) * 12] for b in range(N // 12)]  # not the new order
    with pytest.raises(ValueError, match=r"order must be one of \('feistel', 'randperm'\), got 'x'"):
        ResumableBatchSampler(N, batch_size=4, order="x")


@pytest.mark.parametrize("n", [*range(1, 40), 255, 256, 257, 1000, 1001, 4096, 65537])
def test_feistel_is_a_permutation(n):
    for key in (0, 1, -5, 2**63 + 11):
        perm = FeistelPermutation(n, key)
        assert sorted(perm(i) for i in range(n)) == list(range(n))
    with pytest.raises(IndexError):
        perm(n)


def test_a_shuffled_epoch_of_any_size_holds_no_table_of_its_samples():
    """10**15 samples (8 PB of randperm): a batch at the start and one near the end of an
    epoch, taken at once and with a few KiB, each sample in range and the two disjoint."""
    n, g = 10**15, 64
    sampler = ResumableBatchSampler(n, batch_size=16, rank=2, world_size=4, seed=3)
    tracemalloc.start()
    start = time.perf_counter()
    first = next(iter(sampler))
    sampler.set_position(5, (n // g - 1) * g)  # the epoch's last global batch
    last = list(sampler)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(last) == 1 and len(first) == len(last[0]) == 16
    assert all(0 <= i < n for i in first + last[0]) and not set(first) & set(last[0])
    assert peak < 64 * 1024 and seconds < 1.0, (peak, seconds)


def _chi2(counts: Counter, cells: list, total: int) -> float:
    expected = total / len(cells)
    return sum((counts.get(c, 0) - expected) ** 2 / expected for c in cells)


def test_feistel_orders_are_uniform_by_their_statistics():
    """Over 6000 keys, the samples at positions 0 and 1 of a permutation of 6 are each of the
    30 ordered pairs about equally often (chi-square, 29 degrees of freedom: p = 1e-6 at 80.4;
    28.2 here; six rounds at this size, as for large ones, gave 177; a rotation by the key would
    give 5 pairs). One permutation of 200,003 has no correlation of position and sample, no
    runs of neighbouring samples, and its first 1000 positions spread over the whole range."""
    pairs = Counter()
    for key in range(6000):
        perm = FeistelPermutation(6, key)
        pairs[perm(0), perm(1)] += 1
    assert _chi2(pairs, [(a, b) for a in range(6) for b in range(6) if a != b], 6000) < 80.4

    n = 200_003
    perm = FeistelPermutation(n, 42)
    order = [perm(i) for i in range(n)]
    mean = (n - 1) / 2
    var = sum((i - mean) ** 2 for i in range(n))
    rho = sum((i - mean) * (s - mean) for i, s in enumerate(order)) / var
    assert abs(rho) < 5 / math.sqrt(n), rho  # 5 standard deviations of a uniform shuffle's
    # neighbouring positions hold samples within 1 of each other about twice in a shuffle
    assert sum(abs(a - b) <= 1 for a, b in zip(order, order[1:])) < 12
    # each tenth of the range holds ~100 of the first 1000 positions (9 degrees of freedom)
    tenths = Counter(s * 10 // n for s in order[:1000])
    assert _chi2(tenths, list(range(10)), 1000) < 39.3  # p = 1e-5
