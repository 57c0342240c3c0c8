"""Image and tabular classification, from a laptop CPU to many GPU nodes, with the same code.

    accelerate launch recipes/classify.py                       # digits (embedded), 1 process
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/classify.py --epochs 5
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/classify.py \\
        --dataset cifar10 --model resnet
    python recipes/classify.py --help                           # every flag, with its default

Outputs go to --output-dir (default runs/<time>): metrics.jsonl, config.json, checkpoints/, final/.
Run it again with the same --output-dir and it continues from the newest checkpoint (--resume auto).
Copy this file and change it: the steps below run in dependency order, each a short function.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from launcher import evaluate, fit, make_accelerator
from launcher.checkpoint import read_trainer_state, resolve_resume, write_json_atomic
from launcher.config import TrainConfig, parse_config
from launcher.data import DataSplits, load_splits, make_loader
from launcher.errors import EXIT_USAGE, UsageError
from launcher.fsdp import distributed_label, is_fsdp
from launcher.models import build_model
from launcher.schedulers import from_name
from launcher.sharded import check_resume_format, load_weights
from launcher.tracking import run_metadata, start_tracker


def setup_output_dir(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Rank 0 picks the folder (a timestamp by default) and every rank uses the same one."""
    chosen = [str(config.resolved_output_dir())]
    broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def setup_data(config: TrainConfig, accelerator: Accelerator) -> DataSplits:
    error = None
    with accelerator.main_process_first():  # the first process fills the datasets cache, the rest read it
        try:
            data = load_splits(config.dataset, image_column=config.image_column,
                               label_column=config.label_column, val_fraction=config.val_fraction, seed=config.seed)
        except UsageError as err:  # leave the block normally so its barrier is met on every rank
            error = err
    if error is not None:
        raise error
    return data


def setup_model(config: TrainConfig, data: DataSplits) -> tuple[torch.nn.Module, int]:
    """The model and its number of outputs, checked against the labels on one sample."""
    model = build_model(config.model, data.input_shape, data.num_classes)
    inputs, _ = next(iter(make_loader(data.val, 1, shuffle=False)))
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    if outputs.dim() != 2 or outputs.shape[-1] < data.num_classes:
        raise UsageError(f"dataset {data.name} has {data.num_classes} classes (labels 0..{data.num_classes - 1}) "
                         f"but model {config.model} outputs shape {tuple(outputs.shape[1:])} per sample; "
                         f"build it with num_classes={data.num_classes}")
    return model, outputs.shape[-1]


def run_info(config: TrainConfig, accelerator: Accelerator, data: DataSplits, num_classes: int) -> dict:
    procs_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return {
        "world_size": accelerator.num_processes,
        "num_nodes": max(accelerator.num_processes // procs_per_node, 1),
        "procs_per_node": procs_per_node,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": distributed_label(accelerator),  # e.g. "FSDP2 (launcher, CPU/gloo)", never a guess
        "device": accelerator.device.type,
        "dataset": data.name,
        "model": config.model,
        "num_classes": num_classes,
        "train_samples": len(data.train),
        "val_samples": len(data.val),
        "effective_batch_size": config.batch_size * accelerator.num_processes * config.grad_accum,
        "torch": torch.__version__,
        **run_metadata(),  # git commit of the training code, SLURM job / array ids when present
    }


def run_eval_only(config: TrainConfig, accelerator: Accelerator, output_dir: Path, data: DataSplits,
                  model: torch.nn.Module, checkpoint: Path, num_classes: int) -> None:
    load_weights(model, checkpoint)  # sharded or not, whatever world size wrote it: the whole model per process
    loader = make_loader(data.val, config.eval_batch_size or config.batch_size, shuffle=False,
                         num_workers=config.num_workers)
    # Evaluation needs no sharding or DDP wrapper (accelerate's FSDP2 prepare also wants an optimizer).
    model = accelerator.prepare_model(model.to(accelerator.device), evaluation_mode=True)
    metrics = evaluate(model, accelerator.prepare_data_loader(loader), torch.nn.CrossEntropyLoss(),
                       num_classes=num_classes, accelerator=accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        row = {k: v for k, v in metrics.as_row("val").items()}
        write_json_atomic(output_dir / "eval.json", {**row, "world_size": accelerator.num_processes,
                                                     "checkpoint": str(checkpoint)})
        print(f"eval of {checkpoint}: val_loss {metrics.loss:.4f} val_accuracy {metrics.accuracy:.4f} "
              f"val_f1 {metrics.f1:.4f} on {metrics.samples} samples -> {output_dir / 'eval.json'}")


def train(argv: list[str] | None = None) -> None:
    config = parse_config(argv, description=__doc__)
    accelerator = make_accelerator(grad_accum=config.grad_accum, seed=config.seed)
    output_dir = setup_output_dir(config, accelerator)
    checkpoint = resolve_resume(config.resume, output_dir)
    if checkpoint is not None and not config.eval_only:
        check_resume_format(checkpoint, sharded_run=is_fsdp(accelerator))
    set_seed(config.seed)
    data = setup_data(config, accelerator)
    model, num_classes = setup_model(config, data)
    info = run_info(config, accelerator, data, num_classes)
    if config.eval_only:
        run_eval_only(config, accelerator, output_dir, data, model, checkpoint, num_classes)
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = from_name(config.scheduler, warmup_steps=config.warmup_steps, mode=config.best_mode,
                          factor=config.plateau_factor, patience=config.plateau_patience)
    train_loader = make_loader(data.train, config.batch_size, shuffle=True, num_workers=config.num_workers)
    val_loader = make_loader(data.val, config.eval_batch_size or config.batch_size, shuffle=False,
                             num_workers=config.num_workers)
    # Everything is validated: from here on the output folder is written.
    resumed = read_trainer_state(checkpoint) if checkpoint else {}
    tracker = start_tracker(config, accelerator=accelerator, output_dir=output_dir, run_info=info,
                            resume_run_id=resumed.get("extra", {}).get("wandb_run_id"),
                            history=resumed.get("history"))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "config.json", {"config": config.to_dict(), "run_info": info})
    accelerator.print(f"distributed: {info['distributed_type']}, {info['world_size']} processes on "
                      f"{info['device']}, mixed precision {info['mixed_precision']}")
    fit(model, optimizer, train_loader, val_loader, torch.nn.CrossEntropyLoss(), epochs=config.epochs,
        num_classes=num_classes, accelerator=accelerator, scheduler=scheduler,
        max_grad_norm=config.max_grad_norm or None, best_metric=config.best_metric, best_mode=config.best_mode,
        early_stopping_patience=config.early_stopping_patience, output_dir=output_dir,
        save_every_steps=config.save_every_steps, keep_last=config.keep_last, resume_from=checkpoint,
        config={"config": config.to_dict(), "run_info": info}, extra_state={"wandb_run_id": tracker.run_id},
        log_every=config.log_every, tracker=tracker)
    accelerator.print(f"done: {output_dir}/final/model.safetensors")


def main(argv: list[str] | None = None) -> int:
    try:
        train(argv)
        code = 0
    except UsageError as err:  # raised alike on every rank: the checks are deterministic
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"classify.py: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave together: a rank that tears its group down while a peer is still writing files can take the
        # peer's connection down with it, and torchrun's exit barrier wants every node to finish cleanly.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
