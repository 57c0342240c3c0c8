"""Experiment tracking. The training loop talks to a `Tracker`; non-main ranks hold a `NullTracker`.

`start_tracker` gives rank 0 a W&B run (`WandbTracker`) and every other rank a no-op. W&B is optional at
run time: an import error, an auth or network failure, or a crash of the W&B service becomes one warning
line and training continues with its local logging (metrics.jsonl).

W&B names (metrics.jsonl row key -> W&B key):
  every --log-every optimizer steps, x-axis = global optimizer step (W&B `_step`):
    loss -> train/loss, lr -> train/lr, samples_per_second -> train/samples_per_second, epoch -> train/epoch
  once per epoch, x-axis = `epoch` (define_metric), logged at the step where the epoch ended:
    val_loss -> val/loss, val_accuracy -> val/accuracy, val_precision/recall/f1 -> val/precision, ...
    train_loss -> epoch/train_loss, train_accuracy -> epoch/train_accuracy, lr -> epoch/lr,
    epoch_seconds -> epoch/seconds, samples_per_second -> epoch/samples_per_second
  train/grad_norm: the global gradient norm before clipping, of the interval's last optimizer step.
  summary: best/<key> for every number of the epoch row --best-metric/--best-mode picks (best/epoch,
    best/val_loss, best/train_loss, ...: one epoch, never mixed), computed from the full history;
  at the end of a completed run: best/confusion_matrix, the confusion matrix of that best epoch.
  eval runs (--eval-only, job type eval): the metrics as val/* in the summary, the confusion matrix, and
    the evaluated checkpoint (path, training run id) in the config.

Model artifacts (--wandb-log-model / $WANDB_LOG_MODEL): one W&B artifact `model-<run id>` of type model, a
version per upload, aliases latest, best, final and step-<N>. A failed upload is one warning; training and
the rest of the logging go on. Offline, the files are staged locally and `wandb sync` uploads them.

Console: wandb's own lines are silenced ($WANDB_SILENT defaults to true; WANDB_SILENT=false brings them
back); the tracker prints one line saying where the run is and, offline, how to sync it.

Under a W&B sweep agent ($WANDB_SWEEP_ID set), a SIGTERM stop (exit 75) is the agent stopping the trial (early
termination): the run ends as stopped (exit code 0 to W&B, summary `stopped_by`), not as preempted, because no
requeue will resume it; SLURM jobs outside a sweep still end as preempted.

Temp files: wandb stages media and artifact files in temp folders (`tmp*wandb-media` and `tmp*wandb-artifacts`,
made when wandb is imported; a `tmp*` folder per table or artifact; the service's port-file folder at init),
which it removes only from Python's exit handlers. The tracker points them at `RUN/.wandb-tmp-HOST-PID-START/`
(tempfile's folder while wandb is imported and called), removes that folder at exit, and a later launch on the
folder removes those of this host's dead processes (`sweep_wandb_staging`): a SIGKILLed run leaves nothing in
/tmp (docs/tracking.md#temp-files).

Restarts: the run id lives in the checkpoint; a resumed job reopens the same run (resume="allow"). Because a
job can die after an epoch was logged but before the checkpoint that covers it, the tracker asks W&B what
it already holds (offline: the earlier run files of this id; online: the resumed run's summary and step)
and skips rows W&B has; rows the checkpoint's history has but W&B lost (wandb-core flushes its log about
every 15 s, so a SIGKILL loses the last seconds) are logged again at their original steps.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import secrets
import shutil
import socket
import string
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from launcher.faults.lease import pid_start

if TYPE_CHECKING:
    from launcher.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "launcher"
# wandb waits 90 s for init by default; a training job whose W&B is unreachable should start sooner.
DEFAULT_INIT_TIMEOUT_S = 30.0
# run.finish() waits for every upload by default, forever. Unuploaded data stays on disk for `wandb sync`.
DEFAULT_FINISH_TIMEOUT_S = 120.0
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
_SECRET_NAME = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
REDACTED = "<redacted>"
# An eval run's `predictions` W&B table holds the first rows of --predictions (the parquet holds them all):
# enough to browse in the UI, bounded so that a large split does not upload a large table.
PREDICTIONS_TABLE_ROWS = 1000
# wandb's temp folders go under RUN/<this prefix>HOST-PID-START (see the module docstring).
STAGING_PREFIX = ".wandb-tmp-"


class Tracker(Protocol):
    """What `fit` calls. Every method is called on every rank; only rank 0's tracker does anything."""

    run_id: str | None

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        """Every `log_every` optimizer steps: loss, lr, samples_per_second, epoch (fractional)."""

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Once per completed epoch: the metrics.jsonl row (see launcher.loop)."""

    def log_checkpoint(self, path: Path, *, step: int, best: bool) -> None:
        """After every committed checkpoint (all ranks; rank 0 may upload it as a model artifact)."""

    def finish(self, history: list[Mapping[str, Any]], exit_code: int = 0) -> None:
        """At the end of training, on success and on failure."""


class NullTracker:
    """Logs nothing. Keeps the run id so that a checkpoint written by any rank still carries it."""

    run_id: str | None = None  # also for subclasses that skip __init__ (test recorders)

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        pass

    def log_checkpoint(self, path: Path, *, step: int, best: bool) -> None:
        pass

    def log_evaluation(self, row: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        pass

    def finish(self, history: list[Mapping[str, Any]], exit_code: int = 0) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested)


def generate_run_id() -> str:
    """A W&B-style run id (8 characters of [a-z0-9], like wandb.util.generate_id) without importing wandb."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def resolve_mode(flag: str | None, environ: Mapping[str, str], credentials: bool) -> tuple[str, bool]:
    """(mode, defaulted_to_offline): --wandb-mode > $WANDB_MODE / $WANDB_DISABLED > online with credentials.

    The second value is True when the mode fell back to offline for lack of credentials, so the caller can
    say how to sync later.
    """
    if flag:
        return flag, False
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    aliases = {"dryrun": "offline", "run": "online", "online": "online", "offline": "offline",
               "disabled": "disabled"}
    if env_mode in aliases:
        return aliases[env_mode], False
    if environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled", False
    return ("online", False) if credentials else ("offline", True)


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """Values of environment variables that look like credentials (…_KEY, …_TOKEN, …_SECRET, …PASSWORD)."""
    names = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
    return sorted({v for k, v in environ.items() if names.search(k) and len(v) >= 6}, key=len, reverse=True)


