"""Causal language models, pretrained or fine-tuned, from a laptop CPU to FSDP on many GPU nodes.

    accelerate launch recipes/lm.py                  # a byte-level gpt-nano on Python's standard library
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/lm.py --epochs 3
    accelerate launch recipes/lm.py --dataset my_texts/ --model gpt-mini --block-size 256
    accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/lm.py --model hf:gpt2 \\
        --dataset wikitext --dataset-config wikitext-2-raw-v1 --lr 5e-5 --batch-size 8 --block-size 512
    python recipes/lm.py --help                      # every flag, with its default (docs/lm.md)

With no flags it trains on the embedded corpus, the .py files of the standard library of the Python that
runs it (no download), on a fixed sample of 2M training tokens per epoch (--train-tokens 0: all of them),
and prints validation loss and perplexity per epoch, tokens per second, and a sample continuation.
Outputs go to --output-dir as for classify.py: metrics.jsonl, checkpoints/, final/ (final/hf/ for hf:
models, loadable with AutoModelForCausalLM.from_pretrained). The same folder again continues the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from launcher import CausalLM, EarlyStopping, Monitor, evaluate, fit, make_accelerator
from launcher.checkpoint import write_json_atomic
from launcher.checkpoint.sharded import check_resume_format, load_weights
from launcher.config import TrainConfig, option
from launcher.data import make_loader
from launcher.data.lm.blocks import BlockDataset, LMSplits, load_lm_splits
from launcher.data.lm.corpus import NAME as STDLIB
from launcher.data.lm.tokenizers import BYTE
from launcher.errors import UsageError
from launcher.loop import finite_or_none, launch
from launcher.loop.determinism import determinism_settings
from launcher.loop.ema import EMA
from launcher.loop.launch import open_run, relaunch
from launcher.loop.outputs import eval_writes
from launcher.loop.param_groups import recipe_optimizer
from launcher.models import hf
from launcher.models.gpt import GPT, SIZES, build_gpt, check_block_size
from launcher.parallel.fsdp import distributed_label, is_fsdp
from launcher.schedulers import from_name
from launcher.tracking.throughput import (
    Throughput,
    describe_peak,
    flops_per_token,
    matmul_params,
    peak_flops,
    transformer_shape,
)
from launcher.tracking.tracker import NullTracker, run_metadata, start_tracker

SAMPLE_TOP_K, SAMPLE_TEMPERATURE = 10, 0.8
STDLIB_TRAIN_TOKENS = 2_000_000  # the default run's tokens per epoch: about a minute per epoch on one core


LM_METRIC_NAMES = tuple(f"val_{name}" for name in ("loss", "perplexity", "token_accuracy"))


@dataclass
class LMConfig(TrainConfig):
    """classify.py's flags (optimisation, checkpoints, faults, W&B) with a language model's defaults, less the
    image and label columns, plus the flags below."""

    not_flags = ("image_column", "text_columns", "max_length", "label_column", "problem_type", "augment",
                 "image_size", "image_mean", "image_std", "predictions")

    dataset: str = option(STDLIB, "text: 'stdlib' (the embedded corpus: this Python's standard library), a text "
                          "file or folder of them, a save_to_disk folder, parquet/json/csv files or folders with a "
                          "text column, or a Hub dataset name", relaunch="fixed")
    best_metric: str | None = option(None, "validation metric for early stopping, plateau LR and the best "
                                     "checkpoint (default: val_loss)", LM_METRIC_NAMES, relaunch="fixed")
    model: str = option("gpt-nano", f"{', '.join(SIZES)} (the built-in GPT, docs/lm.md), or hf:NAME_OR_PATH "
                        f"(AutoModelForCausalLM with its own tokenizer)", relaunch="fixed")
    val_fraction: float = option(0.05, "fraction of the documents carved (by --seed) for validation when the "
                                 "dataset has no validation split", relaunch="fixed")
    shuffle_buffer: int = option(1000, "documents in the shuffle buffer of --streaming")
    epochs: int = option(2, "number of epochs")
    batch_size: int = option(32, "blocks per process per micro-batch", relaunch="refuse-mid-epoch")
    lr: float = option(2e-3, "peak learning rate (AdamW)", relaunch="fixed")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices and embeddings; biases and norm weights "
                                 "get none (--decay-all: every parameter)", relaunch="fixed")
    log_every: int = option(20, "log the training loss and tokens/s every N optimizer steps")
    # language-model flags
    block_size: int = option(128, "tokens per training block (documents are joined, end-of-text between them, "
                             "and cut into blocks); at most the model's positions", relaunch="fixed")
    text_column: str | None = option(None, "column holding the text (default: a string column named text, "
                                     "content, document or body, or the only string column)", relaunch="fixed")
    tokenizer: str = option(BYTE, "tokenizer of a built-in model: 'byte' (UTF-8 bytes, 257 ids) or a "
                            "transformers tokenizer's folder or name; hf: models always use their own",
                            relaunch="fixed")
    from_scratch: bool = option(False, "hf: models: build the model from its config with fresh weights "
                                "(pretraining) instead of loading its weights", relaunch="fixed")
    train_tokens: int | None = option(None, "train on a fixed sample of this many tokens per epoch, drawn by "
                                      f"--seed; 0: every block (default: {STDLIB_TRAIN_TOKENS:,} for stdlib, "
                                      f"every block otherwise)", relaunch="fixed")
    dropout: float = option(0.0, "dropout of the built-in GPT", relaunch="fixed")
    positions: str = option("learned", "positions of the built-in GPT: learned (GPT-2) or rotary (RoPE)",
                            ("learned", "rotary"), relaunch="fixed")
    activation_checkpointing: bool = option(False, "recompute each transformer block in the backward pass: "
                                            "less activation memory for about a third more compute")
    peak_flops: float | None = option(None, "the device's peak FLOP/s for MFU (default: known GPUs' bf16 "
                                      "dense peak; none on a CPU)")
    sample_tokens: int = option(120, "tokens of the sample continuation printed at the end (and logged to "
                                "W&B after each validation); 0: none")
    prompt: str | None = option(None, "the sample's prompt (default: the start of the first validation block)")

    def validate(self) -> None:
        super().validate()
        if self.block_size < 2:
            raise UsageError(f"--block-size must be at least 2: a block of T tokens trains T-1 predictions "
                             f"(got {self.block_size})")
        if self.train_tokens is not None and self.train_tokens < 0:
            raise UsageError(f"--train-tokens must be 0 (every block) or positive (got {self.train_tokens})")
        if self.sample_tokens < 0:
            raise UsageError(f"--sample-tokens cannot be negative (got {self.sample_tokens})")
        if hf.is_hf(self.model) and self.tokenizer != BYTE:
            raise UsageError(f"--tokenizer is for the built-in models; --model {self.model} uses its own: "
                             f"drop --tokenizer")
        if self.streaming and self.scheduler == "cosine":
            raise UsageError("--scheduler cosine needs the number of training steps, which a stream does not know "
                             "until it is read; with --streaming use --scheduler constant (and --warmup-steps) or "
                             "plateau")
        if self.from_scratch and not hf.is_hf(self.model):
            raise UsageError("--from-scratch is for hf: models (the built-in GPT always starts from fresh weights); "
                             "drop it")


def setup_data(config: LMConfig, accelerator: Accelerator) -> LMSplits:
    """The tokenizer, and the corpus tokenized once and cut into blocks (the first process fills the datasets
    cache, the others read it)."""
    tokenizer = hf.load_lm_tokenizer(hf.model_name(config.model) if hf.is_hf(config.model) else config.tokenizer)
    error = None
    with accelerator.main_process_first():
        try:
            data = load_lm_splits(config.dataset, tokenizer, block_size=config.block_size,
                                  dataset_config=config.dataset_config, text_column=config.text_column,
                                  val_fraction=config.val_fraction, seed=config.seed,
                                  world_size=accelerator.num_processes, streaming=config.streaming,
                                  shuffle_buffer=config.shuffle_buffer)
        except UsageError as err:  # leave the block normally so its barrier is met on every rank
            error = err
    if error is not None:
        raise error
    budget = config.train_tokens if config.train_tokens is not None else \
        STDLIB_TRAIN_TOKENS if config.dataset == STDLIB else 0
    line = data.describe()
    if budget and isinstance(data.train, BlockDataset) and budget < data.train.token_count():
        data.train = data.train.sample(max(budget // config.block_size, accelerator.num_processes), config.seed)
        line += f"; an epoch trains on a fixed sample of {data.train.token_count():,} of them (--train-tokens 0: all)"
    accelerator.print(line)
    return data


def setup_model(config: LMConfig, accelerator: Accelerator, data: LMSplits) -> torch.nn.Module:
    if hf.is_hf(config.model):
        model = hf.load_causal_lm(hf.model_name(config.model), data.tokenizer, from_scratch=config.from_scratch,
                                  notice=accelerator.print)
        if config.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = build_gpt(config.model, vocab_size=len(data.tokenizer), block_size=config.block_size,
                          dropout=config.dropout, positions=config.positions,
                          activation_checkpointing=config.activation_checkpointing)
    check_block_size(config.block_size, model, config.model)
    return model


def setup_throughput(config: LMConfig, accelerator: Accelerator, model: torch.nn.Module) -> Throughput:
    """FLOPs per token as the field counts them (6N + attention) and the device's peak, for MFU."""
    n_layer, n_embd = transformer_shape(model)
    device_name = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else accelerator.device.type
    peak = peak_flops(device_name, config.peak_flops)
    accelerator.print(describe_peak(device_name, peak))
    return Throughput(flops_per_token(matmul_params(model), n_layer, n_embd, config.block_size), peak)


