"""A model for the streaming tests: a linear layer that records, per training forward, which samples it saw.

    --model tests.stream_probe:factory   with STREAM_PROBE_DIR set: one JSON line per training forward,
    {"k": forward number, "x": first input feature of each sample}, in STREAM_PROBE_DIR/rank<R>-<pid>.jsonl
"""

import json
import os
import time
from pathlib import Path

import torch
from torch import nn


class Probe(nn.Module):
    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, num_classes)
        self.forwards = 0
        self.path = Path(os.environ["STREAM_PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.jsonl"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            with open(self.path, "a") as f:
                f.write(json.dumps({"k": self.forwards, "x": x[:, 0].tolist()}) + "\n")
            time.sleep(float(os.environ.get("STREAM_PROBE_SLEEP", "0")))  # room for a kill mid-epoch
        return self.linear(x)


def factory(input_shape, num_classes):
    return Probe(input_shape[0], num_classes)
