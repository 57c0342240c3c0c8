"""`launcher submit`'s command line: the parser built from `SubmitOptions`' fields, `parse_submit_args`, and
`submit_main`, which renders, saves and submits the script (`sbatch --parsable`) and says where the logs go.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from launcher.errors import UsageError
from launcher.slurm.options import (
    SubmitOptions,
    array_tasks,
    check,
    check_one_line,
    default_setup,
    parse_sweep,
    resolve,
)
from launcher.slurm.render import render_sbatch


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _int(flag: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number, not {text!r}") from None

    return parse


def _seconds(flag: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number of seconds, not {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="launcher submit",
        usage="launcher submit [options] -- SCRIPT [script args]",
        description="Render an sbatch script that runs SCRIPT with accelerate launch on every node, and "
                    "submit it.",
    )
    ints = {"nodes", "gpus_per_node", "procs_per_node", "cpus_per_task", "signal_grace", "max_requeues",
            "max_restarts"}
    floats = {"collective_timeout", "init_timeout"}
    repeatable = {"setup", "env", "env_from_host", "sweep"}
    for f in dataclasses.fields(SubmitOptions):  # in the dataclass's order, with its help and defaults
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("script", "script_args"):
            continue
        if f.name == "dry_run":
            parser.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS,
                                help=f.metadata["help"])
            continue
        shown = f" (default: {f.default})" if f.default not in (None, ()) else ""
        kwargs: dict[str, Any] = {"type": _int(flag)} if f.name in ints else {}
        if f.name in floats:
            kwargs["type"] = _seconds(flag)
        if f.name in repeatable:
            kwargs["action"] = "append"
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"] + shown,
                            metavar=f.metadata["metavar"], **kwargs)
    return parser


def parse_submit_args(argv: Sequence[str]) -> SubmitOptions:
    """`[options] -- SCRIPT [args]` -> unresolved SubmitOptions. Raises UsageError on bad input."""
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        ours, script = argv[:split], argv[split + 1:]
    else:
        ours, script = argv, []
    # Every value, before argparse reads it: int("2\n") is 2, and a newline must not slip through anywhere.
    for i in range(len(ours)):
        check_one_line(*_option_and_value(ours, i))
    values = vars(build_parser().parse_args(ours))
    if not script:
        raise UsageError("missing the training script: put it after `--`, e.g. "
                         "launcher submit --nodes 2 -- recipes/classify.py --epochs 10")
    if "env" in values:
        pairs = []
        for item in values["env"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--env {item!r} must look like KEY=VALUE")
            pairs.append((key, value))
        values["env"] = tuple(pairs)
    if "sweep" in values:
        values["sweep"] = tuple(parse_sweep(s) for s in values["sweep"])
    if "setup" in values:
        values["setup"] = tuple(values["setup"])
    if "env_from_host" in values:
        values["env_from_host"] = tuple(values["env_from_host"])
    options = SubmitOptions(script=script[0], script_args=tuple(script[1:]), **values)
    check(options)
    return options


def _option_and_value(args: Sequence[str], i: int) -> tuple[str, str]:
    """args[i] as (option, value) for a message: `--mem=4G` and `--mem 4G` give ('--mem', '4G')."""
    arg = args[i]
    flag, eq, value = arg.partition("=")
    if arg.startswith("-") and eq and flag.isprintable():
        return flag, value
    previous = args[i - 1].partition("=")[0] if i else ""
    if not arg.startswith("-") and previous.startswith("-") and previous.isprintable():
        return previous, arg
    return "an option", arg


def _project_configs_dir() -> str | None:
    """accelerate_configs/ of this checkout (the launcher package's parent folder), when it has one."""
    candidate = Path(__file__).resolve().parents[2] / "accelerate_configs"  # launcher/slurm/cli.py -> checkout
    return str(candidate) if candidate.is_dir() else None


def submit_main(argv: Sequence[str]) -> int:
    """`launcher submit`. Returns the exit status; raises UsageError on bad input."""
    if any(a in ("-h", "--help") for a in argv[: argv.index("--") if "--" in argv else len(argv)]):
        build_parser().print_help()
        return 0
    options = resolve(
        parse_submit_args(argv),
        cwd=os.getcwd(),
        now=time.time(),
        setup=default_setup(sys.prefix, sys.base_prefix, sys.executable),
        configs_dir=_project_configs_dir(),
    )
    script = render_sbatch(options)
    if options.dry_run:
        sys.stdout.write(script)
        return 0
    # Checked before queueing, not hours later on the nodes (a dry run may render for another machine).
    if not (Path(options.workdir) / options.script).is_file():
        raise UsageError(f"training script {options.script} not found in {options.workdir}; check the path "
                         "after `--` (relative paths start from --workdir, default: the current directory)")
    if options.accelerate_config and not Path(options.accelerate_config).is_file():
        raise UsageError(f"accelerate config {options.accelerate_config} not found; check --accelerate-config")
    for name in options.env_from_host:
        if name not in os.environ:
            raise UsageError(f"--env-from-host {name}: {name} is not set here; export it before launcher submit "
                             "(the job gets the value from this environment)")
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError("sbatch not found: run launcher submit on a SLURM login node (or use --dry-run to "
                         "see the script)")
    log_dir = Path(options.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # Saved before submitting (sbatch reads it); renamed after the job id once SLURM has given one.
    pending = log_dir / f"{options.job_name}-pending-{os.getpid()}.sbatch"
    _write_private(pending, script)
    # --env-from-host: the values travel in the environment sbatch copies into the job (--export=ALL, also
    # rendered as #SBATCH --export=ALL). Given here too, because a command-line option beats an SBATCH_EXPORT
    # in the environment, which beats the #SBATCH line.
    export = ["--export=ALL"] if options.env_from_host else []
    result = subprocess.run([sbatch, "--parsable", *export, str(pending)], check=False, capture_output=True,
                            text=True)
    if result.returncode != 0:
        pending.unlink(missing_ok=True)
        message = (result.stderr.strip() or result.stdout.strip()).splitlines()
        print(f"launcher submit: sbatch failed: {' '.join(message) or f'exit status {result.returncode}'}",
              file=sys.stderr)
        return result.returncode or 1
    job_id = result.stdout.strip().split(";")[0]
    saved = log_dir / f"{options.job_name}-{job_id}.sbatch"
    pending.rename(saved)
    print(describe_submission(options, job_id, saved))
    return 0


def _write_private(path: Path, text: str) -> None:
    """Write a new file readable by its owner alone (0600), whatever the umask.

    The script holds the --env values and --setup lines, which may be more private than the logs beside
    it (secret-looking names are refused, but not every private value has such a name). O_EXCL: never
    write through a file or link that is already there.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def describe_submission(options: SubmitOptions, job_id: str, script_path: Path) -> str:
    log_dir = options.log_dir
    tasks = array_tasks(options)
    lines = [f"Submitted job {job_id}: {options.nodes} node(s) x {options.processes_per_node} process(es)"
             + (f", {len(tasks)} array tasks" if tasks else "")]
    lines.append(f"  script: {script_path}")
    if tasks:
        lines.append(f"  logs:   {log_dir}/{options.job_name}-{job_id}_<task>.out")
        for i, name, _ in tasks:
            lines.append(f"  task {i}: {options.output_dir}/{name}")
    else:
        lines.append(f"  log:    {log_dir}/{options.job_name}-{job_id}.out")
        lines.append(f"  output: {options.output_dir}")
    return "\n".join(lines)
