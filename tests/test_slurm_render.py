"""`launcher submit` without a cluster: argument checks, the pure renderer against golden files, bash syntax.

Regenerate the golden files after an intended change of the script with
    LAUNCHER_UPDATE_GOLDEN=1 PYTHONPATH=$PWD pytest tests/test_slurm_render.py
and review the diff: it is exactly what changes for users' jobs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from launcher import slurm
from launcher.cli import main as cli_main
from launcher.errors import UsageError

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0  # fixed "submission time" for the default output dir name
CWD = "/home/alice/project"
DEFAULT_SETUP = ("source /home/alice/venv/bin/activate",)

CASES = {
    # The tests' own job shape: two CPU nodes, one process each, explicit environment.
    "cpu_two_nodes": ["--nodes", "2", "--gpus-per-node", "0", "--time", "30", "--signal-grace", "60",
                      "--output-dir", "runs/cpu", "--env", "PYTHONPATH=/home/alice/project",
                      "--env", "MESSAGE=hello world", "--",
                      "recipes/classify.py", "--epochs", "3", "--save-every-steps", "5"],
    # Every resource option, GPU nodes, several setup lines, an explicit accelerate config.
    "gpu_all_options": ["--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "64", "--mem", "480G",
                        "--time", "2-00:00:00", "--partition", "gpu", "--account", "proj42", "--qos", "high",
                        "--constraint", "a100&ib", "--job-name", "big-run", "--output-dir", "/scratch/big",
                        "--log-dir", "/scratch/logs", "--accelerate-config", "accelerate_configs/fsdp.yaml",
                        "--setup", "module load cuda/12.4", "--setup", "source ~/venv/bin/activate",
                        "--signal-grace", "300", "--max-requeues", "5", "--",
                        "recipes/classify.py", "--model", "resnet", "--wandb-tags", "a,b"],
    # GPU nodes with the defaults: CPUs per GPU process, the step's GPUs, NCCL's warnings (issue 23).
    "gpu_defaults": ["--nodes", "2", "--gpus-per-node", "4", "--output-dir", "runs/gpu", "--",
                     "recipes/classify.py", "--model", "resnet"],
    # A 2x2 grid, at most two tasks at a time, W&B group = job name.
    "sweep_grid": ["--sweep", "lr=0.1,0.01", "--sweep", "seed=0,1", "--array", "0-3%2", "--job-name", "lr-sweep",
                   "--", "recipes/classify.py", "--epochs", "2"],
    # Seeds as an array, default output dir (job name + submission time), default setup.
    "seeds_array": ["--array", "0-2", "--", "recipes/classify.py", "--epochs", "2"],
    # Secrets from the submitting environment: their names are in the script, their values never (issue 29).
    "env_from_host": ["--nodes", "2", "--output-dir", "runs/secret", "--env-from-host", "HF_TOKEN",
                      "--env-from-host", "WANDB_API_KEY", "--", "recipes/classify.py"],
}


def render(argv: list[str], configs_dir: str | None = None) -> str:
    options = slurm.resolve(slurm.parse_submit_args(argv), cwd=CWD, now=NOW, setup=DEFAULT_SETUP,
                            configs_dir=configs_dir)
    return slurm.render_sbatch(options)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden_file(name: str) -> None:
    text = render(CASES[name])
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("LAUNCHER_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; create it with LAUNCHER_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"rendered script differs from {path} (see the module docstring)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_is_valid_bash(name: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(render(CASES[name]))
    result = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rendering_is_pure() -> None:
    assert render(CASES["sweep_grid"]) == render(CASES["sweep_grid"])


def test_topology_reaches_accelerate_launch() -> None:
    text = render(["--nodes", "3", "--gpus-per-node", "4", "--", "train.py"])  # no config: --multi_gpu
    assert ('exec accelerate launch --multi_gpu \\\n'
            '    --num_machines 3 --num_processes 12 --machine_rank "$SLURM_NODEID" \\\n'
            '    --main_process_ip "$LAUNCHER_MAIN_HOST" --main_process_port "$LAUNCHER_MAIN_PORT" \\\n'
            '    "$@" )\n') in text
    assert "#SBATCH --gpus-per-node=4" in text
    assert "ACCELERATE_USE_CPU" not in text  # GPU nodes use NCCL
    # The machine rank is expanded by each node's own shell, never by the batch shell: the node program
    # sits in a quoted here-doc.
    assert "NODE_PROGRAM=$(cat <<'NODE'" in text
    # With a config file on GPU nodes, its distributed_type (here FSDP) decides: no --multi_gpu.
    fsdp = render(["--nodes", "2", "--gpus-per-node", "8", "--accelerate-config", "fsdp.yaml", "--", "t.py"])
    assert f"accelerate launch --config_file {CWD}/fsdp.yaml \\\n    --num_machines 2 --num_processes 16 " in fsdp


def test_cpu_nodes_use_gloo_and_one_process_per_node() -> None:
    text = render(["--nodes", "2", "--", "train.py"])
    assert "export ACCELERATE_USE_CPU=true" in text
    assert "accelerate launch --multi_gpu \\\n    --num_machines 2 --num_processes 2 " in text
    single = render(["--nodes", "1", "--", "train.py"])
    assert "accelerate launch --cpu \\\n    --num_machines 1 --num_processes 1 " in single


def test_gpu_jobs_get_cpus_for_data_loading_and_their_gpus_on_the_step() -> None:
    # One CPU per GPU process (with OMP_NUM_THREADS=1) starved the DataLoader workers.
    text = render(["--nodes", "2", "--gpus-per-node", "4", "--", "recipes/classify.py"])
    assert f"#SBATCH --cpus-per-task={4 * slurm.options.CPUS_PER_GPU_PROCESS}" in text
    assert f"export OMP_NUM_THREADS={slurm.options.CPUS_PER_GPU_PROCESS}" in text
    [srun] = [line for line in text.splitlines() if line.startswith("srun ")]
    assert "--gpus-per-node=4 --gpu-bind=none" in srun
    assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in text
    cpu = render(["--nodes", "2", "--", "recipes/classify.py"])
    assert "#SBATCH --cpus-per-task=1" in cpu and "--gpus-per-node" not in cpu and "NCCL" not in cpu
    explicit = render(["--gpus-per-node", "2", "--cpus-per-task", "6", "--", "recipes/classify.py"])
    assert "#SBATCH --cpus-per-task=6" in explicit and "export OMP_NUM_THREADS=3" in explicit


def test_default_accelerate_config_follows_topology(tmp_path: Path) -> None:
    for name in ("cpu.yaml", "cpu_ddp.yaml", "single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml"):
        (tmp_path / name).write_text("{}\n")
    def config_of(argv: list[str]) -> str | None:
        options = slurm.resolve(slurm.parse_submit_args([*argv, "--", "t.py"]), cwd=CWD, now=NOW,
                                setup=(), configs_dir=str(tmp_path))
        return Path(options.accelerate_config).name if options.accelerate_config else None

    assert config_of(["--nodes", "2", "--gpus-per-node", "8"]) == "multi_node.yaml"
    assert config_of(["--nodes", "2"]) == "cpu_ddp.yaml"  # CPU nodes never get a GPU config's precision
    assert config_of([]) == "cpu.yaml"
    assert config_of(["--procs-per-node", "2"]) == "cpu_ddp.yaml"
    assert config_of(["--gpus-per-node", "1"]) == "single_gpu.yaml"
    assert config_of(["--gpus-per-node", "4"]) == "multi_gpu.yaml"
    # An explicit config wins and is made absolute (the job may run elsewhere).
    assert slurm.resolve(slurm.parse_submit_args(["--accelerate-config", "my.yaml", "--", "t.py"]), cwd=CWD,
                         now=NOW, setup=(), configs_dir=str(tmp_path)).accelerate_config == f"{CWD}/my.yaml"


def test_defaults_resolve_from_job_name_and_time() -> None:
    options = slurm.resolve(slurm.parse_submit_args(["--", "recipes/classify.py"]), cwd=CWD, now=NOW,
                            setup=DEFAULT_SETUP, configs_dir=None)
    assert options.job_name == "classify"
    assert options.output_dir.startswith(f"{CWD}/runs/classify-2023")
    assert options.log_dir == options.output_dir + "/slurm"
    assert options.setup == DEFAULT_SETUP
    assert options.cpus_per_task == 1 and options.procs_per_node == 1
    # An explicit --setup replaces the default environment activation.
    explicit = slurm.resolve(slurm.parse_submit_args(["--setup", "module load x", "--", "t.py"]), cwd=CWD,
                             now=NOW, setup=DEFAULT_SETUP, configs_dir=None)
    assert explicit.setup == ("module load x",)


def test_default_setup_activates_the_current_environment(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "activate").write_text("")
    assert slurm.default_setup(str(tmp_path), "/usr", f"{tmp_path}/bin/python") == (
        f"source {tmp_path}/bin/activate",)
    assert slurm.default_setup("/opt/py", "/opt/py", "/opt/py/bin/python3") == ("export PATH=/opt/py/bin:$PATH",)


def test_sweep_tasks_get_their_own_output_dir_and_the_sweep_as_wandb_group() -> None:
    text = render(CASES["sweep_grid"])
    assert "#SBATCH --array=0-3%2" in text
    assert "#SBATCH --output=/home/alice/project/runs/lr-sweep-" in text and "/slurm/%x-%A_%a.out" in text
    assert "    0) TASK=lr-0.1_seed-0; ARGS+=(--lr 0.1 --seed 0) ;;" in text
    assert "    3) TASK=lr-0.01_seed-1; ARGS+=(--lr 0.01 --seed 1) ;;" in text
    assert "OUTPUT_DIR=$OUTPUT_DIR/$TASK" in text
    assert "ARGS+=(--wandb-group lr-sweep)" in text


def test_array_selects_grid_tasks() -> None:
    options = slurm.parse_submit_args(["--sweep", "lr=1,2,3", "--array", "0,2", "--", "t.py"])
    assert [(i, name) for i, name, _ in slurm.array_tasks(options)] == [(0, "lr-1"), (2, "lr-3")]
    assert "#SBATCH --array=0,2\n" in render(["--sweep", "lr=1,2,3", "--array", "0,2", "--", "t.py"])


def test_task_names_stay_distinct_after_sanitising() -> None:
    options = slurm.parse_submit_args(["--sweep", "dataset=a/b,a:b", "--", "t.py"])
    names = [name for _, name, _ in slurm.array_tasks(options)]
    assert len(set(names)) == 2 and all("/" not in n for n in names)


def test_script_arguments_are_quoted() -> None:
    text = render(["--", "train.py", "--name", "it's $HOME; rm -rf /"])
    assert "ARGS=(train.py --name 'it'\"'\"'s $HOME; rm -rf /')" in text


@pytest.mark.parametrize(("text", "seconds"), [("90", 5400), ("5:30", 330), ("4:00:00", 14400),
                                               ("2-00", 172800), ("1-02:03", 93780), ("1-00:00:01", 86401)])
def test_time_limits_in_slurm_formats(text: str, seconds: int) -> None:
    assert slurm.time_limit_seconds(text) == seconds


def test_array_spec_parsing() -> None:
    assert slurm.parse_array("0-3") == ([0, 1, 2, 3], None)
    assert slurm.parse_array("1,3,5-6%2") == ([1, 3, 5, 6], 2)
    assert slurm.parse_array("0-8:4") == ([0, 4, 8], None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--nodes", "2"], "missing the training script"),
    (["--nodes", "2", "--"], "missing the training script"),
    (["--frobnicate", "--", "t.py"], "unrecognized arguments: --frobnicate"),
    (["--nodes", "0", "--", "t.py"], "--nodes must be at least 1"),
    (["--nodes", "two", "--", "t.py"], "whole number"),
    (["--gpus-per-node", "-1", "--", "t.py"], "cannot be negative"),
    (["--env", "NOEQUALS", "--", "t.py"], "--env 'NOEQUALS' must look like KEY=VALUE"),
    (["--env", "1BAD=x", "--", "t.py"], "shell variable name"),
    (["--sweep", "lr", "--", "t.py"], "must look like KEY=V1,V2"),
    (["--sweep", "lr=", "--", "t.py"], "empty value"),
    (["--sweep", "lr=1,,2", "--", "t.py"], "empty value"),
    (["--sweep", "lr=1,1", "--", "t.py"], "twice"),
    (["--sweep", "lr=1", "--sweep", "lr=2", "--", "t.py"], "given twice"),
    (["--sweep", "output-dir=a,b", "--", "t.py"], "cannot vary output-dir"),
    (["--sweep", "lr=1,2", "--", "t.py", "--lr", "3"], "contradict"),
    (["--sweep", "lr=1,2", "--", "t.py", "--wandb-group", "g"], "drop --wandb-group"),
    (["--sweep", "lr=1,2", "--array", "0-2", "--", "t.py"], "only 2 combinations"),
    (["--array", "0-2", "--", "t.py", "--seed", "1"], "--seed"),
    (["--array", "3-1", "--", "t.py"], "empty range"),
    (["--array", "a-b", "--", "t.py"], "not a SLURM array spec"),
    (["--", "t.py", "--output-dir", "x"], "pass --output-dir to launcher submit"),
    (["--", "t.py", "--resume=never"], "do not pass --resume"),
    (["--time", "soon", "--", "t.py"], "not a SLURM time"),
    (["--time", "1", "--signal-grace", "60", "--", "t.py"], "--signal-grace 60 must be between"),
    (["--mem", "lots", "--", "t.py"], "not a SLURM size"),
    (["--partition", "a b", "--", "t.py"], "one word"),
    (["--job-name", "a/b", "--", "t.py"], "cannot contain '/'"),
    (["--gpus-per-node", "4", "--procs-per-node", "2", "--", "t.py"], "contradicts --gpus-per-node"),
    (["--procs-per-node", "4", "--cpus-per-task", "2", "--", "t.py"], "fewer than the 4 training processes"),
    (["--max-requeues", "-1", "--", "t.py"], "cannot be negative"),
    (["--max-restarts", "-1", "--", "t.py"], "--max-restarts cannot be negative (got -1)"),
    (["--collective-timeout", "0", "--", "t.py"], "--collective-timeout must be a positive number of seconds"),
    (["--init-timeout", "-5", "--", "t.py"], "--init-timeout must be a positive number of seconds"),
    (["--collective-timeout", "60", "--init-timeout", "30", "--", "t.py"], "--init-timeout (30) must be at least"),
    (["--collective-timeout", "soon", "--", "t.py"], "takes a number of seconds"),
    (["--collective-timeout", "60", "--", "t.py", "--collective-timeout", "9"], "keep one"),
])
def test_bad_input_is_one_clear_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        slurm.parse_submit_args(argv)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_fault_options_reach_the_job_command_line() -> None:
    text = render(["--nodes", "2", "--max-restarts", "2", "--collective-timeout", "120", "--init-timeout", "900",
                   "--", "recipes/classify.py"])
    assert "ARGS=(recipes/classify.py --collective-timeout 120 --init-timeout 900)" in text
    assert "accelerate launch --multi_gpu --max_restarts 2 \\\n" in text
    assert "--max_restarts" not in render(["--nodes", "2", "--", "recipes/classify.py"])


def test_cli_reports_usage_errors_in_one_line_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["submit", "--nodes", "0", "--", "t.py"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher submit: error: --nodes must be at least 1")


def test_dry_run_prints_the_script_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["submit", "--nodes", "2", "--dry-run", "--", "train.py"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --nodes=2" in out
    assert list(tmp_path.iterdir()) == []


def test_missing_script_or_config_is_caught_before_submitting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["submit", "--", "trian.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launcher submit: error: training script trian.py not found in {tmp_path}")
    (tmp_path / "train.py").write_text("")
    assert cli_main(["submit", "--accelerate-config", "nope.yaml", "--", "train.py"]) == 2
    assert capsys.readouterr().err == f"launcher submit: error: accelerate config {tmp_path}/nope.yaml not found; " \
                                      "check --accelerate-config\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "train.py"]  # nothing written


def test_missing_sbatch_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    assert cli_main(["submit", "--", "train.py"]) == 2
    err = capsys.readouterr().err
    assert err == ("launcher submit: error: sbatch not found: run launcher submit on a SLURM login node "
                   "(or use --dry-run to see the script)\n")


def test_submit_saves_the_script_next_to_the_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in sbatch that records what it was given; the cluster tests use the real one.
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\ncp "$2" "$(dirname "$0")/script"\n'
                    'echo "4242;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    assert cli_main(["submit", "--nodes", "2", "--output-dir", "out", "--", "train.py"]) == 0
    out = capsys.readouterr().out
    saved = tmp_path / "out" / "slurm" / "train-4242.sbatch"
    assert out.splitlines() == [
        "Submitted job 4242: 2 node(s) x 1 process(es)",
        f"  script: {saved}",
        f"  log:    {tmp_path}/out/slurm/train-4242.out",
        f"  output: {tmp_path}/out",
    ]
    assert saved.read_text() == (fake.parent / "script").read_text()
    assert (fake.parent / "args").read_text().startswith("--parsable ")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["train-4242.sbatch"]  # no leftover temp file


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert slurm.submit_main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--mem", "--time", "--partition", "--account",
                 "--qos", "--constraint", "--job-name", "--output-dir", "--log-dir", "--accelerate-config",
                 "--setup", "--env", "--signal-grace", "--max-requeues", "--collective-timeout", "--init-timeout",
                 "--max-restarts", "--sweep", "--array", "--dry-run"):
        assert flag in out


def test_console_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'launcher = "launcher.cli:main"' in text
