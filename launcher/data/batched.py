"""`BatchedDataset`: the base of every dataset here whose `__getitems__` returns a whole batch.

Its own module, importing nothing of launcher's, so that every data module (arrays, images, streaming)
and launcher.models.hf can subclass it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class BatchedDataset(Dataset):
    """Map-style dataset of standardized inputs and int64 labels whose `__getitems__` returns a batch.

    torch's DataLoader calls `__getitems__(indices)` when a dataset has it and hands the result to
    `collate_fn`; `make_loader` uses a pass-through collate_fn, so a batch costs one indexing operation.
    """

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.__getitems__([index])
        return inputs[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
