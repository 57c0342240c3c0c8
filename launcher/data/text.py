"""Text classification data: the text column(s), tokenized once with the model's tokenizer, padded per batch.

`launcher.data.load_splits` finds the label column, encodes the labels and carves the validation split as
for any dataset; for a dataset whose inputs are text it hands over to `tokenized_splits`, which

1. tokenizes the text column (or a sentence pair) once with `datasets.map` (cached by datasets; the recipe
   loads data on the main process first, so the cache is written once) and keeps the token ids in Arrow;
2. returns `TextBatchedDataset`s whose `__getitems__(indices)` gathers the rows and pads them to the
   longest in the batch with transformers' `DataCollatorWithPadding` (to a multiple of 8 under mixed
   precision), as a mapping of tensors with 'labels' that `fit` hands to the model as keyword inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.errors import UsageError

_STRING_DTYPES = ("string", "large_string")
_MAP_BATCH = 1000


@dataclass
class TextOptions:
    """How text inputs become tokens: the tokenizer is loaded only if the dataset turns out to be text."""

    load_tokenizer: Callable[[], Any]
    max_length: int = 128
    pad_to_multiple_of: int | None = None  # 8 under mixed precision: tensor cores want multiples of 8

    @functools.cached_property
    def tokenizer(self) -> Any:
        return self.load_tokenizer()

    @property
    def effective_max_length(self) -> int:
        """--max-length, capped by the tokenizer's own model_max_length."""
        return min(self.max_length, getattr(self.tokenizer, "model_max_length", self.max_length))

    def stored(self) -> dict[str, Any]:
        """What preprocessing.json keeps of these options, so `launcher predict` tokenizes alike: truncation
        to `max_length` tokens, padding per batch to the longest row (to `pad_to_multiple_of`)."""
        return {"max_length": int(self.effective_max_length), "truncation": True, "padding": "longest",
                "pad_to_multiple_of": self.pad_to_multiple_of}


def is_text_feature(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in _STRING_DTYPES


def find_text_columns(features: datasets.Features, label_col: str, text_columns: list[str] | None) -> list[str]:
    """The text input columns: --text-columns, else the dataset's one string column or two (a sentence
    pair, in column order), else none (not a text dataset)."""
    if text_columns:
        for name in text_columns:
            if name not in features or name == label_col or not is_text_feature(features[name]):
                strings = ", ".join(c for c in features if c != label_col and is_text_feature(features[c]))
                raise UsageError(f"--text-columns {name!r} is not a text column of the dataset; its text columns: "
                                 f"{strings or 'none'}")
        return list(text_columns)
    strings = [c for c in features if c != label_col and is_text_feature(features[c])]
    if len(strings) > 2:
        raise UsageError(f"the dataset has {len(strings)} text columns ({', '.join(strings)}); name the one to "
                         f"classify, or two for a sentence pair, with --text-columns (e.g. --text-columns "
                         f"{strings[0]},{strings[1]})")
    return strings


def text_needs_model(columns: list[str]) -> str:
    return (f"the dataset's inputs are text (column {' and '.join(repr(c) for c in columns)}); text needs a "
            f"transformers model and its tokenizer: pass --model hf:NAME_OR_PATH (e.g. hf:bert-base-uncased)")


_Part = tuple[datasets.Dataset, np.ndarray, np.ndarray]  # table, this split's rows in it, labels


def tokenized_splits(options: TextOptions, columns: list[str], train: _Part,
                     val: _Part) -> tuple[TextBatchedDataset, TextBatchedDataset]:
    """Tokenize the tables once (a carved validation split shares the training table) and wrap the splits."""
    from transformers import DataCollatorWithPadding

    tokenizer = options.tokenizer
    max_length = options.effective_max_length
    cache: dict[int, datasets.Dataset] = {}

    def tokens(table: datasets.Dataset) -> datasets.Dataset:
        if id(table) not in cache:
            for column in columns:
                if table.data.column(column).null_count:
                    raise UsageError(f"text column {column!r} has missing values; fill or drop those rows")
            cache[id(table)] = table.select_columns(columns).map(
                _tokenize, batched=True, batch_size=_MAP_BATCH, remove_columns=columns,
                fn_kwargs={"tokenizer": tokenizer, "columns": columns, "max_length": max_length})
        return cache[id(table)]

    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=options.pad_to_multiple_of,
                                       return_tensors="pt")
    return tuple(TextBatchedDataset(tokens(table), rows, labels, collator) for table, rows, labels in (train, val))


def _tokenize(batch: dict[str, list], tokenizer: Any, columns: list[str], max_length: int) -> Any:
    return tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_length)


class TextBatchedDataset(Dataset):
    """Token ids in Arrow, int64 labels; `__getitems__` returns a padded batch {input_ids, ..., labels}."""

    def __init__(self, tokens: datasets.Dataset, rows: np.ndarray, labels: np.ndarray, collator: Any) -> None:
        self.tokens = tokens
        self.rows = rows  # this split's row numbers in the table
        labels = np.asarray(labels)  # class ids as int64; multi-hot or regression targets stay float
        self.labels = torch.from_numpy(labels.astype(np.int64) if labels.dtype.kind in "iub" else labels)
        self.collator = collator

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        columns = self.tokens[self.rows[idx]]  # a dict of lists; the tokenizer's pad() takes it as is
        batch = dict(self.collator(columns))
        batch["labels"] = self.labels[torch.from_numpy(idx)]
        return batch

    def token_count(self) -> int:
        """Tokens in the split (padding excluded): what tokens per second count."""
        lengths = [len(ids) for ids in self.tokens.select(self.rows)["input_ids"]]
        return int(sum(lengths))
