"""Raw datasets, their splits and their columns: a `datasets.Dataset` from any source, the label column and
class ids, the validation split (the dataset's own, else a stratified carve by seed).

Sources: the embedded digits and diabetes (scikit-learn's, no network), a local folder (save_to_disk, class
subfolders of images, or files `datasets` infers a builder for) or file (csv/tsv/parquet/json), and a Hub
name. The column helpers here are shared by the in-memory/Arrow inputs (launcher.data.arrays) and the stream
(launcher.data.streaming).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from launcher.data.images import list_image_folder
from launcher.data.labels import mixed_labels
from launcher.errors import UsageError

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
LABEL_NAMES = ("label", "labels", "target", "class", "y")
IMAGE_NAMES = ("image", "img", "pixel_values", "pixels")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}


# ---------------------------------------------------------------------------------------------------------
# Loading


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No datasets progress bars while loading; the user's own setting comes back afterwards."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _load_train_val(dataset: str, config: str | None = None,
                    ) -> tuple[datasets.Dataset, datasets.Dataset | None, tuple[str, str]]:
    loaded = _load_raw(dataset, config)
    if isinstance(loaded, datasets.Dataset):
        return loaded, None, ("train", "")
    if not isinstance(loaded, datasets.DatasetDict):
        raise UsageError(
            f"{dataset!r} loaded as {type(loaded).__name__}; an iterable/streaming dataset cannot "
            f"be used: save it with save_to_disk() or to parquet first"
        )
    splits = list(loaded)
    if "train" in loaded:
        train_name = "train"
    elif len(splits) == 1:
        train_name = splits[0]
    else:
        raise UsageError(
            f"{dataset!r} has splits {', '.join(splits)} but none named 'train'; rename the training split to 'train'"
        )
    val_name = next((s for s in VAL_SPLIT_NAMES if s in loaded and s != train_name), "")
    return loaded[train_name], (loaded[val_name] if val_name else None), (train_name, val_name)


def _load_raw(dataset: str, config: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    if config is not None and (dataset in EMBEDDED or Path(dataset).expanduser().exists()):
        raise UsageError(f"--dataset-config names a configuration of a Hub dataset; {dataset!r} is local: "
                         f"leave --dataset-config out")
    if dataset in EMBEDDED:
        return EMBEDDED[dataset]()
    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_local(lambda: datasets.load_from_disk(str(path)), dataset)
        listed = list_image_folder(path)  # class subfolders: listed in seconds, never decoded here
        if listed is not None:
            return listed
        # datasets infers the builder (imagefolder, csv, parquet, json) and the splits from the files.
        return _load_local(lambda: datasets.load_dataset(str(path)), dataset)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(
                f"cannot read {dataset!r}: use a {'/'.join(FILE_BUILDERS)} file, a folder of "
                f"images in class subfolders, or a save_to_disk folder"
            )
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return _load_local(lambda: datasets.load_dataset(builder, data_files=str(path), **kwargs), dataset)
    if _looks_like_path(dataset):
        raise UsageError(f"dataset path {dataset!r} does not exist")
    try:
        return datasets.load_dataset(dataset, name=config)
    except Exception as error:  # network, missing or gated dataset: all end the same way for the user
        raise UsageError(
            f"could not find or load dataset {dataset!r} from the Hugging Face Hub "
            f"({_first_line(error)}); 'digits', 'diabetes' or a local path (image folder, csv/parquet/json, "
            f"save_to_disk folder) work offline"
        ) from error


def _load_local(load: Any, dataset: str) -> datasets.Dataset | datasets.DatasetDict:
    try:
        return load()
    except Exception as error:  # malformed files surface as many exception types; the message is what matters
        raise UsageError(f"could not read dataset {dataset!r}: {_first_line(error, root=True)}") from error


def _looks_like_path(name: str) -> bool:
    """Hub names are 'name' or 'owner/name'; anything else that does not exist is a mistyped path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in FILE_BUILDERS
    )