def run_info(config: LMConfig, accelerator: Accelerator, data: LMSplits, model: torch.nn.Module,
             throughput: Throughput) -> dict:
    procs_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return {
        "world_size": accelerator.num_processes,
        "num_nodes": max(accelerator.num_processes // procs_per_node, 1),
        "procs_per_node": procs_per_node,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": distributed_label(accelerator),
        "device": accelerator.device.type,
        "dataset": data.name,
        "model": config.model,
        "problem_type": CausalLM.problem_type,
        "tokenizer": getattr(data.tokenizer, "name_or_path", BYTE),
        "vocab_size": len(data.tokenizer),
        "train_blocks": len(data.train),
        "val_blocks": len(data.val),
        "val_tokens": data.val.token_count(),
        "tokens_per_optimizer_step": config.batch_size * config.block_size * accelerator.num_processes
        * config.grad_accum,
        "flops_per_token": throughput.flops_per_token,
        "model/num_parameters": sum(p.numel() for p in model.parameters()),
        "model/trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch": torch.__version__,
        "determinism": determinism_settings(),
        **run_metadata(),
    }


# ---------------------------------------------------------------------------------------------------------
# Sample continuations


def prompt_ids(config: LMConfig, data: LMSplits) -> torch.Tensor:
    """(1, T) ids of --prompt, else the first 32 tokens of the first validation block."""
    if config.prompt:
        ids = data.tokenizer(config.prompt)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)
    return torch.as_tensor(data.val[0]["input_ids"][:32], dtype=torch.long).unsqueeze(0)


