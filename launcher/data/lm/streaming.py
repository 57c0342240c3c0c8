"""`--streaming` for language models: documents tokenized and packed into blocks on the fly, resumable.

Nothing is tokenized up front: the training documents are an iterable stream (`datasets.IterableDataset`,
shuffled by (seed, epoch) with a buffer), split per rank with `split_dataset_by_node`, and each rank packs
its own documents into blocks exactly as `group_texts` does (end-of-text after each document), across
document boundaries and without dropping a partial block per map batch.

The position in a rank's stream is where its next block starts: (document, token offset), counting the
documents of this rank's stream in this epoch. A resume skips that many documents without tokenizing them,
tokenizes the one it stops in and drops `offset` tokens of it, so the blocks that follow are the blocks an
uninterrupted run would have made (bit-identical at the same world size; another world size splits the
stream differently, and the interrupted epoch of the stream starts again, with a warning).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from launcher.data.streaming import _AllHave

SHUFFLE_BUFFER = 1000  # documents


def pack_blocks(documents: Iterator[str], tokenizer: Any, block_size: int,
                start: tuple[int, int] = (0, 0)) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """(block, position of the next block) for each block of `block_size` tokens packed from `documents`.

    `documents` begins at document `start[0]` of the stream; `start[1]` tokens of it are already consumed.
    """
    first_doc, skip = start
    eos = tokenizer.eos_token_id
    pending: deque[list] = deque()  # [document index, offset of pending[0][2][0] in it, token array]
    size = 0
    for index, text in enumerate(documents, start=first_doc):
        ids = np.asarray([*tokenizer([text or ""])["input_ids"][0], eos], dtype=np.int64)
        offset = skip if index == first_doc else 0
        if len(ids) - offset <= 1 and not text:
            continue  # an empty document adds nothing (group_texts skips it too)
        pending.append([index, offset, ids[offset:]])
        size += len(ids) - offset
        while size >= block_size:
            block, need = [], block_size
            while need:
                head = pending[0]
                take = head[2][:need]
                block.append(take)
                need -= len(take)
                if len(take) == len(head[2]):
                    pending.popleft()
                else:
                    head[1] += len(take)
                    head[2] = head[2][len(take):]
            size -= block_size
            position = (pending[0][0], pending[0][1]) if pending else (index + 1, 0)
            yield np.concatenate(block), position


class LMStreamingTrain:
    """The training documents as a stream, and how to make a rank's share of it for an epoch."""

    def __init__(self, documents: datasets.Dataset | datasets.IterableDataset, column: str, tokenizer: Any,
                 block_size: int, seed: int, buffer: int = SHUFFLE_BUFFER, num_shards: int = 64) -> None:
        if isinstance(documents, datasets.Dataset):
            # Shards are what split_dataset_by_node deals out to ranks (and a shuffle reorders).
            documents = documents.to_iterable_dataset(num_shards=min(num_shards, len(documents)))
        self.documents, self.column, self.tokenizer = documents.select_columns([column]), column, tokenizer
        self.block_size, self.seed, self.buffer = block_size, seed, buffer

    def __len__(self) -> int:
        return 0  # unknown until read: the epoch ends when the first rank runs out

    def texts(self, epoch: int, rank: int, world: int, skip_documents: int = 0) -> Iterator[str]:
        ds = self.documents.shuffle(seed=self.seed, buffer_size=self.buffer)
        ds.set_epoch(epoch)
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        if skip_documents:
            ds = ds.skip(skip_documents)
        return (row[self.column] for row in ds)


class LMStreamingLoader:
    """Batches `{"input_ids", "labels"}` of a rank's packed stream; knows its position (`state_dict`)."""

    resumes_itself = True  # the loop saves and restores state_dict() per rank instead of skipping batches

    def __init__(self, train: LMStreamingTrain, batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, device: torch.device | None = None) -> None:
        if rank is None or world_size is None or device is None:
            from accelerate import PartialState

            state = PartialState()
            rank, world_size, device = state.process_index, state.num_processes, state.device
        self.train, self.batch_size = train, batch_size
        self.rank, self.world, self.device = rank, world_size, device
        self.epoch, self.position, self.done, self._resume = 0, (0, 0), False, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": list(self.position), "done": self.done, "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size") != self.world:
            warnings.warn(f"the stream position was saved with {state.get('world_size')} processes, this run has "
                          f"{self.world}: the interrupted epoch of the stream starts again", stacklevel=2)
            return
        self._resume = state

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = (0, 0)
        if self._resume is not None and self._resume["epoch"] == self.epoch and not self._resume["done"]:
            start = tuple(self._resume["position"])
        self._resume = None
        self.position, self.done = start, False
        texts = self.train.texts(self.epoch, self.rank, self.world, skip_documents=start[0])
        blocks = pack_blocks(texts, self.train.tokenizer, self.train.block_size, start)
        all_have = _AllHave()  # every rank, at the same point (under NCCL it builds a gloo group)
        while True:
            batch, position = [], self.position
            while len(batch) < self.batch_size:
                item = next(blocks, None)
                if item is None:
                    break
                batch.append(item[0])
                position = item[1]
            # A short last batch still trains; the first rank out of blocks ends the epoch for all.
            if not all_have.start(bool(batch)).wait():
                break
            self.position = position
            ids = torch.from_numpy(np.stack(batch)).to(self.device, non_blocking=True)
            yield {"input_ids": ids, "labels": ids.clone()}
        self.done = True
