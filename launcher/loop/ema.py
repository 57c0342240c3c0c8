"""`EMA(decay)`: an exponential moving average of the weights, as a `fit` callback (the recipes' `--ema DECAY`).

After every optimizer step: `ema = decay * ema + (1 - decay) * weights`, over every parameter and floating-point
buffer, in float32 (one `torch._foreach_lerp_`; integer buffers such as BatchNorm's `num_batches_tracked` are
copied). It starts from the weights at the first step of the run (as timm's ModelEmaV3 without warm-up).

- Validated: each epoch's row gets `val_ema_*` beside `val_*` (the EMA weights are copied into the model for
  one more validation and the training weights copied back, bit for bit). `checkpoints/best`, early stopping
  and `--best-metric` follow the training weights' `val_*` metrics.
- Exported: **at the end of training the EMA weights are copied into the model**, so `final/model.safetensors`
  (and `final/hf/`, the returned model, what `--eval-only` of final/ scores) is the EMA model: what timm and
  Lightning's weight averaging evaluate and ship. The training weights of the last step stay in the last
  checkpoint's `model.safetensors`; every checkpoint holds both (`callbacks.safetensors`: `ema/NAME`).
- Resumed exactly: the EMA is part of every checkpoint, so a killed and resumed run ends bit-identical, EMA
  included. Under DDP every rank keeps its own copy (the parameters are the same on every rank, so is their
  EMA; floating buffers, which DDP lets differ between ranks, are made rank 0's at every save, validation and
  at the end, one broadcast, only when the model has such buffers).
- FSDP2 (sharded parameters, DTensors): each rank keeps the EMA of its own shards only (a float32 DTensor with
  the parameter's placements; the update runs on the local shards), so its memory is the shard's. It is saved
  in the sharded (DCP) checkpoint beside the model (`callbacks.ema/NAME`), so DCP reshards it: a resume on the
  same world size is bit-identical, on another it continues from the loaded EMA. final/ holds the gathered EMA.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator

import torch
import torch.distributed as dist

from launcher.errors import UsageError
from launcher.loop.callbacks import Callback, CallbackRun

_JSON_KEYS = ("decay", "updates")


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise). Called anew each time: FSDP2 may point a
    sharded parameter at new local storage (at its lazy init, after a state-dict load)."""
    with torch.no_grad():
        return t.to_local() if _is_dtensor(t) else t.detach()


