"""Tokens per second of `fit(task=CausalLM())` (what recipes/lm.py runs) against the leanest hand-written loop.

    python bench/lm.py                                   # a few minutes on 2 idle CPU cores
    python bench/lm.py --repeats 1 --train-tokens 20000  # seconds: checks the plumbing

Both loops train the recipe's default model (the built-in gpt-nano, byte tokenizer, blocks of 128 tokens) on
the same blocks of the recipe's default corpus (the standard library's Python files, cut by
`load_lm_splits`), from the same initial weights, through the same `make_loader` DataLoaders, with AdamW
(lr 2e-3, weight decay 0.1, the recipe's defaults), gradient clipping at 1.0, and one validation pass per
epoch. The lean loop is nanoGPT's: logits, `F.cross_entropy` over the shifted tokens, backward, clip, step,
and on-device sums for the validation loss, no host read inside an epoch. `fit` runs as the recipe calls it
(progress bar on, exact token-weighted loss, tokens/s in its epoch rows), without an output folder.

An epoch is timed from the end of the previous epoch's validation to the end of its own; each run's first
epoch is a warm-up and is dropped; runs are interleaved in a new random order every repeat. Tokens per second
= the epoch's training tokens / its seconds, on the process CPU clock (steadier on a shared machine) and on
the wall clock. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.loops import Run, _quiet, interleaved  # noqa: E402

MODEL, BLOCK, LR, WEIGHT_DECAY, CLIP = "gpt-nano", 128, 2e-3, 0.1, 1.0


def build(train_tokens: int, val_blocks: int, seed: int):
    """The recipe's default data: stdlib blocks, a fixed sample of `train_tokens` to train on."""
    from launcher.data.lm.blocks import load_lm_splits
    from launcher.data.lm.corpus import NAME
    from launcher.models import hf

    data = load_lm_splits(NAME, hf.load_lm_tokenizer("byte"), block_size=BLOCK, seed=seed)
    data.train = data.train.sample(train_tokens // BLOCK, seed)
    data.val = data.val.sample(val_blocks, seed)
    return data


def new_model(data, seed: int) -> torch.nn.Module:
    from launcher.models.gpt import build_gpt

    torch.manual_seed(seed)
    return build_gpt(MODEL, vocab_size=len(data.tokenizer), block_size=BLOCK)


def new_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def loaders(data, batch_size: int, seed: int):
    from launcher.data import make_loader

    return (make_loader(data.train, batch_size, shuffle=True, seed=seed),
            make_loader(data.val, batch_size, shuffle=False, seed=seed))


class _Clock:
    """A Tracker that reads the clock when fit reports a finished epoch, and keeps its validation loss."""

    run_id = None

    def __init__(self, run: Run) -> None:
        self.run = run

    def log_train(self, step, metrics) -> None:
        pass

    def log_epoch(self, row) -> None:
        self.run.final = {"val_loss": row["val_loss"]}
        self.run.mark()

    def finish(self, history, exit_code=0) -> None:
        pass


def launcher_fit(data, batch_size: int, epochs: int, seed: int) -> Run:
    from launcher import CausalLM, fit, make_accelerator

    model = new_model(data, seed)
    accelerator = make_accelerator(seed=seed, cpu=True)
    run = Run()
    with _quiet():
        fit(model, new_optimizer(model), *loaders(data, batch_size, seed), epochs=epochs, task=CausalLM(),
            accelerator=accelerator, max_grad_norm=CLIP, tracker=_Clock(run), find_unused_parameters="off")
    accelerator.free_memory()
    return run


def lean_loop(data, batch_size: int, epochs: int, seed: int) -> Run:
    model = new_model(data, seed)
    optimizer = new_optimizer(model)
    train_loader, val_loader = loaders(data, batch_size, seed)
    run = Run()
    for epoch in range(epochs):
        train_loader.batch_sampler.set_epoch(epoch)  # the order fit trains in: a new shuffle each epoch
        model.train()
        for batch in train_loader:
            ids = batch["input_ids"]
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for batch in val_loader:
                ids = batch["input_ids"]
                logits = model(ids)
                total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum").double()
                count += ids[:, 1:].numel()
        run.final = {"val_loss": (total / count).item()}
        run.mark()
    return run


LOOPS = {"lean": lean_loop, "launcher_fit": launcher_fit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-tokens", type=int, default=200_000, help="tokens an epoch trains on")
    p.add_argument("--val-blocks", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3, help="per run, the first one a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "lm_results.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = build(args.train_tokens, args.val_blocks, args.seed)
    tokens = len(data.train) * (BLOCK - 1)  # predicted tokens an epoch: what fit's tokens/s counts
    per = interleaved(LOOPS, lambda loop: loop(data, args.batch_size, args.epochs, args.seed), args.repeats,
                      args.seed, "val_loss")
    summary = {}
    print(f"{MODEL}, blocks of {BLOCK}, batch {args.batch_size}: {tokens:,} training tokens an epoch; "
          f"{args.repeats} runs x {args.epochs - 1} timed epochs per loop")
    print("| loop | tokens/s (CPU, median) | epoch s (CPU): median / min | epoch s (wall, median) | val_loss (last) |")
    print("|---|---:|---:|---:|---:|")
    for name, times in per.items():
        cpu, wall = statistics.median(times["cpu"]), statistics.median(times["wall"])
        summary[name] = {"tokens_per_second_cpu": tokens / cpu, "epoch_cpu_median": cpu,
                         "epoch_cpu_min": min(times["cpu"]), "epoch_wall_median": wall}
        print(f"| {name} | {tokens / cpu:,.0f} | {cpu:.3f} / {min(times['cpu']):.3f} | {wall:.2f} | "
              f"{times['val_loss'][-1]:.4f} |")
    ratio = summary["lean"]["epoch_cpu_median"] / summary["launcher_fit"]["epoch_cpu_median"]
    ratio_min = summary["lean"]["epoch_cpu_min"] / summary["launcher_fit"]["epoch_cpu_min"]
    print(f"fit / lean, tokens per second: {ratio:.3f}x (median), {ratio_min:.3f}x (min)")
    Path(args.out).write_text(json.dumps({"args": vars(args), "tokens_per_epoch": tokens, "summary": summary,
                                          "epochs": per}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
