"""The decisions behind the GPU paths, as pure functions a CPU machine can check (issue 23): which device a
process trains on, which CUDA RNG states a resume restores, what --deterministic sets."""

from __future__ import annotations

import pytest
import torch

from launcher.errors import UsageError
from launcher.loop.accelerator import trains_on_cpu


@pytest.mark.parametrize(("environ", "gpu", "cpu"), [
    ({}, False, True),                                   # a laptop
    ({}, True, False),                                   # a GPU machine, no preference
    ({"ACCELERATE_USE_CPU": "True"}, True, True),        # cpu.yaml (accelerate launch writes "True")
    ({"ACCELERATE_USE_CPU": "true"}, True, True),        # cpu_ddp.yaml with the variable, as docs say
    ({"ACCELERATE_USE_CPU": "1"}, True, True),
    ({"ACCELERATE_USE_CPU": "False"}, True, False),      # single_gpu.yaml: the launcher writes "False"
    ({"ACCELERATE_USE_CPU": "False"}, False, True),      # ... and with no GPU there is only the CPU
    ({"ACCELERATE_USE_CPU": ""}, True, False),
])
def test_device_decision_honours_accelerate_use_cpu_before_the_group_exists(environ, gpu, cpu):
    assert trains_on_cpu(environ, accelerator_available=gpu) is cpu


def test_device_decision_rejects_a_value_that_is_not_yes_or_no():
    with pytest.raises(UsageError, match="ACCELERATE_USE_CPU='cpu'"):
        trains_on_cpu({"ACCELERATE_USE_CPU": "cpu"}, accelerator_available=True)


def test_rng_restore_gives_the_gpu_in_use_the_saved_state_whatever_the_visible_count():
    from launcher.checkpoint.rng import cuda_states_to_restore

    saved = {"cuda_device": torch.tensor([7], dtype=torch.uint8)}  # saved by a process on, say, GPU 3 of 8
    assert cuda_states_to_restore(saved, device_count=1, current_device=0) == {0: saved["cuda_device"]}
    assert cuda_states_to_restore(saved, device_count=8, current_device=5) == {5: saved["cuda_device"]}


def test_rng_restore_of_an_older_checkpoint_with_fewer_visible_gpus_does_not_fail():
    from launcher.checkpoint.rng import cuda_states_to_restore

    every_gpu = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]  # the old "cuda": all visible GPUs
    assert list(cuda_states_to_restore({"cuda": every_gpu}, device_count=2, current_device=0)) == [0, 1]
    assert cuda_states_to_restore({"cuda": every_gpu}, device_count=2, current_device=1)[1] is every_gpu[1]
    assert cuda_states_to_restore({}, device_count=2, current_device=0) == {}  # saved on a CPU machine


def test_rng_state_round_trips_on_this_machine():
    import random

    from launcher.checkpoint.rng import capture_rng, restore_rng

    state = capture_rng()
    expected = (random.random(), torch.rand(3))
    restore_rng(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
