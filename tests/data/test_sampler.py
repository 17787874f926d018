"""ResumableBatchSampler by its properties, not by a copy of its code: every sample once per
epoch (the trailing partial global batch dropped), ranks disjoint, N processes giving the global
batches of one, a resume equal to the run it continues (on another number of processes too), an
order that is the seed's and the epoch's."""

import itertools

import pytest

from tad_torchtune.data import ResumableBatchSampler

N = 1001  # not a multiple of any global batch below


def _batches(world_size, *, batch_size, epoch=0, start=0, seed=7, shuffle=True):
    """Per rank, the batches of one epoch from sample ``start`` on."""
    out = []
    for rank in range(world_size):
        s = ResumableBatchSampler(N, batch_size=batch_size, rank=rank, world_size=world_size,
                                  shuffle=shuffle, seed=seed)
        s.set_position(epoch, start)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(type(i) is int and len(b) == batch_size for b in batches for i in b)
        out.append(batches)
    return out


def _global(per_rank):
    """The global batches: step b is rank 0's b-th batch, then rank 1's, ..."""
    return [sum(step, []) for step in zip(*per_rank)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (3, 4), (2, 7)])
def test_every_sample_once_per_epoch_on_disjoint_ranks(world_size, batch_size, shuffle):
    per_rank = _batches(world_size, batch_size=batch_size, shuffle=shuffle)
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


@pytest.mark.parametrize("start", [0, 12, 36, 996])
def test_a_resume_continues_the_epoch_on_any_number_of_processes(start):
    whole = _global(_batches(1, batch_size=12, epoch=2))
    assert _global(_batches(1, batch_size=12, epoch=2, start=start)) == whole[start // 12:]
    assert _global(_batches(3, batch_size=4, epoch=2, start=start)) == whole[start // 12:]


def test_the_order_is_the_seed_and_the_epoch():
    epoch0 = _global(_batches(1, batch_size=4, epoch=0))
    assert _global(_batches(1, batch_size=4, epoch=0)) == epoch0  # reproducible
    epoch1 = _global(_batches(1, batch_size=4, epoch=1))
    other_seed = _global(_batches(1, batch_size=4, epoch=0, seed=8))
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
