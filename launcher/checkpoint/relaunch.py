"""What a relaunch may change: the command line of a resume (or --eval-only) against the checkpoint's config.

A checkpoint stores the resolved config of the launch that wrote it. On a relaunch every key is compared
with what was given now, following the key's `relaunch` rule in launcher.config (docs/relaunch.md):

- fixed keys (data, model, optimisation) come from the checkpoint when not given and are refused (one line,
  exit 2) when given with another value;
- apply keys (epochs, patience, logging, W&B, workers, ...) come from the checkpoint when not given, and a
  changed value applies from now on with one notice line;
- refuse-mid-epoch keys (batch size, accumulation) apply at an epoch boundary and are refused mid-epoch,
  because the position inside an epoch is counted in batches of the old size;
- launch keys (output dir, resume, eval-only) say how this launch starts and are never compared.

The data itself is compared too: a fingerprint of it (launcher.data.fingerprint: file sizes and times, an
embedded dataset's version, a Hub revision) is stored beside the config, and a relaunch on data that changed
under the same --dataset is refused unless --accept-data-change, whose use is recorded (`data_changes`).

Rank 0 alone decides which checkpoint to resume and broadcasts it: nodes whose view of a shared file system
differs (NFS attribute caching after a requeue) still load the same checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from launcher.checkpoint import CHECKPOINTS, list_checkpoints, read_trainer_state, resolve_resume
from launcher.config import TrainConfig, relaunch_rule
from launcher.errors import UsageError

ABANDONED_PREFIX = "abandoned-"
DATA_KEY, DATA_CHANGES_KEY = "data", "data_changes"  # beside "config" and "run_info" in config.json/checkpoints


def choose_checkpoint(resume: str, output_dir: Path) -> Path | None:
    """`resolve_resume` on rank 0 only; every rank gets rank 0's answer (or its UsageError)."""
    state = PartialState()
    answer: list[Any] = [None]
    if state.is_main_process:
        try:
            found = resolve_resume(resume, output_dir)
            answer = [("path", str(found) if found is not None else None)]
        except UsageError as err:
            answer = [("error", str(err))]
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    kind, value = answer[0]
    if kind == "error":
        raise UsageError(value)
    return Path(value) if value is not None else None


def stored_config(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the launch config stored in the checkpoint, its trainer state); the config is {} when absent."""
    state = read_trainer_state(checkpoint)
    stored = state.get("config") or {}
    return (stored.get("config") or {}) if isinstance(stored, dict) else {}, state


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return str(value)


def reconcile(given: dict[str, Any], stored: dict[str, Any], *, checkpoint: Path, mid_epoch: bool,
              eval_only: bool, cls: type = TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The config of this launch: the stored one, overridden by what was given where the rules allow.

    Returns the config and the notice lines to print (one per applied change). Raises UsageError naming the
    first key that cannot change, its stored value and how to start a fresh run instead.
    """
    known = cls.__dataclass_fields__
    values: dict[str, Any] = {}
    notices: list[str] = []
    for name in known:
        rule = relaunch_rule(name, cls)
        if rule == "launch" or name not in stored:
            if name in given:
                values[name] = given[name]
            continue
        old = stored[name]
        if name not in given or given[name] == old:
            values[name] = old
            continue
        new = given[name]
        if rule == "fixed" or (rule == "refuse-mid-epoch" and mid_epoch and not eval_only):
            why = ("it defines the data, the model or the optimisation of this run" if rule == "fixed" else
                   "the checkpoint is in the middle of an epoch, counted in batches of the old size; resume "
                   "from an epoch-end checkpoint to change it")
            raise UsageError(f"{_flag(name)} {_show(new)} differs from {_show(old)} stored in {checkpoint}: "
                             f"{why}; drop the flag to continue the run, or start a fresh run with a new "
                             f"--output-dir")
        values[name] = new
        if not eval_only:
            when = "from the next epoch, the LR schedule re-planned" if rule == "refuse-mid-epoch" else "from now on"
            notices.append(f"relaunch: {_flag(name)} {_show(old)} -> {_show(new)} (applies {when})")
    return cls(**values), notices


