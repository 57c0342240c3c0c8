"""`launcher submit`'s edges (issue 29): every field on one line, no '%' in the job's folders, no secrets in the script.

A value with a newline used to slip through (`re.match("...$")` matches before a final "\\n") and became a line of
its own in the rendered script; a '%' in --log-dir was expanded by SLURM in #SBATCH --output only; `--env
HF_TOKEN=...` left the token in clear text in the script kept under the log dir. Each refusal is one line that
names the field and the fix, exits 2 and writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import slurm
from launcher.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0
CWD = "/home/alice/project"

# (flag, a good value): each is also given with a bad character (see BAD) at the end or in the middle.
FIELDS = [
    ("--mem", "4G"), ("--time", "10"), ("--partition", "gpu"), ("--account", "proj"), ("--qos", "high"),
    ("--constraint", "a100"), ("--job-name", "run"), ("--output-dir", "runs/x"), ("--log-dir", "logs"),
    ("--workdir", "work"), ("--accelerate-config", "c.yaml"), ("--setup", "module load cuda"),
    ("--env", "WANDB_PROJECT=x"), ("--env-from-host", "MY_VAR"), ("--sweep", "lr=1,2"), ("--array", "0-3"),
    ("--nodes", "2"), ("--signal-grace", "60"), ("--collective-timeout", "300"),
]
BAD = {"trailing newline": "{}\n", "trailing CR": "{}\r", "embedded newline": "{}\nX", "NUL": "{}\x00"}


def render(argv: list[str]) -> str:
    options = slurm.resolve(slurm.parse_submit_args(argv), cwd=CWD, now=NOW, setup=(), configs_dir=None)
    return slurm.render_sbatch(options)


def refusal(argv: list[str]) -> str:
    with pytest.raises(UsageError) as info:
        render(argv)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


@pytest.mark.parametrize("how", sorted(BAD))
@pytest.mark.parametrize(("flag", "good"), FIELDS, ids=[f for f, _ in FIELDS])
def test_every_option_with_a_newline_cr_or_nul_is_refused_naming_it(flag: str, good: str, how: str) -> None:
    render([flag, good, "--", "t.py"])  # the good value renders
    bad = BAD[how].format(good)
    message = refusal([flag, bad, "--", "t.py"])
    assert message.startswith(f"{flag} {bad!r} contains a newline, carriage return or other control character")
    # `--flag=value` is the same option
    assert refusal([f"{flag}={bad}", "--", "t.py"]).startswith(f"{flag} {bad!r} contains")


@pytest.mark.parametrize("how", sorted(BAD))
def test_the_training_command_with_a_newline_is_refused(how: str) -> None:
    bad = BAD[how].format("x")
    assert refusal(["--", bad]).startswith(f"the training script (after `--`) {bad!r} contains a newline")
    assert refusal(["--", "t.py", "--name", bad]).startswith(f"a script argument (after `--`) {bad!r} contains")


def test_the_probe_env_name_with_a_trailing_newline_no_longer_renders_a_stray_line() -> None:
    # Was: `export WANDB_PROJECT` and a line `=x` of its own.
    assert refusal(["--env", "WANDB_PROJECT\n=x", "--", "t.py"]).startswith("--env 'WANDB_PROJECT\\n=x' contains")


@pytest.mark.parametrize(("field", "value"), [
    ("mem", "4G\n"), ("time", "10\n"), ("partition", "gpu\n"), ("job_name", "a\rb"), ("constraint", "a\nb"),
    ("log_dir", "/l\n"), ("script", "t.py\n"), ("script_args", ("a\nb",)), ("setup", ("x\r",)),
    ("env", (("A\n", "x"),)), ("env", (("A", "x\ny"),)), ("env_from_host", ("A\n",)),
    ("sweep", (("lr", ("1\n",)),)), ("array", "0-1\n"),
])
def test_options_built_in_python_are_checked_too(field: str, value: object) -> None:
    # check() (and render_sbatch on resolved options) refuse them without the command line's own pass.
    options = dataclasses.replace(slurm.SubmitOptions(script="t.py"), **{field: value})
    with pytest.raises(UsageError, match="control character"):
        slurm.check(options)
    resolved = slurm.resolve(slurm.SubmitOptions(script="t.py"), cwd=CWD, now=NOW, setup=(), configs_dir=None)
    with pytest.raises(UsageError, match="control character"):
        slurm.render_sbatch(dataclasses.replace(resolved, **{field: value}))


def test_patterns_match_the_whole_value() -> None:
    for bad in ("10\n", "4:00:00\n"):
        with pytest.raises(UsageError, match="not a SLURM time"):
            slurm.time_limit_seconds(bad)
    with pytest.raises(UsageError, match="not a SLURM array spec"):
        slurm.parse_array("0-3\n")
    for pattern, good in ((slurm.options._MEM_RE, "4G"), (slurm.options._ENV_KEY_RE, "WANDB_PROJECT"),
                          (slurm.options._SWEEP_KEY_RE, "lr")):
        assert pattern.fullmatch(good) and not pattern.fullmatch(good + "\n")
    with pytest.raises(UsageError, match="control character"):
        slurm.parse_sweep("lr\n=1,2")


@pytest.mark.parametrize(("argv", "message"), [
    (["--log-dir", "logs/%j"], "--log-dir 'logs/%j' contains '%', which SLURM expands in #SBATCH --output"),
    (["--output-dir", "runs/%x"], "--output-dir 'runs/%x' contains '%'"),
    (["--workdir", "w%A"], "--workdir 'w%A' contains '%'"),
    (["--job-name", "a%b"], "the default --output-dir '/home/alice/project/runs/a%b-"),
])
def test_a_percent_in_the_job_folders_is_refused(argv: list[str], message: str) -> None:
    text = refusal([*argv, "--", "t.py"])
    assert text.startswith(message) and "without '%'" in text


def test_a_percent_in_the_current_directory_is_refused_and_elsewhere_allowed() -> None:
    with pytest.raises(UsageError, match=r"^the current directory \(the default --workdir\) '/a%b' contains '%'"):
        slurm.resolve(slurm.parse_submit_args(["--", "t.py"]), cwd="/a%b", now=NOW, setup=(), configs_dir=None)
    # Not a folder SLURM sees: the script's own arguments, --env values.
    text = render(["--env", "FMT=%d", "--", "t.py", "--name", "100%"])
    assert "export FMT=%d" in text and "ARGS=(t.py --name 100%)" in text


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SESSION_TOKEN",
                                  "MY_SECRET", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "hf_token"])
def test_a_secret_through_env_is_refused_pointing_at_env_from_host(name: str) -> None:
    message = refusal(["--env", f"{name}=s3cr3t", "--", "t.py"])
    assert message == (f"--env {name}=...: {name} looks like a secret, and --env writes its value into the script "
                       f"kept under the log dir; export it and pass --env-from-host {name} instead")
    assert "s3cr3t" not in message
    setup = refusal(["--setup", f"export {name}=s3cr3t", "--", "t.py"])
    assert setup.startswith(f"--setup sets {name}, which looks like a secret") and "s3cr3t" not in setup


def test_names_that_only_look_like_secrets_pass() -> None:
    text = render(["--env", "TOKENIZERS_PARALLELISM=false", "--env", "KEYBOARD=us", "--", "t.py"])
    assert "export TOKENIZERS_PARALLELISM=false" in text and "export KEYBOARD=us" in text


def test_env_from_host_names_the_variable_and_never_holds_its_value(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_s3cr3t_value")
    text = render(["--env-from-host", "HF_TOKEN", "--", "t.py"])
    assert "hf_s3cr3t_value" not in text
    assert "#SBATCH --export=ALL\n" in text
    line = ('export HF_TOKEN="${HF_TOKEN?launcher: --env-from-host HF_TOKEN is not set in the job environment; '
            'export it and submit again}"')
    assert line in text.splitlines()
    assert "--export" not in render(["--", "t.py"])  # sbatch's default without it, as before
    # The line hands the job's value on, and stops the job with one clear line where there is none.
    script = tmp_path / "env.sh"
    script.write_text(f"set -u\n{line}\nbash -c 'echo \"got $HF_TOKEN\"'\n")
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "HF_TOKEN": "v1"})
    assert (ran.returncode, ran.stdout) == (0, "got v1\n")
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert ran.returncode != 0 and ran.stdout == ""
    assert "HF_TOKEN: launcher: --env-from-host HF_TOKEN is not set in the job environment" in ran.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["--env-from-host", "1BAD"], "--env-from-host '1BAD': the name must be a shell variable name"),
    (["--env-from-host", "HF_TOKEN=x"], "--env-from-host 'HF_TOKEN=x': the name must be a shell variable name"),
    (["--env-from-host", "A", "--env-from-host", "A"], "--env-from-host A is given twice"),
    (["--env", "A=1", "--env-from-host", "A"], "A is given to --env and to --env-from-host; keep one"),
])
def test_bad_env_from_host(argv: list[str], message: str) -> None:
    assert refusal([*argv, "--", "t.py"]).startswith(message)


# --- through the real command line ---

def launcher_submit(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "launcher", "submit", *argv], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("argv", "starts"), [
    (["--env", "WANDB_PROJECT\n=x"], "--env 'WANDB_PROJECT\\n=x' contains a newline"),
    (["--mem", "4G\n"], "--mem '4G\\n' contains a newline"),
    (["--time", "10\n"], "--time '10\\n' contains a newline"),
    (["--log-dir", "logs%j"], "--log-dir 'logs%j' contains '%'"),
    (["--env", "HF_TOKEN=hf_s3cr3t"], "--env HF_TOKEN=...: HF_TOKEN looks like a secret"),
])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_cli_refuses_in_one_line_with_exit_2_and_writes_nothing(argv: list[str], starts: str, dry_run: bool,
                                                                 tmp_path: Path) -> None:
    # A stand-in sbatch that would leave a mark if it were ever run.
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ntouch "$(dirname "$0")/called"\necho 1\n')
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("")
    result = launcher_submit([*argv, *(["--dry-run"] if dry_run else []), "--", "train.py"], work,
                             PATH=f"{fake.parent}:{os.environ['PATH']}")
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith(f"launcher submit: error: {starts}") and result.stderr.count("\n") == 1, \
        result.stderr
    assert "s3cr3t" not in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["train.py"]  # no log dir, no script
    assert not (fake.parent / "called").exists()


def test_cli_env_from_host_unset_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ntouch "$(dirname "$0")/called"\necho 1\n')
    fake.chmod(0o755)
    (tmp_path / "train.py").write_text("")
    environ = {k: v for k, v in os.environ.items() if k != "LAUNCHER_TEST_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "launcher", "submit", "--env-from-host", "LAUNCHER_TEST_TOKEN",
                             "--", "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**environ, "PYTHONPATH": str(REPO), "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert result.returncode == 2
    assert result.stderr == ("launcher submit: error: --env-from-host LAUNCHER_TEST_TOKEN: LAUNCHER_TEST_TOKEN is not "
                             "set here; export it before launcher submit (the job gets the value from this "
                             "environment)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "train.py"]
    assert not (fake.parent / "called").exists()


def test_cli_env_from_host_submits_with_export_all_and_keeps_a_private_script_without_the_value(
        tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    # Records its arguments and the environment it was given (the job gets the same: --export=ALL).
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                    'echo "$LAUNCHER_TEST_TOKEN" > "$(dirname "$0")/token"\necho "4243;cluster"\n')
    fake.chmod(0o755)
    (tmp_path / "train.py").write_text("")
    result = launcher_submit(["--env-from-host", "LAUNCHER_TEST_TOKEN", "--output-dir", "out", "--", "train.py"],
                             tmp_path, PATH=f"{fake.parent}:{os.environ['PATH']}", LAUNCHER_TEST_TOKEN="tok-s3cr3t")
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "out" / "slurm" / "train-4243.sbatch"
    args = (fake.parent / "args").read_text().split()
    assert args[:2] == ["--parsable", "--export=ALL"] and args[2].startswith(f"{saved.parent}/train-pending-")
    assert (fake.parent / "token").read_text() == "tok-s3cr3t\n"
    text = saved.read_text()
    assert "LAUNCHER_TEST_TOKEN" in text and "tok-s3cr3t" not in text
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600  # whatever the umask
    assert "tok-s3cr3t" not in result.stdout + result.stderr


def test_help_lists_env_from_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert slurm.submit_main(["--help"]) == 0
    assert "--env-from-host NAME" in capsys.readouterr().out
