"""FSDP2 runs: accelerate's plugin on GPUs, the launcher's own `fully_shard` over gloo on CPU machines, and
the check, right after the Accelerator is built, that what runs is what the accelerate config asked for.

accelerate applies FSDP only for GPU-like distributed types: on a CPU machine an FSDP config becomes
MULTI_CPU (with `cpu=True`) and the model would silently train as plain DDP. Instead, when the config asks
for FSDP and accelerate set up a CPU gloo group, the launcher shards the model itself with accelerate's own
FSDP2 wrapping function (`fsdp2_prepare_model`, the code `Accelerator.prepare` runs on GPUs) driven by the same
plugin settings, and reports the run as "FSDP2 (launcher, CPU/gloo)". Training steps, gradient clipping and
the sharded checkpoints (launcher.checkpoint.sharded) then run exactly the torch FSDP2/DCP code a GPU run executes; only
the device and the collective backend differ. That is how CI exercises the FSDP path without a GPU.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType

from launcher.errors import UsageError

CPU_FSDP_LABEL = "FSDP2 (launcher, CPU/gloo)"


def fsdp_requested() -> bool:
    """True when `accelerate launch` ran with an FSDP config (it exports ACCELERATE_USE_FSDP=true)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def requested_fsdp_version() -> int:
    # accelerate launch exports FSDP_VERSION; a config without fsdp_version means FSDP1 to accelerate.
    return int(os.environ.get("FSDP_VERSION", "1"))


def launcher_shards(accelerator: Accelerator) -> bool:
    """True when the launcher, not accelerate, applies FSDP2: an FSDP config on a CPU gloo group."""
    return (fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU
            and accelerator.device.type == "cpu")


def is_fsdp(accelerator: Accelerator) -> bool:
    """True when this run shards the model (through accelerate on GPUs, through the launcher on CPU)."""
    return accelerator.distributed_type == DistributedType.FSDP or launcher_shards(accelerator)


def distributed_label(accelerator: Accelerator) -> str:
    """What config.json's run_info and the log call the distributed setup: never DDP while FSDP was asked."""
    if launcher_shards(accelerator):
        return CPU_FSDP_LABEL
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return str(accelerator.distributed_type.value)


def check_distributed(accelerator: Accelerator) -> None:
    """Raise UsageError when the processes that joined or the parallelism differ from the launch's request."""
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != accelerator.num_processes:
        raise UsageError(f"accelerate launch started {launched} processes but the Accelerator sees "
                         f"{accelerator.num_processes} ({accelerator.distributed_type.value}); the processes "
                         f"would train independently: check the accelerate config and --num_processes")
    if not fsdp_requested():
        return
    version = requested_fsdp_version()
    if version != 2:
        raise UsageError(f"the accelerate config asks for FSDP version {version}; the launcher's sharded "
                         f"checkpoints need FSDP2: set fsdp_config.fsdp_version: 2 (see accelerate_configs/fsdp.yaml)")
    if launcher_shards(accelerator) and os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true":
        raise UsageError("hybrid sharding (parallelism_config in the accelerate config) runs on GPUs only; on CPU "
                         "use accelerate_configs/cpu_fsdp.yaml, which shards over all processes")
    if accelerator.distributed_type == DistributedType.FSDP or launcher_shards(accelerator):
        return
    raise UsageError(f"the accelerate config asks for FSDP but accelerate set up "
                     f"{accelerator.distributed_type.value} on {accelerator.device.type}; launch it with "
                     f"`accelerate launch --config_file accelerate_configs/fsdp.yaml` (GPUs) or cpu_fsdp.yaml (CPU)")


def _plugin_from_env(accelerator: Accelerator) -> Any:
    """The FSDP plugin accelerate would build from the launch's FSDP_* variables (it reads them itself)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # Broadcasting rank 0's weights from the meta device is a GPU-memory optimisation; on CPU every rank
    # builds the same seeded model anyway.
    plugin.cpu_ram_efficient_loading = False
    return plugin


def block_wrap_policy() -> None:
    """Make accelerate's FSDP2 auto-wrap give a model's transformer blocks units of their own.

    accelerate's size-based policy picks every module above `fsdp_min_num_params`, bottom-up, and two of
    its picks break on transformers' causal LMs: a container without a forward (GPT-2 keeps its blocks in a
    plain `nn.ModuleList`, which `fully_shard` refuses: "does not support containers that do not implement
    forward"), and the decoder stack that holds the tied token embedding (sharding it replaces the
    embedding's parameter, so the output projection no longer shares it and accelerate shards the embedding
    a second time). So where the model names its blocks (`_no_split_modules`: every transformers model,
    and the built-in GPT) the policy becomes one unit per block, which is what transformer-based wrap,
    torchtitan and HF Trainer do; elsewhere it only passes over containers without a forward. Applied to
    accelerate's function in place (both `Accelerator.prepare` on GPUs and `shard_model` on CPUs call it
    there); idempotent.
    """
    from accelerate.utils import fsdp_utils

    original = fsdp_utils.fsdp2_prepare_auto_wrap_policy
    if getattr(original, "launcher_blocks", False):
        return

    def auto_wrap_policy(plugin: Any, model: torch.nn.Module) -> Any:
        policy = original(plugin, model)
        if policy is None:
            return None
        blocks = tuple({type(m) for m in model.modules()
                        if type(m).__name__ in (getattr(model, "_no_split_modules", None) or ())})
        if blocks:
            return lambda module: isinstance(getattr(module, "_checkpoint_wrapped_module", module), blocks)
        return lambda module: type(module).forward is not torch.nn.Module.forward and policy(module)

    auto_wrap_policy.launcher_blocks = True  # type: ignore[attr-defined]
    fsdp_utils.fsdp2_prepare_auto_wrap_policy = auto_wrap_policy


def shard_model(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """Apply FSDP2 to `model` in place on a CPU gloo group and point `optimizer` at the sharded parameters.

    Uses accelerate's `fsdp2_prepare_model`, so the FSDP units (auto-wrap policy, min_num_params,
    reshard_after_forward, mixed precision) are those accelerate builds on GPUs for the same config. The
    model is then marked as prepared, so `accelerator.prepare` leaves it alone (on MULTI_CPU it would wrap
    it in DDP).
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("FSDP on CPU needs a process group: start the run with accelerate launch "
                         "--config_file accelerate_configs/cpu_fsdp.yaml")
    names = {id(p): name for name, p in model.named_parameters()}
    old_groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    if optimizer.state:
        raise ValueError("shard the model before the optimizer has taken a step (its state would be lost)")
    # Only the attributes fsdp2_prepare_model reads; torch_device_mesh None means the default 1-D mesh.
    shim = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=_plugin_from_env(accelerator)),
                           mixed_precision=accelerator.mixed_precision, is_main_process=accelerator.is_main_process,
                           device=accelerator.device, torch_device_mesh=None, parallelism_config=None)
    model = fsdp2_prepare_model(shim, model)
    sharded = dict(model.named_parameters())
    for group, group_names in zip(optimizer.param_groups, old_groups):
        group["params"] = [sharded[name] for name in group_names]
    model._is_accelerate_prepared = True
    return model