def set_aside_newer(checkpoint: Path, output_dir: Path) -> Path | None:
    """Resuming an older checkpoint of this run: move the newer ones to checkpoints/abandoned-<time>/.

    They belong to a branch of the run that is no longer followed; left in place they would outrank the new
    branch in rotation and in the next --resume auto. Nothing is deleted. Rank 0 only; returns the folder.
    """
    root = output_dir / CHECKPOINTS
    try:
        inside = checkpoint.resolve().parent == root.resolve()
    except OSError:
        return None
    if not inside:
        return None
    newer = [name for name in list_checkpoints(output_dir) if name > checkpoint.resolve().name]
    if not newer:
        return None
    folder = root / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    folder = folder if not folder.exists() else folder.with_name(f"{folder.name}-{os.getpid()}")
    folder.mkdir()
    for name in newer:
        shutil.move(str(root / name), str(folder / name))
    _repoint_best(root, checkpoint)
    return folder


def _repoint_best(root: Path, checkpoint: Path) -> None:
    """checkpoints/best follows the branch: the best checkpoint as the resumed one saw it, or none."""
    link = root / "best"
    best = read_trainer_state(checkpoint).get("best_checkpoint")
    if link.is_symlink() and (root / str(best)).is_dir() and best:
        tmp = root / f".best-{os.getpid()}"
        os.symlink(best, tmp)
        os.replace(tmp, link)
    elif link.is_symlink():
        link.unlink()


def describe_abandoned(folder: Path, checkpoint: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return (f"resuming {checkpoint.name}, older than this run's newest checkpoint: {len(names)} newer "
            f"checkpoint(s) ({names[0]} .. {names[-1]}) set aside in {folder} (delete it when not needed)")


def is_epoch_end(state: dict[str, Any]) -> bool:
    """A checkpoint saved at an epoch boundary (nothing of the next epoch trained yet)."""
    return not state.get("batches_done") and not state.get("samples_done")



# ---------------------------------------------------------------------------------------------------------
# The data under --dataset (its fingerprint: launcher.data.fingerprint; launcher.loop.launch joins the two)


def stored_data(state: dict[str, Any]) -> tuple[dict[str, Any] | None, list]:
    """(the data fingerprint the checkpoint's run recorded, or None; the data changes it accepted so far)."""
    stored = state.get("config") or {}
    if not isinstance(stored, dict):
        return None, []
    return stored.get(DATA_KEY), list(stored.get(DATA_CHANGES_KEY) or [])


def check_data(config: TrainConfig, change: str | None, checkpoint: Path) -> str | None:
    """A relaunch on data that changed since the run recorded it (`change`, in a few words) is refused with one
    line (UsageError), unless --accept-data-change; returns the notice line of an accepted change."""
    if change is None:
        return None
    if not getattr(config, "accept_data_change", False):
        raise UsageError(f"data at {config.dataset} changed since the run started ({change}; recorded in "
                         f"{checkpoint}); relaunch with --accept-data-change to train on the new data knowingly, "
                         f"or use a new --output-dir")
    return (f"relaunch: data at {config.dataset} changed since the run started ({change}); --accept-data-change: "
            f"training on the new data, recorded in config.json ({DATA_CHANGES_KEY})")


def data_record(config: TrainConfig, current: dict[str, Any], previous: dict[str, Any] | None, changes: list,
                change: str | None) -> dict[str, Any]:
    """What config.json and every checkpoint store about the data: this launch's fingerprint, and each change
    accepted so far with its time, the fingerprints before and after (without their per-file entries)."""
    if change is not None:
        brief = {k: v for k, v in (previous or {}).items() if k != "entries"}
        changes = [*changes, {"accepted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dataset": config.dataset,
                              "change": change, "from": brief,
                              "to": {k: v for k, v in current.items() if k != "entries"}}]
    return {DATA_KEY: current, DATA_CHANGES_KEY: changes}