def scrub(value: Any, secrets_: list[str]) -> Any:
    """Drop keys named like credentials and redact any string holding a secret value, recursively."""
    if isinstance(value, Mapping):
        return {k: scrub(v, secrets_) for k, v in value.items() if not _SECRET_NAME.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets_) for v in value]
    if isinstance(value, str):
        for secret in secrets_:
            if secret in value:
                value = value.replace(secret, REDACTED)
    return value


def git_info(code_dir: Path) -> dict[str, Any]:
    """{"git_commit": sha, "git_dirty": bool} of the repository holding code_dir; {} outside a repository."""
    try:
        commit = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(code_dir), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(status.strip())} if commit else {}


def run_metadata(environ: Mapping[str, str] = os.environ, code_dir: Path | None = None) -> dict[str, Any]:
    """Git commit of the training code (the script's folder) and SLURM job ids, when present."""
    if code_dir is None:
        script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
        code_dir = script.resolve().parent if script and script.is_file() else Path.cwd()
    info = git_info(code_dir)
    for name in SLURM_VARIABLES:
        if environ.get(name):
            value = environ[name]
            info[name.lower()] = int(value) if value.isdigit() else value
    return info


def build_config(config: Mapping[str, Any], run_info: Mapping[str, Any], metadata: Mapping[str, Any],
                 environ: Mapping[str, str]) -> dict[str, Any]:
    """One flat W&B config: every resolved hyperparameter, then run facts (world size, ...) and metadata.

    Flat so that W&B filters and the runs table read `lr`, `world_size`, `git_commit` directly. A run fact
    whose name clashes with a hyperparameter is kept as `run_<name>`.
    """
    merged: dict[str, Any] = dict(config)
    for key, value in {**run_info, **metadata}.items():
        merged[f"run_{key}" if key in config else key] = value
    return scrub(merged, secret_values(environ))


_EPOCH_KEYS = {"train_loss": "epoch/train_loss", "train_accuracy": "epoch/train_accuracy", "lr": "epoch/lr",
               "epoch_seconds": "epoch/seconds", "samples_per_second": "epoch/samples_per_second"}
