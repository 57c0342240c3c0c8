"""launcher.param_groups (launcher/loop/param_groups.py): no weight decay on biases, norm weights and scalars,
decay on matrices and embeddings; and both recipes' real runs, read back from their checkpoints' optimizer
state (plain and FSDP2-sharded), config.json's run_info and the run's first lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher import param_groups
from launcher.checkpoint import list_checkpoints
from launcher.loop.param_groups import decay_all_for, describe_optimizer, optimizer_summary
from tests.helpers import ROOT, run

LM = ROOT / "recipes" / "lm.py"
LM_ARGS = ["--train-tokens", "20000", "--epochs", "1", "--batch-size", "8", "--sample-tokens", "0"]


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.conv = torch.nn.Conv1d(4, 4, 3)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 11)
        self.head.weight = self.embed.weight  # tied: one parameter, listed once
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(model: torch.nn.Module, group: dict) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in group["params"]}


def test_under_two_dimensions_is_not_decayed_embeddings_are():
    model = Small()
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert _names(model, groups[0]) == {"embed.weight", "conv.weight"}
    assert _names(model, groups[1]) == {"conv.bias", "norm.weight", "norm.bias", "head.bias", "scale"}


def test_decay_all_is_one_group_without_the_frozen():
    model = Small()
    (group,) = param_groups(model, 0.1, decay_all=True)
    assert group["weight_decay"] == 0.1 and len(group["params"]) == 7
    assert not any(n.startswith("frozen") for n in _names(model, group))


def test_an_empty_group_is_left_out():
    (group,) = param_groups(torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False)), 0.01)
    assert group["weight_decay"] == 0.01


def test_the_line_and_the_summary():
    optimizer = torch.optim.AdamW(param_groups(Small(), 0.1), lr=1e-3)
    assert describe_optimizer(optimizer) == ("optimizer: AdamW, 2 groups: 2 tensors / 92 params with weight decay "
                                             "0.1, 5 tensors / 24 params without weight decay")
    assert optimizer_summary(optimizer) == {"name": "AdamW", "groups": [
        {"weight_decay": 0.1, "tensors": 2, "params": 92}, {"weight_decay": 0.0, "tensors": 5, "params": 24}]}
    big = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1200, 1000))], lr=1e-3, weight_decay=0.1)
    assert describe_optimizer(big) == "optimizer: AdamW, 1 group: 1 tensors / 1.2M params with weight decay 0.1"


def test_checkpoints_from_before_the_groups_resume_with_one():
    assert decay_all_for({"config": {"config": {"lr": 0.1}}})
    assert not decay_all_for({"config": {"config": {"lr": 0.1, "decay_all": False}}})
    assert not decay_all_for({})


# ---------------------------------------------------------------------------------------------------------
# The recipes, for real


def _newest(out: Path) -> Path:
    return out / "checkpoints" / list_checkpoints(out)[-1]


def _plain_groups(checkpoint: Path) -> list[tuple[float, list[int]]]:
    """(weight decay, each parameter's number of dimensions) per group, from optimizer.pt's state."""
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    return [(g["weight_decay"], [saved["state"][pid]["exp_avg"].dim() for pid in g["params"]])
            for g in saved["param_groups"]]


def _check_split(groups: list[tuple[float, list[int]]], weight_decay: float) -> None:
    assert [wd for wd, _ in groups] == [weight_decay, 0.0]
    assert all(d >= 2 for d in groups[0][1]) and all(d < 2 for d in groups[1][1])


def _check_reported(out: Path, stdout: str, weight_decay: float, groups: int) -> None:
    info = json.loads((out / "config.json").read_text())["run_info"]["optimizer"]
    assert info["name"] == "AdamW" and len(info["groups"]) == groups
    assert info["groups"][0]["weight_decay"] == weight_decay
    line = next(line for line in stdout.splitlines() if line.startswith("optimizer: "))
    assert line.startswith(f"optimizer: AdamW, {groups} group")
    assert stdout.index(line) < stdout.index("epoch 1:")  # among the run's first lines


@pytest.mark.slow
def test_classify_decays_matrices_not_biases(tmp_path):
    result = run(["--epochs", "1", "--output-dir", str(tmp_path)])
    _check_split(_plain_groups(_newest(tmp_path)), 0.01)
    _check_reported(tmp_path, result.stdout, 0.01, 2)
    assert "3 tensors / 84.5k params with weight decay 0.01, 3 tensors / 522 params without" in result.stdout


@pytest.mark.slow
def test_classify_decay_all_is_one_group(tmp_path):
    result = run(["--epochs", "1", "--decay-all", "--output-dir", str(tmp_path)])
    (group,) = _plain_groups(_newest(tmp_path))
    assert group[0] == 0.01 and sorted(group[1]) == [1, 1, 1, 2, 2, 2]
    _check_reported(tmp_path, result.stdout, 0.01, 1)
    assert json.loads((tmp_path / "config.json").read_text())["config"]["decay_all"] is True


@pytest.mark.slow
def test_lm_decays_matrices_and_embeddings_not_norms(tmp_path):
    result = run([*LM_ARGS, "--output-dir", str(tmp_path)], script=LM)
    _check_split(_plain_groups(_newest(tmp_path)), 0.1)
    _check_reported(tmp_path, result.stdout, 0.1, 2)


@pytest.mark.slow
def test_lm_decay_all_is_one_group(tmp_path):
    result = run([*LM_ARGS, "--decay-all", "--output-dir", str(tmp_path)], script=LM)
    (group,) = _plain_groups(_newest(tmp_path))
    assert group[0] == 0.1 and min(group[1]) == 1 and max(group[1]) == 2
    _check_reported(tmp_path, result.stdout, 0.1, 1)


@pytest.mark.slow
def test_lm_groups_survive_fsdp2_sharding(tmp_path):
    """The groups are built on the unsharded model; the sharded checkpoint's optimizer state names every
    parameter (DCP: fully qualified names), so the groups can be read back by name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / "run"
    result = run([*LM_ARGS, "--output-dir", str(out)], nproc=2, script=LM, config="cpu_fsdp")
    assert "FSDP2" in json.loads((out / "config.json").read_text())["run_info"]["distributed_type"]
    dcp_to_torch_save(_newest(out) / "dcp", tmp_path / "full.pt")
    saved = torch.load(tmp_path / "full.pt", map_location="cpu", weights_only=False)["optimizer"]
    decayed, undecayed = saved["param_groups"]
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert "embed" in decayed["params"] and "blocks.0.attn.qkv.weight" in decayed["params"]
    assert "blocks.0.ln_1.weight" in undecayed["params"] and "blocks.0.attn.qkv.bias" in undecayed["params"]
    assert all(saved["state"][name]["exp_avg"].dim() >= 2 for name in decayed["params"])
    assert all(saved["state"][name]["exp_avg"].dim() < 2 for name in undecayed["params"])
    _check_reported(out, result.stdout, 0.1, 2)