def _shadow_of(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy (a DTensor of the same mesh and placements for a DTensor: only the local shard is held)."""
    local = _local(t)
    copy = local.to(torch.float32, copy=True) if local.is_floating_point() else local.clone()
    if not _is_dtensor(t):
        return copy
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(copy, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


class EMA(Callback):
    """An exponential moving average of the model's weights (see the module docstring); `decay` in (0, 1),
    e.g. 0.999. `ema.weights()` gives the averaged weights by name."""

    name = "ema"

    def __init__(self, decay: float) -> None:
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ValueError(f"EMA decay must be between 0 and 1, e.g. 0.999 (got {decay!r})")
        self.decay = float(decay)
        self.updates = 0
        self.names: list[str] = []
        self.shadow: list[torch.Tensor] = []  # float32 for floating tensors, in `names` order
        self._live: list[torch.Tensor] = []  # the model's tensors (detached views), same order
        self._float: list[int] = []  # indices of floating tensors
        self._other: list[int] = []  # integer buffers: copied
        self._buffers: list[int] = []  # indices of floating buffers (may differ between DDP ranks)

    # ---- the hooks
    def on_train_start(self, run: CallbackRun) -> None:
        model = run.model
        params = list(model.named_parameters())
        buffers = list(model.named_buffers())
        self.names = [n for n, _ in params] + [n for n, _ in buffers]
        clash = set(self.names) & set(_JSON_KEYS)
        if clash:
            raise ValueError(f"EMA: the model has tensors named {sorted(clash)}, which EMA's state uses")
        tensors = [t for _, t in params] + [t for _, t in buffers]
        # DTensors (FSDP2) are kept as the parameters themselves, their local shards looked up at each use
        self._dtensor = any(_is_dtensor(t) for t in tensors)
        self._live = [t if _is_dtensor(t) else t.detach() for t in tensors]
        self._float = [i for i, t in enumerate(self._live) if t.is_floating_point()]
        self._other = [i for i, t in enumerate(self._live) if not t.is_floating_point()]
        self._buffers = [i for i in range(len(params), len(self._live))
                         if self._live[i].is_floating_point() and not _is_dtensor(self._live[i])]
        self.shadow = [_shadow_of(t) for t in self._live]
        self.updates = 0
        self._shadow_float = [_local(self.shadow[i]) for i in self._float]
        self._live_float = [self._live[i] for i in self._float]
        self._cast = any(t.dtype != torch.float32 for t in self._live_float)

    @torch.no_grad()
    def on_step_end(self, run: CallbackRun) -> None:
        live = [_local(t) for t in self._live_float] if self._dtensor else self._live_float
        live = [t.float() for t in live] if self._cast else live
        if live:
            torch._foreach_lerp_(self._shadow_float, live, 1.0 - self.decay)
        for i in self._other:
            _local(self.shadow[i]).copy_(_local(self._live[i]))
        self.updates += 1

    def on_validation_end(self, run: CallbackRun, row: dict) -> None:
        self._sync_buffers()
        with self.swapped_in():
            metrics = run.evaluate()
        row.update({k: v for k, v in metrics.as_row("val_ema").items()
                    if not isinstance(v, (list, tuple)) and k not in ("val_ema_samples", "val_ema_tokens")})

    def on_save(self, run: CallbackRun) -> dict:
        self._sync_buffers()
        return self.state_dict()

    def on_train_end(self, run: CallbackRun) -> None:
        self._sync_buffers()
        self.copy_to_model()

    # ---- state
    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, **dict(zip(self.names, self.shadow))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state.items() if k not in _JSON_KEYS}
        missing, unexpected = sorted(set(self.names) - set(saved)), sorted(set(saved) - set(self.names))
        shapes = [n for n, s in zip(self.names, self.shadow) if n in saved and saved[n].shape != s.shape]
        if missing or unexpected or shapes:
            raise UsageError("the checkpoint's EMA weights do not fit the model: " + "; ".join(
                [f"missing {', '.join(missing[:5])}"] * bool(missing) + [f"unexpected {', '.join(unexpected[:5])}"]
                * bool(unexpected) + [f"other shapes for {', '.join(shapes[:5])}"] * bool(shapes)))
        if float(state.get("decay", self.decay)) != self.decay:
            warnings.warn(f"EMA decay {self.decay} from now on; the checkpoint's average was built with "
                          f"{state['decay']}", stacklevel=2)
        for name, tensor in zip(self.names, self.shadow):
            if saved[name] is not tensor:  # under FSDP2 DCP loaded into the shadow itself
                _local(tensor).copy_(_local(saved[name]) if _is_dtensor(saved[name]) else saved[name])
        self.updates = int(state.get("updates", 0))

    # ---- the averaged weights
    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged parameters and buffers by name (float32; integer buffers as the model's; under FSDP2
        DTensors holding this rank's shards, `full_tensor()` gathers one)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Copy the EMA weights into the model (cast to its dtypes)."""
        for live, shadow in zip(self._live, self.shadow):
            _local(live).copy_(_local(shadow))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the model for the block; the model's own weights back afterwards, bit for bit."""
        with torch.no_grad():
            saved = [_local(t).clone() for t in self._live]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for live, old in zip(self._live, saved):
                    _local(live).copy_(old)

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Floating buffers' EMA as rank 0's on every rank (DDP lets buffers differ between ranks); parameters
        are the same on every rank already. Nothing to do for a model without floating buffers."""
        if not self._buffers or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for i in self._buffers:
            dist.broadcast(self.shadow[i], src=0)