_NOT_LOGGED = {"step", "world_size", "val_confusion_matrix"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row as W&B epoch-level metrics (see the module docstring for the names)."""
    out: dict[str, Any] = {"epoch": row["epoch"]}
    for key, value in row.items():
        if key in _NOT_LOGGED or key == "epoch" or not _is_number(value):
            continue
        if key.startswith("val_"):
            out["val/" + key[4:]] = value
        else:
            out[_EPOCH_KEYS.get(key, "epoch/" + key)] = value
    return out


def train_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"train/" + k: v for k, v in metrics.items() if _is_number(v)}


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def best_row(history: list[Mapping[str, Any]], metric: str, mode: str) -> Mapping[str, Any] | None:
    """The epoch row that --best-metric/--best-mode picks (the earliest of ties), or None."""
    rows = [r for r in history if _finite(r.get(metric))]
    if not rows:
        return None
    pick = max if mode == "max" else min
    target = pick(r[metric] for r in rows)
    return next(r for r in rows if r[metric] == target)


def best_summary(history: list[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """best/<key> for every number of the one epoch row --best-metric/--best-mode picks, and the epochs done.

    One row, never mixed: best/val_loss is that epoch's loss, not the lowest loss of any epoch.
    """
    out: dict[str, Any] = {}
    row = best_row(history, metric, mode)
    if row is not None:
        out.update({"best/" + k: v for k, v in row.items() if _is_number(v) and k not in ("world_size",)})
    out["epochs_completed"] = max((r["epoch"] for r in history), default=0)
    return out


def artifact_of(path: Path) -> str | None:
    """`name:version` when `path` lies in a folder `artifact.download()` made (artifacts/<name>:<version>/)."""
    parts = path.parts
    for parent, folder in zip(parts, parts[1:]):
        if parent == "artifacts" and re.fullmatch(r"[\w.-]+:[\w.-]+", folder):
            return folder
    return None


def confusion_matrix_table(matrix: list[list[float]], class_names: list[str] | None) -> list[list[Any]]:
    """Rows (Actual, Predicted, nPredictions) of W&B's built-in confusion-matrix chart."""
    names = list(class_names) if class_names and len(class_names) == len(matrix) else \
        [str(i) for i in range(len(matrix))]
    return [[names[i], names[j], matrix[i][j]] for i in range(len(matrix)) for j in range(len(matrix[i]))]


def first_rows(columns: Mapping[str, list], limit: int = PREDICTIONS_TABLE_ROWS) -> tuple[list[str], list[list]]:
    """The names and the first `limit` rows of a table held as columns (--predictions'), for log_table."""
    names = list(columns)
    return names, [list(row) for row in zip(*(columns[name][:limit] for name in names))]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _warn_unavailable(what: str, err: BaseException) -> None:
    message = scrub(_one_line(err), secret_values(os.environ))
    log.warning("W&B %s failed (%s); training continues, logging locally only (metrics.jsonl)", what, message)


# ---------------------------------------------------------------------------------------------------------
# wandb's temp folders, under the run folder


def staging_name(host: str | None = None, pid: int | None = None) -> str:
    """`.wandb-tmp-HOST-PID-START` of this process: who made it, so that only a dead owner's is ever swept."""
    pid = os.getpid() if pid is None else pid
    return f"{STAGING_PREFIX}{host or socket.gethostname()}-{pid}-{pid_start(pid) or 0}"


def _owner_gone(name: str, host: str) -> bool:
    """Whether the process named in a staging folder's name is of this host and no longer alive (its pid is
    dead, or now belongs to a process started at another time). Another host's folder is never judged."""
    rest = name[len(STAGING_PREFIX):]
    parts = rest.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    pid, start = int(parts[1]), parts[2]
    if pid == os.getpid():
        return False
    if process_gone(pid):
        return True
    now = pid_start(pid)
    return start != "0" and now is not None and now != start


def sweep_wandb_staging(folder: Path) -> list[Path]:
    """Remove the wandb temp folders in `folder` whose owner (this host, named in the folder's name) is gone.

    Only names this tracker makes are looked at, and only this host's: a process of another host (an
    --eval-only into a shared folder) cannot be asked whether it lives, so its folder is kept. Returns what
    was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for path in entries:
        if path.name.startswith(STAGING_PREFIX) and not path.is_symlink() and _owner_gone(path.name, host):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


# wandb-core's own (Go) temp entries in $TMPDIR: its socket folder `wandb-<client pid>-<core pid>-<random>` and
# its system monitor's socket `wandb_symon-<core pid>-<monitor pid>-<random>.sock`. wandb-core removes them
# when it ends, unless it is SIGKILLed with its client (a whole process tree killed: the OOM killer, SLURM).
_CORE_ENTRIES = (re.compile(r"^wandb-(\d+)-(\d+)-\d+$"), re.compile(r"^wandb_symon-(\d+)-(\d+)-\d+\.sock$"))


def sweep_wandb_core_leftovers(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove wandb-core's socket folders and sockets in the system temp folder ($TMPDIR, else /tmp, as Go
    reads it) whose every named process is dead: a socket nobody serves. A name that matches but whose pids
    live (another user's W&B run, or a pid reused) is kept; so is anything that is not a socket folder."""
    root = Path(folder or os.environ.get("TMPDIR") or "/tmp")
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = next((m for m in (r.match(path.name) for r in _CORE_ENTRIES) if m), None)
        if match is None or not all(process_gone(int(pid)) for pid in match.groups()):
            continue
        try:
            if path.is_symlink():
                continue
            if path.is_dir() and all(child.name == "socket" and child.is_socket() for child in path.iterdir()):
                shutil.rmtree(path)
            elif path.is_socket():
                path.unlink()
            else:
                continue
            removed.append(path)
        except OSError:
            continue  # someone else's, or gone meanwhile
    return removed


def process_gone(pid: int) -> bool:
    """Whether pid names no running process: none, or a zombie (a killed process its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _make_staging(output_dir: Path) -> Path | None:
    """This process's wandb temp folder under the run folder, removed at exit; None when it cannot be made
    (a read-only folder: wandb then uses the system's temp folder as before)."""
    staging = output_dir / staging_name()
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    # Registered before wandb is imported, so that it runs after wandb's own exit handlers (last in, first out),
    # which clean the folders inside it. launcher.loop.launch.exit_now runs the exit handlers before os._exit.
    atexit.register(shutil.rmtree, staging, ignore_errors=True)
    return staging


@contextlib.contextmanager
def temp_folder(staging: Path | None) -> Iterator[None]:
    """tempfile's folder is `staging` inside the block (wandb's imports and calls), the old one after it."""
    if staging is None or not staging.is_dir():
        yield
        return
    saved, tempfile.tempdir = tempfile.tempdir, str(staging)
    try:
        yield
    finally:
        tempfile.tempdir = saved


# ---------------------------------------------------------------------------------------------------------
# The W&B tracker


class WandbTracker:
    """Rank 0's tracker: one W&B run. Any W&B error turns it into a no-op after one warning."""

    def __init__(self, run: Any, wandb_module: Any, *, history: list[Mapping[str, Any]] | None,
                 best_metric: str, best_mode: str, class_names: list[str] | None,
                 logged_epoch: int, logged_step: int, log_model: str = "none",
                 output_dir: Path | None = None, staging: Path | None = None) -> None:
        self.run_id: str | None = run.id
        self._staging = staging  # wandb's temp folder (temp_folder), None for the system's
        self._log_model, self._output_dir = log_model, output_dir
        self._run: Any = run
        self._wandb = wandb_module
        self._best_metric, self._best_mode = best_metric, best_mode
        self._class_names = class_names
        self._history: dict[int, Mapping[str, Any]] = {int(r["epoch"]): r for r in history or []}
        self._last_epoch = logged_epoch  # highest epoch W&B holds for this run
        self._last_step = logged_step  # highest step W&B holds for this run
        self._skipped_epochs: list[int] = []
        self._skipped_steps = 0
        self._define_metrics()
        self._backfill()

    # -- Tracker protocol --------------------------------------------------------------------------------

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._run is None:
            return
        if step <= self._last_step:
            # W&B already holds this step from before a restart; steps must only grow.
            self._skipped_steps += 1
            return
        self._guard("log", lambda: self._run.log(train_metrics(metrics), step=step))
        self._last_step = step

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        epoch = int(row["epoch"])
        self._history[epoch] = row
        if self._run is None:
            return
        if epoch <= self._last_epoch:
            self._skipped_epochs.append(epoch)
            log.info("W&B run %s already holds epoch %d from before the restart; not logging it again",
                     self.run_id, epoch)
            return
        self._log_epoch_row(row)
        self._guard("summary update", self._update_summary)

    def log_checkpoint(self, path: Path, *, step: int, best: bool) -> None:
        """--wandb-log-model checkpoints: every committed checkpoint, as it is saved (rotation may delete it)."""
        if self._run is None or self._log_model != "checkpoints":
            return
        row = self._history.get(max(self._history, default=0), {})
        aliases = [f"step-{step}"] + (["best"] if best else [])
        self._log_artifact(Path(path), aliases, {"step": step, "epochs_completed": row.get("epoch"), "best": best})

    def log_evaluation(self, row: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> None:
        """An eval-only run: the metrics in the summary, the checkpoint in the config, the confusion matrix."""
        if self._run is None:
            return
        metrics = {k: v for k, v in epoch_metrics({"epoch": 0, **row}).items() if k != "epoch"}
        self._guard("config update", lambda: self._run.config.update(
            {f"evaluated_{k}": v for k, v in checkpoint.items()}, allow_val_change=True))
        self._guard("summary update", lambda: self._run.summary.update(metrics))
        artifact = artifact_of(Path(str(checkpoint.get("checkpoint", ""))))
        if artifact is not None:  # downloaded from W&B: the lineage edge from the model to this eval
            try:
                with temp_folder(getattr(self, "_staging", None)):
                    self._run.use_artifact(artifact)
            except Exception as err:  # noqa: BLE001 - lineage is a nicety, never a failure
                log.warning("W&B use_artifact(%s) failed (%s); the checkpoint path is in the config", artifact,
                            _one_line(err))
        if row.get("val_confusion_matrix"):
            matrix = row["val_confusion_matrix"]
            self._guard("confusion matrix", lambda: self._log_matrix(matrix, "eval/confusion_matrix",
                                                                     "Confusion matrix"))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A W&B table (a recipe's extra output, e.g. sampled text), logged under `key` at `step`.
        A table is logged whole each time, so pass every row so far: W&B shows the latest version."""
        if self._run is None:
            return
        if step is not None and step < self._last_step:
            return  # W&B already holds a later step (a restart): steps must only grow
        table = lambda: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])  # noqa: E731
        self._guard(f"table {key}", lambda: self._run.log({key: table()}, step=step))
        if step is not None:
            self._last_step = step

    def finish(self, history: list[Mapping[str, Any]], exit_code: int = 0) -> None:
        if self._run is None:
            return
        for row in history:
            self._history[int(row["epoch"])] = row
        if self._history:  # an eval run has none: its summary is the evaluation
            self._guard("summary update", self._update_summary)
        if exit_code == 0 and self._history:
            self._guard("confusion matrix", self._log_confusion_matrix)
            self._log_final_artifacts()
        if exit_code == 75 and os.environ.get("WANDB_SWEEP_ID"):
            # A sweep agent's SIGTERM (early termination): nothing will requeue this trial, so it is stopped.
            self._guard("summary update", lambda: self._run.summary.update({"stopped_by": "sweep agent"}))
            exit_code = 0
        elif exit_code == 75:
            # The job will be requeued: W&B shows the run as preempted instead of crashed.
            self._guard("mark preempting", self._run.mark_preempting)
        run, self._run = self._run, None
        try:
            with temp_folder(getattr(self, "_staging", None)):
                run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001 - W&B must never take training down
            _warn_unavailable("finish", err)

    # -- internals ---------------------------------------------------------------------------------------

    def _guard(self, what: str, action: Any) -> None:
        if self._run is None:
            return
        try:
            with temp_folder(getattr(self, "_staging", None)):
                action()
        except Exception as err:  # noqa: BLE001 - W&B must never take training down
            _warn_unavailable(what, err)
            self._run = None

    def _define_metrics(self) -> None:
        def define() -> None:
            self._run.define_metric("epoch")
            self._run.define_metric("val/*", step_metric="epoch")
            self._run.define_metric("epoch/*", step_metric="epoch")

        self._guard("define_metric", define)

    def _backfill(self) -> None:
        """Log the checkpoint's epochs that W&B lost (killed before wandb-core flushed them)."""
        for epoch in sorted(self._history):
            if epoch > self._last_epoch:
                self._log_epoch_row(self._history[epoch])
        if self._history:
            self._guard("summary update", self._update_summary)

    def _log_epoch_row(self, row: Mapping[str, Any]) -> None:
        step = max(int(row.get("step", self._last_step)), self._last_step)
        self._guard("log", lambda: self._run.log(epoch_metrics(row), step=step))
        self._last_step = step
        self._last_epoch = max(self._last_epoch, int(row["epoch"]))

    def _update_summary(self) -> None:
        history = [self._history[e] for e in sorted(self._history)]
        self._run.summary.update(best_summary(history, self._best_metric, self._best_mode))

    def _log_confusion_matrix(self) -> None:
        history = [self._history[e] for e in sorted(self._history)]
        row = best_row([r for r in history if r.get("val_confusion_matrix")], self._best_metric,
                       self._best_mode)
        if row is not None:
            self._log_matrix(row["val_confusion_matrix"], "best/confusion_matrix",
                             f"Confusion matrix, best epoch ({row['epoch']})")

    def _log_matrix(self, matrix: list[list[float]], key: str, title: str) -> None:
        table = self._wandb.Table(columns=["Actual", "Predicted", "nPredictions"],
                                  data=confusion_matrix_table(matrix, self._class_names))
        chart = self._wandb.plot_table("wandb/confusion_matrix/v1", table,
                                       {"Actual": "Actual", "Predicted": "Predicted",
                                        "nPredictions": "nPredictions"}, {"title": title})
        self._run.log({key: chart}, step=max(self._last_step, 0))

    def _log_final_artifacts(self) -> None:
        """At the end of a completed run: final/ (final, checkpoints) or the best checkpoint (best)."""
        if self._output_dir is None or self._log_model == "none":
            return
        final, best = self._output_dir / "final", self._output_dir / "checkpoints" / "best"
        if self._log_model == "best" and best.exists():
            row = best_row(list(self._history.values()), self._best_metric, self._best_mode) or {}
            real = best.resolve()
            self._log_artifact(real, ["best", f"step-{int(real.name.rsplit('-', 1)[-1])}"],
                               {"epoch": row.get("epoch"), self._best_metric: row.get(self._best_metric)})
        elif self._log_model in ("final", "checkpoints") and (final / "model.safetensors").exists():
            self._log_artifact(final, ["final"], {"epochs_completed": max(self._history, default=0)})

    def _log_artifact(self, folder: Path, aliases: list[str], metadata: Mapping[str, Any]) -> None:
        """One version of `model-<run id>`. Never fatal: a failure is one warning and the run goes on."""
        try:
            with temp_folder(getattr(self, "_staging", None)):
                artifact = self._wandb.Artifact(f"model-{self.run_id}", type="model",
                                                metadata={k: v for k, v in metadata.items() if v is not None})
                artifact.add_dir(str(folder))
                self._run.log_artifact(artifact, aliases=["latest", *aliases])
        except Exception as err:  # noqa: BLE001 - a failed upload never fails training
            log.warning("W&B model artifact of %s failed (%s); training and logging continue", folder,
                        scrub(_one_line(err), secret_values(os.environ)))


def _already_logged_offline(run: Any, run_id: str) -> tuple[int, int]:
    """(highest epoch, highest step) in this run's earlier local run files (earlier process starts)."""
    from launcher.tracking.wandb_records import RecordFileError, find_run_files, read_run_file

    current = Path(run.settings.sync_dir).resolve()
    epoch, step = 0, -1
    for path in find_run_files(current.parent, run_id):
        if path.parent.resolve() == current:
            continue
        try:
            earlier = read_run_file(path)
        except (OSError, RecordFileError) as err:
            log.warning("cannot read earlier W&B run file %s (%s); it is ignored", path, err)
            continue
        for row in earlier.history:
            if _is_number(row.get("epoch")):
                epoch = max(epoch, int(row["epoch"]))
            if _is_number(row.get("_step")):
                step = max(step, int(row["_step"]))
    return epoch, step


def _already_logged_online(run: Any) -> tuple[int, int]:
    """(highest epoch, highest step) the W&B server holds for a resumed run."""
    if not run.resumed:
        return 0, -1
    epoch = run.summary.get("epoch")
    return (int(epoch) if _is_number(epoch) else 0), int(run.starting_step) - 1


def _agree_on_run_id(accelerator: Any, resume_run_id: str | None) -> str:
    """Rank 0 picks the id (checkpoint's, else $WANDB_RUN_ID, else a new one); every rank learns it."""
    run_id = resume_run_id or os.environ.get("WANDB_RUN_ID") or generate_run_id()
    if getattr(accelerator, "num_processes", 1) > 1:
        from accelerate.utils import broadcast_object_list

        holder = [run_id]
        broadcast_object_list(holder, from_process=0)
        run_id = holder[0]
    return run_id


def start_tracker(config: TrainConfig, *, accelerator: Any, output_dir: Path, run_info: Mapping[str, Any],
                  resume_run_id: str | None, history: list[Mapping[str, Any]] | None = None) -> Tracker:
    """Called on every rank (it is a collective when there are several processes).

    Rank 0 opens (or, with `resume_run_id`, reopens) the W&B run; the other ranks get a NullTracker with the
    same run_id. `history` is the epoch rows restored from the checkpoint, used to re-log epochs W&B lost.
    """
    from launcher.config import wandb_credentials_configured

    run_id = _agree_on_run_id(accelerator, resume_run_id)
    if not accelerator.is_main_process:
        return NullTracker(run_id)
    environ = os.environ
    mode, defaulted = resolve_mode(config.wandb_mode, environ, wandb_credentials_configured())
    if mode == "disabled":
        return NullTracker(run_id)
    # wandb's own ~40 lines (banners, sparklines, sync hints) drown ours; WANDB_SILENT=false brings them back.
    os.environ.setdefault("WANDB_SILENT", "true")
    output_dir = Path(output_dir)
    # wandb's temp folders under the run folder, not /tmp (see the module docstring): the media and artifact
    # staging folders are made when wandb is first imported, the rest while it is called.
    sweep_wandb_staging(output_dir)
    staging = _make_staging(output_dir)
    try:
        with temp_folder(staging):
            import wandb
    except Exception as err:  # noqa: BLE001 - a broken install must not stop training
        _warn_unavailable("import", err)
        return NullTracker(run_id)

    settings: dict[str, Any] = {}
    if "WANDB_INIT_TIMEOUT" not in environ:
        settings["init_timeout"] = DEFAULT_INIT_TIMEOUT_S
    if "WANDB_FINISH_TIMEOUT" not in environ:
        settings["finish_timeout"] = DEFAULT_FINISH_TIMEOUT_S
    wandb_config = build_config(config.to_dict(), run_info, run_metadata(environ), environ)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with temp_folder(staging):
            run = wandb.init(
                project=config.wandb_project or environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=config.wandb_entity,
                group=config.wandb_group,
                tags=config.wandb_tags,
                name=config.wandb_name or (None if environ.get("WANDB_NAME") else output_dir.resolve().name),
                job_type=config.wandb_job_type or (None if environ.get("WANDB_JOB_TYPE") else
                                                   "eval" if config.eval_only else "train"),
                id=run_id,
                resume="allow",
                mode=mode,
                dir=None if environ.get("WANDB_DIR") else str(output_dir),
                config=wandb_config,
                settings=wandb.Settings(**settings),
            )
        if mode == "offline":
            logged_epoch, logged_step = _already_logged_offline(run, run_id)
        else:
            logged_epoch, logged_step = _already_logged_online(run)
    except Exception as err:  # noqa: BLE001 - auth, network, bad settings: never fatal
        _warn_unavailable("init", err)
        return NullTracker(run_id)
    print(where_line(run, mode, defaulted), flush=True)
    # The recipe resolves --best-metric for its task before this; a caller that did not gets the
    # single-label default (the metric of each problem type: launcher.tasks, Monitor.resolve).
    best_metric = config.best_metric or "val_accuracy"
    best_mode = config.best_mode or ("min" if best_metric in ("val_loss", "val_mae", "val_rmse") else "max")
    return WandbTracker(run, wandb, history=history, best_metric=best_metric, best_mode=best_mode,
                        class_names=run_info.get("class_names"), logged_epoch=logged_epoch,
                        logged_step=logged_step, log_model=config.log_model(), output_dir=output_dir,
                        staging=staging)


def where_line(run: Any, mode: str, defaulted: bool) -> str:
    """Our one console line about W&B (wandb's own are silenced): where the run is, how to upload it."""
    if mode != "offline":
        return f"W&B: run {run.id} at {run.url}"
    why = " (no credentials found: set WANDB_API_KEY or `wandb login` to log online)" if defaulted else ""
    pattern = Path(run.settings.sync_dir).parent / f"offline-run-*-{run.id}"
    return f"W&B: offline run {run.id} in {run.settings.sync_dir}{why}; upload it with `wandb sync {pattern}`"
