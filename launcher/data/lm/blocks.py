"""Text sources -> documents -> token ids (once, cached) -> blocks of `block_size` tokens.

1. `load_documents`: the train and validation documents of any source: the embedded standard-library
   corpus (`stdlib`, the default), a text file or a folder of text files (each file one document), or
   anything classify.py reads through launcher.data.sources (a save_to_disk folder, parquet/json/csv files,
   the Hub's `data/train-00000-of-00004.parquet` layout, a `load_dataset` name). Without a validation
   split, a fraction of the documents is carved off by seed.
2. `tokenize_documents`: one `datasets.map` with the tokenizer; datasets caches the result next to the
   source's Arrow files, so with the recipe's `main_process_first()` the first process tokenizes and the
   others (and the next run) read the cache.
3. `group_texts`: run_clm's function: a map batch of documents concatenated, each followed by the
   end-of-text token, and cut into blocks of `block_size` (the batch's last partial block is dropped).
4. `BlockDataset`: the blocks as one (num_blocks, block_size) array, memory-mapped from the cache where
   datasets allows; `__getitems__` returns a batch `{"input_ids", "labels"}` in one indexing operation,
   for `make_loader` and its `ElasticBatchSampler` (the position a count of blocks consumed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from launcher.data.batched import BatchedDataset
from launcher.data.lm import corpus
from launcher.data.lm.tokenizers import ByteTokenizer
from launcher.data.sources import FILE_BUILDERS, VAL_SPLIT_NAMES, _load_train_val, _quiet
from launcher.errors import UsageError

TEXT_NAMES = ("text", "content", "document", "body")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
MAP_BATCH = 1000  # documents per map batch: group_texts drops at most one partial block per batch
_TOKEN_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


@dataclass
class Documents:
    train: datasets.Dataset
    val: datasets.Dataset
    column: str
    name: str
    val_source: str


@dataclass
class LMSplits:
    """What the recipe needs: the block datasets, the tokenizer, and the numbers for the corpus line."""

    train: BlockDataset | Any  # an LMStreamingTrain with --streaming
    val: BlockDataset
    tokenizer: Any
    name: str
    val_source: str
    num_train_docs: int
    num_val_docs: int

    @property
    def block_size(self) -> int:
        return self.train.block_size

    def describe(self) -> str:
        val_tokens = self.val.token_count()
        if not isinstance(self.train, BlockDataset):
            return (f"corpus: {self.name}, {self.num_train_docs:,} train documents streamed (tokenized and packed "
                    f"as they are read), {val_tokens:,} validation tokens (validation: {self.val_source})")
        train_tokens = self.train.token_count()
        if self.name == corpus.NAME:
            return corpus.describe(self.num_train_docs, self.num_val_docs, train_tokens, val_tokens)
        return (f"corpus: {self.name}, {self.num_train_docs:,} train and {self.num_val_docs:,} validation "
                f"documents, {train_tokens:,} train tokens, {val_tokens:,} validation tokens "
                f"(validation: {self.val_source})")


# ---------------------------------------------------------------------------------------------------------
# 1. Documents


def load_documents(dataset: str, *, dataset_config: str | None = None, text_column: str | None = None,
                   val_fraction: float = 0.05, seed: int = 0) -> Documents:
    with _quiet():
        if dataset == corpus.NAME:
            splits = corpus.stdlib_corpus()
            return Documents(splits["train"], splits["validation"], "text", dataset,
                             f"{corpus.VAL_PERCENT}% of the files, by a hash of their path")
        train, val, names = _load_text_files(Path(dataset).expanduser())
        if train is None:
            train, val, names = _load_train_val(dataset, dataset_config)
        column = find_text_column(train.features, text_column)
        if val is not None:
            if column not in val.features:
                raise UsageError(f"validation split '{names[1]}' has no column {column!r}; give both splits it")
            return Documents(train, val, column, dataset, f"split '{names[1]}'")
        if len(train) < 2:
            raise UsageError(f"{dataset!r} has {len(train)} document(s); at least 2 are needed to carve a "
                             f"validation split (or give it a validation split)")
        carved = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        return Documents(carved["train"], carved["test"], column, dataset,
                         f"{val_fraction:g} of the documents (seed {seed})")


def _load_text_files(path: Path) -> tuple[datasets.Dataset | None, datasets.Dataset | None, tuple[str, str]]:
    """A text file, or a folder of text files (train/ and validation/ subfolders become the splits), each
    file one document. (None, None, ...) for anything else: launcher.data.sources reads it."""
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        return _text_dataset([path]), None, ("train", "")
    if not path.is_dir() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return None, None, ("", "")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files or any(p.suffix.lower() in (*FILE_BUILDERS, ".arrow") for p in files):
        return None, None, ("", "")
    texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    if not texts:
        return None, None, ("", "")
    val_dir = next((path / n for n in VAL_SPLIT_NAMES if (path / n).is_dir()), None)
    if (path / "train").is_dir() and val_dir is not None:
        train = [p for p in texts if (path / "train") in p.parents]
        val = [p for p in texts if val_dir in p.parents]
        return _text_dataset(train), _text_dataset(val), ("train", val_dir.name)
    return _text_dataset(texts), None, ("train", "")


def _text_dataset(files: list[Path]) -> datasets.Dataset:
    if not files:
        raise UsageError("no text files in that split; put .txt/.md/.py files in it")
    return datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train")


def find_text_column(features: datasets.Features, text_column: str | None) -> str:
    strings = [c for c, f in features.items() if isinstance(f, datasets.Value) and f.dtype in ("string",
                                                                                                "large_string")]
    if text_column is not None:
        if text_column not in strings:
            raise UsageError(f"--text-column {text_column!r} is not a text column of the dataset; its text "
                             f"columns: {', '.join(strings) or 'none'}")
        return text_column
    lowered = {c.lower(): c for c in strings}
    found = next((lowered[n] for n in TEXT_NAMES if n in lowered), None)
    if found is None and len(strings) == 1:
        found = strings[0]
    if found is None:
        raise UsageError(f"no text column found (looked for a string column named {'/'.join(TEXT_NAMES)}, or "
                         f"the only string column): name it with --text-column; the dataset's columns: "
                         f"{', '.join(features)}")
    return found


# ---------------------------------------------------------------------------------------------------------
# 2, 3. Tokens and blocks


def _tokenize(batch: dict[str, list], tokenizer: Any, column: str) -> dict[str, list]:
    texts = [t or "" for t in batch[column]]  # a missing document is an empty one
    return {"input_ids": tokenizer(texts)["input_ids"]}


def tokenize_documents(ds: datasets.Dataset, tokenizer: Any, column: str) -> datasets.Dataset:
    """Token ids of every document, whole: a transformers tokenizer's warning that a document is longer than
    the model's maximum is silenced, as in run_clm (the blocks cut them to --block-size)."""
    with _quiet_tokenizer(tokenizer):
        return _tokenize_all(ds, tokenizer, column)


