"""Host reads per training step of `fit`, counted by a probe (CPU-only machines cannot use
torch.cuda.set_sync_debug_mode): every Tensor method that copies a value to the host (`item`, `tolist`,
`cpu`, `numpy`, `__bool__`, `__float__`, `__int__`, `__index__`) is wrapped with a counter, and `fit` runs
one epoch on N and on 2N training batches with the same validation; the difference over N is what one
step costs. On a GPU each such read is a host sync. Reads made by launcher/data/ are not counted: they
are of the sampler's index tensors, which live on the host (one `tolist` per batch).

    python bench/host_reads.py        # one line per task: reads per step (0.00 is the target)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher import CausalLM, Regression, SingleLabelClassification, fit  # noqa: E402
from launcher.data import TensorBatchedDataset, make_loader  # noqa: E402

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
count = [0]


def probe() -> None:
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, **kwargs):
            # The data package reads its own host-side index tensors (the sampler's order): never on a device.
            if "launcher/data/" not in sys._getframe(1).f_code.co_filename:
                count[0] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, wrapped)


def run(task_name: str, batches: int) -> int:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    n = 16 * batches
    if task_name == "causal_lm":
        x = torch.randint(0, 11, (n, 7))
        y = torch.where(torch.rand(n, 7) < 0.8, x, torch.full_like(x, -100))
        model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
        task, metrics = CausalLM(), None
    else:
        x = torch.randn(n, 8)
        if task_name == "regression":
            import torchmetrics

            y, model = x[:, :1] * 2, torch.nn.Linear(8, 1)
            task, metrics = Regression(1), {"mse": torchmetrics.MeanSquaredError()}
        else:
            y, model = x[:, :3].argmax(1), torch.nn.Linear(8, 3)
            task, metrics = SingleLabelClassification(3), None
    train = make_loader(TensorBatchedDataset(x, y), 16, shuffle=True)
    val = make_loader(TensorBatchedDataset(x[:64], y[:64]), 16, shuffle=False)
    before = count[0]
    fit(model, torch.optim.SGD(model.parameters(), lr=0.01), train, val, epochs=1, task=task, metrics=metrics,
        progress=False, log_every=10**9, find_unused_parameters="off")
    return count[0] - before


def main() -> None:
    probe()
    for name in ("single_label_classification", "regression", "causal_lm"):
        short, long = run(name, 10), run(name, 20)
        print(f"{name}: {(long - short) / 10:.2f} host reads per training step "
              f"({short} in a 10-step run, {long} in a 20-step run, validation and start-up included)")


if __name__ == "__main__":
    main()
