"""`fit` over make_loader in one process: mid-epoch resume from samples_done, old checkpoints without it."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from launcher import Checkpointing, fit
from launcher.checkpoint import TRAINER_STATE, list_checkpoints
from launcher.data import TensorBatchedDataset, make_loader


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(out, *, epochs=2, resume=None, batch_size=8):
    """103 samples, batches of 8: 13 steps an epoch, the last one 7 samples; a checkpoint every 5 steps."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(103, 4, generator=g), torch.randint(0, 3, (103,), generator=g)
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = make_loader(TensorBatchedDataset(x, y), batch_size, shuffle=True, seed=4)
    val = make_loader(TensorBatchedDataset(x[:20], y[:20]), 6, shuffle=False)
    history = fit(model, optimizer, loader, val, torch.nn.CrossEntropyLoss(), epochs=epochs, num_classes=3,
                  checkpointing=Checkpointing(out, save_every_steps=5, keep_last=100, resume_from=resume),
                  progress=False)
    return history, model


def test_mid_epoch_resume_is_bit_identical_and_counts_samples(tmp_path):
    clean_rows, clean = train(tmp_path / "clean")
    ckpt = tmp_path / "clean" / "checkpoints" / "step-00000005"
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    assert (state["epoch"], state["samples_done"], state["batches_done"]) == (0, 40, 5)
    rows, resumed = train(tmp_path / "resumed", resume=ckpt)
    for a, b in zip(clean.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train_samples"] for r in rows] == [103, 103]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in clean_rows]


def test_checkpoint_without_samples_done_resumes_at_its_position(tmp_path, capsys):
    train(tmp_path / "clean", epochs=1)
    ckpt = tmp_path / "clean" / "checkpoints" / "step-00000010"
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    del state["samples_done"]  # as written before it existed
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    (ckpt / "manifest.json").write_text(json.dumps(_rehash(ckpt)))
    rows, _ = train(tmp_path / "old", epochs=1, resume=ckpt)
    assert "80 samples into the epoch" in capsys.readouterr().out
    assert rows[0]["train_samples"] == 103 and rows[0]["step"] == 13
    assert list_checkpoints(tmp_path / "old")[-1] == "step-00000013"  # 3 steps after step 10, not 13


def _rehash(ckpt):
    from launcher.checkpoint import _sha256

    manifest = json.loads((ckpt / "manifest.json").read_text())
    path = ckpt / TRAINER_STATE
    manifest["files"][TRAINER_STATE] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return manifest
