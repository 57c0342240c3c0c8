"""Images listed at start-up, decoded per batch: image folders, image datasets, augmentation.

An image column (`datasets.Image`) is never decoded up front. Start-up lists the images (a folder of class
subfolders is scanned with os.scandir into an Arrow table of (path, label); an image dataset's column is
read undecoded as {bytes, path}), probes the first image's header for the size and mode, and computes the
standardization statistics from a fixed, seeded sample of the training split (cached as a small JSON file
keyed by the dataset's fingerprint), so start-up does not grow with the dataset. `LazyImageDataset`
decodes, resizes, augments and standardizes each batch in `__getitems__`, i.e. in the DataLoader workers.

Augmentation (albumentations: the fastest of the libraries that import beside the CPU torch wheel, see
bench/RESULTS.md) draws each sample's randomness from a seed that is a function of (seed, epoch, sample
index) alone, so neither the worker nor the rank that loads a sample changes what it looks like.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from launcher.data.batched import BatchedDataset
from launcher.errors import UsageError

# Images decoded for the standardization statistics; a fixed sample, so start-up does not grow with the data.
STATS_SAMPLE = 512
# Bump when the statistics' computation changes, so cached values of the old code are not reused.
_STATS_VERSION = 1
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
# Folder names datasets' imagefolder builder also reads as splits.
_SPLIT_DIRS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "eval": "validation"}
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
AUGMENTATIONS = ("none", "standard")

# Images this process has decoded (tests read it to prove that start-up decodes a fixed number of images).
decode_count = 0


# ---------------------------------------------------------------------------------------------------------
# Listing a folder


def list_image_folder(root: Path) -> datasets.DatasetDict | None:
    """An image folder (class subfolders, optionally under train/validation/test) listed as undecoded rows.

    Returns None for any other layout (metadata files, images at the top level, ...), which datasets'
    imagefolder builder then reads. The builder writes every row through Python into an Arrow cache,
    which takes minutes on a million files (bench/RESULTS.md); this is one scandir per class folder.
    """
    top = _subdirs(root)
    if top is None or not top:
        return None
    split_dirs = {name: path for name, path in top.items() if name.lower() in _SPLIT_DIRS}
    if split_dirs and len(split_dirs) != len(top):
        return None  # split folders mixed with other folders: not a layout we can read unambiguously
    splits = {_SPLIT_DIRS[n.lower()]: p for n, p in split_dirs.items()} if split_dirs else {"train": root}
    class_dirs = {}
    for split, folder in splits.items():
        classes = _subdirs(folder)
        if not classes:
            return None
        class_dirs[split] = classes
    cache = _listing_cache(root, splits, class_dirs)
    cached = _read_listing(cache)
    if cached is not None:
        return _as_datasets(*cached)
    listed = {}
    for split, classes in class_dirs.items():
        listed[split] = {name: _image_files(path) for name, path in classes.items()}
        if any(files is None for files in listed[split].values()):
            return None
    names = sorted(set().union(*(set(c) for c in listed.values())))
    rows = {}
    for split, classes in listed.items():
        paths, labels = [], []
        for label, name in enumerate(names):
            files = sorted(classes.get(name, []))
            paths.extend(files)
            labels.extend([label] * len(files))
        rows[split] = (paths, labels)
    _write_listing(cache, names, rows)
    return _as_datasets(names, rows)


def _as_datasets(names: list[str], rows: dict[str, tuple[list[str], list[int]]]) -> datasets.DatasetDict:
    """Undecoded image rows (path only) and their class ids, one Dataset per split."""
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)})
    out = {}
    for split, (paths, labels) in rows.items():
        image = pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                           names=["bytes", "path"])
        table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
        # The listing itself is the fingerprint: datasets would otherwise hash the whole table.
        digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:32]
        out[split] = datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=digest)
    return datasets.DatasetDict(out)


# The listing of a folder is kept in the datasets cache, keyed by the modification times of the folders
# that hold the images: adding, removing or renaming a file changes its folder's mtime, so a stale listing
# is never read. The first process (the recipe lists under main_process_first) scans the class folders and
# writes it; every other rank, node and later run stats O(classes) folders and reads it memory-mapped,
# instead of each of a thousand ranks scanning a million files on a shared filesystem.
_LISTING_VERSION = 1


def _listing_cache(root: Path, splits: dict[str, Path], class_dirs: dict[str, dict[str, Path]]) -> Path:
    key = [str(_LISTING_VERSION), os.path.abspath(root), str(os.stat(root).st_mtime_ns)]
    for split, folder in sorted(splits.items()):
        key += [split, str(os.stat(folder).st_mtime_ns)]
        key += [f"{name}:{os.stat(path).st_mtime_ns}" for name, path in sorted(class_dirs[split].items())]
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:32]
    return Path(datasets.config.HF_DATASETS_CACHE) / "launcher-image-listings" / f"{digest}.arrow"


def _read_listing(cache: Path) -> tuple[list[str], dict[str, tuple[list[str], list[int]]]] | None:
    try:
        with open(cache, "rb") as f:
            table = pa.ipc.open_file(f).read_all()
        meta = json.loads(table.schema.metadata[b"launcher"])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):  # missing, partial or foreign
        return None
    rows, at = {}, 0
    paths, labels = table.column("path").to_pylist(), table.column("label").to_pylist()
    for split, count in meta["splits"]:
        rows[split] = (paths[at: at + count], labels[at: at + count])
        at += count
    return meta["names"], rows


def _write_listing(cache: Path, names: list[str], rows: dict[str, tuple[list[str], list[int]]]) -> None:
    """Best effort: a read-only or full cache only means the next process lists the folder itself."""
    meta = {"names": names, "splits": [[split, len(paths)] for split, (paths, _) in rows.items()]}
    table = pa.table({"path": pa.array([p for paths, _ in rows.values() for p in paths], pa.string()),
                      "label": pa.array([x for _, labels in rows.values() for x in labels], pa.int64())})
    table = table.replace_schema_metadata({"launcher": json.dumps(meta)})
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, cache)  # whole or not at all
    except (OSError, pa.ArrowException):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _subdirs(folder: Path) -> dict[str, Path] | None:
    """Subfolders by name, or None if the folder also holds files other than hidden ones."""
    dirs = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                return None
            dirs[entry.name] = Path(entry.path)
    return dirs


def _image_files(folder: Path) -> list[str] | None:
    """Absolute paths of the images in a class folder; None if it holds anything else (subfolders, csv)."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS or entry.is_dir():
                return None
            files.append(os.path.abspath(entry.path))
    return files


