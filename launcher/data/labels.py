"""Suspicious class labels, said before anything trains (docs/data.md, "Suspicious labels").

- A label column that mixes numbers and other strings (one `cat` among integer ids in a CSV, which the CSV
  reader then types as strings) would otherwise train with classes `['0', '1', 'cat']`: `mixed_labels`
  refuses it in one line that names a few of the odd values and their rows.
- A class with a single example cannot be in both the training and the validation split: `singleton_classes`
  names such classes, for a one-line warning (the run goes on: a rare class is not an error, but its
  validation metrics, or its training, are missing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from launcher.errors import UsageError

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_SHOWN = 3  # odd values named in the refusal, and classes in the warning


def _is_number(value: str) -> bool:
    return _NUMBER.fullmatch(value.strip()) is not None


def mixed_labels(splits: dict[str, np.ndarray], column: str) -> None:
    """Refuse a string label column where some values are numbers and others are not.

    `splits`: each split's label values (strings), in row order. The odd ones out are the fewer kind (the
    words among numbers, or the numbers among words), named with their split and row (counted from 0, as the
    split's rows: a CSV's data rows, its header not counted)."""
    values = {split: np.asarray(v).astype(str) for split, v in splits.items()}
    distinct = set().union(*(np.unique(v).tolist() for v in values.values())) if values else set()
    numeric = {value for value in distinct if _is_number(value)}
    if not numeric or numeric == distinct:
        return
    counts = {True: 0, False: 0}
    for v in values.values():
        hits = np.isin(v, list(numeric))
        counts[True] += int(hits.sum())
        counts[False] += int(len(v) - hits.sum())
    odd_numeric = counts[True] < counts[False]  # the fewer kind is the odd one out (words, on a tie)
    odd: list[tuple[str, int, str]] = []
    for split, v in values.items():
        rows = np.flatnonzero(np.isin(v, list(numeric)) == odd_numeric)[:_SHOWN - len(odd)]
        odd += [(split, int(row), str(v[row])) for row in rows]
    total_odd = counts[odd_numeric]
    usual = "names" if odd_numeric else "numbers"
    kind = "number" if odd_numeric else "non-numeric value"
    shown = ", ".join(f"{value!r} (row {row}{'' if len(splits) == 1 else f' of split {split!r}'})"
                      for split, row, value in odd)
    more = f" and {total_odd - len(odd)} more" if total_odd > len(odd) else ""
    raise UsageError(f"label column {column!r} mixes numbers and strings: {total_odd} {kind}(s) among "
                     f"{counts[not odd_numeric]} {usual}: {shown}{more}; fix or drop those rows, "
                     f"or pick another column with --label-column")


def singleton_classes(names: Sequence[str], train: np.ndarray, val: np.ndarray) -> str | None:
    """The warning line for classes with exactly one example over both splits' class ids, or None."""
    counts = [np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=len(names))[:len(names)]
              for ids in (train, val)]
    single = np.flatnonzero(counts[0] + counts[1] == 1)
    if not len(single):
        return None
    shown = ", ".join(f"{names[i]!r} (in {'training' if counts[0][i] else 'validation'} only)"
                      for i in single[:_SHOWN])
    more = f" and {len(single) - _SHOWN} more" if len(single) > _SHOWN else ""
    return (f"warning: {len(single)} class(es) with a single example, which cannot be in both the training and "
            f"the validation split: {shown}{more}; add examples or drop those rows")
