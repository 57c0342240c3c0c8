"""The epoch loop: written once, run unchanged on CPU, one GPU, many GPUs and many nodes.

`fit` lets Accelerate prepare the model, optimizer, dataloaders and scheduler (loaders from
launcher.data.make_loader are sharded by their own sampler and left alone), then trains and validates
the way a careful practitioner does: train()/eval() modes, no gradients in evaluation, gradient
accumulation through `accelerator.accumulate`, clipping on real optimizer steps, mixed precision from the
accelerate config, LR scheduling, early stopping decided from all-reduced metrics (so every rank agrees).

Nothing is read back to the host per step: losses and the task's statistics accumulate on the device and are
read once per log interval and once per epoch. The only per-step collective is the preemption vote, which
runs asynchronously on a CPU group (see launcher.faults.preemption).

The package, one concern per module (a name is looked up, and so patched, in the module that uses it):
- `accelerator`: make_accelerator, start_process_group, use_cpu;
- `determinism`: use_deterministic_algorithms (`--deterministic`) and the settings in effect;
- `batches`: splitting a batch, the forward pass, the task and a batch's losses, the valid samples of a last batch;
- `evaluation`: evaluate;
- `prediction`: predict (batch inference, every sample once, in dataset order);
- `options`: fit's grouped options (Monitor, EarlyStopping, Checkpointing);
- `steps`: the training step's functions and the micro-batches of an ElasticBatchSampler epoch;
- `state`: FitRun, the per-`fit` state;
- `resume`: restoring a run from a checkpoint, the re-planned schedule, runs already finished;
- `outputs`: checkpoints, the final model, metrics.jsonl, and the finiteness checks (Diverged);
- `training`: fit and the epoch loop;
- `callbacks`: Callback, the hooks on fit and their checkpointed state; `ema`: EMA, the weights' moving average;
- `user_model`: what a custom step receives as its model (the prepared model's call, the plain model's attributes);
- `launch`: what every recipe does around fit (flags, process group, output folder, relaunch, exit codes).
"""

from launcher.loop.accelerator import make_accelerator, start_process_group, use_cpu
from launcher.loop.batches import (
    Batch,
    UnpackBatch,
    batch_losses,
    default_unpack,
    forward,
    last_batch_remainder,
    logits_of,
    per_sample_loss_fn,
    resolve_task,
    valid_in_batch,
)
from launcher.loop.callbacks import Callback, CallbackRun
from launcher.loop.ema import EMA
from launcher.loop.evaluation import evaluate
from launcher.loop.options import Checkpointing, EarlyStopping, Monitor
from launcher.loop.outputs import Diverged, finite_or_none
from launcher.loop.prediction import predict
from launcher.loop.outputs import _json_line as _json_line
from launcher.loop.resume import finished_reason, planned_steps
from launcher.loop.state import FitRun
from launcher.loop.steps import _mean_backward as _mean_backward
from launcher.loop.training import Preempted, fit, should_save_step

__all__ = [
    "Batch",
    "Callback",
    "CallbackRun",
    "Checkpointing",
    "EMA",
    "Diverged",
    "EarlyStopping",
    "FitRun",
    "Preempted",
    "UnpackBatch",
    "batch_losses",
    "default_unpack",
    "evaluate",
    "finished_reason",
    "finite_or_none",
    "fit",
    "forward",
    "last_batch_remainder",
    "logits_of",
    "make_accelerator",
    "Monitor",
    "per_sample_loss_fn",
    "planned_steps",
    "predict",
    "resolve_task",
    "should_save_step",
    "start_process_group",
    "use_cpu",
    "valid_in_batch",
]
