"""Image, text and tabular classification and regression, from a laptop CPU to many GPU nodes, with the same code.

    accelerate launch recipes/classify.py                       # digits (embedded), 1 process
    accelerate launch recipes/classify.py --dataset diabetes.csv --label-column target   # float target: regression
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/classify.py --epochs 5
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/classify.py \\
        --dataset cifar10 --model resnet
    accelerate launch recipes/classify.py --dataset glue --dataset-config mrpc \\
        --model hf:bert-base-uncased --lr 2e-5 --epochs 3         # transformers models: docs/hf.md
    python recipes/classify.py --help                           # every flag, with its default

Outputs go to --output-dir (default runs/<time>-<random>): metrics.jsonl, config.json, checkpoints/, final/.
Run it again with the same --output-dir and it continues from the newest checkpoint (--resume auto).
Copy this file and change it: the steps below run in dependency order, each a short function.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from launcher import (
    EarlyStopping,
    Monitor,
    MultiLabelClassification,
    Regression,
    SingleLabelClassification,
    evaluate,
    fit,
    make_accelerator,
)
from launcher.checkpoint import write_json_atomic
from launcher.checkpoint.files import write_parquet_atomic
from launcher.checkpoint.sharded import check_resume_format, load_weights
from launcher.config import TrainConfig
from launcher.data import DataSplits, load_splits, make_loader
from launcher.data.labels import singleton_classes
from launcher.data.streaming import load_stream_splits
from launcher.data.text import TextOptions
from launcher.errors import UsageError
from launcher.loop import default_unpack, finite_or_none, forward, predict
from launcher.loop import launch
from launcher.loop.determinism import determinism_settings
from launcher.loop.ema import EMA
from launcher.loop.launch import open_run, relaunch
from launcher.loop.outputs import eval_writes
from launcher.loop.predicting import named_rows, with_preprocessing
from launcher.loop.param_groups import recipe_optimizer
from launcher.models import build_model, hf
from launcher.parallel.fsdp import distributed_label, is_fsdp
from launcher.schedulers import from_name
from launcher.tracking.tracker import PREDICTIONS_TABLE_ROWS, first_rows, run_metadata, start_tracker


def setup_data(config: TrainConfig, accelerator: Accelerator) -> DataSplits:
    error, text = None, None
    if hf.is_hf(config.model):  # text is tokenized with the model's own tokenizer (loaded only for text)
        name = hf.model_name(config.model)
        text = TextOptions(lambda: hf.load_tokenizer(name), max_length=config.max_length,
                           pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    with accelerator.main_process_first():  # the first process fills the datasets cache, the rest read it
        try:
            if config.streaming:
                if config.augment != "none":
                    raise UsageError("--augment is not available with --streaming yet; use --augment none")
                data = load_stream_splits(config.dataset, seed=config.seed, label_column=config.label_column,
                                          image_column=config.image_column, buffer=config.shuffle_buffer,
                                          problem_type=config.problem_type)
                if not len(data.train) and config.scheduler == "cosine":
                    raise UsageError("--scheduler cosine needs the number of training rows, which this stream "
                                     "does not say; use --scheduler constant or plateau")
            else:
                data = load_splits(config.dataset, image_column=config.image_column,
                                   label_column=config.label_column, val_fraction=config.val_fraction,
                                   seed=config.seed, augment=config.augment, image_size=config.image_size,
                                   image_mean=config.image_mean, image_std=config.image_std,
                                   dataset_config=config.dataset_config, text_columns=config.text_columns,
                                   text=text, problem_type=config.problem_type,
                                   categorical=not config.no_categorical, impute=not config.no_impute)
        except UsageError as err:  # leave the block normally so its barrier is met on every rank
            error = err
    if error is not None:
        raise error
    single = data.problem_type == "single_label_classification"
    accelerator.print(f"problem type: {data.problem_type} ({data.problem_reason}, {data.num_classes} "
                      f"{'classes' if 'classification' in data.problem_type else 'target(s)'}); "
                      f"--problem-type sets another")
    if data.features_line:  # tables: numeric, missing values, categorical (launcher.data.preprocess)
        accelerator.print(data.features_line)
    if single and not config.streaming:  # a class seen once is in only one split (launcher.data.labels)
        lonely = singleton_classes(data.class_names, data.train.labels, data.val.labels)
        if lonely:
            accelerator.print(lonely)
    if single and data.num_classes < 2:
        raise UsageError(f"dataset {data.name} has {data.num_classes} class ({', '.join(data.class_names)}) in "
                         f"--label-column {config.label_column or '(auto-detected)'}; classification needs at "
                         f"least two: check the dataset and the label column")
    if hf.is_hf(config.model) and data.kind == "image":  # the model's image processor, not our standardization
        data = hf.with_image_processor(data, hf.model_name(config.model), notice=accelerator.print)
    return data


def setup_task(data: DataSplits, num_outputs: int) -> Any:
    """The task the label column asks for (launcher.tasks), named as transformers' problem_type."""
    if data.problem_type == "regression":
        return Regression(num_outputs, target_mean=data.target_mean, target_std=data.target_std)
    if data.problem_type == "multi_label_classification":
        return MultiLabelClassification(num_outputs)
    return SingleLabelClassification(num_outputs)


