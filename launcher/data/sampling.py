"""The order of an epoch and each rank's share of it, as pure functions of (seed, epoch, position).

Resume is exact at any world size and worker count because nothing here depends on who loads a sample:

- the order of epoch e is one permutation of the whole dataset drawn from (seed, e) alone, the same on
  every rank and at every world size: `torch.randperm` below `RANDPERM_LIMIT` samples (every rank draws the
  whole of it: O(dataset) per rank and epoch, fine at that size), and at or above it a keyed bijection
  (`EpochOrder`) that each rank evaluates only at its own positions, a chunk at a time: O(its share) time and
  O(chunk) memory per rank, nothing at the epoch's start;
- the position inside an epoch is the number of samples consumed globally (`TrainerState.samples_done`);
- global batch k from position `start` is `order[start + k*G : start + (k+1)*G]` with G = batch size per
  process x world size, and rank r takes its contiguous slice of it. Nothing is padded with repeated
  samples: the last global batch may be short and is split as evenly as possible (ranks differ by at most
  one sample; when it has fewer samples than ranks, some ranks get an empty batch, which the loop trains
  with zero weight so that DDP's collectives still match).

Every rank yields the same number of batches, one per global batch, so no rank runs out before the others.
This is the idea behind mosaicml-streaming's "elastic determinism": a global sample count over a fixed
canonical order.

Evaluation goes one step further: inside `sampler.padded()` (what `evaluate`, `predict` and fit's validation
use) every batch of every rank has exactly the batch size. A short last share is filled up with copies of
sample 0 that are never counted (`real_samples(k)` says how many of batch k are real; evaluation,
prediction and their statistics keep only those). Iterated directly, an evaluation loader yields each
sample once and nothing else (`skip_empty`: a rank whose share of the last batch is empty yields nothing).
Padded, every rank of a sharded model runs the same number of forward passes on the same shapes (FSDP2
gathers each layer's parameters in every forward: a rank with one batch fewer leaves the others waiting in
that all-gather forever), and a sample's forward never depends on how many ranks share the epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# Test-only: append the sample ids each rank's sampler yields to `<path>.rank<r>` (one JSON line per batch).
RECORD_ENV = "LAUNCHER_TEST_RECORD_SAMPLES"

_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads consecutive epochs over the seed space
_MASK = (1 << 63) - 1
_M64 = (1 << 64) - 1

# Below this many samples the order is torch.randperm, exactly as it always was (every small dataset's order
# unchanged, byte for byte); at or above it, the keyed bijection. 2**24 samples: a 128 MB permutation per rank.
RANDPERM_LIMIT = 1 << 24
CHUNK = 1 << 16  # positions of a rank's share whose samples the bijection computes at once


class EpochIndices(list):
    """The sample indices of one batch, and the epoch they belong to.

    A dataset's `__getitems__(indices)` reads `getattr(indices, "epoch", 0)` when a sample's randomness
    (augmentation) must be a function of (seed, epoch, sample index); other datasets treat it as a list.
    It pickles to DataLoader workers with its epoch. `tensor` is the same indices as an int64 tensor when
    the sampler has one (in-process only, not pickled): a dataset may index with it directly instead of
    turning the list back into a tensor.
    """

    __slots__ = ("epoch", "tensor")

    def __init__(self, indices=(), epoch: int = 0, tensor: torch.Tensor | None = None) -> None:
        super().__init__(indices)
        self.epoch = epoch
        self.tensor = tensor

    def __reduce__(self):
        return EpochIndices, (list(self), self.epoch)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s permutation: a fixed function of (seed, epoch), 63 bits."""
    return (int(seed) * _MIX + int(epoch) * 0xBF58476D1CE4E5B9 + 1) & _MASK


