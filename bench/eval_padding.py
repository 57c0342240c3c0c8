"""The cost of batch-invariant evaluation: every evaluation batch padded to the batch size (launcher.data.sampling).

    python bench/eval_padding.py            # gpt-nano on 403 validation blocks of 256 tokens, ~1 minute
    python bench/eval_padding.py --smoke    # a few seconds (tests/test_bench_smoke.py)

Times `evaluate` of one process over the same blocks with the padded sampler and with the unpadded one (the
last batch short), interleaved, and prints the padded samples each world size would add. Padding costs at
most one batch per rank per evaluation: what it adds is the padded share of the forward passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from launcher import CausalLM, evaluate, make_accelerator
from launcher.data import TensorBatchedDataset
from launcher.data.sampling import ElasticBatchSampler
from launcher.models.gpt import build_gpt


def padded_fraction(samples: int, batch: int, world: int) -> float:
    """Padded samples over real ones: every rank's last batch filled up to `batch`."""
    batches = -(-samples // (batch * world))
    return (batches * batch * world - samples) / samples


class Unpadded(ElasticBatchSampler):
    """The sampler as it was before padding: `padded()` changes nothing (the last batch stays short)."""

    @contextlib.contextmanager
    def padded(self):
        yield self


def loader(ds, batch: int, pad: bool):
    sampler = (ElasticBatchSampler if pad else Unpadded)(len(ds), batch, shuffle=False, skip_empty=True)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=lambda b: b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    blocks, block, batch, repeats = (19, 32, 8, 1) if args.smoke else (403, 256, 32, args.repeats)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (blocks, block))
    ds = TensorBatchedDataset(ids, ids.clone())
    model = build_gpt("gpt-nano", vocab_size=256, block_size=block)
    accelerator = make_accelerator()
    times: dict[str, list[float]] = {"padded": [], "unpadded": []}
    losses = {}
    for _ in range(repeats):
        for name in times:
            started = time.perf_counter()
            metrics = evaluate(model, loader(ds, batch, pad=name == "padded"), task=CausalLM(),
                               accelerator=accelerator)
            times[name].append(time.perf_counter() - started)
            losses[name] = metrics.loss
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"blocks": blocks, "block_size": block, "batch_size": batch, "median_s": median,
              "padded_over_unpadded": median["padded"] / median["unpadded"],
              "same_loss": losses["padded"] == losses["unpadded"],
              "padded_fraction": {world: padded_fraction(blocks, batch, world) for world in (1, 2, 3, 4, 8)}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