# ---------------------------------------------------------------------------------------------------------
# Decoding


def decode(cell: dict, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One stored image ({bytes, path}) as a uint8 (H, W, C) array of `mode` and `size` (width, height)."""
    global decode_count
    from PIL import Image

    image = _open(cell)
    with image:
        if image.format == "JPEG":
            image.draft(mode, size)  # JPEG decodes at a reduced scale when the target is much smaller
        image = image.convert(mode) if image.mode != mode else image
        image.load()
        if image.size != size:
            image = image.resize(size, resample=Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    decode_count += 1
    return array[..., None] if array.ndim == 2 else array


def _open(cell: dict) -> Any:
    from PIL import Image

    data, path = cell.get("bytes"), cell.get("path")
    try:
        return Image.open(io.BytesIO(data) if data else path)
    except (OSError, ValueError, TypeError) as error:  # unreadable, truncated or missing file
        raise UsageError(f"cannot read image {path or '<bytes>'}: {error}; remove or replace it") from error


def probe(cell: dict) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the header alone: grayscale stays 1 channel, anything else is RGB."""
    with _open(cell) as image:
        return ("L" if image.mode in _GRAYSCALE_MODES else "RGB"), image.size


class ImageColumn:
    """Undecoded cells ({bytes, path}) of one image column, read by row number; pickles by reference.

    The datasets.Dataset (memory-mapped when it comes from the cache) is what pickles to workers; the Arrow
    column is looked up again in each process.
    """

    def __init__(self, ds: datasets.Dataset, column: str) -> None:
        ds = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        indices = getattr(ds, "_indices", None)  # a select()ed view: map its rows to the table's
        self.row_map = None if indices is None else indices.column(0).to_numpy()
        self.ds, self.column = ds, column
        self._cells: pa.ChunkedArray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cells": None}

    def __len__(self) -> int:
        return len(self.ds)

    def cells(self, rows: np.ndarray) -> list[dict]:
        if self._cells is None:
            self._cells = self.ds.data.table.column(self.column)
        if self.row_map is not None:
            rows = self.row_map[rows]
        return self._cells.take(pa.array(rows, pa.int64())).to_pylist()


# ---------------------------------------------------------------------------------------------------------
# Augmentation


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (seed, epoch, sample index) alone."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class Augmenter:
    """An albumentations pipeline applied to one (H, W, C) image with its own seed."""

    def __init__(self, preset: str, height: int, width: int) -> None:
        if preset not in AUGMENTATIONS or preset == "none":
            raise ValueError(f"unknown augmentation preset {preset!r}")
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
        import albumentations as A

        # torchvision's RandomResizedCrop defaults: 8-100% of the area, aspect ratio 3/4..4/3.
        self.transform = A.Compose([A.RandomResizedCrop(size=(height, width), scale=(0.08, 1.0)),
                                    A.HorizontalFlip(p=0.5)])
        self.preset = preset

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        self.transform.set_random_seed(seed)
        out = self.transform(image=image)["image"]
        return out[..., None] if out.ndim == 2 else out


def check_augment(preset: str) -> None:
    if preset not in AUGMENTATIONS:
        raise UsageError(f"--augment must be one of {', '.join(AUGMENTATIONS)} (got {preset!r})")


# ---------------------------------------------------------------------------------------------------------
# Datasets


class LazyImageDataset(BatchedDataset):
    """Rows of an image column decoded, resized, augmented (training only) and standardized per batch."""

    def __init__(self, column: ImageColumn, rows: np.ndarray, labels: torch.Tensor, *, mode: str,
                 size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor,
                 augment: Augmenter | None = None, seed: int = 0) -> None:
        self.column, self.rows, self.labels = column, rows, labels
        self.mode, self.size = mode, size
        self.mean, self.std = mean.flatten(), std.flatten()
        # Standardization as one multiply-subtract per pixel on the (N, H, W, C) batch: x / 255 / std - mean / std.
        self._scale, self._shift = 1.0 / (255.0 * self.std), self.mean / self.std
        self.augment, self.seed = augment, seed

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch = getattr(indices, "epoch", 0)  # launcher.data.sampling.EpochIndices carries the epoch
        idx = np.asarray(indices, dtype=np.int64)
        channels = 1 if self.mode == "L" else 3
        width, height = self.size
        pixels = np.empty((len(idx), height, width, channels), dtype=np.uint8)
        for j, cell in enumerate(self.column.cells(self.rows[idx])):
            image = decode(cell, self.mode, self.size)
            if self.augment is not None:
                image = self.augment(image, sample_seed(self.seed, epoch, int(idx[j])))
            pixels[j] = image
        inputs = torch.from_numpy(pixels).mul(self._scale).sub_(self._shift)  # uint8 * float32 -> float32
        # (N, C, H, W) in channels_last memory: no transposing copy (a third of the time at 224x224), and
        # convolutions take it as it is.
        return inputs.permute(0, 3, 1, 2), self.labels[torch.from_numpy(idx)]


class AugmentedDataset(BatchedDataset):
    """Augmentation over a batched dataset of (N, C, H, W) float images (arrays held in memory or Arrow).

    Cropping with bilinear resampling and flipping commute with per-channel standardization, so the
    already standardized tensors are augmented as they are.
    """

    def __init__(self, base: torch.utils.data.Dataset, augment: Augmenter, seed: int) -> None:
        self.base, self.augment, self.seed = base, augment, seed
        self.labels = base.labels

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch = getattr(indices, "epoch", 0)
        inputs, labels = self.base.__getitems__(indices)
        if not len(labels):  # a rank's empty share of a short last batch: nothing to augment
            return inputs, labels
        images = inputs.permute(0, 2, 3, 1).numpy()
        out = np.stack([self.augment(np.ascontiguousarray(image), sample_seed(self.seed, epoch, int(i)))
                        for image, i in zip(images, indices)])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), labels


