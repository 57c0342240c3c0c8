"""`load_splits`: the one pipeline every (non-streaming) source goes through, and `DataSplits`, what it returns.

The steps are listed in the package docstring (launcher.data); each step's code lives in its own module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from torch.utils.data import Dataset

from launcher.data.arrays import _ColumnStore, _input_spec, _standardized
from launcher.data.images import AugmentedDataset, Augmenter, check_augment, lazy_image_splits
from launcher.data import targets as target_types
from launcher.data.preprocess import PREPROCESSING_FORMAT, fit_table_encoder
from launcher.data.sources import (
    _array_depth,
    _detect_image_column,
    _find_label_column,
    _load_train_val,
    _quiet,
    _require_same_columns,
    _stratified_split,
)
from launcher.data.text import TextOptions, find_text_columns, text_needs_model, tokenized_splits
from launcher.errors import UsageError


@dataclass
class DataSplits:
    """Standardized train/val datasets (feed them to make_loader) and what a model needs to know."""

    train: Dataset
    val: Dataset
    num_classes: int  # the model's outputs: classes, labels (multi-label) or targets (regression)
    input_shape: tuple[int, ...]  # per sample: (C, H, W) for images, (F,) for tabular, () for text
    class_names: list[str]
    name: str
    # What the recipe may want to log or save: where validation came from and the standardization used.
    val_source: str = ""
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    kind: str = ""  # "image", "tabular" or "text"
    preprocessor: Any = None  # the tokenizer or image processor that made the inputs (an HF model keeps it)
    problem_type: str = "single_label_classification"  # launcher.data.targets: what the label column asks
    problem_reason: str = ""  # why that type (detected from the column, or --problem-type)
    target_mean: list[float] = field(default_factory=list)  # regression: the standardization of the targets
    target_std: list[float] = field(default_factory=list)
    # What turns a raw row into an input, stored with the model (launcher.data.preprocess, preprocessing.json)
    preprocessing: dict = field(default_factory=dict)
    features_line: str = ""  # tabular: one line on the numeric and categorical features and missing values



def load_splits(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    augment: str = "none",
    image_size: int | None = None,
    image_mean: Sequence[str] | None = None,
    image_std: Sequence[str] | None = None,
    dataset_config: str | None = None,
    text_columns: list[str] | None = None,
    text: TextOptions | None = None,
    problem_type: str | None = None,
    categorical: bool = True,
    impute: bool = True,
) -> DataSplits:
    """Load `dataset` ('digits', a local path, or a Hub name) as standardized train/val splits.

    Image columns stay undecoded until a batch asks for them (launcher.data.images); `augment` applies to the
    training split of image inputs only.


    dataset_config: the configuration of a Hub dataset that has several (load_dataset's `name`).
    Text inputs (--text-columns, or string columns when no image column is found) are tokenized with
    `text`'s tokenizer (launcher.data.text); without `text` they are refused.
    problem_type: forces the problem type (default: detected from the label column, launcher.data.targets).
    categorical / impute: tables' string columns one-hot encoded, missing numbers filled with the training
    mean plus an indicator (launcher.data.preprocess); False refuses them instead.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    check_augment(augment)
    with _quiet():
        train, val, split_names = _load_train_val(dataset, dataset_config)
        columns = list(train.features)
        label_col = _find_label_column(train.features, label_column, image_column)
        text_cols = []
        if text_columns or (image_column is None and _detect_image_column(train.features, label_col) is None):
            text_cols = find_text_columns(train.features, label_col, text_columns)
        if text_cols and text is None:
            if all(_array_depth(train.features[c]) is None for c in columns if c not in (label_col, *text_cols)):
                raise UsageError(text_needs_model(text_cols))
            text_cols = []  # numeric columns too: perhaps meant as tabular, and the tabular error says both
        if val is not None:
            _require_same_columns(val, columns, split_names)

        found = target_types.encode(train, val, label_col, split_names, problem_type)
        class_names, train_labels, val_labels = found.names, found.train, found.val
        single = found.problem_type == "single_label_classification"
        if val is None:
            # Carved validation rows stay in the same table as the training rows; only row numbers differ.
            train_rows, val_rows = (_stratified_split(train_labels, val_fraction, seed) if single
                                    else _random_split(len(train_labels), val_fraction, seed))
            train_labels, val_labels = train_labels[train_rows], train_labels[val_rows]
            val_source = f"{val_fraction:g} of split '{split_names[0]}' ({'stratified, ' if single else ''}seed {seed})"
        else:
            train_rows, val_rows = np.arange(len(train)), np.arange(len(val))
            val_source = f"split '{split_names[1]}'"
            for split, size in zip(split_names, (len(train), len(val))):
                if size == 0:
                    raise UsageError(f"split '{split}' of {dataset!r} is empty")
        target_mean, target_std = [], []
        if found.problem_type == "regression":
            train_labels, val_labels, target_mean, target_std = target_types.standardize(train_labels, val_labels)
        typed = dict(problem_type=found.problem_type, problem_reason=found.reason, target_mean=target_mean,
                     target_std=target_std)
        stored = {"format": PREPROCESSING_FORMAT, "label_column": label_col, "problem_type": found.problem_type,
                  "class_names": list(class_names), "target_mean": list(target_mean),
                  "target_std": list(target_std)}
        if text_cols:
            train_ds, val_ds = tokenized_splits(text, text_cols, (train, train_rows, train_labels),
                                                (train if val is None else val, val_rows, val_labels))
            return DataSplits(train=train_ds, val=val_ds, num_classes=len(class_names), input_shape=(),
                              class_names=class_names, name=dataset, val_source=val_source, kind="text",
                              preprocessor=text.tokenizer, preprocessing={**stored, **text.stored(),
                                                                          "kind": "text",
                                                                          "text_columns": list(text_cols)},
                              **typed)

        column = image_column or _detect_image_column(train.features, label_col)
        if column is not None and isinstance(train.features[column], datasets.Image):
            train_ds, val_ds, shape, mean, std = lazy_image_splits(
                train, train if val is None else val, column, (train_rows, train_labels), (val_rows, val_labels),
                seed=seed, augment=augment, image_size=image_size, image_mean=image_mean, image_std=image_std)
            kind = "image"
            stored.update(kind="encoded_images", image_column=column, mode=train_ds.mode, size=list(train_ds.size))
        else:
            spec, train_table, val_table = _input_spec(train, val, label_col, image_column, categorical)
            train_store = _ColumnStore(train_table, spec)
            val_store = train_store if val_table is None else _ColumnStore(val_table, spec)
            if spec.kind == "tabular":  # fills, indicators and vocabularies: from the training rows only
                spec.encoder = fit_table_encoder(spec.columns, set(spec.categorical), train_store.raw(train_rows),
                                                 impute=impute)
                spec.shape = (spec.encoder.width,)
                stored["encoder"] = spec.encoder.to_json()
            stored.update(kind=spec.kind, columns=list(spec.columns), stored_shape=list(spec.stored_shape),
                          transpose=None if spec.transpose is None else list(spec.transpose), scale=spec.scale)
            train_ds, val_ds, mean, std = _standardized(
                spec, (train_store, train_rows, train_labels), (val_store, val_rows, val_labels)
            )
            shape, kind = spec.shape, spec.kind
            if augment != "none":
                if spec.kind != "image":
                    raise UsageError(f"--augment {augment} needs image inputs; this dataset's inputs are tabular")
                train_ds = AugmentedDataset(train_ds, Augmenter(augment, shape[1], shape[2]), seed)
    stored.update(input_shape=list(shape), mean=mean.flatten().tolist(), std=std.flatten().tolist())
    return DataSplits(
        train=train_ds,
        val=val_ds,
        num_classes=len(class_names),
        input_shape=shape,
        class_names=class_names,
        name=dataset,
        val_source=val_source,
        mean=mean.flatten().tolist(),
        std=std.flatten().tolist(),
        kind=kind,
        preprocessing=stored,
        features_line=spec.encoder.describe() if kind == "tabular" and spec.encoder is not None else "",
        **typed,
    )


def _random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (seed) split of rows that have no single class to stratify by; sorted row indices."""
    if n < 2:
        raise UsageError(f"the dataset has {n} row(s); at least 2 are needed to carve a validation split")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
