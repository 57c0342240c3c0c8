"""What turns a raw row into a model input, learnt on the training split and stored with the model.

Two parts:

- `TableEncoder`: tables as people have them. Numeric columns pass through, a missing value (NaN, an empty
  cell) filled with the column's training mean, plus a 0/1 indicator feature for every column that had
  missing values in the training split; string columns are categorical, one-hot encoded over the training
  split's vocabulary (the `MAX_CATEGORIES` most frequent values) plus one `<other>` slot that takes rarer
  values and values never seen in training. The encoded vector is then standardized like any tabular input
  (launcher.data.arrays), with statistics of the encoded training rows.
- `preprocessing.json` (`PREPROCESSING_FILE`): one JSON object that says everything a prediction needs besides
  the weights: the kind of input, its columns, the encoder, the standardization, the image size and mode, the
  label column, the problem type and the class names. `load_splits` builds it (`DataSplits.preprocessing`);
  the recipe stores it in every checkpoint (`trainer_state.json`, `extra.preprocessing`) and in
  `final/preprocessing.json`; `launcher predict` reads it back (docs/predict.md).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launcher.errors import UsageError

PREPROCESSING_FILE = "preprocessing.json"
PREPROCESSING_FORMAT = 1
MAX_CATEGORIES = 32  # one-hot slots per categorical column, besides <other>
OTHER = "<other>"


def _as_float(part: np.ndarray, name: str) -> np.ndarray:
    """A numeric column as float64, None (an empty cell of an object column) as NaN."""
    if part.dtype != object:
        return part.astype(np.float64, copy=False)
    try:
        return np.array([np.nan if v is None else float(v) for v in part], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise UsageError(f"column {name!r} holds non-numeric values ({error}); the model was trained on numbers "
                         f"in it") from error


def _category(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


@dataclass
class TableEncoder:
    """Raw table columns -> one float32 feature vector per row (see the module docstring)."""

    columns: list[str]  # the input columns, in order
    fill: dict[str, float | None] = field(default_factory=dict)  # numeric column -> training mean (None: no impute)
    indicators: list[str] = field(default_factory=list)  # numeric columns with a missing-value indicator
    categories: dict[str, list[str | None]] = field(default_factory=dict)  # categorical column -> vocabulary

    @property
    def features(self) -> list[str]:
        """The names of the encoded features, in order: `col`, `col__missing`, `col=value`, `col=<other>`."""
        names: list[str] = []
        for column in self.columns:
            if column in self.categories:
                names += [f"{column}={'<missing>' if v is None else v}" for v in self.categories[column]]
                names.append(f"{column}={OTHER}")
            else:
                names.append(column)
                if column in self.indicators:
                    names.append(f"{column}__missing")
        return names

    @property
    def width(self) -> int:
        return len(self.features)

    def encode(self, parts: list[np.ndarray]) -> np.ndarray:
        """(rows, width) float32 from the raw columns (one array per column of `columns`, in order)."""
        rows = len(parts[0]) if parts else 0
        out = np.zeros((rows, self.width), dtype=np.float32)
        at = 0
        for column, part in zip(self.columns, parts):
            if column in self.categories:
                vocabulary = self.categories[column]
                slot = {v: i for i, v in enumerate(vocabulary)}
                other = len(vocabulary)
                ids = np.fromiter((slot.get(_category(v), other) for v in part), dtype=np.int64, count=rows)
                out[np.arange(rows), at + ids] = 1.0
                at += other + 1
                continue
            values = _as_float(part, column)
            missing = np.isnan(values)
            fill = self.fill.get(column)
            if fill is not None and missing.any():
                values = np.where(missing, fill, values)
            out[:, at] = values
            at += 1
            if column in self.indicators:
                out[:, at] = missing
                at += 1
        return out

    def describe(self) -> str:
        """One line for the run's first lines."""
        numeric = [c for c in self.columns if c not in self.categories]
        text = f"features: {len(numeric)} numeric"
        if self.indicators:
            text += f" ({len(self.indicators)} with missing values, filled with training means + indicators)"
        elif numeric and any(v is None for v in self.fill.values()):
            text += " (missing values not filled: --no-impute)"
        if self.categories:
            shown = "; ".join(f"{c}: {len(v)} categories + {OTHER}, one-hot" for c, v in self.categories.items())
            text += f", {len(self.categories)} categorical ({shown})"
        return text + f" -> {self.width} inputs"

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "fill": dict(self.fill), "indicators": list(self.indicators),
                "categories": {c: list(v) for c, v in self.categories.items()}, "features": self.features}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableEncoder:
        return cls(list(data["columns"]), dict(data.get("fill", {})), list(data.get("indicators", [])),
                   {c: list(v) for c, v in data.get("categories", {}).items()})


def fit_table_encoder(columns: list[str], categorical: set[str], parts: list[np.ndarray], *,
                      impute: bool = True) -> TableEncoder:
    """The encoder of the training rows' raw columns (`parts`, one array per column); `categorical`: the
    string columns. Without `impute`, missing numeric values stay NaN (and the finiteness check refuses them)."""
    encoder = TableEncoder(list(columns))
    for column, part in zip(columns, parts):
        if column in categorical:
            counts = Counter(_category(v) for v in part)
            if len(counts) > MAX_CATEGORIES and len(counts) > len(part) / 2:  # sentences, ids: not categories
                raise UsageError(f"column {column!r} holds free text ({len(counts)} distinct values in {len(part)} "
                                 f"training rows), not categories: train a text model on it with --model "
                                 f"hf:NAME_OR_PATH (--text-columns {column}), or drop the column")
            top = sorted(counts, key=lambda v: (-counts[v], v is None, str(v)))[:MAX_CATEGORIES]
            encoder.categories[column] = sorted(top, key=lambda v: (v is None, str(v)))
            continue
        values = _as_float(part, column)
        missing = np.isnan(values)
        if not impute:
            encoder.fill[column] = None
            continue
        seen = values[~missing]
        encoder.fill[column] = float(seen.mean()) if len(seen) else 0.0
        if missing.any():
            encoder.indicators.append(column)
    return encoder


# ---------------------------------------------------------------------------------------------------------
# preprocessing.json


def read_preprocessing(path: Path) -> dict[str, Any]:
    """The preprocessing of a run: `path` is a preprocessing.json file, a final/ folder, a run folder (its
    final/) or a checkpoint folder (trainer_state.json's extra.preprocessing)."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / PREPROCESSING_FILE, path / "final" / PREPROCESSING_FILE]
    for candidate in candidates:
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError) as error:
                raise UsageError(f"cannot read {candidate}: {error}") from error
            return _checked(data, candidate)
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            data = json.loads(state.read_text()).get("extra", {}).get("preprocessing")
        except (OSError, ValueError, AttributeError) as error:
            raise UsageError(f"cannot read {state}: {error}") from error
        if data:
            return _checked(data, state)
    raise UsageError(f"{path} holds no {PREPROCESSING_FILE} (nor a checkpoint's extra.preprocessing): it was "
                     f"trained before models carried their preprocessing, or is not a run folder, final/ or "
                     f"checkpoint; train it again with this version")


def _checked(data: Any, where: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or "kind" not in data:
        raise UsageError(f"{where} is not a preprocessing description (no 'kind')")
    if data.get("format", 1) > PREPROCESSING_FORMAT:
        raise UsageError(f"{where} has preprocessing format {data['format']}, newer than this launcher's "
                         f"{PREPROCESSING_FORMAT}; upgrade the launcher")
    return data
