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


def test_watchdog_blames_the_rank_with_an_idle_gpu_not_those_waiting_on_theirs():
    from launcher.faults.watchdog import name_stuck_ranks

    # On a GPU a healthy rank waits at its next host read (launcher code) while its stream waits for the peer.
    states = [(False, True, "launcher/loop/training.py:359 in _step_metrics"),
              (False, False, "launcher/data/loader.py:80 in __iter__"),
              (True, False, "torch/distributed/distributed_c10d.py:2800 in all_reduce")]
    culprits, how = name_stuck_ranks(states)
    assert culprits == [1] and "rank 1 at launcher/data/loader.py:80" in how and "rank 0" not in how


def test_watchdog_names_every_rank_when_all_wait_on_torch_or_their_gpu():
    from launcher.faults.watchdog import name_stuck_ranks

    culprits, how = name_stuck_ranks([(False, True, "a.py:1 in f"), (True, False, "b.py:2 in g")])
    assert culprits == [0, 1] and "every rank is alive and waiting" in how


def test_nccl_async_error_handling_is_left_to_torch():
    # torch's default (3) ends the process without ncclCommAbort, which can itself hang on a wedged GPU.
    from launcher.faults.watchdog import nccl_environment

    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in nccl_environment()


def test_watchdog_tells_a_compilation_from_running_compiled_code():
    # A recompilation (a new shape) is bounded like start-up; a compiled step that hangs is bounded like a step.
    from launcher.faults.watchdog import _compiling

    seen = {"compiling": [], "running": []}

    def backend(graph, example_inputs):
        seen["compiling"].append(_compiling())
        return graph.forward

    @torch._dynamo.disable
    def probe():
        seen["running"].append(_compiling())

    def step(x):
        y = x * 2
        probe()  # a graph break: runs eagerly between two compiled graphs
        return y + 1

    compiled = torch.compile(step, backend=backend)
    compiled(torch.ones(3))
    seen["running"].clear()  # the first call compiled
    compiled(torch.ones(3))
    compiled(torch.ones(3))
    assert seen["compiling"] and all(seen["compiling"])
    assert seen["running"] == [False, False]
    assert not _compiling()


def test_deterministic_sets_kernels_cudnn_and_the_cublas_workspace():
    from launcher.loop.determinism import determinism_settings, use_deterministic_algorithms

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = True
    try:
        environ: dict[str, str] = {}
        settings = use_deterministic_algorithms(environ)
        assert environ == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        assert settings == {"deterministic_algorithms": True, "cudnn_deterministic": True, "cudnn_benchmark": False,
                            "cublas_workspace_config": ":4096:8"} == determinism_settings(environ)
        chosen = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the other deterministic value, a user's choice, is kept
        assert use_deterministic_algorithms(chosen)["cublas_workspace_config"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_builtin_image_models_avoid_modules_without_a_deterministic_cuda_backward(name):
    from torch import nn

    from launcher.models import build_model

    # torch.use_deterministic_algorithms(True) makes these raise in backward on a GPU (its documented list).
    no_deterministic_backward = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.MaxPool3d,
                                 nn.AvgPool3d, nn.FractionalMaxPool2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
    model = build_model(name, (3, 16, 16), 10)
    assert not [m for m in model.modules() if isinstance(m, no_deterministic_backward)]


def test_global_average_pool_is_adaptive_average_pool_to_one():
    from torch import nn

    from launcher.models.builtin import GlobalAvgPool

    x = torch.randn(4, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x))


@pytest.mark.slow
def test_deterministic_flag_is_recorded_and_changes_nothing_on_the_cpu(tmp_path):
    import json
    import os

    from tests.helpers import assert_same_weights, comparable, final_weights, read_metrics, run

    args = ["--model", "cnn", "--epochs", "1", "--batch-size", "128"]
    run([*args, "--deterministic", "--output-dir", str(tmp_path / "det")])
    run([*args, "--output-dir", str(tmp_path / "default")])
    saved = json.loads((tmp_path / "det" / "config.json").read_text())
    assert saved["config"]["deterministic"] is True
    assert saved["run_info"]["determinism"] == {"deterministic_algorithms": True, "cudnn_deterministic": True,
                                                "cudnn_benchmark": False,
                                                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG",
                                                                                          ":4096:8")}
    default = json.loads((tmp_path / "default" / "config.json").read_text())
    assert default["config"]["deterministic"] is False
    assert default["run_info"]["determinism"]["deterministic_algorithms"] is False
    # CPU kernels are deterministic already: the flag changes no number.
    assert_same_weights(final_weights(tmp_path / "det"), final_weights(tmp_path / "default"))
    assert comparable(read_metrics(tmp_path / "det")) == comparable(read_metrics(tmp_path / "default"))
