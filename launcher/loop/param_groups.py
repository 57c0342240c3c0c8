"""Which parameters get weight decay: the optimizer's parameter groups, by the usual convention.

Weight decay pulls weights towards zero. That regularizes matrices (linear, convolution and embedding
weights), but on a bias, a norm's gain or a learned scalar it only drags the value towards an arbitrary
point: a RMSNorm/LayerNorm weight decayed at 0.1 shrinks towards 0 instead of 1. So, as nanoGPT does (and
HF Trainer, which excludes biases and norm weights by name), every parameter with fewer than 2 dimensions is
left undecayed and everything else, embeddings included, is decayed:

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-3)

`decay_all=True` gives the single group `AdamW(model.parameters(), weight_decay=...)` would (the recipes'
`--decay-all`). Parameters that do not require grad are left out. The groups hold the parameters themselves,
so build them before FSDP2 shards the model: launcher.parallel.fsdp.shard_model (and accelerate's prepare)
remaps every group's parameters to their sharded counterparts by name.

`describe_optimizer` and `optimizer_summary` say what an optimizer's groups hold (the recipes print the one
line and keep the summary in config.json's run_info).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def decays(parameter: torch.nn.Parameter) -> bool:
    """The convention: matrices and higher-rank tensors (embeddings too) are decayed; biases, norm weights
    and scalars (under 2 dimensions) are not."""
    return parameter.dim() >= 2


def param_groups(model: torch.nn.Module, weight_decay: float, *, decay_all: bool = False) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer: [{"params": decayed, "weight_decay": weight_decay},
    {"params": the rest, "weight_decay": 0.0}], an empty group left out; one group of every parameter with
    `decay_all`. Only parameters that require grad, each once (a tied weight is one parameter)."""
    decayed: list[torch.nn.Parameter] = []
    undecayed: list[torch.nn.Parameter] = []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if decay_all or decays(parameter) else undecayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def optimizer_summary(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"name": "AdamW", "groups": [{"weight_decay": 0.1, "tensors": 12, "params": 1234}, ...]}: for run_info."""
    groups = [{"weight_decay": group.get("weight_decay", 0.0), "tensors": len(group["params"]),
               "params": sum(p.numel() for p in group["params"])} for group in optimizer.param_groups]
    return {"name": type(optimizer).__name__, "groups": groups}


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """One line: 'optimizer: AdamW, 2 groups: 12 tensors / 1.2M params with weight decay 0.1, 9 tensors /
    3.1k params without'."""
    found = optimizer_summary(optimizer)
    parts = [f"{g['tensors']} tensors / {_count(g['params'])} params "
             + (f"with weight decay {g['weight_decay']:g}" if g["weight_decay"] else "without weight decay")
             for g in found["groups"]]
    count = len(found["groups"])
    return f"optimizer: {found['name']}, {count} group{'s' if count != 1 else ''}: {', '.join(parts)}"


def decay_all_for(resumed: dict) -> bool:
    """True for a checkpoint written before the recipes split the groups (its stored config has no
    `decay_all`): its optimizer state has one group, and resuming it needs the same."""
    stored = resumed.get("config") if isinstance(resumed, dict) else None
    config = stored.get("config") if isinstance(stored, dict) else None
    return bool(resumed) and isinstance(config, dict) and "decay_all" not in config


def recipe_optimizer(model: torch.nn.Module, config: Any, resumed: dict | None, info: dict,
                     say: Any = print) -> tuple[torch.optim.AdamW, Any]:
    """The recipes' AdamW: `param_groups` at `config.weight_decay` (`config.decay_all`: one group; a checkpoint
    from before the groups resumes with one), the groups said in one line and kept in `info["optimizer"]`
    (config.json's run_info). Returns the optimizer and the config (decay_all set where a resume needs it)."""
    if resumed and decay_all_for(resumed) and not config.decay_all:
        config = dataclasses.replace(config, decay_all=True)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, decay_all=config.decay_all),
                                  lr=config.lr)
    info["optimizer"] = optimizer_summary(optimizer)
    say(describe_optimizer(optimizer))
    return optimizer, config
