"""ResumableBatchSampler against its definition, written out with Python lists."""

import pytest
import torch

from tad_torchtune.data import ResumableBatchSampler


def reference(n, *, batch_size, rank, world_size, shuffle, seed, epoch, start):
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
             if shuffle else list(range(n)))
    g = batch_size * world_size
    return [order[b * g + rank * batch_size: b * g + (rank + 1) * batch_size]
            for b in range(start // g, n // g)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size, rank", [(1, 0), (3, 2)])
def test_batches_equal_the_definition(shuffle, world_size, rank):
    s = ResumableBatchSampler(1001, batch_size=4, rank=rank, world_size=world_size,
                              shuffle=shuffle, seed=7)
    for epoch, start in ((0, 0), (2, 36), (1, 996)):
        s.set_position(epoch, start)
        got = list(s)
        assert got == reference(1001, batch_size=4, rank=rank, world_size=world_size,
                                shuffle=shuffle, seed=7, epoch=epoch, start=start)
        assert len(got) == len(s) and all(type(i) is int for b in got for i in b)