def continuation(model: torch.nn.Module, tokenizer: Any, prompt: torch.Tensor, new_tokens: int,
                 seed: int = 0) -> tuple[str, str]:
    """(prompt text, continuation text) from a plain (unsharded) model on this process alone: top-10
    sampling at temperature 0.8 with its own seeded generator (greedy decoding of a small model repeats
    itself; the seed makes the sample the same on every call)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    limit = context_length(model)
    if limit is not None and prompt.shape[1] + new_tokens > limit:  # a model with absolute positions
        new_tokens = min(new_tokens, limit - 1)
        prompt = prompt[:, -(limit - new_tokens):]  # the prompt's end, cropped to the model's context
    if isinstance(model, GPT):
        out = model.generate(prompt, new_tokens, top_k=SAMPLE_TOP_K, temperature=SAMPLE_TEMPERATURE, seed=seed)
    else:
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=True, top_k=SAMPLE_TOP_K, temperature=SAMPLE_TEMPERATURE,
                                 pad_token_id=tokenizer.pad_token_id)
        model.train(was_training)
    return tokenizer.decode(prompt[0].tolist()), tokenizer.decode(out[0, prompt.shape[1]:].tolist())


def context_length(model: torch.nn.Module) -> int | None:
    """How many positions an hf model can attend to (GPT-2's n_positions, others' max_position_embeddings);
    None for the built-in GPT, whose generate crops its context itself."""
    if isinstance(model, GPT):
        return None
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def sample_or_warn(model: torch.nn.Module, tokenizer: Any, prompt: torch.Tensor, new_tokens: int,
                   seed: int) -> tuple[str, str] | None:
    """`continuation`, or None after a one-line warning: a sample is a courtesy and never fails a run."""
    try:
        return continuation(model, tokenizer, prompt, new_tokens, seed)
    except Exception as err:  # noqa: BLE001 - whatever generate raises, training already finished
        print(f"warning: no sample continuation ({type(err).__name__}: {err})", flush=True)
        return None


class SampleTables:
    """The tracker, plus a sample continuation logged as a W&B table after each validation (rank 0 only,
    from the live model: not under FSDP, where a forward pass needs every rank)."""

    def __init__(self, tracker: Any, model: torch.nn.Module, tokenizer: Any, prompt: torch.Tensor,
                 new_tokens: int, seed: int) -> None:
        self._tracker, self._model, self._tokenizer = tracker, model, tokenizer
        self._prompt, self._new_tokens, self._seed, self._rows = prompt, new_tokens, seed, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)

    def log_epoch(self, row: dict) -> None:
        self._tracker.log_epoch(row)
        sample = sample_or_warn(self._model, self._tokenizer, self._prompt, self._new_tokens, self._seed)
        if sample is None:
            return
        self._rows.append([row["epoch"], row["step"], *sample])
        self._tracker.log_table("samples", ["epoch", "step", "prompt", "continuation"], self._rows, step=row["step"])


def sample_tracker(tracker: Any, config: LMConfig, accelerator: Accelerator, model: torch.nn.Module,
                   data: LMSplits) -> Any:
    if isinstance(tracker, NullTracker) or not config.sample_tokens or is_fsdp(accelerator):
        return tracker
    return SampleTables(tracker, model, data.tokenizer, prompt_ids(config, data), config.sample_tokens, config.seed)


def final_model(config: LMConfig, output_dir: Path, data: LMSplits) -> torch.nn.Module:
    """The trained model, read back from final/ (whole, whatever sharded it during training)."""
    if hf.is_hf(config.model):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(output_dir / "final" / "hf")
    model = GPT.from_config_dict(json.loads((output_dir / "final" / "gpt_config.json").read_text()))
    load_weights(model, output_dir / "final" / "model.safetensors")
    return model


def export_gpt_config(model: torch.nn.Module, weights: dict, final: Path) -> None:
    """fit's export_final for the built-in GPT: its shape beside the weights, so final/ rebuilds it."""
    write_json_atomic(final / "gpt_config.json", model.config_dict())


