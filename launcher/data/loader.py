"""The DataLoader over a `BatchedDataset`: batches from the elastic batch sampler (launcher.data.sampling),
already sharded for this rank, and built in one `__getitems__` call each."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from launcher.data.sampling import ElasticBatchSampler


def batched_collate(batch: Any) -> Any:
    """The batch is already built by `__getitems__`; a module-level function so workers can pickle it."""
    return batch


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """A DataLoader over a dataset from `load_splits`, already sharded for this rank.

    Batches come from an `ElasticBatchSampler` (launcher.data.sampling): the epoch's order is a function of
    (seed, epoch), rank r takes its slice of each global batch (`batch_size` per process), no sample is
    repeated to pad the last batch. `fit` and `evaluate` recognize such loaders and do not let Accelerate
    re-shard them. Rank and world size come from torch.distributed (or Accelerate's state) unless given.

    The loader has a generator of its own: the base seed of its workers is drawn from it, not from the
    global RNG, so the training's random stream (dropout) does not depend on when workers start. With
    CUDA, batches are pinned so that the non-blocking copy to the GPU does not make the host wait.
    A stream (`--streaming`) gets its own resumable loader (launcher.data.streaming).
    """
    from launcher.data.lm.streaming import LMStreamingLoader, LMStreamingTrain
    from launcher.data.streaming import StreamingLoader, StreamingTrain

    if isinstance(ds, StreamingTrain):
        return StreamingLoader(ds, batch_size, num_workers)
    if isinstance(ds, LMStreamingTrain):  # documents packed into blocks on the fly, in this process
        return LMStreamingLoader(ds, batch_size)

    if rank is None or world_size is None:
        rank, world_size = _rank_and_world_size()
    # An unshuffled loader is an evaluation loader: a rank with no sample in the last global batch skips it
    # when iterated directly; evaluate/predict/validation pad every share to the batch size instead (never
    # counted), so every rank runs the same forward passes on the same shapes (launcher.data.sampling).
    sampler = ElasticBatchSampler(len(ds), batch_size, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=shuffle, drop_last=drop_last, skip_empty=not shuffle)
    return DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=batched_collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def _rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's group, else Accelerate's state, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    from accelerate.state import PartialState

    if PartialState._shared_state:  # only read a state someone built: building one here would init a group
        state = PartialState()
        return state.process_index, state.num_processes
    return 0, 1