def _splitmix64(x: int) -> int:
    """splitmix64's finalizer on a Python int (the round keys)."""
    x = (x + _MIX) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic, the same on every platform)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochOrder:
    """The order of epoch `epoch` as a function: `order[positions]` is the sample at those positions.

    Below `randperm_limit` samples it is `torch.randperm` drawn from (seed, epoch), materialized (exactly the
    order this launcher always used). At or above it, a keyed bijection of [0, n), evaluated only at the
    positions asked for: a balanced Feistel network over the smallest power of four >= n (so the domain is
    under 4n), `ROUNDS` rounds whose round function is splitmix64 of (half-word xor a round key), the keys
    drawn from (seed, epoch, round) by splitmix64; a value that lands outside [0, n) is permuted again until
    it lands inside (cycle walking, a bijection of [0, n); under 4 passes on average). splitmix64 mixes every
    input bit into every output bit, so already 4 rounds are a strong pseudo-random permutation (Luby-Rackoff);
    6 leave a margin. Nothing in it depends on the rank or the world size.
    """

    ROUNDS = 6

    def __init__(self, num_samples: int, seed: int, epoch: int, shuffle: bool = True,
                 randperm_limit: int = RANDPERM_LIMIT) -> None:
        self.num_samples, self.shuffle = int(num_samples), bool(shuffle)
        self.perm: torch.Tensor | None = None
        if not self.shuffle:
            return
        key = epoch_seed(seed, epoch)
        if self.num_samples < randperm_limit:
            self.perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(key))
            return
        if self.num_samples > 1 << 62:
            raise ValueError(f"an epoch of {self.num_samples} samples is beyond 2**62")
        self.half = max(1, ((self.num_samples - 1).bit_length() + 1) // 2)
        epoch_key = _splitmix64(key)
        self.keys = [_splitmix64(epoch_key ^ ((r + 1) * 0xD1B54A32D192ED03 & _M64)) for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        """One bijection of [0, 4**half) on uint64 arrays."""
        half = np.uint64(self.half)
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> half, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ np.uint64(key)) & mask)
        return (left << half) | right

    def __getitem__(self, positions: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(positions, slice):
            lo, hi, _ = positions.indices(self.num_samples)
            positions = torch.arange(lo, max(lo, hi), dtype=torch.int64)
        if not self.shuffle:
            return positions.clone()
        if self.perm is not None:
            return self.perm[positions]
        out = self._feistel(positions.numpy().astype(np.uint64))
        n = np.uint64(self.num_samples)
        outside = np.flatnonzero(out >= n)
        while outside.size:  # cycle walking: from a bijection of the larger domain, one of [0, n)
            out[outside] = self._feistel(out[outside])
            outside = outside[out[outside] >= n]
        return torch.from_numpy(out.astype(np.int64))


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True,
                randperm_limit: int = RANDPERM_LIMIT) -> torch.Tensor:
    """The order of the whole dataset in epoch `epoch` (int64), identical on every rank and world size
    (the whole of `EpochOrder`: for tests and tools; the sampler computes only its own share)."""
    order = EpochOrder(num_samples, seed, epoch, shuffle, randperm_limit)
    return order.perm if order.perm is not None else order[:]


