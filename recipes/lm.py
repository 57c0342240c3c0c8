"""Causal language models, pretrained or fine-tuned, from a laptop CPU to FSDP on many GPU nodes.

    accelerate launch recipes/lm.py                       # gpt-micro on the standard library's source, bytes
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/lm.py --batch-size 8
    accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/lm.py --model gpt-small \\
        --activation-checkpointing                        # FSDP2 on GPUs
    accelerate launch recipes/lm.py --model hf:gpt2 --dataset wikitext --dataset-config wikitext-2-raw-v1 \\
        --block-size 512 --lr 5e-5                         # fine-tune a transformers model
    python recipes/lm.py --help                            # every flag, with its default

DRAFT (issue 20, first stage): everything up to training is built here (config, data, model, optimizer,
loaders, the corpus and throughput lines, a sample continuation); the training call waits for the
task-agnostic loop of issue 19 (see `train_and_validate`).

Copy this file and change it: the steps below run in dependency order, each a short function.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from launcher import make_accelerator
from launcher.config import option, parse_values
from launcher.data import make_loader
from launcher.data.lm.blocks import LMSplits, load_lm_splits
from launcher.data.lm.corpus import NAME as STDLIB
from launcher.data.lm.tokenizers import BYTE, load_lm_tokenizer
from launcher.errors import EXIT_USAGE, UsageError
from launcher.faults.timeouts import DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_INIT_TIMEOUT, check_timeouts
from launcher.loop import start_process_group
from launcher.models import gpt, hf
from launcher.tracking import throughput


@dataclass
class LMConfig:
    # data
    dataset: str = option(STDLIB, "'stdlib' (the .py files of Python's standard library, embedded), a text file "
                                  "or folder of them, a save_to_disk folder, parquet/json/csv files, or a name "
                                  "for datasets.load_dataset", relaunch="fixed")
    dataset_config: str | None = option(None, "configuration of a Hub dataset (load_dataset's name=)",
                                        relaunch="fixed")
    text_column: str | None = option(None, "column holding the documents (default: text/content/document/body, "
                                           "or the only string column)", relaunch="fixed")
    val_fraction: float = option(0.05, "fraction of the documents carved (by --seed) for validation when the "
                                       "dataset has no validation split", relaunch="fixed")
    block_size: int = option(256, "tokens per training block (documents are concatenated with end-of-text "
                                  "between them and cut into blocks)", relaunch="fixed")
    num_workers: int = option(0, "DataLoader worker processes per training process (not with --streaming)")
    streaming: bool = option(False, "tokenize and pack the training documents as they are read, per process, "
                                    "instead of once up front (validation is still tokenized once)",
                             relaunch="fixed")
    shuffle_buffer: int = option(1000, "documents in the shuffle buffer of --streaming", relaunch="fixed")
    # model
    model: str = option("gpt-micro", f"{', '.join(gpt.SIZES)} (built in, byte-level) or hf:NAME_OR_PATH "
                                     f"(AutoModelForCausalLM and its tokenizer)", relaunch="fixed")
    model_config: str | None = option(None, "hf: models: train from this config (a folder or Hub name) with "
                                            "fresh weights instead of loading --model's weights",
                                      relaunch="fixed")
    positions: str = option("learned", "built-in models: learned position embeddings or rotary (RoPE)",
                            gpt.POSITIONS, relaunch="fixed")
    dropout: float = option(0.0, "built-in models: dropout on embeddings, attention and MLP outputs",
                            relaunch="fixed")
    activation_checkpointing: bool = option(False, "recompute each block in the backward pass (less memory, "
                                                   "about a third more compute); works with DDP and FSDP2")
    # optimisation
    epochs: int = option(1, "number of epochs")
    batch_size: int = option(16, "blocks per process per step", relaunch="refuse-mid-epoch")
    eval_batch_size: int | None = option(None, "evaluation blocks per process (default: --batch-size)")
    lr: float = option(1e-3, "peak learning rate (AdamW)", relaunch="fixed")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices only (not biases, norms)",
                                 relaunch="fixed")
    warmup_steps: int = option(100, "linear warm-up, in optimizer steps", relaunch="fixed")
    grad_accum: int = option(1, "micro-batches per optimizer step", relaunch="refuse-mid-epoch")
    max_grad_norm: float | None = option(1.0, "clip gradients to this global norm (0: no clipping)")
    seed: int = option(0, "seed for weights, block order and a carved validation split", relaunch="fixed")
    # throughput and samples
    peak_flops: float | None = option(None, "peak FLOP/s of one device for MFU (default: from a table of common "
                                            "GPUs; none on CPU)")
    sample_prompt: str = option("def ", "prompt of the sample continuation printed at the end")
    sample_tokens: int = option(120, "tokens of the sample continuation (0: none)")
    sample_top_k: int = option(10, "the sample draws each token among the k likeliest (1: greedy), seeded by "
                                   "--seed: the same text on every rank and run")
    # output
    output_dir: str | None = option(None, "where metrics, checkpoints and final weights go (default: "
                                          "runs/<time>)", relaunch="launch")
    collective_timeout: float = option(DEFAULT_COLLECTIVE_TIMEOUT, "seconds a training step may stall")
    init_timeout: float = option(DEFAULT_INIT_TIMEOUT, "seconds start-up and validation may stall")

    def __post_init__(self) -> None:
        for name in ("block_size", "batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.block_size < 2:
            raise UsageError("--block-size must be at least 2: a block of T tokens trains T-1 predictions")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be between 0 and 1 (got {self.val_fraction})")
        if self.model_config is not None and not hf.is_hf(self.model):
            raise UsageError("--model-config builds an hf: model from a config; use it with --model hf:NAME")
        if self.streaming and self.num_workers:
            raise UsageError("--streaming packs blocks in the training process itself; drop --num-workers")
        if self.positions not in gpt.POSITIONS:
            raise UsageError(f"--positions must be one of {', '.join(gpt.POSITIONS)} (got {self.positions!r})")
        if self.sample_tokens < 0 or self.sample_top_k < 1:
            raise UsageError("--sample-tokens cannot be negative and --sample-top-k must be at least 1")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise UsageError(f"--peak-flops must be positive (got {self.peak_flops})")
        check_timeouts(self.collective_timeout, self.init_timeout)


def setup_tokenizer(config: LMConfig) -> Any:
    """Bytes for the built-in models; an hf: model's own tokenizer (from --model, else --model-config)."""
    if hf.is_hf(config.model):
        return load_lm_tokenizer(hf.model_name(config.model))
    if not gpt.is_gpt(config.model):
        raise UsageError(f"unknown model {config.model!r}: use one of {', '.join(gpt.SIZES)} or hf:NAME_OR_PATH")
    return load_lm_tokenizer(BYTE)