# ---------------------------------------------------------------------------------------------------------
# Building the splits


def lazy_image_splits(
    train: datasets.Dataset,
    val: datasets.Dataset,
    column: str,
    train_part: tuple[np.ndarray, np.ndarray],
    val_part: tuple[np.ndarray, np.ndarray],
    *,
    seed: int,
    augment: str = "none",
    image_size: int | None = None,
    image_mean: Sequence[str] | None = None,
    image_std: Sequence[str] | None = None,
) -> tuple[LazyImageDataset, LazyImageDataset, tuple[int, int, int], torch.Tensor, torch.Tensor]:
    """Train/val datasets over an image column; `val` may be `train` itself (rows carved from it)."""
    check_augment(augment)
    (train_rows, train_labels), (val_rows, val_labels) = train_part, val_part
    train_col = ImageColumn(train, column)
    val_col = train_col if val is train else ImageColumn(val, column)
    mode, first_size = probe(train_col.cells(train_rows[:1])[0])
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size must be at least 1 (got {image_size})")
    size = (image_size, image_size) if image_size else first_size
    channels = 1 if mode == "L" else 3
    mean, std = _given_stats(image_mean, image_std, channels)
    if mean is None:
        mean, std = _cached_stats(train_col, train_rows, mode, size, seed, train._fingerprint)
    augmenter = Augmenter(augment, size[1], size[0]) if augment != "none" else None
    common = {"mode": mode, "size": size, "mean": mean, "std": std}
    train_ds = LazyImageDataset(train_col, train_rows, torch.from_numpy(train_labels), augment=augmenter,
                                seed=seed, **common)
    val_ds = LazyImageDataset(val_col, val_rows, torch.from_numpy(val_labels), **common)  # never augmented
    return train_ds, val_ds, (channels, size[1], size[0]), mean, std


