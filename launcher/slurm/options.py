"""`launcher submit`'s options: `SubmitOptions` (every default), the defaults that depend on where you submit
from (`resolve`), the checks (`check`) and the array and sweep specs (`parse_array`, `parse_sweep`, `array_tasks`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.faults.timeouts import DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_INIT_TIMEOUT, check_timeouts

# Flags the job passes to the training script itself; the user must not pass them too.
OWNED_SCRIPT_FLAGS = ("--output-dir", "--resume")
# The sweep name goes to W&B as the group, so runs of one sweep line up.
SWEEP_GROUP_FLAG = "--wandb-group"


def _opt(default: Any, help: str, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar})


# A GPU process needs CPUs beside its main thread: DataLoader workers (--num-workers), pinned-memory copies,
# NCCL's proxy thread. One CPU each starved them; 8 fits the usual 8-16 cores per GPU of GPU nodes.
CPUS_PER_GPU_PROCESS = 8


@dataclass(frozen=True)
class SubmitOptions:
    """Everything `launcher submit` needs; the one place its defaults live."""

    script: str = _opt("", "the training script (after `--`)")
    script_args: tuple[str, ...] = _opt((), "arguments for the training script (after SCRIPT)")
    # resources
    nodes: int = _opt(1, "number of nodes; one `accelerate launch` per node", "N")
    gpus_per_node: int = _opt(0, "GPUs per node; 0 = CPU nodes (processes join a gloo group)", "N")
    procs_per_node: int | None = _opt(None, "training processes per node (default: one per GPU, or 1 on "
                                            "CPU nodes)", "N")
    cpus_per_task: int | None = _opt(None, "CPUs for each node's task (default: 1 per training process on CPU "
                                           f"nodes, {CPUS_PER_GPU_PROCESS} per GPU process)", "N")
    mem: str | None = _opt(None, "memory per node, e.g. 64G (default: the partition's default)", "SIZE")
    time: str = _opt("01:00:00", "time limit ([D-]HH:MM:SS, MM:SS or minutes)", "TIME")
    partition: str | None = _opt(None, "SLURM partition (default: the cluster's default)", "NAME")
    account: str | None = _opt(None, "SLURM account to charge", "NAME")
    qos: str | None = _opt(None, "SLURM quality of service", "NAME")
    constraint: str | None = _opt(None, "node features, e.g. 'a100&ib'", "EXPR")
    job_name: str | None = _opt(None, "job name (default: the script's name without .py)", "NAME")
    # where things go
    output_dir: str | None = _opt(None, "training output dir, passed to the script as --output-dir "
                                        "(default: runs/JOB_NAME-TIMESTAMP); a sweep gets one subfolder "
                                        "per task", "DIR")
    log_dir: str | None = _opt(None, "where SLURM logs and the rendered script go (default: "
                                     "OUTPUT_DIR/slurm)", "DIR")
    workdir: str | None = _opt(None, "directory the job runs in (default: the current directory)", "DIR")
    # how the job starts
    accelerate_config: str | None = _opt(None, "accelerate config file (default: the one in "
                                               "accelerate_configs/ matching nodes and GPUs)", "FILE")
    setup: tuple[str, ...] | None = _opt(None, "shell line run before training, e.g. 'module load cuda' "
                                               "(repeatable; default: activate the current Python "
                                               "environment)", "LINE")
    env: tuple[tuple[str, str], ...] = _opt((), "environment variable for the job, written into the script "
                                                "(repeatable; secrets: use --env-from-host)", "KEY=VALUE")
    env_from_host: tuple[str, ...] = _opt((), "pass this variable from the submitting environment to the job "
                                              "without writing its value into the script, e.g. HF_TOKEN "
                                              "(repeatable)", "NAME")
    # preemption
    signal_grace: int = _opt(120, "seconds before the time limit at which SLURM warns the job (USR1) so it "
                                  "can checkpoint and requeue itself", "SECONDS")
    max_requeues: int = _opt(3, "how often the job may requeue itself after a preemption signal", "N")
    # faults
    collective_timeout: float | None = _opt(None, "passed to the script: seconds a training step may stall "
                                                  "before the job fails naming the stalled rank (default: "
                                                  "the script's, 300 for the recipe)", "SECONDS")
    init_timeout: float | None = _opt(None, "passed to the script: seconds start-up, validation and a "
                                            "checkpoint write may stall (default: the script's, 1800)", "SECONDS")
    max_restarts: int = _opt(0, "torchrun restarts of the workers inside the allocation when one of them "
                                "fails (accelerate launch --max_restarts); they resume from the newest "
                                "checkpoint", "N")
    # sweeps
    sweep: tuple[tuple[str, tuple[str, ...]], ...] = _opt((), "sweep a script flag over values; several "
                                                             "--sweep make a grid, one array task per "
                                                             "combination (repeatable)", "KEY=V1,V2")
    array: str | None = _opt(None, "SLURM array indices, e.g. 0-3 or 0-7%%2; with --sweep it selects "
                                   "or throttles the grid's tasks, without it each task gets --seed INDEX",
                             "SPEC")
    dry_run: bool = _opt(False, "print the rendered script and submit nothing")

    @property
    def processes_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def cpus(self) -> int:
        """CPUs of each node's task: --cpus-per-task, else the default for the node's kind."""
        per_process = CPUS_PER_GPU_PROCESS if self.gpus_per_node > 0 else 1
        return self.cpus_per_task or self.processes_per_node * per_process

    @property
    def num_processes(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def is_array(self) -> bool:
        return bool(self.sweep) or self.array is not None


def default_accelerate_config(nodes: int, gpus_per_node: int, procs_per_node: int) -> str:
    """Name of the config in accelerate_configs/ for this topology.

    The job passes the topology (machines, processes, rank, rendezvous) on the command line, which wins
    over the file; the file contributes the rest (mixed precision, dynamo, ...). CPU jobs get the CPU
    configs even across nodes: the GPU ones may ask for bf16/fp16.
    """
    total = nodes * procs_per_node
    if gpus_per_node == 0:
        return "cpu_ddp.yaml" if total > 1 else "cpu.yaml"
    if nodes > 1:
        return "multi_node.yaml"
    return "multi_gpu.yaml" if total > 1 else "single_gpu.yaml"


def default_setup(prefix: str, base_prefix: str, executable: str) -> tuple[str, ...]:
    """Shell lines that make the job use the Python environment `launcher submit` runs in."""
    activate = Path(prefix) / "bin" / "activate"
    if prefix != base_prefix and activate.exists():  # a virtualenv / venv
        return (f"source {shlex.quote(str(activate))}",)
    # conda or a plain installation: its bin folder first on PATH finds python and accelerate.
    return (f"export PATH={shlex.quote(str(Path(executable).parent))}:$PATH",)


def resolve(options: SubmitOptions, *, cwd: str, now: float, setup: Sequence[str],
            configs_dir: str | None) -> SubmitOptions:
    """Fill the defaults that depend on where and when `launcher submit` runs; check everything.

    Pure: the caller passes in the current directory, the time, the default setup lines and the folder of
    accelerate configs, so tests get the same answer on every machine.
    """
    check(options)
    workdir = Path(cwd) / (options.workdir or ".")
    job_name = options.job_name or Path(options.script).stem or "job"
    _check_sbatch_value("--job-name", job_name)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    output_dir = workdir / (options.output_dir or f"runs/{job_name}-{stamp}")
    log_dir = workdir / options.log_dir if options.log_dir else output_dir / "slurm"
    accelerate_config = options.accelerate_config
    if accelerate_config is None and configs_dir is not None:
        candidate = Path(configs_dir) / default_accelerate_config(
            options.nodes, options.gpus_per_node, options.processes_per_node)
        accelerate_config = str(candidate) if candidate.exists() else None
    elif accelerate_config is not None:
        accelerate_config = str(workdir / accelerate_config)
    # The defaults come from the current directory and the job name: checked as the paths they become.
    given = "choose a folder without '%'"
    default = "pass --output-dir without '%' (or a job name without it)"
    if options.workdir:
        check_path("--workdir", str(workdir), given)
    else:
        check_path("the current directory (the default --workdir)", str(workdir), "pass --workdir without '%'")
    check_path("--output-dir" if options.output_dir else "the default --output-dir", str(output_dir),
               given if options.output_dir else default)
    check_path("--log-dir" if options.log_dir else "the default --log-dir", str(log_dir),
               given if options.log_dir else default)
    return dataclasses.replace(
        options,
        job_name=job_name,
        workdir=_normal(workdir),
        output_dir=_normal(output_dir),
        log_dir=_normal(log_dir),
        procs_per_node=options.processes_per_node,
        cpus_per_task=options.cpus,
        accelerate_config=accelerate_config,
        setup=tuple(options.setup) if options.setup is not None else tuple(setup),
    )


def _normal(path: Path) -> str:
    return os.path.normpath(str(path))


# Every pattern is applied with fullmatch: `re.match("...$")` also accepts the value followed by a newline
# (`$` matches before a final "\n"), which then lands in the script as a line of its own.
_TIME_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEM_RE = re.compile(r"\d+[KMGT]?")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SWEEP_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# Newline, CR, NUL and the other control characters (tab aside): none belongs in any value the script is made
# of. A newline in a #SBATCH value or a name ends the line there and starts another one.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# --env names that look like credentials. Their values would sit in clear text in the script kept under the
# log dir, so --env refuses them and names --env-from-host, which carries the value without writing it.
_SECRET_NAME_RE = re.compile(r".*_KEY|.*TOKEN.*|.*SECRET.*|.*PASSWORD.*|.*PASSWD.*|.*CREDENTIAL.*")
# Names the pattern catches that hold no secret (a tokenizer setting, not a token).
_NOT_SECRET_NAMES = frozenset({"TOKENIZERS_PARALLELISM"})
# An assignment in a --setup line (`export HF_TOKEN=...`, `HF_TOKEN=... cmd`): the name it sets.
_SETUP_ASSIGNMENT_RE = re.compile(r"(?:^|[\s;&|(])(?:export\s+|declare\s+-x\s+)?([A-Za-z_][A-Za-z0-9_]*)\+?=")


def looks_like_secret(name: str) -> bool:
    """True for variable names such as HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD."""
    upper = name.upper()
    return upper not in _NOT_SECRET_NAMES and _SECRET_NAME_RE.fullmatch(upper) is not None


def check_one_line(field: str, value: str) -> None:
    """Refuse a value with a newline, CR, NUL or another control character, naming its field."""
    if _CONTROL_RE.search(value):
        raise UsageError(f"{field} {value!r} contains a newline, carriage return or other control character; "
                         "give it on one line without them")


def check_path(field: str, value: str, fix: str = "choose a folder without '%'") -> None:
    """A folder the job's #SBATCH lines see (or that one of them is derived from): one line, and no '%'.

    SLURM expands filename patterns (%j, %x, %A, ...) in #SBATCH --output, but the script uses the same folder
    literally (the fault file, the printed log path): a '%' would name two different folders. Escaping it as
    '%%' in the #SBATCH lines alone would work for SLURM but not for `sbatch` on the saved script by a user
    who edits it, nor for the paths we print; refusing is one rule that holds everywhere.
    """
    check_one_line(field, value)
    if "%" in value:
        raise UsageError(f"{field} {value!r} contains '%', which SLURM expands in #SBATCH --output (%j, %x, ...) "
                         f"but the script uses literally; {fix}")


def check_text_fields(options: SubmitOptions) -> None:
    """Every text the script is made of, one line each: the refusals name the field and the fix."""
    named: list[tuple[str, str | None]] = [
        ("the training script (after `--`)", options.script),
        ("--mem", options.mem), ("--time", options.time), ("--partition", options.partition),
        ("--account", options.account), ("--qos", options.qos), ("--constraint", options.constraint),
        ("--job-name", options.job_name), ("--accelerate-config", options.accelerate_config),
        ("--array", options.array),
    ]
    named += [("a script argument (after `--`)", arg) for arg in options.script_args]
    named += [("--setup", line) for line in options.setup or ()]
    named += [("--env", key) for key, _ in options.env]
    named += [(f"--env {key}=", value) for key, value in options.env]
    named += [("--env-from-host", name) for name in options.env_from_host]
    named += [("--sweep", key) for key, _ in options.sweep]
    named += [(f"--sweep {key}=", value) for key, values in options.sweep for value in values]
    for name, value in named:
        if value is not None:
            check_one_line(name, value)
    for name, value in (("--workdir", options.workdir), ("--output-dir", options.output_dir),
                         ("--log-dir", options.log_dir)):
        if value is not None:
            check_path(name, value)


def time_limit_seconds(text: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME_RE.fullmatch(text)
    if not match:
        raise UsageError(f"--time {text!r} is not a SLURM time; use e.g. 90 (minutes), 4:00:00 or 2-00:00:00")
    days, a, b, c = match.groups()
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if b is None:  # M
        return int(a) * 60
    if c is None:  # M:S
        return int(a) * 60 + int(b)
    return (int(a) * 60 + int(b)) * 60 + int(c)  # H:M:S


def _check_sbatch_value(flag: str, value: str) -> None:
    # #SBATCH lines are not parsed by a shell: keep values to one plain word.
    if not value or re.search(r"[\s'\"\\]", value):
        raise UsageError(f"{flag} {value!r} must be one word without spaces or quotes")


def check(options: SubmitOptions) -> None:
    """Reject bad or contradictory options with one line that says how to fix them."""
    if not options.script:
        raise UsageError("missing the training script: put it after `--`, e.g. "
                         "launcher submit --nodes 2 -- recipes/classify.py --epochs 10")
    check_text_fields(options)
    if options.nodes < 1:
        raise UsageError(f"--nodes must be at least 1 (got {options.nodes})")
    if options.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node cannot be negative (got {options.gpus_per_node}); 0 means CPU nodes")
    if options.procs_per_node is not None and options.procs_per_node < 1:
        raise UsageError(f"--procs-per-node must be at least 1 (got {options.procs_per_node})")
    if options.gpus_per_node and options.procs_per_node not in (None, options.gpus_per_node):
        raise UsageError(f"--procs-per-node {options.procs_per_node} contradicts --gpus-per-node "
                         f"{options.gpus_per_node}: on GPU nodes each process drives one GPU; drop --procs-per-node")
    if options.cpus_per_task is not None and options.cpus_per_task < 1:
        raise UsageError(f"--cpus-per-task must be at least 1 (got {options.cpus_per_task})")
    if options.cpus_per_task is not None and options.cpus_per_task < options.processes_per_node:
        raise UsageError(f"--cpus-per-task {options.cpus_per_task} is fewer than the "
                         f"{options.processes_per_node} training processes per node; give each at least one CPU")
    if options.mem is not None and not _MEM_RE.fullmatch(options.mem):
        raise UsageError(f"--mem {options.mem!r} is not a SLURM size; use e.g. 64G or 16000M")
    limit = time_limit_seconds(options.time)
    if limit < 60:
        raise UsageError(f"--time {options.time!r} is under a minute; SLURM's limits are in whole minutes")
    if options.signal_grace < 1 or options.signal_grace >= limit:
        raise UsageError(f"--signal-grace {options.signal_grace} must be between 1 and the time limit "
                         f"({limit} s) in seconds")
    if options.signal_grace > 65535:
        raise UsageError("--signal-grace cannot exceed 65535 seconds (SLURM's limit)")
    if options.max_requeues < 0:
        raise UsageError(f"--max-requeues cannot be negative (got {options.max_requeues})")
    if options.max_restarts < 0:
        raise UsageError(f"--max-restarts cannot be negative (got {options.max_restarts})")
    if options.collective_timeout is not None or options.init_timeout is not None:
        check_timeouts(DEFAULT_COLLECTIVE_TIMEOUT if options.collective_timeout is None else options.collective_timeout,
                       DEFAULT_INIT_TIMEOUT if options.init_timeout is None else options.init_timeout)
    for flag, value in (("--collective-timeout", options.collective_timeout),
                        ("--init-timeout", options.init_timeout)):
        if value is not None and _has_flag(options.script_args, flag):
            raise UsageError(f"{flag} is given to launcher submit and to the script; keep one")
    for flag, value in (("--partition", options.partition), ("--account", options.account),
                        ("--qos", options.qos), ("--constraint", options.constraint),
                        ("--job-name", options.job_name)):
        if value is not None:
            _check_sbatch_value(flag, value)
    if options.job_name is not None and "/" in options.job_name:
        raise UsageError(f"--job-name {options.job_name!r} cannot contain '/': it names the log files")
    for key, _ in options.env:
        if not _ENV_KEY_RE.fullmatch(key):
            raise UsageError(f"--env {key!r}: the name must be a shell variable name (letters, digits, _)")
        if looks_like_secret(key):
            # Refused, not warned about: a warning scrolls by, the script with the value stays on disk.
            raise UsageError(f"--env {key}=...: {key} looks like a secret, and --env writes its value into the "
                             f"script kept under the log dir; export it and pass --env-from-host {key} instead")
    for name in options.env_from_host:
        if not _ENV_KEY_RE.fullmatch(name):
            raise UsageError(f"--env-from-host {name!r}: the name must be a shell variable name (letters, digits, "
                             "_), without a value")
        if options.env_from_host.count(name) > 1:
            raise UsageError(f"--env-from-host {name} is given twice; keep one")
        if any(key == name for key, _ in options.env):
            raise UsageError(f"{name} is given to --env and to --env-from-host; keep one")
    for line in options.setup or ():
        for name in _SETUP_ASSIGNMENT_RE.findall(line):
            if looks_like_secret(name):
                raise UsageError(f"--setup sets {name}, which looks like a secret, in the script kept under the "
                                 f"log dir; export it and pass --env-from-host {name} instead")
    for flag in OWNED_SCRIPT_FLAGS:
        if _has_flag(options.script_args, flag):
            if flag == "--resume":
                raise UsageError("do not pass --resume to a SLURM job: it always resumes with --resume auto, so "
                                 "a requeued job continues from its newest checkpoint")
            raise UsageError(f"pass {flag} to launcher submit (before `--`), not to the script: the job "
                             "gives the script its own output dir (one per sweep task)")
    keys = [key for key, _ in options.sweep]
    for key, values in options.sweep:
        flag = "--" + key.replace("_", "-")
        if keys.count(key) > 1:
            raise UsageError(f"--sweep {key} is given twice; list all its values in one --sweep {key}=V1,V2")
        if flag in OWNED_SCRIPT_FLAGS or flag == SWEEP_GROUP_FLAG:
            raise UsageError(f"--sweep cannot vary {key}: the job sets {flag} itself")
        if _has_flag(options.script_args, flag):
            raise UsageError(f"--sweep {key}=... and the script argument {flag} contradict each other; "
                             "keep one")
        if not values:
            raise UsageError(f"--sweep {key} has no values")
    if options.sweep and _has_flag(options.script_args, SWEEP_GROUP_FLAG):
        raise UsageError(f"a sweep sets {SWEEP_GROUP_FLAG} to its name (--job-name); drop {SWEEP_GROUP_FLAG}")
    if options.array is not None:
        indices, _ = parse_array(options.array)
        if options.sweep:
            size = len(sweep_grid(options.sweep))
            if max(indices) >= size:
                raise UsageError(f"--array {options.array} names task {max(indices)}, but the sweep has only "
                                 f"{size} combinations (0-{size - 1})")
        elif _has_flag(options.script_args, "--seed"):
            raise UsageError("--array without --sweep gives each task --seed INDEX; drop --seed from the "
                             "script arguments or use --sweep instead")


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def parse_array(spec: str) -> tuple[list[int], int | None]:
    """SLURM array syntax: '0-3', '1,3,5', '0-15:4', with an optional '%N' limit on concurrent tasks."""
    match = re.fullmatch(r"([0-9,:\-]+)(?:%(\d+))?", spec)
    if not match:
        raise UsageError(f"--array {spec!r} is not a SLURM array spec; use e.g. 0-3, 1,3,5 or 0-7%2")
    indices: set[int] = set()
    for item in match.group(1).split(","):
        part = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", item)
        if not part:
            raise UsageError(f"--array {spec!r}: cannot read {item!r}; use N, N-M or N-M:STEP")
        first = int(part.group(1))
        last = int(part.group(2)) if part.group(2) is not None else first
        step = int(part.group(3)) if part.group(3) is not None else 1
        if last < first or step < 1:
            raise UsageError(f"--array {spec!r}: {item!r} is an empty range")
        indices.update(range(first, last + 1, step))
    limit = int(match.group(2)) if match.group(2) is not None else None
    if limit == 0:
        raise UsageError(f"--array {spec!r}: the %N limit must be at least 1")
    return sorted(indices), limit


def parse_sweep(text: str) -> tuple[str, tuple[str, ...]]:
    check_one_line("--sweep", text)  # before the values are stripped of their spaces (and newlines)
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not _SWEEP_KEY_RE.fullmatch(key):
        raise UsageError(f"--sweep {text!r} must look like KEY=V1,V2 (e.g. --sweep lr=0.1,0.01), KEY a script flag "
                         "without its dashes")
    items = tuple(v.strip() for v in values.split(","))
    if not values or any(not v for v in items):
        raise UsageError(f"--sweep {text!r} has an empty value; list values separated by commas")
    if len(set(items)) != len(items):
        raise UsageError(f"--sweep {text!r} lists a value twice")
    return key, items


def sweep_grid(sweep: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[tuple[str, str], ...]]:
    """All combinations, the last --sweep varying fastest (like nested loops in the order given)."""
    keys = [key for key, _ in sweep]
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(values for _, values in sweep))]


def array_tasks(options: SubmitOptions) -> list[tuple[int, str, tuple[str, ...]]]:
    """(array index, task name = its output subfolder, extra script arguments) for each array task."""
    if options.sweep:
        grid = sweep_grid(options.sweep)
        wanted = parse_array(options.array)[0] if options.array else range(len(grid))
        raw = [(i, "_".join(f"{k}-{v}" for k, v in grid[i]),
                tuple(a for k, v in grid[i] for a in ("--" + k.replace("_", "-"), v))) for i in wanted]
    elif options.array is not None:
        raw = [(i, f"seed-{i}", ("--seed", str(i))) for i in parse_array(options.array)[0]]
    else:
        return []
    names = [re.sub(r"[^A-Za-z0-9._=+-]", "_", name) for _, name, _ in raw]
    if len(set(names)) != len(names):  # values that differ only in characters we replaced
        names = [f"{i:03d}-{name}" for (i, _, _), name in zip(raw, names)]
    return [(i, name, args) for (i, _, args), name in zip(raw, names)]
