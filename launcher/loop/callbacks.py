"""Callbacks on `fit`: typed hooks into the epoch loop, with their state saved in every checkpoint.

    class PrintLR(Callback):
        def on_validation_end(self, run, row):
            row["lr_x1000"] = run.optimizer.param_groups[0]["lr"] * 1000  # a key of its own in the row

    fit(..., callbacks=[PrintLR(), EMA(0.999)])

A `Callback` has no-op methods; override the ones you need. `run` (`CallbackRun`) is a view of the training
run: the unwrapped model, the optimizer, the accelerator, the state (epoch, global_step), and `evaluate()`.
Every rank calls every hook, in the same order, so a hook may run collectives.

When hooks run (docs/callbacks.md): `on_train_start` once per `fit` call, after a resume restored the model and
before the callbacks' own state is restored (`on_load`); `on_step_end` after each optimizer step; at each epoch
end `on_validation_end(run, row)` after the validation and before the row is recorded (metrics.jsonl, the
tracker), so a callback may add keys to it; `on_save` at every checkpoint; `on_train_end` once training is
complete (not after a preemption or divergence), before final/ is written.

A callback's state: `state_dict()` returns a flat dict of tensors and plain JSON values (`on_save` returns it
by default), `load_state_dict()` receives the same dict back (`on_load` by default). Tensors go into
`callbacks.safetensors` of the checkpoint (under `NAME/KEY`), listed in the manifest with size and sha256 like
every other file; the rest into `trainer_state.json` (`extra.callbacks.NAME`). Each callback is keyed by its
`name` (default: its class name), which must be unique and stable across relaunches. Rank 0's state is saved
and every rank loads it: state that differs between ranks must be made equal in `on_save` (EMA does so).
Under FSDP2 the tensors (DTensors stay sharded) go into the sharded checkpoint's DCP state dict instead, as
`callbacks.NAME/KEY`, and are loaded by DCP after `on_train_start` into what `state_dict()` returns then
(resharded on any world size).
With no callback the loop pays nothing per step (the hooks are not even looked up).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from launcher.checkpoint.layout import CheckpointError

if TYPE_CHECKING:
    from launcher.loop.state import FitRun

CALLBACKS_FILE = "callbacks.safetensors"
EXTRA_KEY = "callbacks"  # TrainerState.extra["callbacks"][name]: each callback's JSON state


class Callback:
    """Hooks into `fit`; every method is a no-op. See the module docstring for when each runs."""

    name: str | None = None  # the key of this callback's state in checkpoints (default: the class name)

    def on_train_start(self, run: CallbackRun) -> None:
        """Once per `fit` call, after a resume restored the model and before `on_load`."""

    def on_step_end(self, run: CallbackRun) -> None:
        """After every optimizer step (`run.global_step` counts it already)."""

    def on_validation_end(self, run: CallbackRun, row: dict) -> None:
        """After each epoch's validation, before `row` is recorded: keys added to `row` are recorded with it."""

    def on_save(self, run: CallbackRun) -> dict:
        """The state to checkpoint (every rank calls it; rank 0's is written): `state_dict()` by default."""
        return self.state_dict()

    def on_load(self, run: CallbackRun, state: dict) -> None:
        """Restore what `on_save` returned (on every rank, after `on_train_start`): `load_state_dict` by default."""
        self.load_state_dict(state)

    def on_train_end(self, run: CallbackRun) -> None:
        """Once training is complete (also for a relaunch of a finished run), before final/ is written."""

    def state_dict(self) -> dict:
        """A flat dict of tensors and JSON values (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Receives `state_dict()`'s dict back, exactly (tensors on the CPU)."""


