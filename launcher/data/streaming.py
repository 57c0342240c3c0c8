"""`--streaming`: train on a dataset too large to index, resumable mid-epoch at the same world size.

The training split is a `datasets.IterableDataset` over parquet/arrow shards (a local folder or a Hub name):
shuffled (shard order and a buffer of rows, seeded by --seed and the epoch), split per rank with
`split_dataset_by_node`, and split per DataLoader worker by datasets itself. Each (rank, worker) stream
is then a deterministic function of (seed, epoch, world size, workers), so the position is simply how
many samples of each worker's stream this rank consumed: `StreamingLoader.state_dict()` counts them in the
main process (each batch says which worker made it), the loop saves them per rank in the checkpoint, and
a resume skips that many rows of each worker's stream before anything is decoded. (datasets' own
`IterableDataset.state_dict()` raises IndexError on load with a shuffle buffer and workers, and resumes
only at the same world size and worker count anyway.)

Every rank must run the same number of steps: before each batch the ranks agree (one all-reduce of one
number) that all of them still have one, so the epoch ends when the first rank's shards run out.
Validation is a map-style split read lazily, so its metrics are exact as always.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node

from launcher.data import images, targets
from launcher.data.batched import BatchedDataset
from launcher.data.preprocess import PREPROCESSING_FORMAT
from launcher.errors import UsageError

SHUFFLE_BUFFER = 10_000
STATS_ROWS = 512  # rows at the head of the (unshuffled) stream that the standardization statistics come from
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_VAL_DIRS = ("validation", "valid", "val", "test")


class RowConverter:
    """Rows (dicts) of one schema -> standardized float32 inputs and the task's targets (int64 class ids,
    float32 multi-hot rows, or float32 standardized regression targets), in the worker."""

    def __init__(self, features: datasets.Features, label: str, image_column: str | None,
                 problem_type: str | None = None) -> None:
        from launcher.data.sources import _array_depth, _detect_image_column, _find_label_column

        self.label = _find_label_column(features, label, image_column)
        self.feature = features[self.label]
        self.problem_type, self.reason = (problem_type, "--problem-type") if problem_type else \
            targets.detect(self.feature)
        if self.problem_type == "single_label_classification" and not (
                isinstance(self.feature, datasets.ClassLabel) or _array_depth(self.feature) == 0):
            raise UsageError(f"--streaming needs integer or ClassLabel labels for single-label classification; "
                             f"column {self.label!r} is neither")
        # Targets other than class ids (launcher.data.targets), set by fit_targets: the names, and either the
        # regression's standardization or the multi-label width (ids, or a multi-hot vector as it is).
        self.names: list[str] = []
        self.target_mean = self.target_std = None
        self.multi_hot = False
        column = image_column or _detect_image_column(features, self.label)
        if column is not None and isinstance(features[column], datasets.Image):
            self.kind, self.columns = "image", [column]
        elif column is not None:
            self.kind, self.columns = "array", [column]
        else:
            self.kind = "tabular"
            self.columns = [c for c in features if c != self.label]
            bad = [c for c in self.columns if _array_depth(features[c]) != 0]
            if bad or not self.columns:
                raise UsageError(f"--streaming: columns {', '.join(bad) or '(none)'} are not numeric features "
                                 f"(categorical string columns are one-hot encoded without --streaming only); "
                                 f"name the input column with --image-column")
        self.mode, self.size, self.shape = "RGB", (0, 0), ()
        self.mean = self.std = None

    def fit(self, rows: list[dict]) -> None:
        """Shape and standardization statistics from the first rows of the training stream."""
        if self.kind == "image":
            self.mode, self.size = images.probe(rows[0][self.columns[0]])
        raw = self.raw(rows)
        self.shape = tuple(raw.shape[1:])
        dims = (0, 2, 3) if raw.dim() == 4 else (0,)
        x = raw.double()
        mean, std = x.mean(dim=dims), x.std(dim=dims, unbiased=False)
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        view = (1, -1, 1, 1) if raw.dim() == 4 else (1, -1)
        self.mean, self.std = mean.float().reshape(view), std.float().reshape(view)

    def raw(self, rows: list[dict]) -> torch.Tensor:
        if self.kind == "image":
            pixels = np.stack([images.decode(r[self.columns[0]], self.mode, self.size) for r in rows])
            return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        if self.kind == "array":
            arrays = np.stack([np.asarray(r[self.columns[0]], dtype=np.float32) for r in rows])
            if arrays.ndim == 3:  # (N, H, W): one channel
                arrays = arrays[:, None]
            return torch.from_numpy(arrays)
        missing = next((c for r in rows for c in self.columns if r[c] is None), None)
        if missing is not None:
            raise UsageError(f"--streaming: column {missing!r} has missing values; fill them first, or train "
                             f"without --streaming (which fills them with training means)")
        return torch.tensor([[float(r[c]) for c in self.columns] for r in rows], dtype=torch.float32)

    def fit_targets(self, head: list[dict], val: datasets.Dataset) -> None:
        """Regression and multi-label targets: checked and named as the map-style path does (launcher.data.
        targets) on the stream's first rows and the validation split; a regression is standardized with the
        first rows' mean and std, as the features are."""
        if self.problem_type == "single_label_classification":
            return
        features = datasets.Features({self.label: self.feature})
        head_ds = datasets.Dataset.from_dict({self.label: [r[self.label] for r in head]}, features=features)
        found = targets.encode(head_ds, val.select_columns([self.label]).cast(features), self.label,
                               ("train", "validation"), self.problem_type)
        self.names, self.problem_type = found.names, found.problem_type
        if self.problem_type == "regression":
            _, _, mean, std = targets.standardize(found.train, found.val)
            self.target_mean, self.target_std = torch.tensor(mean, dtype=torch.float64), \
                torch.tensor(std, dtype=torch.float64)
        self.multi_hot = found.reason.endswith("(multi-hot)")

    def labels(self, rows: list[dict]) -> torch.Tensor:
        values = [r[self.label] for r in rows]
        if self.problem_type == "regression":
            # (N,) or (N, K), as the map-style path shapes them; the statistics have one entry per target
            return ((torch.tensor(values, dtype=torch.float64) - self.target_mean) / self.target_std).float()
        if self.problem_type == "multi_label_classification":
            if self.multi_hot:
                return torch.tensor(values, dtype=torch.float32)
            hot = torch.zeros(len(values), len(self.names))
            for i, ids in enumerate(values):
                for label in ids:
                    if not 0 <= int(label) < len(self.names):
                        raise ValueError(f"label column {self.label!r} holds class id {label}, beyond the "
                                         f"{len(self.names)} classes of the stream's first rows and the validation "
                                         f"split; declare them with Sequence(ClassLabel(names=[...]))")
                    hot[i, int(label)] = 1.0
            return hot
        return torch.tensor([int(v) for v in values], dtype=torch.int64)

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = (self.raw(rows) - self.mean) / self.std
        return inputs.contiguous(), self.labels(rows)