def setup_data(config: LMConfig, accelerator: Accelerator, tokenizer: Any) -> LMSplits:
    error = None
    with accelerator.main_process_first():  # the first process tokenizes into the datasets cache
        try:
            data = load_lm_splits(config.dataset, tokenizer, block_size=config.block_size,
                                  dataset_config=config.dataset_config, text_column=config.text_column,
                                  val_fraction=config.val_fraction, seed=config.seed,
                                  world_size=accelerator.num_processes, streaming=config.streaming,
                                  shuffle_buffer=config.shuffle_buffer)
        except UsageError as err:  # leave the block normally so that its barrier is met on every rank
            error = err
    if error is not None:
        raise error
    return data


def setup_model(config: LMConfig, tokenizer: Any) -> torch.nn.Module:
    if hf.is_hf(config.model):
        model = load_causal_lm(hf.model_name(config.model), config.model_config)
        if config.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise UsageError(f"the tokenizer has {len(tokenizer)} ids but {config.model} embeds {vocab}; use the "
                             f"model's own tokenizer")
    else:
        model = gpt.build_gpt(config.model, vocab_size=len(tokenizer), block_size=config.block_size,
                              dropout=config.dropout, positions=config.positions,
                              activation_checkpointing=config.activation_checkpointing)
    gpt.check_block_size(config.block_size, model, config.model)
    return model


def load_causal_lm(name: str, model_config: str | None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with hf._quiet():  # no load reports or progress bars
            if model_config is not None:
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_config))
            return AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--model hf:{name}: cannot load a causal language model ({first})") from None


