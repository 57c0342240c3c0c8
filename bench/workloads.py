"""The two benchmark workloads: the same data, model, batch size, optimizer and seed for every loop.

Both datasets go through the recipe's own pipeline (a `datasets.Dataset` written with save_to_disk, read by
`launcher.data.load_splits`), so every loop trains on exactly the tensors the recipe would: the peers get
them as a `TensorDataset` behind a standard `DataLoader`, the leanest loop as plain tensors, and the
recipe's data path as the `BatchedDataset`s `load_splits` returns.

- mlp: overhead-bound. The 8x8 handwritten digits plus their four one-pixel shifts (8985 images), the
  recipe's MLP, batches of 32: per step the model costs about as much as the Python around it.
- cnn: compute-bound. The digits upsampled to 32x32 RGB, the recipe's small CNN, batches of 64.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from launcher.data import DataSplits, batched_collate, load_splits, make_loader
from launcher.models.builtin import build_model

LR, WEIGHT_DECAY = 1e-3, 0.01  # the recipe's AdamW defaults


@dataclass
class Workload:
    name: str
    model_name: str
    batch_size: int
    splits: DataSplits
    description: str

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_train, y_train, x_val, y_val): the standardized tensors load_splits produced."""
        tr, va = self.splits.train, self.splits.val
        return tr.inputs, tr.labels, va.inputs, va.labels

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # the same initial weights for every loop
        return build_model(self.model_name, self.splits.input_shape, self.num_classes)

    @staticmethod
    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def peer_loaders(self, seed: int) -> tuple[DataLoader, DataLoader]:
        """What the seed tutorial, Accelerate's examples and Lightning's docs use: a DataLoader over a
        TensorDataset (per-sample __getitem__ plus default_collate)."""
        x, y, xv, yv = self.tensors()
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True, generator=generator)
        return train, DataLoader(TensorDataset(xv, yv), batch_size=self.batch_size, shuffle=False)

    def plain_recipe_loaders(self, seed: int) -> tuple[DataLoader, DataLoader]:
        """The recipe's datasets behind plain DataLoaders (what make_loader built before ElasticBatchSampler)."""
        generator = torch.Generator().manual_seed(seed)
        return (DataLoader(self.splits.train, batch_size=self.batch_size, shuffle=True, generator=generator,
                           collate_fn=batched_collate),
                DataLoader(self.splits.val, batch_size=self.batch_size, shuffle=False, collate_fn=batched_collate))

    def recipe_loaders(self) -> tuple[DataLoader, DataLoader]:
        """The recipe's loaders over load_splits' datasets (one __getitems__ per batch)."""
        return (make_loader(self.splits.train, self.batch_size, shuffle=True),
                make_loader(self.splits.val, self.batch_size, shuffle=False))


def _shifted_digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits (N, 8, 8) in [0, 1] and labels, with copies shifted one pixel up, down, left and right."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    out, labels = [images], [bunch.target]
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        shifted = np.roll(images, step, axis=axis)
        edge = [slice(None)] * 3
        edge[axis] = 0 if step == 1 else -1
        shifted[tuple(edge)] = 0.0  # shift in blank pixels instead of wrapping around
        out.append(shifted)
        labels.append(bunch.target)
    return np.concatenate(out), np.concatenate(labels).astype(np.int64)


def _upsampled_rgb(images: np.ndarray, size: int, seed: int) -> np.ndarray:
    """(N, 8, 8) in [0, 1] -> (N, 3, size, size) uint8, bilinear, each image with a random colour tint."""
    x = torch.from_numpy(images).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    tint = torch.from_numpy(np.random.default_rng(seed).uniform(0.5, 1.0, size=(len(images), 3, 1, 1)))
    return (x * tint * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _save(root: Path, name: str, inputs: np.ndarray, labels: np.ndarray, array_type: type, dtype: str) -> str:
    features = datasets.Features({
        "image": array_type(shape=inputs.shape[1:], dtype=dtype),
        "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
    })
    path = root / name
    datasets.Dataset.from_dict({"image": inputs, "label": labels}, features=features).save_to_disk(str(path))
    return str(path)


def build_workloads(names: list[str], *, mlp_samples: int | None = None, cnn_samples: int = 800,
                    seed: int = 0, root: Path | None = None) -> dict[str, Workload]:
    """Workloads by name; `*_samples` caps the dataset size (train + val) for quick runs."""
    root = Path(root or tempfile.mkdtemp(prefix="launcher-bench-"))
    images, labels = _shifted_digits()
    order = np.random.default_rng(seed).permutation(len(labels))  # a size cap keeps every class and shift
    images, labels = images[order], labels[order]
    built = {}
    datasets.disable_progress_bars()
    if "mlp" in names:
        n = min(mlp_samples or len(labels), len(labels))
        path = _save(root, "digits-shifted", images[:n], labels[:n], datasets.Array2D, "float32")
        built["mlp"] = Workload("mlp", "mlp", 32, load_splits(path, seed=seed),
                                f"MLP (64-256-256-10) on 8x8 digits + shifts, {n} images, batch 32")
    if "cnn" in names:
        n = min(cnn_samples, len(labels))
        path = _save(root, "digits-32px", _upsampled_rgb(images[:n], 32, seed), labels[:n], datasets.Array3D, "uint8")
        built["cnn"] = Workload("cnn", "cnn", 64, load_splits(path, seed=seed),
                                f"small CNN (4 conv 32/64) on 32x32 RGB digits, {n} images, batch 64")
    return built