class _WorkerCollate:
    """Builds a batch in the worker and tags it with the worker that made it (the position is per worker)."""

    def __init__(self, convert: RowConverter) -> None:
        self.convert = convert

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int]:
        info = torch.utils.data.get_worker_info()
        return (*self.convert(rows), 0 if info is None else info.id)


class _SkipFirst:
    """A filter that drops the first `skip[worker]` rows of each worker's stream (a resume's replay)."""

    def __init__(self, skip: dict[int, int]) -> None:
        self.skip, self.seen = skip, 0

    def __call__(self, _row: dict) -> bool:
        info = torch.utils.data.get_worker_info()
        self.seen += 1
        return self.seen > self.skip.get(0 if info is None else info.id, 0)


class StreamingTrain:
    """The training stream's recipe: files or a Hub name, the row converter, its length estimate."""

    def __init__(self, build: Any, convert: RowConverter, num_shards: int, num_rows: int | None, seed: int,
                 buffer: int) -> None:
        self.build, self.convert, self.num_shards, self.num_rows = build, convert, num_shards, num_rows
        self.seed, self.buffer = seed, buffer

    def __len__(self) -> int:
        return self.num_rows or 0

    def stream(self, epoch: int, rank: int, world: int, skip: dict[int, int]) -> datasets.IterableDataset:
        ds = self.build().shuffle(seed=self.seed, buffer_size=self.buffer)
        ds.set_epoch(epoch)
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        return ds.filter(_SkipFirst(skip)) if any(skip.values()) else ds