def setup_monitor(config: TrainConfig, task: Any) -> TrainConfig:
    """--best-metric/--best-mode resolved for the task (its own by default); a metric it never reports fails
    here, before anything is written."""
    monitor = Monitor(config.best_metric, config.best_mode).resolve(task, ())
    return dataclasses.replace(config, best_metric=monitor.metric, best_mode=monitor.mode)


def setup_model(config: TrainConfig, accelerator: Accelerator, data: DataSplits) -> tuple[torch.nn.Module, int]:
    """The model and its number of outputs, checked against the labels on one sample."""
    if hf.is_hf(config.model):
        model = hf.load_model(hf.model_name(config.model), data, notice=accelerator.print)
    else:
        model = build_model(config.model, data.input_shape, data.num_classes)
    inputs, _ = default_unpack(next(iter(make_loader(data.val, 1, shuffle=False, rank=0, world_size=1))))
    model.eval()
    with torch.no_grad():
        outputs = forward(model, inputs)  # the logits, whatever the model returns them in
    if data.problem_type != "single_label_classification":
        if outputs[0].numel() != data.num_classes:
            raise UsageError(f"dataset {data.name} has {data.num_classes} {data.problem_type.replace('_', ' ')} "
                             f"target(s) per sample but model {config.model} outputs shape {tuple(outputs.shape[1:])}; "
                             f"build it with num_classes={data.num_classes}")
        return model, data.num_classes
    if outputs.dim() != 2 or outputs.shape[-1] < data.num_classes:
        raise UsageError(f"dataset {data.name} has {data.num_classes} classes (labels 0..{data.num_classes - 1}) "
                         f"but model {config.model} outputs shape {tuple(outputs.shape[1:])} per sample; "
                         f"build it with num_classes={data.num_classes}")
    return model, outputs.shape[-1]


def run_info(config: TrainConfig, accelerator: Accelerator, data: DataSplits, model: torch.nn.Module,
             num_classes: int) -> dict:
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
        "problem_type": data.problem_type,
        "class_names": list(data.class_names),  # W&B's confusion matrix and eval.json name the classes
        "train_samples": len(data.train),
        "val_samples": len(data.val),
        "effective_batch_size": config.batch_size * accelerator.num_processes * config.grad_accum,
        "model/num_parameters": sum(p.numel() for p in model.parameters()),  # HF Trainer's W&B key
        "model/trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch": torch.__version__,
        "determinism": determinism_settings(),  # what --deterministic set (or not), as the run trained
        **run_metadata(),  # git commit of the training code, SLURM job / array ids when present
    }


def run_eval_only(config: TrainConfig, accelerator: Accelerator, output_dir: Path, data: DataSplits,
                  model: torch.nn.Module, checkpoint: Path, task: Any, info: dict, trained: dict) -> None:
    """Scores the split the checkpoint was validated on: its seed and val fraction come from its config;
    --predictions also writes every sample's prediction, once, in the split's order.

    The scores also go to a W&B run of job type eval, which names the checkpoint and the training run."""
    load_weights(model, checkpoint)  # sharded or not, whatever world size wrote it: the whole model per process
    loader = make_loader(data.val, config.eval_batch_size or config.batch_size, shuffle=False,
                         num_workers=config.num_workers, seed=config.seed)
    # Evaluation needs no sharding or DDP wrapper (accelerate's FSDP2 prepare also wants an optimizer).
    model = accelerator.prepare_model(model.to(accelerator.device), evaluation_mode=True)
    metrics = evaluate(model, loader, task=task, accelerator=accelerator)
    rows = None  # --predictions: every rank predicts its share; rank 0 writes them all, in the split's order
    if config.predictions:
        rows = predict(model, loader, task, accelerator=accelerator)
        rows = rows if rows is None else named_rows(rows, data.class_names, data.problem_type)  # class names
        eval_writes(accelerator.is_main_process, Path(config.predictions), "predictions",
                    lambda: write_parquet_atomic(Path(config.predictions), rows), flag="--predictions path")
    row = finite_or_none(metrics.as_row("val"))  # strict JSON: NaN/inf as null

    def write_eval() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "eval.json", {**row, "world_size": accelerator.num_processes,
                                                     "checkpoint": str(checkpoint),
                                                     "problem_type": data.problem_type,
                                                     "class_names": list(data.class_names)})

    eval_writes(accelerator.is_main_process, output_dir / "eval.json", "eval.json", write_eval, flag="--output-dir")
    if accelerator.is_main_process:
        shown = " ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
        print(f"eval of {checkpoint}: {shown} on {metrics.samples} samples -> {output_dir / 'eval.json'}"
              + (f", predictions -> {config.predictions}" if config.predictions else ""))
    tracker = start_tracker(config, accelerator=accelerator, output_dir=output_dir, run_info=info, resume_run_id=None)
    tracker.log_evaluation(metrics.as_row("val"), {"checkpoint": str(checkpoint.resolve()),
                                                   "run_id": trained.get("extra", {}).get("wandb_run_id")})
    if rows is not None:  # rank 0 (the others' tracker logs nothing): the first rows, as a W&B table
        tracker.log_table("predictions", *first_rows(rows, PREDICTIONS_TABLE_ROWS))
    tracker.finish([], 0)


