"""What the label column asks the model to learn: the problem type, and the targets as arrays.

Named as transformers names them (`config.problem_type`):
- `single_label_classification`: class ids or class-name strings (launcher.data.sources._encode_labels);
- `multi_label_classification`: a list of class ids per row (datasets' `Sequence(ClassLabel)`, as in
  go_emotions) or a multi-hot vector of 0/1 of one length; targets become float multi-hot (N, K);
- `regression`: float values, one per row or a vector of one length; targets become float32 (N,) or
  (N, K), standardized with the training rows' mean and std (`standardize`), reported back in the
  original units by launcher.tasks.Regression.

`detect` picks the type from the column's feature and values; `--problem-type` forces one, and a column
that cannot be read as the forced type is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from launcher.data.sources import _describe, _encode_labels, _is_float_dtype, _is_integer_dtype
from launcher.errors import UsageError
from launcher.tasks import PROBLEM_TYPES  # noqa: F401 - re-exported: the names live with the tasks



@dataclass
class Targets:
    problem_type: str
    names: list[str]  # class names (classification), target names (regression)
    train: np.ndarray
    val: np.ndarray | None
    reason: str  # why this type: said in the recipe's one line


def _inner(feature: object) -> object | None:
    if isinstance(feature, (datasets.Sequence, datasets.List, datasets.LargeList)):
        return feature.feature
    return None


def detect(feature: object) -> tuple[str, str]:
    """(problem type, why) from the label column's feature."""
    inner = _inner(feature)
    if inner is not None:
        if isinstance(inner, datasets.ClassLabel):
            return "multi_label_classification", "a list of class ids per row"
        if isinstance(inner, datasets.Value) and _is_integer_dtype(inner.dtype):
            return "multi_label_classification", "a list of integers per row"
        if isinstance(inner, datasets.Value) and _is_float_dtype(inner.dtype):
            return "regression", "a vector of floats per row"
    if isinstance(feature, datasets.Value) and _is_float_dtype(feature.dtype):
        return "regression", f"{feature.dtype} values"
    return "single_label_classification", "class ids or names"


def encode(train: datasets.Dataset, val: datasets.Dataset | None, column: str, split_names: tuple[str, str],
           problem_type: str | None) -> Targets:
    """The targets of both splits for `problem_type` (None: detected)."""
    feature = train.features[column]
    detected, reason = detect(feature)
    chosen = problem_type or detected
    if problem_type is not None:
        reason = "--problem-type"
    if chosen == "single_label_classification":
        names, y_train, y_val = _encode_labels(train, val, column, split_names)
        return Targets(chosen, names, y_train, y_val, reason)
    raw = {split_names[0]: _rows(train, column)}
    if val is not None:
        raw[split_names[1]] = _rows(val, column)
    if chosen == "regression":
        return _regression(feature, raw, column, split_names, reason)
    return _multi_label(feature, raw, column, split_names, reason)


def _rows(ds: datasets.Dataset, column: str) -> list:
    return ds.select_columns([column])[column]


def _regression(feature: object, raw: dict, column: str, split_names: tuple[str, str], reason: str) -> Targets:
    inner = _inner(feature)
    numeric = (isinstance(feature, datasets.Value) and (_is_float_dtype(feature.dtype) or _is_integer_dtype(
        feature.dtype))) or (isinstance(inner, datasets.Value) and (_is_float_dtype(inner.dtype) or
                                                                    _is_integer_dtype(inner.dtype)))
    if not numeric:
        raise UsageError(f"--problem-type regression needs numbers in label column {column!r}, which holds "
                         f"{_describe(feature)} values; pick a numeric column with --label-column")
    out = {}
    for split, rows in raw.items():
        try:
            values = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError(f"label column {column!r} in split '{split}' has rows of different lengths or empty "
                             f"values; regression needs one number (or one vector length) per row") from None
        if not np.isfinite(values).all():
            raise UsageError(f"label column {column!r} has empty or non-finite values in split '{split}'; fill or "
                             f"drop those rows")
        out[split] = values.astype(np.float32)
    width = 1 if out[split_names[0]].ndim == 1 else out[split_names[0]].shape[1]
    names = [column] if width == 1 else [f"{column}[{i}]" for i in range(width)]
    return Targets("regression", names, out[split_names[0]], out.get(split_names[1]), reason)


def _multi_label(feature: object, raw: dict, column: str, split_names: tuple[str, str], reason: str) -> Targets:
    inner = _inner(feature)
    if inner is None or not (isinstance(inner, datasets.ClassLabel) or (
            isinstance(inner, datasets.Value) and (_is_integer_dtype(inner.dtype) or _is_float_dtype(inner.dtype)))):
        raise UsageError(f"--problem-type multi_label_classification needs a list of class ids (or a multi-hot "
                         f"vector) per row in label column {column!r}, which holds {_describe(feature)} values")
    rows = [r for split_rows in raw.values() for r in split_rows]
    lengths = {len(r) for r in rows}
    values = {v for r in rows for v in r}
    multi_hot = not isinstance(inner, datasets.ClassLabel) and len(lengths) == 1 and values <= {0, 1}
    if multi_hot and values and len(rows[0]) > 1:
        width = len(rows[0])
        names = [str(i) for i in range(width)]
        encode = {s: np.asarray(r, dtype=np.float32).reshape(len(r), width) for s, r in raw.items()}
        return Targets("multi_label_classification", names, encode[split_names[0]], encode.get(split_names[1]),
                       reason + " (multi-hot)")
    if isinstance(inner, datasets.ClassLabel):
        names = list(inner.names)
    else:
        top = max((int(v) for v in values), default=0)
        names = [str(i) for i in range(top + 1)]
    out = {}
    for split, split_rows in raw.items():
        hot = np.zeros((len(split_rows), len(names)), dtype=np.float32)
        for i, ids in enumerate(split_rows):
            for label in ids:
                if not float(label).is_integer() or not 0 <= label < len(names):
                    raise UsageError(f"label column {column!r} row {i} of split '{split}' holds class id {label!r}, "
                                     f"but the classes are 0..{len(names) - 1} ({len(names)} names); fix the row or "
                                     f"the column's ClassLabel names")
                hot[i, int(label)] = 1.0
        out[split] = hot
    return Targets("multi_label_classification", names, out[split_names[0]], out.get(split_names[1]), reason)


def standardize(train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    """Regression targets standardized with the training rows' mean and std (a constant target: only centred)."""
    mean = train.astype(np.float64).mean(axis=0)
    std = train.astype(np.float64).std(axis=0)
    std = np.where(std < 1e-12, 1.0, std)
    train, val = ((y - mean) / std for y in (train, val))
    return (train.astype(np.float32), val.astype(np.float32), np.atleast_1d(mean).tolist(),
            np.atleast_1d(std).tolist())