class StreamingLoader:
    """The training loader for a stream: yields (inputs, labels) and knows its position (state_dict)."""

    resumes_itself = True  # tells launcher.loop to save and restore state_dict() per rank, not to skip batches

    def __init__(self, train: StreamingTrain, batch_size: int, num_workers: int) -> None:
        from accelerate import PartialState

        state = PartialState()
        self.train, self.batch_size, self.num_workers = train, batch_size, num_workers
        self.rank, self.world, self.device = state.process_index, state.num_processes, state.device
        streams = self.world * max(num_workers, 1)
        if train.num_shards < streams:
            raise UsageError(f"--streaming: {train.num_shards} shard(s) cannot feed {self.world} process(es) x "
                             f"{max(num_workers, 1)} worker(s) without repeating data; write the data as at least "
                             f"{streams} files or lower --num-workers")
        self.epoch, self.consumed, self.done, self._resume = 0, {}, False, None
        self._agreement: _AllHave | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per rank, estimated from the row count (the stream's own end is what counts)."""
        rows = len(self.train)
        return math.ceil(rows / (self.world * self.batch_size)) if rows else 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in self.consumed.items()},
                "done": self.done, "world_size": self.world, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("world_size"), state.get("num_workers")) != (self.world, self.num_workers):
            warnings.warn(f"the stream position was saved with {state.get('world_size')} processes x "
                          f"{state.get('num_workers')} workers, this run has {self.world} x {self.num_workers}: "
                          f"the interrupted epoch of the stream starts again", stacklevel=2)
            return
        self._resume = state

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from accelerate.utils import send_to_device

        skip: dict[int, int] = {}
        if self._resume is not None and self._resume["epoch"] == self.epoch and not self._resume["done"]:
            skip = {int(k): v for k, v in self._resume["consumed"].items()}
        self._resume = None
        self.consumed, self.done = dict(skip), False
        stream = self.train.stream(self.epoch, self.rank, self.world, skip)
        loader = torch.utils.data.DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                                             collate_fn=_WorkerCollate(self.train.convert),
                                             # pinned host memory: what makes the non_blocking copy below async
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(self.train.seed))
        if self._agreement is None:  # every rank's first epoch starts here, at the same point
            self._agreement = _AllHave()
        batches = iter(loader)
        batch = next(batches, None)
        agreed = self._agreement.start(batch is not None)
        while agreed.wait():  # the first rank out of data ends the epoch for all: every rank steps equally often
            inputs, labels, worker = batch
            # The next batch and the ranks' vote on it are under way while this one trains.
            batch = next(batches, None)
            agreed = self._agreement.start(batch is not None)
            self.consumed[worker] = self.consumed.get(worker, 0) + len(labels)
            yield send_to_device((inputs, labels), self.device, non_blocking=True)
        self.done = True


class _AllHave:
    """Whether every rank has a batch: one all-reduce (MIN) of a host flag per batch, on a gloo group, started
    a batch ahead. On the CPU it never touches the GPU: an NCCL all-reduce of a GPU flag read back with .item()
    made the host wait for the GPU at every step."""

    def __init__(self) -> None:
        self.group = None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank creates it at the same point

    def start(self, have: bool) -> _Vote:
        flag = torch.tensor([1 if have else 0])
        if not self.distributed:
            return _Vote(flag, None)
        return _Vote(flag, dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group, async_op=True))


class _Vote:
    def __init__(self, flag: torch.Tensor, work: Any) -> None:
        self.flag, self.work = flag, work

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
        return bool(self.flag.item())


class StreamValDataset(BatchedDataset):
    """A map-style validation split converted per batch (exact metrics, as for any dataset)."""

    def __init__(self, ds: datasets.Dataset, convert: RowConverter) -> None:
        self.ds, self.convert = ds, convert
        self.labels = convert.labels([{convert.label: v} for v in ds[convert.label]])  # the split's targets

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        columns = self.ds[list(indices)]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return self.convert(rows)


# ---------------------------------------------------------------------------------------------------------
# Sources


