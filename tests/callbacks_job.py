"""tests/test_callbacks.py's job under `accelerate launch`: a custom step that reads an attribute of the user's
model under DDP, with an EMA callback; writes OUTPUT_DIR/report.json (rank 0).

    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml --num_processes 2 tests/callbacks_job.py OUT
"""

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import EMA, StepOutput, fit, make_accelerator


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = 0.5  # a plain attribute: DDP's wrapper has none

    def forward(self, x):
        return self.lin(x)


seen = {}


def step(model, batch):
    x, y = batch
    seen["wrapper"] = type(getattr(model, "wrapped", model)).__name__
    seen["scale"] = model.scale
    logits = model(x) * model.scale  # the call goes through DDP: gradients are all-reduced
    return StepOutput(nn.functional.cross_entropy(logits, y, reduction="none"))


def main(out: Path) -> None:
    accelerator = make_accelerator(seed=0)
    set_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (77,), generator=g)
    data = TensorDataset(torch.randn(77, 4, generator=g) + nn.functional.one_hot(y, 4).float(), y)
    model = Net()
    ema = EMA(0.9)
    history = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=8),
                  DataLoader(data, batch_size=16), epochs=2, step=step, accelerator=accelerator, progress=False,
                  callbacks=[ema])
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])[None]
    every = accelerator.gather(flat)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({
            **seen, "same_weights_on_every_rank": bool((every == every[0]).all()),
            "steps": history[-1]["step"], "ema_updates": ema.updates, "row": sorted(history[-1])}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
