"""Checkpoints independent of torch.compile: a compiled run's checkpoints and final/ load into the plain model,
and a plain run's checkpoints into a compiled one (`accelerate launch --dynamo_backend inductor`, real
compilation with the machine's C compiler)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import torch

from launcher.checkpoint import plain_state_dict
from launcher.data import load_splits
from launcher.models.builtin import build_model
from tests.helpers import read_metrics, run

ARGS = ["--batch-size", "64", "--lr", "3e-3"]
COMPILED = ["--dynamo_backend", "inductor"]


def assert_plain_keys(file) -> None:
    keys = list(load_file(str(file)))
    assert keys and not [k for k in keys if "_orig_mod" in k or k.startswith("module.")], keys


def test_plain_state_dict_drops_the_compile_prefix_wherever_it_is():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    model[2] = torch.compile(model[2])  # a compiled block, as torchtitan compiles
    wrapped = torch.compile(model)
    keys = list(wrapped.state_dict())
    assert keys == ["_orig_mod.0.weight", "_orig_mod.0.bias", "_orig_mod.2._orig_mod.weight",
                    "_orig_mod.2._orig_mod.bias"]
    plain = plain_state_dict(wrapped.state_dict())
    torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)).load_state_dict(plain)


@pytest.mark.slow
def test_compiled_and_plain_runs_resume_and_evaluate_each_others_checkpoints(tmp_path):
    out = tmp_path / "run"
    run([*ARGS, "--epochs", "1", "--output-dir", str(out)])  # plain: step-23
    # Plain checkpoint -> compiled resume; the compiled run writes step-46 and final/.
    compiled = run([*ARGS, "--epochs", "2", "--output-dir", str(out)], extra=COMPILED)
    assert "resumed from" in compiled.stdout and "step-00000023" in compiled.stdout
    step46 = out / "checkpoints" / "step-00000046"
    assert_plain_keys(step46 / "model.safetensors")
    assert_plain_keys(out / "final" / "model.safetensors")
    data = load_splits("digits", val_fraction=0.2, seed=0)
    build_model("mlp", data.input_shape, data.num_classes).load_state_dict(
        load_file(str(out / "final" / "model.safetensors")), strict=True)

    # Compiled checkpoint -> plain evaluation, and the other way round.
    run([*ARGS, "--eval-only", "--resume", str(step46), "--output-dir", str(tmp_path / "eval-plain")])
    run([*ARGS, "--eval-only", "--resume", str(out / "checkpoints" / "step-00000023"),
         "--output-dir", str(tmp_path / "eval-compiled")], extra=COMPILED)
    for name in ("eval-plain", "eval-compiled"):
        assert json.loads((tmp_path / name / "eval.json").read_text())["val_accuracy"] > 0.5

    # Compiled checkpoint -> plain resume.
    plain = run([*ARGS, "--epochs", "3", "--output-dir", str(out)])
    assert "resumed from" in plain.stdout and "step-00000046" in plain.stdout
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2, 3]