# ---------------------------------------------------------------------------------------------------------
# The run


def run_eval_only(config: LMConfig, accelerator: Accelerator, output_dir: Path, data: LMSplits,
                  model: torch.nn.Module, checkpoint: Path, info: dict, trained: dict) -> None:
    """Validation loss and perplexity of a checkpoint's weights over every validation token -> eval.json."""
    load_weights(model, checkpoint)
    loader = make_loader(data.val, config.eval_batch_size or config.batch_size, shuffle=False,
                         num_workers=config.num_workers, seed=config.seed)
    model = accelerator.prepare_model(model.to(accelerator.device), evaluation_mode=True)
    metrics = evaluate(model, loader, task=CausalLM(), accelerator=accelerator)
    row = finite_or_none(metrics.as_row("val"))

    def write_eval() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "eval.json", {**row, "world_size": accelerator.num_processes,
                                                     "checkpoint": str(checkpoint)})

    eval_writes(accelerator.is_main_process, output_dir / "eval.json", "eval.json", write_eval, flag="--output-dir")
    if accelerator.is_main_process:
        print(f"eval of {checkpoint}: val_loss {row['val_loss']:.4f} val_perplexity {row['val_perplexity']:.3f} "
              f"on {row['val_tokens']:,} tokens -> {output_dir / 'eval.json'}")
    tracker = start_tracker(config, accelerator=accelerator, output_dir=output_dir, run_info=info, resume_run_id=None)
    tracker.log_evaluation(metrics.as_row("val"), {"checkpoint": str(checkpoint.resolve()),
                                                   "run_id": trained.get("extra", {}).get("wandb_run_id")})
    tracker.finish([], 0)


