"""A batch sampler whose position is a number, so a run resumes exactly on any number of
processes, and whose shuffled order is computed, not held: memory and start-up do not grow with
the corpus."""

from typing import Iterator

import torch
from torch.utils.data import Sampler

# How a shuffled epoch orders the samples: "feistel" computes the position -> sample map of a
# pseudo-random permutation on the fly (no state per sample); "randperm", earlier versions',
# holds torch.randperm(num_samples), 8 bytes per sample, and is kept so that their checkpoints
# resume in the order they began.
SAMPLE_ORDERS = ("feistel", "randperm")

_MASK64 = (1 << 64) - 1
# Feistel rounds: 48 - 4 B for a domain of 2**B, at least 6 (B >= 11: over 1024 samples); a
# round function of few bits takes few values, so a small domain needs more rounds to mix.
# Always even, so that the network's two parts end with the widths they began with
_MIN_ROUNDS = 6


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers whose output bits each depend on
    every input bit."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A pseudo-random permutation of ``range(n)`` fixed by ``key``, evaluated one index at a
    time in O(1) memory.

    A Feistel network of 6 to 40 rounds permutes ``range(2**B)``, the smallest power of 2 at
    or above ``n`` (``B`` at least 2): an index is split into a left and a right part of ``B // 2``
    and ``B - B // 2`` bits, and each round replaces ``(left, right)`` by ``(right, left XOR
    F(right))``, ``F`` being ``_mix64`` of the part and a round key cut to the left part's width
    (the widths swap each round; an even number of rounds restores them). An index mapped to
    ``n`` or more is mapped again until it lands below ``n`` ("cycle walking"): a bijection of
    ``range(n)`` still, in fewer than 2 passes on average (``2**B < 2 n`` for ``n > 2``). Six
    rounds of a function that mixes every bit make the order as good as a uniform shuffle for
    data loading (Luby-Rackoff: four rounds of a random function give a pseudo-random
    permutation), though not every permutation can come out: once both parts are 2 bits or
    wider each round is an even permutation of ``range(2**B)``, so where ``n`` is a power of 2
    from 16 on only even ones do. A domain
    of 1024 or fewer takes more, ``48 - 4 B``: a round function of a few bits takes too few
    values to mix in six (at ``n = 6`` a chi-square of 177 on 29 degrees of freedom over the
    first two positions, 28 with 36 rounds; tests/data/test_sampler.py).
    """

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._widths = (bits // 2, bits - bits // 2)
        key = _mix64(key & _MASK64)
        rounds = max(_MIN_ROUNDS, 48 - 4 * bits)
        self._keys = [key := _mix64(key + 0x9E3779B97F4A7C15 & _MASK64) for _ in range(rounds)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} of a permutation of {self.n}")
        while True:
            left_bits, right_bits = self._widths
            left, right = i >> right_bits, i & ((1 << right_bits) - 1)
            for k in self._keys:
                left, right = right, left ^ (_mix64(right ^ k) & ((1 << left_bits) - 1))
                left_bits, right_bits = right_bits, left_bits
            i = left << right_bits | right
            if i < self.n:
                return i


class ResumableBatchSampler(Sampler[list[int]]):
    """Global batches in a per-epoch order fixed by ``(seed, epoch)``, this rank's share of each.

    Global batch ``b`` of an epoch is ``order[b*G : (b+1)*G]`` with ``G = batch_size * world_size``;
    rank ``r`` takes ``order[b*G + r*batch_size : b*G + (r+1)*batch_size]``. The trailing partial
    global batch is dropped. The position is the number of samples consumed in the epoch (counted
    globally), so a checkpoint taken on N processes resumes on M processes as long as the global
    batch stays the same multiple.

    Args:
        num_samples: dataset length.
        batch_size: per-rank micro-batch size.
        rank: this process's rank.
        world_size: number of data-parallel processes.
        shuffle: permute samples each epoch.
        seed: base seed of the permutation.
        order: one of ``SAMPLE_ORDERS``; how a shuffled epoch is ordered (``"randperm"``: that
            of checkpoints written before ``"feistel"``).
    """

    def __init__(
        self, num_samples: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
        shuffle: bool = True, seed: int = 0, order: str = "feistel",
    ) -> None:
        if order not in SAMPLE_ORDERS:
            raise ValueError(f"order must be one of {SAMPLE_ORDERS}, got {order!r}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.order = order
        self.epoch = 0
        self.start_sample = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_position(self, epoch: int, samples_consumed: int) -> None:
        if samples_consumed % self.global_batch:
            raise ValueError(
                f"cannot resume at sample {samples_consumed} of epoch {epoch}: it is not a multiple "
                f"of the global batch {self.global_batch} (batch_size {self.batch_size} x "
                f"{self.world_size} processes); keep batch_size * processes a divisor of it"
            )
        self.epoch, self.start_sample = epoch, samples_consumed

    def __len__(self) -> int:
        return (self.num_samples // self.global_batch) - self.start_sample // self.global_batch

    def _samples(self):
        """The epoch's order: a function of a range of positions to the samples at them."""
        if not self.shuffle:
            return list
        if self.order == "feistel":
            sample_at = FeistelPermutation(self.num_samples, (self.seed << 32) ^ self.epoch)
            return lambda positions: [sample_at(i) for i in positions]
        # a tensor, not a list: 8 bytes per sample instead of ~36
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=gen)
        return lambda positions: order[positions.start : positions.stop].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        n_global = self.num_samples // self.global_batch
        if n_global == 0:
            return
        samples = self._samples()
        for b in range(self.start_sample // self.global_batch, n_global):
            begin = b * self.global_batch + self.rank * self.batch_size
            yield samples(range(begin, begin + self.batch_size))
