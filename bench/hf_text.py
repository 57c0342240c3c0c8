"""Tokens per second of launcher's `fit` against a plain Accelerate loop over the same tokenized loader.

    python bench/hf_text.py                    # about a minute on 2 idle CPU cores
    python bench/hf_text.py --repeats 2 --sentences 400     # seconds: checks the plumbing

The model is the tests' tiny BERT (tests/hf_fixtures.py: 1 layer, hidden size 32, written by
save_pretrained and loaded with AutoModelForSequenceClassification, 3 classes); the data are short sentences
tokenized once by the recipe's own path (launcher.data.load_splits with the model's tokenizer) and padded
per batch by `DataCollatorWithPadding` in the dataset's `__getitems__`; both loops iterate the same
`make_loader` DataLoaders. The plain loop is accelerate's examples/nlp_example.py: `model(**batch)` with the
labels, `outputs.loss`, `accelerator.backward`, and `gather_for_metrics` per validation batch. `fit` runs with
its defaults (progress bar on, exact metrics, no output folder). Both train from the same initial weights
with AdamW(lr=1e-3), no schedule, no clipping, and validate after every epoch.

An epoch is timed from the end of the previous epoch's validation to the end of its own; the first epoch of
every run is a warm-up and is dropped; runs are interleaved in a new random order every repeat. Tokens per
second = the training split's tokens (padding excluded) / the epoch's seconds, on the process CPU clock (the
steadier one on a shared machine) and on the wall clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.loops import Run, _EpochClockTracker, _quiet, interleaved  # noqa: E402


def build(folder: Path, sentences: int, batch_size: int):
    from transformers import AutoTokenizer

    from launcher.data import load_splits, make_loader
    from launcher.data.text import TextOptions
    from tests import hf_fixtures

    hf_fixtures.tiny_bert(folder / "bert")
    csv = hf_fixtures.write_text_csv(folder / "sentences.csv", n=sentences)
    data = load_splits(str(csv), text=TextOptions(lambda: AutoTokenizer.from_pretrained(folder / "bert")))

    def loaders():
        return (make_loader(data.train, batch_size, shuffle=True), make_loader(data.val, batch_size, shuffle=False))

    return folder / "bert", data, loaders


def new_model(path: Path, data, seed: int):
    from launcher.models import hf

    torch.manual_seed(seed)
    return hf.load_model(str(path), data, notice=lambda line: None)


def launcher_fit(path, data, loaders, epochs: int, seed: int) -> Run:
    from launcher import fit, make_accelerator

    model = new_model(path, data, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = make_accelerator(seed=seed, cpu=True)
    run = Run()
    with _quiet():
        fit(model, optimizer, *loaders(), torch.nn.CrossEntropyLoss(), epochs=epochs, num_classes=data.num_classes,
            accelerator=accelerator, seed=seed, tracker=_EpochClockTracker(run))
    accelerator.free_memory()
    return run


def plain_accelerate(path, data, loaders, epochs: int, seed: int) -> Run:
    """accelerate's examples/nlp_example.py loop."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = new_model(path, data, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_dl, eval_dl = loaders()
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    run = Run()
    for _ in range(epochs):
        model.train()
        for batch in train_dl:
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        correct = total = 0
        for batch in eval_dl:
            with torch.no_grad():
                outputs = model(**batch)
            predictions = outputs.logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += (predictions == references).long().sum().item()
            total += len(references)
        run.final = {"val_accuracy": correct / total}
        run.mark()
    accelerator.free_memory()
    return run


LOOPS = {"accelerate": plain_accelerate, "launcher_fit": launcher_fit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=2000, help="dataset size (80%% train)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3, help="per run, the first one a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "hf_results.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path, data, loaders = build(Path(tmp), args.sentences, args.batch_size)
        tokens = data.train.token_count()
        per = interleaved(LOOPS, lambda loop: loop(path, data, loaders, args.epochs, args.seed), args.repeats,
                          args.seed, "val_accuracy")
    summary = {name: {"tokens_per_s_cpu": tokens / statistics.median(d["cpu"]),
                      "tokens_per_s_wall": tokens / statistics.median(d["wall"]),
                      "epoch_s_cpu_median": statistics.median(d["cpu"]), "epoch_s_cpu_min": min(d["cpu"]),
                      "val_accuracy": d["val_accuracy"][-1]} for name, d in per.items()}
    ratio = summary["launcher_fit"]["tokens_per_s_cpu"] / summary["accelerate"]["tokens_per_s_cpu"]
    ratio_min = per["accelerate"]["cpu"] and min(per["accelerate"]["cpu"]) / min(per["launcher_fit"]["cpu"])
    result = {"args": vars(args), "train_tokens_per_epoch": tokens, "train_samples": len(data.train),
              "steps_per_epoch": -(-len(data.train) // args.batch_size), "summary": summary,
              "fit_over_accelerate_tokens_per_s": {"median": ratio, "min": ratio_min}, "epochs": per}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{tokens} training tokens per epoch, {result['steps_per_epoch']} steps of {args.batch_size}; "
          f"{args.repeats} runs x {args.epochs - 1} timed epochs per loop\n")
    print("| loop | tokens/s (CPU, median) | tokens/s (wall, median) | epoch s (CPU, median / min) | val acc |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['tokens_per_s_cpu']:,.0f} | {s['tokens_per_s_wall']:,.0f} | "
              f"{s['epoch_s_cpu_median']:.3f} / {s['epoch_s_cpu_min']:.3f} | {s['val_accuracy']:.3f} |")
    print(f"\nfit / plain Accelerate, tokens per second: {ratio:.3f}x (median), {ratio_min:.3f}x (min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
