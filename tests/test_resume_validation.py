"""A resume validates a checkpoint once: rank 0 chooses it (hashing each file once), `loadable_checkpoint` and
`fit` trust that verdict, and a corrupt newest checkpoint is still skipped with a warning."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import launcher.checkpoint.layout as layout
from launcher import Checkpointing, fit
from launcher.checkpoint import list_checkpoints, loadable_checkpoint, resolve_resume
from launcher.checkpoint.files import _sha256


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def setup(seed=0):
    set_seed(seed)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randn(96, 4, generator=g) + nn.functional.one_hot(y, 4).float()
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 3))
    loaders = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), DataLoader(TensorDataset(x, y), 32)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), *loaders


def train(out: Path, epochs: int, resume_from: Path | None = None) -> list[dict]:
    model, opt, train_loader, val_loader = setup()
    return fit(model, opt, train_loader, val_loader, nn.CrossEntropyLoss(), epochs=epochs, num_classes=3,
               progress=False, checkpointing=Checkpointing(out, save_every_steps=4, keep_last=5,
                                                           resume_from=resume_from))


@pytest.mark.slow
def test_corrupt_newest_is_skipped_and_every_file_is_hashed_once(tmp_path, monkeypatch):
    reference = train(tmp_path / "ref", 2)
    out = tmp_path / "run"
    train(out, 1)  # 6 steps: step-4, then the epoch end step-6
    assert list_checkpoints(out) == ["step-00000004", "step-00000006"]
    newest = out / "checkpoints" / "step-00000006" / "optimizer.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: only the checksum can tell
    newest.write_bytes(bytes(data))

    hashed = Counter()

    def counting_sha256(path):
        hashed[Path(path).relative_to(out).as_posix()] += 1
        return _sha256(path)

    monkeypatch.setattr(layout, "_sha256", counting_sha256)
    # What the recipe does: rank 0 chooses (resolve_resume), checks the fit, then fit resumes.
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000006.*corrupted"):
        chosen = resolve_resume("auto", out)
    assert chosen.name == "step-00000004"
    model, opt, *_ = setup()
    assert loadable_checkpoint(chosen, model=model, optimizer=opt, fallback=True, output_dir=out) == chosen
    history = train(out, 2, resume_from=chosen)

    older = {k: n for k, n in hashed.items() if k.startswith("checkpoints/step-00000004/")}
    assert older and set(older.values()) == {1}, hashed  # each file of the resumed checkpoint: hashed once
    assert hashed["checkpoints/step-00000006/optimizer.pt"] == 1
    strip = ("epoch_seconds", "samples_per_second")
    assert [{k: v for k, v in r.items() if k not in strip} for r in history] == \
        [{k: v for k, v in r.items() if k not in strip} for r in reference]
