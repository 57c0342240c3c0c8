"""What a custom `step=` receives as its model: the prepared model, with the plain model's attributes.

`fit` prepares the model with Accelerate; under DDP that wraps it (`DistributedDataParallel`), and
`model.my_head` or `model.config` of the wrapper raises `AttributeError` on 2 processes while it works on 1.
The step cannot simply get the unwrapped module either: DDP's forward is what prepares the gradient
all-reduce, so a forward of the plain module trains each rank on its own gradients without a word.

So a custom step gets `UserModel`: calling it (`model(x)`, or `model.forward(x)`) calls the prepared model,
with DDP's hooks (and autocast, torch.compile) as before; any other attribute (`model.my_head`,
`model.config`, `model.encode`, `model.parameters()`) is the plain model's. On one process, or where the
model is not wrapped (FSDP2 shards the module in place), the step gets the model itself, unchanged.

A submodule or a method called directly (`model.encoder(x)`, `model.encode(x)`) bypasses the wrapper, as
`model.module.encoder(x)` would: under DDP the parameters it uses are not all-reduced by that call. Compute
the training loss through the model's own call; use the rest for what needs no gradient sync (a target
network, a logit scale, a read of the config).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate.utils import extract_model_from_parallel


class UserModel:
    """The prepared model's call, the plain model's attributes (see the module docstring)."""

    __slots__ = ("_wrapped", "_module")

    def __init__(self, wrapped: torch.nn.Module, module: torch.nn.Module) -> None:
        object.__setattr__(self, "_wrapped", wrapped)
        object.__setattr__(self, "_module", module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names UserModel itself does not have
        try:
            return getattr(self._module, name)
        except AttributeError:
            return getattr(self._wrapped, name)  # e.g. DDP's `module`, `no_sync`

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module, name, value)

    def __repr__(self) -> str:
        return f"UserModel({type(self._wrapped).__name__} of {type(self._module).__name__})"

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The plain model."""
        return self._module

    @property
    def wrapped(self) -> torch.nn.Module:
        """The model as Accelerate prepared it."""
        return self._wrapped


def user_model(model: torch.nn.Module) -> Any:
    """`model` itself when nothing wraps it, else a UserModel of the wrapper and the plain model."""
    module = extract_model_from_parallel(model, keep_torch_compile=False)
    return model if module is model else UserModel(model, module)


def user_step(step: Callable | None) -> Callable | None:
    """A custom step that receives `user_model(model)`; the proxy is built once per prepared model."""
    if step is None:
        return None
    cache: dict[int, tuple[Any, Any]] = {}

    def call(model: torch.nn.Module, batch: Any) -> Any:
        hit = cache.get(id(model))
        if hit is None or hit[0] is not model:
            hit = cache[id(model)] = (model, user_model(model))
        return step(hit[1], batch)

    call.__wrapped__ = step  # type: ignore[attr-defined]
    return call