def _first_line(error: BaseException, *, root: bool = False) -> str:
    """First line of the error, or of its root cause ('DatasetGenerationError' says less than its cause)."""
    while root and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _digits() -> datasets.Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no network) as a real datasets.Dataset."""
    images, labels = digits_arrays()
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(8, 8), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )
    # Pixel values are counts 0..16 (of a 4x4 block); /16 puts them in [0, 1] like any image.
    images = (images / 16.0).astype(np.float32)
    return datasets.Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)


def _diabetes() -> datasets.Dataset:
    """scikit-learn's bundled diabetes data (442 patients, 10 measurements in their own units, `target`: a
    float disease progression score a year later): the embedded regression, no network."""
    from sklearn.datasets import load_diabetes

    return datasets.Dataset.from_pandas(load_diabetes(as_frame=True, scaled=False).frame, preserve_index=False)


# Datasets that ship with a dependency: `--dataset NAME` works offline.
EMBEDDED = {"digits": _digits, "diabetes": _diabetes}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) of pixel counts 0..16, labels): what `sklearn.datasets.load_digits()` returns,
    read from the file scikit-learn ships without importing scikit-learn, whose import (scipy, joblib)
    took ~2 s of every run's start-up. Falls back to load_digits where the file is not where scikit-learn
    keeps it."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without executing it
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as rows:  # as load_digits reads it: 64 pixels and the label per row
                data = np.loadtxt(rows, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


# ---------------------------------------------------------------------------------------------------------
# Columns and labels


def _find_label_column(features: datasets.Features, label_column: str | None, image_column: str | None) -> str:
    columns = list(features)
    available = ", ".join(columns)
    for flag, name in (("--label-column", label_column), ("--image-column", image_column)):
        if name is not None and name not in features:
            raise UsageError(f"{flag} {name!r} is not a column of the dataset; available columns: {available}")
    if label_column is not None:
        if label_column == image_column:
            raise UsageError(f"--label-column and --image-column both name {label_column!r}; they must differ")
        return label_column
    candidates = [c for c in columns if c != image_column]
    found = next((c for c in candidates if isinstance(features[c], datasets.ClassLabel)), None)
    if found is None:
        lowered = {c.lower(): c for c in candidates}
        found = next((lowered[n] for n in LABEL_NAMES if n in lowered), None)
    if found is None:
        raise UsageError(
            f"no label column found (looked for a ClassLabel feature or a column named "
            f"{'/'.join(LABEL_NAMES)}); name it with --label-column, available columns: {available}"
        )
    return found


def _require_same_columns(val: datasets.Dataset, columns: list[str], split_names: tuple[str, str]) -> None:
    missing = [c for c in columns if c not in val.features]
    if missing:
        raise UsageError(
            f"validation split '{split_names[1]}' lacks column(s) {', '.join(missing)} of split "
            f"'{split_names[0]}'; give both splits the same columns"
        )


def _encode_labels(
    train: datasets.Dataset, val: datasets.Dataset | None, column: str, split_names: tuple[str, str]
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Class names and int64 class ids for both splits (strings: sorted names -> ids)."""
    feature = train.features[column]
    raw = {split_names[0]: _column(train, column)}
    if val is not None:
        raw[split_names[1]] = _column(val, column)
    for split, values in raw.items():
        # Missing labels arrive as None (text) or NaN (numbers: Arrow nulls become NaN in numpy).
        if (values.dtype == object and any(v is None for v in values)) or (
            values.dtype.kind == "f" and np.isnan(values).any()
        ):
            raise UsageError(f"label column {column!r} has empty values in split '{split}'; fill or drop those rows")
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        ids = {s: v.astype(np.int64) for s, v in raw.items()}
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        mixed_labels(raw, column)  # one `cat` among integer ids: refused, naming it and its row
        names = sorted(set().union(*(np.unique(v.astype(str)).tolist() for v in raw.values())))
        ids = {s: np.searchsorted(np.asarray(names), v.astype(str)).astype(np.int64) for s, v in raw.items()}
    elif isinstance(feature, datasets.Value) and _is_integer_dtype(feature.dtype):
        ids = {s: v.astype(np.int64) for s, v in raw.items()}
        names = []
    else:
        raise UsageError(
            f"label column {column!r} holds {_describe(feature)} values; classification needs integer class "
            f"ids or class-name strings: convert it, pick another column with --label-column, or train a "
            f"regression (--problem-type regression)"
        )
    for split, values in ids.items():
        if len(values) and values.min() < 0:
            raise UsageError(
                f"split '{split}' has negative labels in column {column!r} (e.g. -1 for "
                f"unlabelled rows); use a labelled split or remove those rows"
            )
    if not names:
        top = max(int(v.max()) for v in ids.values() if len(v))
        names = [str(i) for i in range(top + 1)]
    elif any(len(v) and v.max() >= len(names) for v in ids.values()):
        raise UsageError(f"label column {column!r} has ids beyond its {len(names)} class names")
    return names, ids[split_names[0]], ids.get(split_names[1])


def _column(ds: datasets.Dataset, column: str) -> np.ndarray:
    values = ds.select_columns([column]).with_format("numpy")[:][column]
    return np.asarray(values)


def _is_integer_dtype(dtype: str) -> bool:
    return dtype == "bool" or re.fullmatch(r"u?int(8|16|32|64)", dtype) is not None


def _is_float_dtype(dtype: str) -> bool:
    return re.fullmatch(r"float(16|32|64)|double|halffloat", dtype) is not None

def _detect_image_column(features: datasets.Features, label_col: str) -> str | None:
    candidates = [c for c in features if c != label_col]
    found = next((c for c in candidates if isinstance(features[c], datasets.Image)), None)
    if found is None:
        lowered = {c.lower(): c for c in candidates}
        found = next((lowered[n] for n in IMAGE_NAMES if n in lowered), None)
    if found is None:
        found = next((c for c in candidates if isinstance(features[c], (datasets.Array2D, datasets.Array3D))), None)
    return found


def _array_depth(feature: Any) -> int | None:
    """Nesting depth of a numeric feature (0 for a scalar), None if it is not numeric."""
    if isinstance(feature, datasets.Value):
        return 0 if _is_integer_dtype(feature.dtype) or _is_float_dtype(feature.dtype) else None
    if isinstance(feature, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)):
        numeric = _is_integer_dtype(feature.dtype) or _is_float_dtype(feature.dtype)
        return len(feature.shape) if numeric else None
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        inner = _array_depth(feature.feature)
        return None if inner is None else inner + 1
    return None




def _describe(feature: Any) -> str:
    if isinstance(feature, datasets.Value):
        return "text" if feature.dtype in ("string", "large_string") else feature.dtype
    return type(feature).__name__




def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (seed) split keeping class proportions; returns sorted (train, val) row indices."""
    n = len(labels)
    if n < 2:
        raise UsageError(f"the dataset has {n} row(s); at least 2 are needed to carve a validation split")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation: per-class quotas that add up to exactly n_val.
    exact = counts * n_val / n
    quota = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - quota), kind="stable")
    quota[by_remainder[: n_val - quota.sum()]] += 1
    # Sort rows by class, randomly within a class; the first `quota` rows of each class go to validation.
    order = np.lexsort((np.random.default_rng(seed).permutation(n), labels))
    class_of = np.searchsorted(classes, labels[order])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    is_val = (np.arange(n) - starts[class_of]) < quota[class_of]
    return np.sort(order[~is_val]), np.sort(order[is_val])