def load_stream_splits(dataset: str, *, seed: int, label_column: str | None = None,
                       image_column: str | None = None, buffer: int = SHUFFLE_BUFFER,
                       problem_type: str | None = None) -> Any:
    """DataSplits whose `train` is a StreamingTrain (make_loader turns it into a StreamingLoader).
    `problem_type` forces one (default: detected from the label column, as launcher.data.targets does)."""
    from launcher.data.pipeline import DataSplits

    path = Path(dataset).expanduser()
    if path.is_dir():
        train_files, val_files = _local_shards(path)
        builder = _FILE_BUILDERS[Path(train_files[0]).suffix]
        features = datasets.Features.from_arrow_schema(_schema(train_files[0]))

        def build() -> datasets.IterableDataset:
            # Our own reader: datasets' streaming parquet builder sleeps 5 s at the end of every pass (its
            # workaround for apache/arrow#45214), at start-up and at every epoch end. A list in gen_kwargs
            # is what datasets shards (one file a shard), shuffles and splits per rank and worker.
            return datasets.IterableDataset.from_generator(_file_rows, features=features,
                                                           gen_kwargs={"files": train_files})

        val = datasets.load_dataset(builder, data_files=val_files, split="train")
        num_shards = len(train_files)
        num_rows = sum(_num_rows(f) for f in train_files)
    else:
        def build() -> datasets.IterableDataset:
            return datasets.load_dataset(dataset, split="train", streaming=True)

        try:
            val_name = next(s for s in _VAL_DIRS if s in datasets.get_dataset_split_names(dataset))
            val = datasets.load_dataset(dataset, split=val_name)
        except Exception as error:  # offline, missing or gated: all end the same way for the user
            raise UsageError(f"--streaming {dataset!r}: could not load its validation split ({error})") from error
        head = build()
        split_info = (head.info.splits or {}).get("train")
        num_shards, num_rows = head.num_shards, getattr(split_info, "num_examples", None) or None
    head = build()
    convert = RowConverter(head.features, label_column, image_column, problem_type)
    if convert.kind == "image":
        head = head.cast_column(convert.columns[0], datasets.Image(decode=False))
        val = val.cast_column(convert.columns[0], datasets.Image(decode=False))
    first = list(head.take(STATS_ROWS))
    convert.fit(first)
    convert.fit_targets(first, val)
    if convert.problem_type != "single_label_classification":
        names = convert.names
    elif isinstance(convert.feature, datasets.ClassLabel):
        names = list(convert.feature.names)
    else:
        names = [str(i) for i in range(int(np.asarray(val.with_format("numpy")[convert.label]).max()) + 1)]
    train = StreamingTrain(lambda: _undecoded(build(), convert), convert, num_shards, num_rows, seed, buffer)
    regression = convert.problem_type == "regression"
    # What launcher predict needs (launcher.data.preprocess); array columns are not described yet.
    stored = {"format": PREPROCESSING_FORMAT, "label_column": convert.label, "problem_type": convert.problem_type,
              "class_names": list(names), "target_mean": convert.target_mean.tolist() if regression else [],
              "target_std": convert.target_std.tolist() if regression else [], "input_shape": list(convert.shape),
              "mean": convert.mean.flatten().tolist(), "std": convert.std.flatten().tolist()}
    if convert.kind == "tabular":
        stored.update(kind="tabular", columns=list(convert.columns), stored_shape=[], transpose=None, scale=1.0)
    elif convert.kind == "image":
        stored.update(kind="encoded_images", image_column=convert.columns[0], mode=convert.mode,
                      size=list(convert.size))
    return DataSplits(train=train, val=StreamValDataset(val, convert), num_classes=len(names),
                      preprocessing=stored if convert.kind != "array" else {},
                      input_shape=convert.shape, class_names=names, name=dataset,
                      val_source="its validation split (map-style)", mean=convert.mean.flatten().tolist(),
                      std=convert.std.flatten().tolist(), problem_type=convert.problem_type,
                      problem_reason=convert.reason + (f"; targets standardized with the first {len(first)} rows"
                                                       if regression else ""),
                      target_mean=convert.target_mean.tolist() if regression else [],
                      target_std=convert.target_std.tolist() if regression else [])


def _schema(path: str) -> Any:
    if path.endswith(".parquet"):
        return pq.read_schema(path)
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).schema


def _num_rows(path: str) -> int:
    if path.endswith(".parquet"):
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(path) as source:
        return sum(len(b) for b in pa.ipc.open_stream(source))


def _file_rows(files: list[str]) -> Iterator[dict]:
    """Rows of parquet or arrow (save_to_disk) files, one record batch at a time."""
    for path in files:
        if path.endswith(".parquet"):
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        else:
            batches = pa.ipc.open_stream(pa.memory_map(path))
        for batch in batches:
            yield from batch.to_pylist()


def _undecoded(ds: datasets.IterableDataset, convert: RowConverter) -> datasets.IterableDataset:
    if convert.kind == "image":
        return ds.cast_column(convert.columns[0], datasets.Image(decode=False))
    return ds


def _local_shards(root: Path) -> tuple[list[str], list[str]]:
    """Training and validation shard files (*.parquet or *.arrow), found by datasets' own split patterns, so
    every layout the non-streaming path reads streams too: train/ and validation/ folders, the Hub's
    data/train-00000-of-00004.parquet, train-*.parquet at the top."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
    except Exception:  # noqa: BLE001 - datasets raises several kinds for "no data files here"
        found = {}
    splits = {str(name): [str(f) for f in files if Path(str(f)).suffix in _FILE_BUILDERS]
              for name, files in found.items()}
    train = sorted(splits.get("train", []))
    val = sorted(next((splits[name] for name in _VAL_DIRS if splits.get(name)), []))
    if not train or not val:
        raise UsageError(f"--streaming {root}: expected shard files in {root}/train/ and {root}/validation/ "
                         f"(or the Hub's {root}/data/train-00000-of-0000N.parquet; *.parquet or *.arrow); found "
                         f"{len(train)} training and {len(val)} validation files")
    if len({Path(f).suffix for f in train}) > 1:
        raise UsageError(f"--streaming {root}/train mixes parquet and arrow files; use one format")
    return train, val