def train(given: dict, config: LMConfig, output_dir: Path, lease: Any) -> None:
    """Everything after the output folder is claimed (launcher.loop.launch): relaunch rules, data, model,
    then fit, then a sample continuation from the final weights."""
    config, checkpoint, resumed = relaunch(given, config, output_dir)
    accelerator = make_accelerator(grad_accum=config.grad_accum, seed=config.seed,
                                   collective_timeout=config.collective_timeout, init_timeout=config.init_timeout,
                                   deterministic=config.deterministic)
    if checkpoint is not None and not config.eval_only:
        check_resume_format(checkpoint, sharded_run=is_fsdp(accelerator))
    set_seed(config.seed)
    data = setup_data(config, accelerator)
    model = setup_model(config, accelerator, data)
    throughput = setup_throughput(config, accelerator, model)
    info = run_info(config, accelerator, data, model, throughput)
    if config.eval_only:
        run_eval_only(config, accelerator, output_dir, data, model, checkpoint, info, resumed)
        return
    # No weight decay on biases and norm weights (launcher.param_groups); --decay-all: one group.
    optimizer, config = recipe_optimizer(model, config, resumed, info, accelerator.print)
    monitor = Monitor(config.best_metric, config.best_mode).resolve(CausalLM(), ())  # val_loss by default
    scheduler = from_name(config.scheduler, warmup_steps=config.warmup_steps, mode=monitor.mode,
                          factor=config.plateau_factor, patience=config.plateau_patience)
    # Blocks are sharded per rank by make_loader; the position is a global count of blocks, so a resume
    # continues exactly at any world size (a stream: at the same world size, docs/data.md).
    train_loader = make_loader(data.train, config.batch_size, shuffle=True, num_workers=config.num_workers,
                               seed=config.seed)
    val_loader = make_loader(data.val, config.eval_batch_size or config.batch_size, shuffle=False,
                             num_workers=config.num_workers, seed=config.seed)
    checkpointing, tracker = open_run(
        config, accelerator, output_dir, checkpoint, resumed, model=model, optimizer=optimizer, info=info,
        lease=lease, export_final=hf.exporter(data.tokenizer) if hf.is_hf(config.model) else export_gpt_config)
    accelerator.print(f"{info['tokens_per_optimizer_step']:,} tokens per optimizer step, "
                      f"{throughput.flops_per_token:,} training FLOPs per token")
    patience = config.early_stopping_patience
    fit(model, optimizer, train_loader, val_loader, epochs=config.epochs, task=CausalLM(),
        accelerator=accelerator, scheduler=scheduler, max_grad_norm=config.max_grad_norm or None,
        monitor=monitor, early_stopping=EarlyStopping(patience) if patience is not None else None,
        checkpointing=checkpointing,
        log_every=config.log_every, tracker=sample_tracker(tracker, config, accelerator, model, data),
        find_unused_parameters=config.find_unused_parameters, throughput=throughput,
        callbacks=[EMA(config.ema)] if config.ema else None)  # final/ then holds the EMA weights
    sample = None
    if accelerator.is_main_process and config.sample_tokens:
        sample = sample_or_warn(final_model(config, output_dir, data), data.tokenizer, prompt_ids(config, data),
                                config.sample_tokens, config.seed)
    if sample is not None:
        prompt, text = sample
        what = f"sample of the final weights (top-{SAMPLE_TOP_K}, temperature {SAMPLE_TEMPERATURE}, seed {config.seed})"
        print(f"{what}:\n{prompt}\033[1m{text}\033[0m" if os.isatty(1) else
              f"{what}, prompt then continuation:\n{prompt}\n---\n{text}")
    accelerator.print(f"done: {output_dir}/final/model.safetensors"
                      + (f" and {output_dir}/final/hf (from_pretrained)" if hf.is_hf(config.model) else ""))


def main(argv: list[str] | None = None) -> int:
    return launch.main(train, argv, cls=LMConfig, description=__doc__, prog="lm.py")


if __name__ == "__main__":
    launch.exit_now(main())
