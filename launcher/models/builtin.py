"""The recipe's models: three built-ins sized for small inputs, or any `module.path:factory` of the user's.

All are deterministic given the torch seed, and use no in-place operations on activations that autograd or
DDP's gradient hooks could trip over.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import torch
from torch import nn

from launcher.errors import UsageError

MODEL_NAMES = ("mlp", "cnn", "resnet")
_MIN_SIDE = 8  # the conv models pool twice; smaller images are better served by the mlp


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model `name` (one of MODEL_NAMES or 'module.path:factory') for inputs of `input_shape`."""
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 1:
        raise UsageError(f"the model needs at least one class (got num_classes={num_classes})")
    if name == "mlp":
        return MLP(input_shape, num_classes)
    if name in ("cnn", "resnet"):
        channels = _image_channels(name, input_shape)
        return SmallCNN(channels, num_classes) if name == "cnn" else ResNet(channels, num_classes)
    if ":" in name:
        return _from_factory(name, input_shape, num_classes)
    raise UsageError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or 'module.path:factory' "
        f"(a function called with input_shape= and num_classes= that returns a torch.nn.Module)"
    )


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise UsageError(
            f"--model {name} needs image inputs (C, H, W) but the dataset gives inputs of shape "
            f"{input_shape}; use --model mlp for tabular data"
        )
    channels, height, width = input_shape
    if min(height, width) < _MIN_SIDE:
        raise UsageError(
            f"--model {name} needs images of at least {_MIN_SIDE}x{_MIN_SIDE} (got {height}x{width}); use --model mlp"
        )
    return channels


class MLP(nn.Module):
    """Flatten, two hidden layers with ReLU and dropout, linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        features = 1
        for dim in input_shape:
            features *= dim
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Two conv-bn-relu pairs per stage (32, 64 channels) with 2x2 max-pooling, global average pool, linear.

    Works for any image of at least 8x8: the pools halve 8x8 to 2x2, and the average pool takes any size.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            *_conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            GlobalAvgPool(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GlobalAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d(1) as a mean: the same numbers, and a backward with no atomic adds, so the model
    runs under --deterministic on a GPU (torch has no deterministic CUDA backward for adaptive pooling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1 projection) shortcut, as in He et al. 2016."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))  # out-of-place add: autograd keeps both inputs intact


class ResNet(nn.Module):
    """CIFAR-style ResNet-20: a 3x3 stem, 3 stages of 3 BasicBlocks (16, 32, 64 channels), global pool."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, widths[0]))
        stages: list[nn.Module] = []
        cin = widths[0]
        for index, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(cin, width, stride))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(GlobalAvgPool(), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


def _from_factory(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise UsageError(f"--model {spec!r}: write it as 'module.path:factory' (e.g. mymodels:build)")
    module = _import(module_name, spec)
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise UsageError(f"--model {spec!r}: module {module_name!r} has no attribute {factory_name!r}")
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {factory_name!r} is not callable; name a function or class")
    try:
        inspect.signature(factory).bind(input_shape=input_shape, num_classes=num_classes)
    except TypeError:
        raise UsageError(
            f"--model {spec!r}: {factory_name} must accept the keyword arguments input_shape and num_classes"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): just call it
        pass
    model = factory(input_shape=input_shape, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r}: {factory_name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(module_name: str, spec: str):
    """Import a dotted module (the working directory is importable, as with `python -m`) or a .py file."""
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise UsageError(f"--model {spec!r}: file {module_name!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)  # so pickling/checkpointing can find its classes
        module_spec.loader.exec_module(module)
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing *named* module is a usage error; a missing dependency inside it keeps its traceback.
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise
        raise UsageError(
            f"--model {spec!r}: cannot import module {module_name!r}; run from the folder that contains it "
            f"or add that folder to PYTHONPATH"
        ) from None