def share(global_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, length) of rank `rank`'s contiguous slice of a global batch of `global_size` samples.

    Split as evenly as possible: the first `global_size % world_size` ranks get one sample more. A full
    global batch (batch size x world size) gives every rank exactly the batch size.
    """
    quotient, remainder = divmod(global_size, world_size)
    return rank * quotient + min(rank, remainder), quotient + (1 if rank < remainder else 0)


class ElasticBatchSampler(Sampler[EpochIndices]):
    """Batches of sample indices for one rank: its slice of each global batch of the epoch's order.

    `set_epoch(epoch, start)` selects the epoch and the global position (samples already consumed by all
    ranks together) to continue from; `len()` is the number of batches this rank yields from there, the
    same on every rank. `drop_last` drops a short last global batch. `skip_empty` (evaluation loaders)
    makes a rank whose share of a short last batch is empty yield nothing for it, instead of the empty batch
    that training needs so that every rank takes part in each step. Inside `padded()` (evaluation), every
    share is filled up to `batch_size` with copies of sample 0 instead (`real_samples(k)` of batch k are
    real, the rest padding), and every rank yields the same batches again.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, skip_empty: bool = False,
                 randperm_limit: int = RANDPERM_LIMIT) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.skip_empty = bool(skip_empty)
        self.pad = False  # set by `padded()` only
        self.randperm_limit = int(randperm_limit)
        self.epoch, self.start = 0, 0
        record = os.environ.get(RECORD_ENV)
        self._record = f"{record}.rank{self.rank}" if record else None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside an epoch of {self.num_samples} samples")
        self.epoch, self.start = int(epoch), int(start)

    @property
    def end(self) -> int:
        """The position where this epoch's batches stop (before a dropped short last batch)."""
        if not self.drop_last:
            return self.num_samples
        return self.start + (self.num_samples - self.start) // self.global_batch_size * self.global_batch_size

    def __len__(self) -> int:
        if self.skip_empty and not self.pad:
            return sum(1 for size in self.global_sizes() if share(size, self.rank, self.world_size)[1])
        return -(-(self.end - self.start) // self.global_batch_size)

    @contextlib.contextmanager
    def padded(self) -> Iterator[ElasticBatchSampler]:
        """Batches iterated inside are all of `batch_size` on every rank (see the module docstring)."""
        previous, self.pad = self.pad, True
        try:
            yield self
        finally:
            self.pad = previous

    def real_samples(self, k: int) -> int | None:
        """How many samples of this rank's batch `k` (counted from `start`) are real, or None for all of them
        (only a padded evaluation loader's last batch can hold padding)."""
        if not self.pad or k != len(self) - 1:
            return None
        size = self.end - (self.start + k * self.global_batch_size)
        if size >= self.global_batch_size:
            return None
        return share(size, self.rank, self.world_size)[1]

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch (from position 0), whatever `start` is now."""
        g = self.global_batch_size
        return self.num_samples // g if self.drop_last else -(-self.num_samples // g)

    def global_sizes(self) -> list[int]:
        """The size of every global batch from `start` (the loop derives gradient weights from it)."""
        g, end = self.global_batch_size, self.end
        return [min(g, end - lo) for lo in range(self.start, end, g)]

    def _slices(self) -> Iterator[tuple[int, int, int]]:
        """(global position, first position of this rank's slice, its length) of each global batch from start."""
        g, end = self.global_batch_size, self.end
        full = self.rank * self.batch_size  # offset inside a full global batch
        for lo in range(self.start, end, g):
            size = min(g, end - lo)
            offset, length = (full, self.batch_size) if size == g else share(size, self.rank, self.world_size)
            if length or self.pad or not self.skip_empty:
                yield lo, lo + offset, length

    def __iter__(self) -> Iterator[EpochIndices]:
        order = EpochOrder(self.num_samples, self.seed, self.epoch, self.shuffle, self.randperm_limit)
        if order.perm is None and self.shuffle:
            yield from self._iter_lazily(order)
            return
        whole = order.perm if order.perm is not None else torch.arange(self.num_samples, dtype=torch.int64)
        for lo, at, length in self._slices():
            # One tensor slice and one tolist() per batch: no Python int passes through a sampler one by one.
            yield self._batch(lo, whole[at: at + length])

    def _iter_lazily(self, order: EpochOrder) -> Iterator[EpochIndices]:
        """The bijection evaluated at this rank's positions, `CHUNK` of them at a time (a vectorized call per
        chunk, a slice per batch)."""
        per_chunk = max(1, CHUNK // self.batch_size)
        slices = self._slices()
        while chunk := [s for _, s in zip(range(per_chunk), slices)]:
            lengths = torch.tensor([length for _, _, length in chunk], dtype=torch.int64)
            starts = torch.tensor([at for _, at, _ in chunk], dtype=torch.int64)
            first = torch.cumsum(lengths, 0) - lengths  # where each slice begins in the chunk
            positions = torch.arange(int(lengths.sum()), dtype=torch.int64)
            positions += torch.repeat_interleave(starts - first, lengths)
            mine, at = order[positions], 0
            for lo, _, length in chunk:
                yield self._batch(lo, mine[at: at + length])
                at += length

    def _batch(self, position: int, indices: torch.Tensor) -> EpochIndices:
        if self._record:  # the real samples only
            self._write_record(position, EpochIndices(indices.tolist(), self.epoch))
        if self.pad and indices.shape[0] < self.batch_size:  # copies of sample 0, never counted (real_samples)
            indices = torch.cat([indices, indices.new_zeros(self.batch_size - indices.shape[0])])
        return EpochIndices(indices.tolist(), self.epoch, indices)

    def _write_record(self, position: int, batch: EpochIndices) -> None:
        with open(self._record, "a") as f:
            f.write(json.dumps({"epoch": batch.epoch, "position": position, "ids": list(batch),
                                "num_samples": self.num_samples, "shuffle": self.shuffle}) + "\n")


def find_elastic_sampler(loader: object) -> ElasticBatchSampler | None:
    """The ElasticBatchSampler behind a DataLoader, or None for any other loader."""
    sampler = getattr(loader, "batch_sampler", None)
    return sampler if isinstance(sampler, ElasticBatchSampler) else None


def iterate(loader: object) -> Iterator:
    """The batches of a DataLoader on an ElasticBatchSampler, fetched directly when it has no workers and
    does not pin memory: exactly what its single-process iterator does (`collate_fn(dataset.__getitems__(
    indices))` per batch from the batch sampler) without its per-batch bookkeeping (profiler context,
    fetcher, checks: about 7 us a batch, 4% of a small MLP's step). Anything else iterates the loader."""
    dataset = getattr(loader, "dataset", None)
    getitems = getattr(dataset, "__getitems__", None)
    if (find_elastic_sampler(loader) is None or getitems is None or getattr(loader, "num_workers", 1)
            or getattr(loader, "pin_memory", True)):
        return iter(loader)
    collate = loader.collate_fn
    return (collate(getitems(indices)) for indices in loader.batch_sampler)
