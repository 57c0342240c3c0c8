"""A process's RNG states (python, numpy, torch, CUDA) as plain tensors and numbers, and back."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    """This process's RNG states as tensors and numbers (loadable with weights_only=True).

    CUDA: the state of the one GPU this process trains on (`cuda_device`), not of every visible GPU: a resume
    may see fewer GPUs per process (CUDA_VISIBLE_DEVICES, SLURM's GPU binding), and the GPU it trains on may
    have another index there."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npk = state["numpy"]
    np.random.set_state((npk["kind"], npk["keys"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"],
                         npk["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in cuda_states_to_restore(state, torch.cuda.device_count(),
                                                         torch.cuda.current_device()).items():
            torch.cuda.set_rng_state(cuda_state, device)


def cuda_states_to_restore(state: dict, device_count: int, current_device: int) -> dict[int, torch.Tensor]:
    """Which CUDA generator gets which saved state: the GPU this process trains on gets the state of the GPU
    the saving process trained on. Checkpoints written before that (key "cuda": every visible GPU's state)
    restore the GPUs both runs can see; a resume with fewer visible GPUs must not fail (torch's
    set_rng_state_all raises IndexError) over generators this process never uses."""
    if "cuda_device" in state:
        return {current_device: state["cuda_device"]}
    return dict(enumerate(state.get("cuda", ())[:device_count]))
