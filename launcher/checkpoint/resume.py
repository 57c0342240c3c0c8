"""Which checkpoint a run resumes from: `--resume auto|never|PATH` (`resolve_resume`, `latest_valid`), and
`loadable_checkpoint`, the newest one that also loads into this model."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.collective import main_decides
from launcher.checkpoint.layout import (
    CHECKPOINTS,
    LEASE_PREFIX,
    MANIFEST,
    STALE_VIEW_ENV,
    CheckpointError,
    checkpoints_dir,
    list_checkpoints,
    validate,
    validated_once,
)
from launcher.checkpoint.loading import check_fits, check_small_files
from launcher.errors import UsageError


def latest_valid(output_dir: str | os.PathLike, *, warn: bool = True) -> Path | None:
    """The newest checkpoint that validates; broken newer ones are skipped with a warning naming them.

    A sharded checkpoint's small files must also load (its shards DCP checks as it loads them, into the model);
    a full checkpoint's weights and optimizer state `loadable_checkpoint` checks against the model."""
    if os.environ.get("RANK", "0") in os.environ.get(STALE_VIEW_ENV, "").split(","):
        return None
    for name in reversed(list_checkpoints(output_dir)):
        path = checkpoints_dir(output_dir) / name
        try:
            if validate(path).get("sharded"):
                check_small_files(path)
        except CheckpointError as err:
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
            continue
        return path
    return None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """--resume auto|never|PATH -> the checkpoint folder to load, or None to start fresh."""
    output_dir = Path(output_dir)
    if resume == "auto":
        return latest_valid(output_dir)
    if resume == "never":
        if output_dir.exists() and any(not p.name.startswith(LEASE_PREFIX) for p in output_dir.iterdir()):
            raise UsageError(f"--resume never but {output_dir} is not empty; choose a new --output-dir, "
                             f"or use --resume auto to continue the run in it")
        return None
    path = Path(resume)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / CHECKPOINTS).is_dir():
        found = latest_valid(path)  # a run folder was given: take its newest checkpoint
        if found is None:
            raise UsageError(f"--resume {resume}: that run folder has no valid checkpoint")
        return found
    if not path.is_dir():
        raise UsageError(f"--resume {resume}: no such checkpoint folder; give a checkpoints/step-* folder, "
                         f"a run folder, 'auto' or 'never'")
    try:
        validate(path)
    except CheckpointError as err:
        raise UsageError(f"--resume {resume}: not a valid checkpoint ({err})") from None
    return path


UNLOADABLE_PREFIX = "unloadable-"


def loadable_checkpoint(path: Path | None, *, model: torch.nn.Module, optimizer: Any, fallback: bool,
                        output_dir: str | os.PathLike | None = None, is_main: bool = True, scheduler: Any = None,
                        scaler: Any = None) -> Path | None:
    """Collective: `path` if it loads into `model` and `optimizer`; with `fallback` (--resume auto) the
    newest older checkpoint that does, else a UsageError naming what does not match.

    Rank 0 alone decides (every rank builds the same model) and broadcasts its answer: each candidate is
    validated once in this process (`validated_once`: the one `resolve_resume` chose is not hashed again) and
    matched by names and shapes only (`check_fits`: no tensor data is read). A checkpoint skipped by the
    fallback is renamed `checkpoints/unloadable-step-...` (kept for the user, out of the resume order and of
    rotation), with one warning line saying what is wrong with it. `scheduler`, `scaler` (optional): their
    saved states must also have their keys.
    """
    if path is None:
        return None
    kind, value = main_decides(lambda: _choose_loadable(path, model, optimizer, fallback, output_dir,
                                                          scheduler, scaler), is_main)
    if kind == "error":
        raise UsageError(value)
    return Path(value)


def _choose_loadable(path: Path, model: torch.nn.Module, optimizer: Any, fallback: bool,
                     output_dir: str | os.PathLike | None, scheduler: Any = None,
                     scaler: Any = None) -> tuple[str, str]:
    candidates = [path]
    if fallback and output_dir is not None:
        candidates += [checkpoints_dir(output_dir) / n for n in reversed(list_checkpoints(output_dir))
                       if n < path.name]
    skipped, error = [], None
    for candidate in candidates:
        try:
            validated_once(candidate)
            check_fits(candidate, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            error = None
        except CheckpointError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - any failure to read it: --resume auto falls back as for damage
            error = f"{candidate.name} does not load ({type(err).__name__}: {str(err).strip()[:200]})".splitlines()[0]
        if error is None:
            break
        if not fallback:
            return "error", f"--resume {candidate}: {error}"
        print(f"warning: skipping checkpoint {candidate}: {error}", file=sys.stderr, flush=True)
        skipped.append(candidate)
    else:
        return "error", (f"no checkpoint in {checkpoints_dir(output_dir or path.parent.parent)} loads into this "
                         f"model (newest: {error}); resume with the code and config that wrote them, or "
                         f"train into a new --output-dir")
    for bad in skipped:
        if bad.parent.name == CHECKPOINTS:
            with contextlib.suppress(OSError):
                os.replace(bad, bad.with_name(UNLOADABLE_PREFIX + bad.name))
    return "path", str(candidate)