@contextlib.contextmanager
def _quiet_tokenizer(tokenizer: Any) -> Iterator[None]:
    if isinstance(tokenizer, ByteTokenizer):
        yield
        return
    from transformers.utils import logging  # a transformers tokenizer: its long-document warning is noise here

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _tokenize_all(ds: datasets.Dataset, tokenizer: Any, column: str) -> datasets.Dataset:
    return ds.map(_tokenize, batched=True, batch_size=MAP_BATCH, remove_columns=ds.column_names,
                  features=_TOKEN_FEATURES, fn_kwargs={"tokenizer": tokenizer, "column": column},
                  desc="tokenizing")


def group_texts(examples: dict[str, list], block_size: int, eos_token_id: int) -> dict[str, list]:
    """run_clm's group_texts, with the end-of-text token after every document: the batch's documents as
    one stream, cut into blocks of `block_size` tokens; the partial block at the end is dropped."""
    pieces = []
    for ids in examples["input_ids"]:
        if len(ids):
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(np.array([eos_token_id], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    usable = len(stream) // block_size * block_size
    return {"input_ids": stream[:usable].reshape(-1, block_size)}


def group_blocks(tokens: datasets.Dataset, block_size: int, eos_token_id: int) -> datasets.Dataset:
    return tokens.map(group_texts, batched=True, batch_size=MAP_BATCH, features=_TOKEN_FEATURES,
                      fn_kwargs={"block_size": block_size, "eos_token_id": eos_token_id},
                      desc=f"grouping into blocks of {block_size}")


class BlockDataset(BatchedDataset):
    """Blocks of token ids; `__getitems__` gives `{"input_ids": (B, T) int64, "labels": the same ids}`."""

    def __init__(self, blocks: datasets.Dataset | np.ndarray, block_size: int) -> None:
        self._source = blocks if isinstance(blocks, datasets.Dataset) else None
        self.blocks = _as_array(blocks, block_size) if self._source is not None else blocks
        self.block_size = block_size

    def __getstate__(self) -> dict:
        # To a DataLoader worker: the Dataset (which pickles as its cache file's path), not a copy of the
        # memory-mapped blocks; the worker maps the file again.
        state = dict(self.__dict__)
        if self._source is not None:
            state["blocks"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.blocks is None:
            self.blocks = _as_array(self._source, self.block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[np.asarray(indices, dtype=np.int64)].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    def token_count(self) -> int:
        return len(self.blocks) * self.block_size

    def sample(self, num_blocks: int, seed: int) -> BlockDataset:
        """A fixed random subset of `num_blocks` blocks (kept in corpus order), drawn by `seed`: the same on
        every rank and every relaunch, so a capped epoch (--train-tokens) resumes exactly."""
        if num_blocks >= len(self):
            return self
        chosen = np.sort(np.random.default_rng(seed).choice(len(self), size=num_blocks, replace=False))
        return BlockDataset(np.ascontiguousarray(self.blocks[chosen]), self.block_size)


def _as_array(blocks: datasets.Dataset, block_size: int) -> np.ndarray:
    """(num_blocks, block_size) int32 from the Arrow column: a view of the memory-mapped cache when it is
    one chunk, else one copy."""
    column = blocks.data.table.column("input_ids")
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return flat.reshape(-1, block_size)


# ---------------------------------------------------------------------------------------------------------
# The whole pipeline


def load_lm_splits(dataset: str, tokenizer: Any, *, block_size: int, dataset_config: str | None = None,
                   text_column: str | None = None, val_fraction: float = 0.05, seed: int = 0,
                   world_size: int = 1, streaming: bool = False, shuffle_buffer: int = 1000) -> LMSplits:
    """Train and validation blocks of `dataset`, checked to give every process at least one block.

    With `streaming`, the training documents are not tokenized here: `train` is an `LMStreamingTrain` that
    `make_loader` turns into a per-rank packed stream (launcher.data.lm.streaming); validation is blocks as
    always, so its loss stays exact.
    """
    if block_size < 2:
        raise UsageError(f"--block-size must be at least 2: a block of T tokens trains T-1 predictions "
                         f"(got {block_size})")
    docs = load_documents(dataset, dataset_config=dataset_config, text_column=text_column,
                          val_fraction=val_fraction, seed=seed)

    def blocks(ds: datasets.Dataset) -> BlockDataset:
        return BlockDataset(group_blocks(tokenize_documents(ds, tokenizer, docs.column), block_size,
                                         tokenizer.eos_token_id), block_size)

    with _quiet():
        val = blocks(docs.val)
        if streaming:
            from launcher.data.lm.streaming import LMStreamingTrain

            train = LMStreamingTrain(docs.train, docs.column, tokenizer, block_size, seed, buffer=shuffle_buffer)
            if len(docs.train) < world_size:
                raise UsageError(f"--streaming: the training split of {dataset} has {len(docs.train)} document(s), "
                                 f"fewer than the {world_size} process(es); stream a larger corpus")
        else:
            train = blocks(docs.train)
    check_enough_blocks(len(train) if not streaming else world_size, len(val), block_size=block_size,
                        world_size=world_size, name=dataset)
    return LMSplits(train=train, val=val, tokenizer=tokenizer, name=dataset, val_source=docs.val_source,
                    num_train_docs=len(docs.train), num_val_docs=len(docs.val))


def check_enough_blocks(train_blocks: int, val_blocks: int, *, block_size: int, world_size: int,
                        name: str) -> None:
    if train_blocks < world_size:
        raise UsageError(f"the training text of {name} makes {train_blocks} block(s) of {block_size} tokens, fewer "
                         f"than the {world_size} process(es): each needs at least one; lower --block-size or "
                         f"add text")
    if val_blocks < 1:
        raise UsageError(f"the validation text of {name} is shorter than one block of {block_size} tokens; lower "
                         f"--block-size or give validation more text")