def setup_optimizer(config: LMConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, decaying matrices only (nanoGPT, GPT-3): biases and norm gains keep their scale."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def describe_throughput(config: LMConfig, accelerator: Accelerator, model: torch.nn.Module) -> str:
    layers, width = throughput.transformer_shape(model)
    per_token = throughput.flops_per_token(throughput.matmul_params(model), layers, width, config.block_size)
    device = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else "cpu"
    peak = throughput.peak_flops(device, config.peak_flops)
    return f"model: {config.model}, {per_token / 1e6:.2f} MFLOPs per token; {throughput.describe_peak(device, peak)}"


def train_and_validate(config: LMConfig, accelerator: Accelerator, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, data: LMSplits) -> torch.nn.Module:
    """TODO(issue 19): `fit` trains only classifiers on this branch. With issue 19's loop (branch issue19:
    `launcher.tasks.CausalLM`, per-token cross entropy on labels shifted by one, ignore_index -100, loss as
    a sum and a count of tokens) this is

        rows = fit(model, optimizer, train_loader, val_loader, task=CausalLM(), epochs=config.epochs,
                   accelerator=accelerator, scheduler=from_name("cosine", warmup_steps=config.warmup_steps),
                   max_grad_norm=config.max_grad_norm or None, monitor=Monitor("val_loss", "min"),
                   checkpointing=Checkpointing(output_dir, ...), tracker=tracker)
        return accelerator.unwrap_model(model)

    (tried on an export of that branch: it trains and reports val_loss / val_perplexity), plus tokens/s and
    MFU in the progress line (launcher.tracking.throughput). Until then the recipe stops here, untrained.
    """
    train_loader = make_loader(data.train, config.batch_size, shuffle=True, num_workers=config.num_workers,
                               seed=config.seed)
    val_loader = make_loader(data.val, config.eval_batch_size or config.batch_size, shuffle=False,
                             num_workers=config.num_workers, seed=config.seed)
    steps = "a stream of" if config.streaming else f"{len(train_loader)}"
    accelerator.print(f"not trained: {steps} steps per epoch are ready, the loop's task API is not "
                      f"(issue 19); {len(val_loader)} validation batches per process")
    return model


def sample_continuation(config: LMConfig, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> str:
    """A short continuation of --sample-prompt, top-k sampled with --seed (the same text on every rank and
    run; greedy decoding of a small model soon repeats one token)."""
    ids = torch.tensor([tokenizer(config.sample_prompt)["input_ids"]], device=device)
    if hf.is_hf(config.model):
        torch.manual_seed(config.seed)  # transformers' sampling draws from the global generator
        out = model.generate(ids, max_new_tokens=config.sample_tokens, do_sample=config.sample_top_k > 1,
                             top_k=config.sample_top_k, pad_token_id=tokenizer.eos_token_id)
    else:
        out = model.generate(ids, config.sample_tokens, top_k=config.sample_top_k, seed=config.seed)
    return tokenizer.decode(out[0, ids.shape[1]:])


def train(argv: list[str] | None = None) -> None:
    config = LMConfig(**parse_values(argv, description=__doc__, cls=LMConfig))
    start_process_group(collective_timeout=config.collective_timeout, init_timeout=config.init_timeout)
    accelerator = make_accelerator(grad_accum=config.grad_accum, seed=config.seed,
                                   collective_timeout=config.collective_timeout, init_timeout=config.init_timeout)
    set_seed(config.seed)
    tokenizer = setup_tokenizer(config)
    model = setup_model(config, tokenizer)  # before the data: its position limit bounds --block-size
    data = setup_data(config, accelerator, tokenizer)
    accelerator.print(data.describe())
    optimizer = setup_optimizer(config, model)
    accelerator.print(describe_throughput(config, accelerator, model))
    model = train_and_validate(config, accelerator, model, optimizer, data)
    if config.sample_tokens:
        text = sample_continuation(config, model.to(accelerator.device), tokenizer, accelerator.device)
        accelerator.print(f"sample: {config.sample_prompt!r} -> {text!r}")


def main(argv: list[str] | None = None) -> int:
    try:
        train(argv)
        code = 0
    except UsageError as err:  # raised alike on every rank: the checks are deterministic
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"lm.py: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
