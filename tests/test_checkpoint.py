"""Checkpoint files: atomic writes, validation, corrupt-newest fallback, rotation, safe loading."""

import json
import os
import warnings

import pytest
import torch
from torch import nn

from launcher.checkpoint import (
    CheckpointManager,
    TrainerState,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    resolve_resume,
    validate,
)
from launcher.errors import UsageError


def save(manager, step, model, opt, **kw):
    return manager.save(TrainerState(global_step=step, epoch=step // 10, batches_done=step % 10, **kw),
                        model_state=model.state_dict(), optimizer=opt)


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return tmp_path, model, opt, CheckpointManager(tmp_path, keep_last=2)


def test_roundtrip_restores_everything(setup):
    out, model, opt, manager = setup
    rng_at_save = torch.get_rng_state()
    path = save(manager, 7, model, opt, history=[{"epoch": 1}], extra={"wandb_run_id": "abc"})
    assert path.name == "step-00000007" and validate(path)["step"] == 7
    twin = nn.Linear(3, 2)
    twin_opt = torch.optim.Adam(twin.parameters())
    state, rng, _ = load_checkpoint(path, model=twin, optimizer=twin_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], twin_opt.state_dict()["state"][0]["exp_avg"])
    assert (state.global_step, state.batches_done, state.history, state.extra) == (7, 7, [{"epoch": 1}],
                                                                                   {"wandb_run_id": "abc"})
    assert torch.equal(rng["torch"], rng_at_save)
    assert not list(out.glob("checkpoints/.tmp-*"))


def test_folder_without_manifest_is_not_a_checkpoint(setup):
    out, model, opt, manager = setup
    save(manager, 1, model, opt)
    second = save(manager, 2, model, opt)
    (second / "manifest.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_valid(out).name == "step-00000001"
    assert any("step-00000002" in str(w.message) for w in caught)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(setup, damage):
    out, model, opt, manager = setup
    save(manager, 1, model, opt)
    newest = save(manager, 2, model, opt)
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000002"):
        assert resolve_resume("auto", out).name == "step-00000001"


def test_rotation_keeps_last_k_plus_best(setup):
    out, model, opt, manager = setup
    for step in range(1, 6):
        save(manager, step, model, opt)
        if step == 2:
            manager.mark_best("step-00000002")
        manager.rotate(protect="step-00000002")
    assert list_checkpoints(out) == ["step-00000002", "step-00000004", "step-00000005"]
    assert os.readlink(out / "checkpoints" / "best") == "step-00000002"
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()


def test_mismatched_model_names_missing_and_unexpected_keys(setup):
    out, model, opt, manager = setup
    path = save(manager, 1, model, opt)
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(UsageError, match=r"missing keys: 0\.bias, 0\.weight; unexpected keys: bias, weight"):
        load_model_weights(other, path)
    mismatch = r"shape mismatch: bias \(2,\) vs model \(5,\), weight \(2, 3\) vs model \(5, 3\)"
    with pytest.raises(UsageError, match=mismatch):
        load_model_weights(nn.Linear(3, 5), path)


def test_checkpoint_files_load_without_unpickling_code(setup):
    out, model, opt, manager = setup
    path = save(manager, 1, model, opt)
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)  # raises if anything but tensors and plain data
    assert json.loads((path / "trainer_state.json").read_text())["global_step"] == 1


def test_resume_modes(setup):
    out, model, opt, manager = setup
    assert resolve_resume("auto", out / "empty") is None
    save(manager, 3, model, opt)
    with pytest.raises(UsageError, match="--resume never but .* is not empty"):
        resolve_resume("never", out)
    assert resolve_resume(str(out), out).name == "step-00000003"  # a run folder
    assert resolve_resume(str(out / "checkpoints" / "step-00000003"), out).name == "step-00000003"
    with pytest.raises(UsageError, match="no such checkpoint folder"):
        resolve_resume(str(out / "nope"), out)


def test_stale_temp_folders_are_cleaned(setup):
    out, model, opt, manager = setup
    save(manager, 1, model, opt)
    stale = out / "checkpoints" / ".tmp-step-00000002-123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    manager.clean_stale()
    assert not stale.exists() and list_checkpoints(out) == ["step-00000001"]