def _given_stats(mean: Sequence[str] | None, std: Sequence[str] | None,
                 channels: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise UsageError("--image-mean and --image-std go together; give both (one value per channel) or neither")
    values = {}
    for flag, given in (("--image-mean", mean), ("--image-std", std)):
        try:
            numbers = [float(v) for v in given]
        except ValueError:
            raise UsageError(f"{flag} takes comma-separated numbers (got {','.join(map(str, given))})") from None
        if len(numbers) == 1:
            numbers = numbers * channels
        if len(numbers) != channels:
            raise UsageError(f"{flag} has {len(numbers)} values but the images have {channels} channel(s)")
        values[flag] = torch.tensor(numbers, dtype=torch.float32)
    if (values["--image-std"] <= 0).any():
        raise UsageError("--image-std values must be positive")
    return values["--image-mean"], values["--image-std"]


def stats_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "launcher-image-stats"


def _cached_stats(column: ImageColumn, rows: np.ndarray, mode: str, size: tuple[int, int], seed: int,
                  fingerprint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of a fixed, seeded sample of training images, cached by dataset fingerprint."""
    sample = np.sort(np.random.default_rng(seed).choice(len(rows), min(STATS_SAMPLE, len(rows)), replace=False))
    key_text = json.dumps([_STATS_VERSION, fingerprint, mode, list(size), hashlib.sha256(
        rows[sample].tobytes()).hexdigest()])
    path = stats_cache_dir() / f"{hashlib.sha256(key_text.encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(path.read_text())
        return torch.tensor(cached["mean"]), torch.tensor(cached["std"])
    except (OSError, ValueError, KeyError):
        pass
    pixels = np.stack([decode(cell, mode, size) for cell in column.cells(rows[sample])]).astype(np.float64) / 255
    mean = pixels.mean(axis=(0, 1, 2))
    std = pixels.std(axis=(0, 1, 2))
    std = np.where(std < 1e-6, 1.0, std)  # constant channels: only centre them
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist(), "images": len(sample)}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next start-up the same few hundred decodes
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
