"""Building the Accelerator `fit` expects, and joining the process group before one exists."""

from __future__ import annotations

import os
from datetime import timedelta
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, str_to_bool

from launcher.errors import UsageError
from launcher.faults.elastic import join_restarted_group
from launcher.faults.gloo_exit import settle_gloo_workers_at_exit
from launcher.faults.timeouts import Timeouts
from launcher.faults.watchdog import nccl_environment
from launcher.loop.determinism import use_deterministic_algorithms
from launcher.parallel.fsdp import check_distributed


def make_accelerator(*, grad_accum: int = 1, seed: int | None = None, collective_timeout: float | None = None,
                     init_timeout: float | None = None, deterministic: bool = False, **kwargs: Any) -> Accelerator:
    """The Accelerator `fit` expects; mixed precision and topology come from `accelerate launch`.

    - On a machine without a GPU, or when asked for (`ACCELERATE_USE_CPU`, as cpu.yaml's `use_cpu: true`
      sets it), `cpu=True` makes each process of a multi-process launch join a gloo group (otherwise every
      process silently trains alone as world size 1) and keeps the model off any GPU (`trains_on_cpu`).
    - `use_seedable_sampler`: the shuffle order of epoch e is a function of (seed, e), which is what makes
      mid-epoch resume exact.
    - `step_scheduler_with_optimizer=False`: `fit` steps schedules once per optimizer step.
    - `non_blocking`: batches are copied to the GPU asynchronously. A blocking copy synchronizes the host
      with the GPU's stream on every batch, so the CPU could never run ahead of the GPU (pair it with
      `pin_memory=True` in the DataLoader, as launcher.data.make_loader does when CUDA is available).
    - `init_timeout` bounds process-group start-up (rendezvous, the first barriers); `collective_timeout`
      bounds each training step once `fit` runs (launcher.faults.watchdog; `fit` reads both from the returned
      accelerator's `launcher_timeouts`). On GPUs the NCCL watchdog / flight-recorder variables of
      `launcher.faults.watchdog.nccl_environment` are set unless already set.
    - `deterministic`: deterministic kernels, cuDNN and cuBLAS settings (launcher.loop.determinism), set
      before anything touches the GPU; what a GPU run needs to repeat itself bit for bit.
    """
    if deterministic:
        use_deterministic_algorithms()
    timeouts = _timeouts(Timeouts(), collective_timeout, init_timeout)
    kwargs.setdefault("cpu", use_cpu())
    if not any(isinstance(h, InitProcessGroupKwargs) for h in kwargs.get("kwargs_handlers", ())):
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", ()),
                                     InitProcessGroupKwargs(timeout=timedelta(seconds=timeouts.init))]
    _prepare_process_group(kwargs["cpu"], timeouts)
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed,
                                                                   non_blocking=True))
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False, **kwargs)
    accelerator.launcher_timeouts = timeouts
    check_distributed(accelerator)  # never a silent downgrade (e.g. an FSDP config running as DDP)
    return accelerator


def _timeouts(base: Timeouts, collective: float | None, init: float | None) -> Timeouts:
    return Timeouts(base.collective if collective is None else collective, base.init if init is None else init)


def start_process_group(*, collective_timeout: float | None = None, init_timeout: float | None = None,
                        deterministic: bool = False) -> PartialState:
    """Join the process group the way make_accelerator would, for work that must happen before the
    Accelerator is built (rank 0 choosing the checkpoint whose config decides grad_accum, say)."""
    if deterministic:
        use_deterministic_algorithms()  # before the group touches the GPU: cuBLAS reads its variable once
    timeouts = _timeouts(Timeouts(), collective_timeout, init_timeout)
    cpu = use_cpu()
    _prepare_process_group(cpu, timeouts)
    return PartialState(cpu=cpu, timeout=timedelta(seconds=timeouts.init))


def _prepare_process_group(cpu: bool, timeouts: Timeouts) -> None:
    """What must happen before the default group exists: NCCL's watchdog settings, torchrun restarts, and the
    exit handler that lets gloo's worker threads settle (launcher.faults.gloo_exit; GPU runs have gloo
    groups too: the watchdog's, the streaming vote's)."""
    settle_gloo_workers_at_exit()
    if not cpu and torch.cuda.is_available():
        for key, value in nccl_environment().items():
            os.environ.setdefault(key, value)  # read when the NCCL group is created
    join_restarted_group("gloo" if cpu or not torch.cuda.is_available() else "nccl",
                         timedelta(seconds=timeouts.init))  # torchrun restarts: see launcher.faults.elastic


def use_cpu() -> bool:
    """Whether this process trains on the CPU (gloo); `PartialState(cpu=use_cpu())` starts the process group
    the same way make_accelerator would, for work that must happen before the Accelerator is built."""
    return trains_on_cpu(os.environ, accelerator_available=torch.cuda.is_available() or _has_other_accelerator())


def trains_on_cpu(environ: Mapping[str, str], *, accelerator_available: bool) -> bool:
    """The device decision: the CPU when asked for (`ACCELERATE_USE_CPU`, which `accelerate launch` sets from
    a config's `use_cpu: true`, as in cpu.yaml) or when there is no GPU (or other accelerator).

    accelerate itself reads the variable only when the Accelerator is built, after the process group exists
    (on a GPU machine an NCCL one): cpu.yaml would train on the GPU, cpu_ddp.yaml with
    ACCELERATE_USE_CPU=true would start NCCL with more processes than GPUs. So it is read here, first.
    """
    flag = environ.get("ACCELERATE_USE_CPU", "").strip()
    if flag:
        try:
            if str_to_bool(flag):
                return True
        except ValueError:
            raise UsageError(f"ACCELERATE_USE_CPU={flag!r} is not a yes/no value; set it to true or false") from None
    return not accelerator_available


def _has_other_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool((mps and mps.is_available()) or (xpu and xpu.is_available()))