def train(given: dict, config: TrainConfig, output_dir: Path, lease: Any) -> None:
    """Everything after the output folder is claimed (launcher.loop.launch): relaunch rules, data, model,
    then fit."""
    config, checkpoint, resumed = relaunch(given, config, output_dir)
    accelerator = make_accelerator(grad_accum=config.grad_accum, seed=config.seed,
                                   collective_timeout=config.collective_timeout, init_timeout=config.init_timeout,
                                   deterministic=config.deterministic)
    if checkpoint is not None and not config.eval_only:
        check_resume_format(checkpoint, sharded_run=is_fsdp(accelerator))
    set_seed(config.seed)
    data = setup_data(config, accelerator)
    model, num_classes = setup_model(config, accelerator, data)
    task = setup_task(data, num_classes)
    config = setup_monitor(config, task)
    info = run_info(config, accelerator, data, model, num_classes)
    if config.eval_only:
        run_eval_only(config, accelerator, output_dir, data, model, checkpoint, task, info, resumed)
        return
    # No weight decay on biases and norm weights (launcher.param_groups); --decay-all: one group.
    optimizer, config = recipe_optimizer(model, config, resumed, info, accelerator.print)
    scheduler = from_name(config.scheduler, warmup_steps=config.warmup_steps, mode=config.best_mode,
                          factor=config.plateau_factor, patience=config.plateau_patience)
    # Sharded per rank by make_loader; the order is a function of (seed, epoch), the position a global
    # sample count, so a resume continues exactly at any world size and worker count (docs/data.md).
    train_loader = make_loader(data.train, config.batch_size, shuffle=True, num_workers=config.num_workers,
                               seed=config.seed)
    val_loader = make_loader(data.val, config.eval_batch_size or config.batch_size, shuffle=False,
                             num_workers=config.num_workers, seed=config.seed)
    checkpointing, tracker = open_run(
        config, accelerator, output_dir, checkpoint, resumed, model=model, optimizer=optimizer, info=info,
        lease=lease, export_final=hf.exporter(data.preprocessor) if hf.is_hf(config.model) else None)
    # Every checkpoint and final/ carry what turns a raw row into an input (final/preprocessing.json).
    checkpointing = with_preprocessing(checkpointing, data.preprocessing, model=config.model, num_outputs=num_classes)
    patience = config.early_stopping_patience
    fit(model, optimizer, train_loader, val_loader, epochs=config.epochs, task=task,
        accelerator=accelerator, scheduler=scheduler,
        max_grad_norm=config.max_grad_norm or None, monitor=Monitor(config.best_metric, config.best_mode),
        early_stopping=EarlyStopping(patience) if patience is not None else None, checkpointing=checkpointing,
        log_every=config.log_every, tracker=tracker, find_unused_parameters=config.find_unused_parameters,
        callbacks=[EMA(config.ema)] if config.ema else None)  # final/ then holds the EMA weights
    accelerator.print(f"done: {output_dir}/final/model.safetensors"
                      + (f" and {output_dir}/final/hf (from_pretrained)" if hf.is_hf(config.model) else ""))


def main(argv: list[str] | None = None) -> int:
    return launch.main(train, argv, description=__doc__, prog="classify.py")


if __name__ == "__main__":
    launch.exit_now(main())
