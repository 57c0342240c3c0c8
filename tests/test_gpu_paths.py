"""The decisions behind the GPU paths, as pure functions a CPU machine can check (issue 23): which device a
process trains on, which CUDA RNG states a resume restores, what --deterministic sets."""

from __future__ import annotations

import pytest

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
