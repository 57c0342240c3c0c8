"""Checkpoints that validate but do not load: skipped by --resume auto, refused with one line otherwise,
and never half applied."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.checkpoint import (
    CheckpointManager,
    CheckpointMismatch,
    TrainerState,
    _sha256,
    read_checkpoint,
    validate,
)
from launcher.errors import EXIT_USAGE
from tests.helpers import RECIPE, ROOT, make_env, read_metrics, run


def rewrite_in_place(folder, fname, write):
    """Replace one file of a checkpoint and update its manifest, so that the checkpoint still validates."""
    write(folder / fname)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][fname] = {"size": (folder / fname).stat().st_size, "sha256": _sha256(folder / fname)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    validate(folder)


def test_optimizer_state_of_other_shapes_is_refused_before_anything_is_applied(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = CheckpointManager(tmp_path).save(TrainerState(global_step=1), model_state=model.state_dict(),
                                            optimizer=optimizer)
    other = torch.nn.Linear(4, 3)  # same names and shapes, other values, fresh optimizer
    other_opt = torch.optim.AdamW(other.parameters())
    before = {k: v.clone() for k, v in other.state_dict().items()}

    def wrong_moments(file):
        state = torch.load(file, weights_only=True)
        state["state"][0]["exp_avg"] = torch.zeros(5, 4)
        torch.save(state, file)

    rewrite_in_place(path, "optimizer.pt", wrong_moments)
    with pytest.raises(CheckpointMismatch, match=r"optimizer.pt state 'exp_avg' of parameter 0 has shape \(5, 4\), "
                                                 r"the parameter \(3, 4\)"):
        read_checkpoint(path, model=other, optimizer=other_opt)
    assert all((other.state_dict()[k] == v).all() for k, v in before.items())  # nothing applied
    assert other_opt.state_dict()["state"] == {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs on one process: checkpoints step-23 and step-46; step-46's weights then get other shapes,
    as after a change of the model's code."""
    out = tmp_path_factory.mktemp("run")
    run(["--epochs", "2", "--batch-size", "64", "--output-dir", str(out)])
    newest = out / "checkpoints" / "step-00000046"

    def wider(file):
        weights = load_file(str(file))
        weights["net.4.weight"] = torch.zeros(256, 200)
        save_file(weights, str(file))

    rewrite_in_place(newest, "model.safetensors", wider)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--eval-only"]], ids=["train", "eval-only"])
def test_resume_path_to_it_is_one_line_exit_2(trained, tmp_path, extra):
    newest = trained / "checkpoints" / "step-00000046"
    proc = subprocess.run([sys.executable, str(RECIPE), "--epochs", "3", "--batch-size", "64", *extra,
                           "--resume", str(newest), "--output-dir", str(tmp_path / "out")], env=make_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("classify.py: error:"), proc.stderr[-3000:]
    assert "shape mismatch: net.4.weight (256, 200) vs model (256, 256)" in lines[0]


@pytest.mark.slow
def test_resume_auto_skips_it_with_one_warning_and_continues_from_the_previous_one(trained):
    result = run(["--epochs", "3", "--batch-size", "32", "--output-dir", str(trained)], nproc=2)
    skipped = [line for line in result.stdout.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and skipped[0].startswith("warning: skipping checkpoint")
    assert "step-00000046" in skipped[0] and "net.4.weight (256, 200)" in skipped[0]
    assert "resumed from " + str(trained / "checkpoints" / "step-00000023") in result.stdout
    assert [row["epoch"] for row in read_metrics(trained)] == [1, 2, 3]
    assert (trained / "checkpoints" / "unloadable-step-00000046").is_dir()  # kept for the user, out of the way
    # The resumed run wrote its own step-46, which loads.
    rewritten = load_file(str(trained / "checkpoints" / "step-00000046" / "model.safetensors"))
    assert rewritten["net.4.weight"].shape == (256, 256)