class CallbackRun:
    """What a callback sees of the run. Treat it as read-only, except `row` in `on_validation_end` and the
    model's weights where a callback means to change them (EMA swaps its weights in and back out)."""

    def __init__(self, run: FitRun, evaluate: Callable[[], Any]) -> None:
        self._run, self._evaluate = run, evaluate

    @property
    def accelerator(self) -> Any:
        return self._run.accelerator

    @property
    def model(self) -> torch.nn.Module:
        """The plain model (no DDP wrapper; under FSDP2 the sharded module itself, its parameters DTensors)."""
        return self._run.accelerator.unwrap_model(self._run.model, keep_torch_compile=False)

    @property
    def wrapped_model(self) -> torch.nn.Module:
        """The model as Accelerate prepared it (call this one for a forward pass that trains)."""
        return self._run.model

    @property
    def optimizer(self) -> Any:
        return self._run.optimizer

    @property
    def state(self) -> Any:
        """The launcher.checkpoint.TrainerState: epoch, batches_done, global_step, history, best_value, ..."""
        return self._run.state

    @property
    def epoch(self) -> int:
        """Index of the epoch in progress (0-based)."""
        return self._run.state.epoch

    @property
    def global_step(self) -> int:
        return self._run.state.global_step

    @property
    def output_dir(self) -> Path | None:
        return self._run.output_dir

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (FSDP2): its parameters are DTensors, each rank holds its shards."""
        from launcher.checkpoint.sharded import is_sharded_model

        return is_sharded_model(self._run.model)

    def evaluate(self) -> Any:
        """Validate the model's current weights as the epoch's validation does (every rank must call it):
        the task's metrics (`.as_row("val")` gives the row's keys)."""
        return self._evaluate()


def _name_of(callback: Callback) -> str:
    return callback.name or type(callback).__name__


class Callbacks:
    """The callbacks of one `fit` call, dispatched in the order given. `fit` keeps None when there are none."""

    def __init__(self, callbacks: Sequence[Callback], run: FitRun, evaluate: Callable[[], Any]) -> None:
        self.items = list(callbacks)
        names = [_name_of(c) for c in self.items]
        for c in self.items:
            if not isinstance(c, Callback):
                raise TypeError(f"callbacks must be launcher.Callback instances, not {type(c).__name__}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two callbacks are named {', '.join(duplicates)}: give each a unique `name` (the key "
                             f"of its state in checkpoints)")
        self.names = names
        self.run = run
        self.view = CallbackRun(run, evaluate)
        self.pending: tuple[dict, dict[str, torch.Tensor]] | None = None  # (JSON, tensors) read by a resume
        self.sharded_from: Path | None = None  # a sharded checkpoint: the tensors are loaded (DCP) at train_start
        # The per-step hook, bound once: only callbacks that override it are called.
        self._step_hooks = [c.on_step_end for c in self.items if type(c).on_step_end is not Callback.on_step_end]

    def train_start(self) -> None:
        for c in self.items:
            c.on_train_start(self.view)
        if self.pending is not None:
            json_state, tensors = self.pending
            self.pending = None
            if self.sharded_from is not None:
                tensors = self._load_sharded(self.sharded_from)
            self._restore(json_state, tensors)

    def step_end(self) -> None:
        for hook in self._step_hooks:
            hook(self.view)

    def validation_end(self, row: dict) -> None:
        for c in self.items:
            c.on_validation_end(self.view, row)

    def train_end(self) -> None:
        for c in self.items:
            c.on_train_end(self.view)

    def collect(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Every callback's state split into (JSON by name, tensors as NAME/KEY on the CPU)."""
        json_state: dict[str, dict] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, c in zip(self.names, self.items):
            state = c.on_save(self.view) or {}
            if not isinstance(state, dict):
                raise TypeError(f"callback {name}: on_save/state_dict must return a dict, not {type(state).__name__}")
            plain = {}
            for key, value in state.items():
                if not isinstance(key, str) or "/" in key:
                    raise ValueError(f"callback {name}: state keys must be strings without '/', got {key!r}")
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.detach()
                else:
                    plain[key] = value
            json_state[name] = plain
        return json_state, tensors

    def _load_sharded(self, path: Path) -> dict[str, torch.Tensor]:
        """Collective: the callbacks' tensors of a sharded checkpoint, loaded by DCP into the tensors their
        `state_dict()` gives now (after `on_train_start`: same shapes and placements, any world size)."""
        from launcher.checkpoint.sharded import load_callback_tensors

        templates: dict[str, torch.Tensor] = {}
        for name, c in zip(self.names, self.items):
            for key, value in (c.state_dict() or {}).items():
                if isinstance(value, torch.Tensor):
                    templates[f"{name}/{key}"] = value
        return load_callback_tensors(path, templates)

    def _restore(self, json_state: dict, tensors: dict[str, torch.Tensor]) -> None:
        known = set(self.names)
        stale = sorted(set(json_state) - known | {k.split("/", 1)[0] for k in tensors} - known)
        if stale:
            warnings.warn(f"the checkpoint holds the state of callbacks this run does not have ({', '.join(stale)}); "
                          f"it is dropped", stacklevel=3)
        for name, c in zip(self.names, self.items):
            if name not in json_state:
                continue  # new in this launch: it keeps what on_train_start set up
            state = dict(json_state[name])
            prefix = f"{name}/"
            state.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            c.on_load(self.view, state)


def read_callback_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `callbacks.safetensors` in a checkpoint folder ({} when it has none); CheckpointError
    when the file does not load."""
    file = Path(path) / CALLBACKS_FILE
    if not file.is_file():
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} does not load: {str(err).splitlines()[0] if str(err) else err}") from None


def checkpoint_files(callbacks: Callbacks | None, state: Any, sharded: bool
                     ) -> tuple[dict[str, Callable[[str], None]], dict[str, torch.Tensor]]:
    """At a save (every rank): the callbacks' JSON state into `state.extra`, and their tensors: unsharded, the
    writer of `{CALLBACKS_FILE: write(path)}` (rank 0 runs it) for the checkpoint manager; sharded (FSDP2), the
    tensors as NAME/KEY (DTensors stay sharded) for the DCP state dict (`callbacks.NAME/KEY`). ({}, {}) without."""
    if callbacks is None:
        return {}, {}
    json_state, tensors = callbacks.collect()
    state.extra[EXTRA_KEY] = json_state
    if not tensors:
        return {}, {}
    if sharded:
        return {}, tensors
    from launcher.checkpoint.files import save_weights

    return {CALLBACKS_FILE: lambda p: save_weights(tensors, p)}, {}


def loaded_state(callbacks: Callbacks | None, extra: dict, tensors: dict[str, torch.Tensor]) -> None:
    """After a resume read the checkpoint: keep the callbacks' state until `train_start` restores it."""
    json_state = extra.pop(EXTRA_KEY, None) or {}
    if callbacks is not None and (json_state or tensors):
        callbacks.pending = (json_state, tensors)
    elif callbacks is None and (json_state or tensors):
        warnings.warn(f"the checkpoint holds the state of callbacks ({', '.join(sorted(json_state))}) and this run "
                      f"has none; it is dropped", stacklevel=3)
