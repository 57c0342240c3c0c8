"""`launcher submit`: render an sbatch script for a (multi-node) training job and submit it.

    launcher submit --nodes 2 --gpus-per-node 8 --time 4:00:00 -- recipes/classify.py --epochs 30

Three layers, each testable on its own:

- `SubmitOptions`: a frozen dataclass; every default lives in its fields (or, for the few defaults that
  depend on where you submit from, in `resolve`, right below it).
- `render_sbatch(options) -> str`: a pure function from resolved options to the script's text.
- `submit_main(argv)`: parses the command line, renders, saves the script next to the logs, runs
  `sbatch --parsable` and prints the job id and where the logs go.

What the rendered job does (the README explains the script line by line):

- one task per node (`srun --ntasks-per-node=1 --kill-on-bad-exit=1`); each task runs `accelerate launch`
  with the job's topology: `--machine_rank` from that node's $SLURM_NODEID, the first host of the node
  list as rendezvous host and a port derived from the job id;
- if any node's training fails, srun kills the other nodes at once and the job ends FAILED, naming the
  node and rank;
- `--signal=B:USR1@GRACE` asks SLURM to signal the batch shell GRACE seconds before the time limit; the
  shell forwards USR1 to the training processes, which save a checkpoint and exit, and then requeues the
  job (`scontrol requeue`), at most `--max-requeues` times. The requeued job resumes with `--resume auto`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from launcher.errors import EXIT_HUNG, EXIT_PREEMPTED, UsageError
from launcher.timeouts import DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_INIT_TIMEOUT, check_timeouts

# Flags the job passes to the training script itself; the user must not pass them too.
OWNED_SCRIPT_FLAGS = ("--output-dir", "--resume")
# The sweep name goes to W&B as the group, so runs of one sweep line up.
SWEEP_GROUP_FLAG = "--wandb-group"
PORT_BASE, PORT_SPAN = 20000, 20000
# After a USR1, the batch shell signals the training again at this interval until it has stopped.
USR1_RESEND_SECONDS = 5


def _opt(default: Any, help: str, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar})


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
    cpus_per_task: int | None = _opt(None, "CPUs for each node's task (default: 1 per training process)", "N")
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
    env: tuple[tuple[str, str], ...] = _opt((), "environment variable for the job (repeatable)", "KEY=VALUE")
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
    def num_processes(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def is_array(self) -> bool:
        return bool(self.sweep) or self.array is not None


# ------------------------------------------------------------------------------------- defaults, checks


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
    return dataclasses.replace(
        options,
        job_name=job_name,
        workdir=_normal(workdir),
        output_dir=_normal(output_dir),
        log_dir=_normal(log_dir),
        procs_per_node=options.processes_per_node,
        cpus_per_task=options.cpus_per_task or options.processes_per_node,
        accelerate_config=accelerate_config,
        setup=tuple(options.setup) if options.setup is not None else tuple(setup),
    )


def _normal(path: Path) -> str:
    return os.path.normpath(str(path))


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SWEEP_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def time_limit_seconds(text: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME_RE.match(text)
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
    if options.mem is not None and not _MEM_RE.match(options.mem):
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
        if not _ENV_KEY_RE.match(key):
            raise UsageError(f"--env {key!r}: the name must be a shell variable name (letters, digits, _)")
    for line in options.setup or ():
        if "\n" in line:
            raise UsageError("--setup takes one line per flag; repeat --setup for several lines")
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
    match = re.match(r"^([0-9,:\-]+)(?:%(\d+))?$", spec)
    if not match:
        raise UsageError(f"--array {spec!r} is not a SLURM array spec; use e.g. 0-3, 1,3,5 or 0-7%2")
    indices: set[int] = set()
    for item in match.group(1).split(","):
        part = re.match(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$", item)
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
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not _SWEEP_KEY_RE.match(key):
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


# ------------------------------------------------------------------------------------------- rendering


# The job's body. Placeholders {{NAME}} are filled by render_sbatch; everything else is literal bash.
_BODY = r"""
# No `set -e`: the script looks at srun's exit status itself.
set -uo pipefail

# --- environment ---
{{ENVIRONMENT}}

# --- what every node runs ---
OUTPUT_DIR={{OUTPUT_DIR}}
ARGS=({{ARGS}})
{{SWEEP}}ARGS+=(--output-dir "$OUTPUT_DIR" --resume auto)

# --- rendezvous: the first node hosts it; the port comes from the job id, so jobs that share a node
# do not collide (array tasks have job ids of their own) ---
LAUNCHER_MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
LAUNCHER_MAIN_PORT=$(({{PORT_BASE}} + SLURM_JOB_ID % {{PORT_SPAN}}))
# Node 0's task (on this machine) writes here which signal stopped the training, if one did.
LAUNCHER_STOPPED_BY=${TMPDIR:-/tmp}/launcher-stopped-by-$SLURM_JOB_ID
# A rank that finds another one hung writes its one-line verdict here (shared: it may run on any node).
LAUNCHER_FAULT_FILE={{LOG_DIR}}/.fault-$SLURM_JOB_ID
export LAUNCHER_MAIN_HOST LAUNCHER_MAIN_PORT LAUNCHER_STOPPED_BY LAUNCHER_FAULT_FILE
rm -f "$LAUNCHER_STOPPED_BY" "$LAUNCHER_FAULT_FILE"
mkdir -p "$OUTPUT_DIR"
echo "launcher: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST," \
    "rendezvous $LAUNCHER_MAIN_HOST:$LAUNCHER_MAIN_PORT, output $OUTPUT_DIR, $(date)"

# --- the program each node runs (quoted here-doc: $SLURM_NODEID etc. expand on that node) ---
NODE_PROGRAM=$(cat <<'NODE'
usr1=0 term=0
# Bash runs these traps once accelerate has exited: they only remember which signal came.
trap "usr1=1" USR1
trap "term=1" TERM
# The launcher agent (torchrun inside accelerate) must survive USR1, which kills a Python process by
# default; the training processes install their own handler (they checkpoint and exit with 75).
( trap "" USR1; exec {{ACCELERATE}} \
    "$@" )
status=$?
if [ "$status" != 0 ] && [ $((usr1 + term)) != 0 ]; then
    signal=$([ "$usr1" = 1 ] && echo USR1 || echo TERM)
    echo "launcher: node $SLURMD_NODENAME (machine rank $SLURM_NODEID) stopped after SIG$signal"
    if [ "$SLURM_NODEID" = 0 ]; then echo "$signal" >"$LAUNCHER_STOPPED_BY"; fi
    exit 0  # not a failure: a non-zero status would make srun kill the other nodes mid-save
fi
if [ "$status" != 0 ]; then
    echo "launcher: training failed on node $SLURMD_NODENAME (machine rank $SLURM_NODEID, {{RANKS}})," \
        "exit status $status" >&2
fi
exit "$status"
NODE
)

# --- preemption: SLURM sends USR1 to this shell {{GRACE}} s before the time limit (--signal above) ---
forwarded=0 resender=
forward_usr1() {
    [ "$forwarded" = 1 ] && return
    forwarded=1
    echo "launcher: USR1 received; asking the training processes to save a checkpoint and stop"
    # Without --full or --batch, scancel signals the job steps (the training), not this shell. Sent again
    # every {{RESEND}} s until the training has stopped: a process still starting up (not yet listening for
    # USR1, so ignoring it) gets it later; for the others a second USR1 changes nothing.
    ( while :; do scancel --signal=USR1 "$SLURM_JOB_ID"; sleep {{RESEND}}; done ) &
    resender=$!
}
trap forward_usr1 USR1
# SIGTERM (scancel, the hard time limit) reaches the training processes directly: wait for them.
trap 'echo "launcher: SIGTERM received; waiting for the training processes to stop"' TERM

srun --nodes={{NODES}} --ntasks-per-node=1 --cpus-per-task={{CPUS}} --kill-on-bad-exit=1 \
    bash -c "$NODE_PROGRAM" launcher-node "${ARGS[@]}" &
srun_pid=$!
# --- a hung rank: once a live rank has named it, the training is over; kill its job step on every node
# now. A stopped process never handles srun's SIGTERM, and its SIGKILL would come only after KillWait.
# (The step, not the job: scancel --signal=KILL JOBID would cancel the job, which would read CANCELLED.) ---
end_training_step() {
    local step
    for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o %i | sed -n 's/.*\.\([0-9][0-9]*\)$/\1/p'); do
        scancel --signal=KILL "$SLURM_JOB_ID.$step"
    done
}
( while [ ! -s "$LAUNCHER_FAULT_FILE" ]; do sleep 1; done; end_training_step ) &
fault_watcher=$!
# `wait` returns early whenever a trapped signal arrives: keep waiting until srun has exited.
while :; do
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
# If a signal interrupted the last wait and srun exited right after, its status is still to collect.
if [ "$status" -gt 128 ]; then
    wait "$srun_pid" 2>/dev/null
    late=$?
    [ "$late" != 127 ] && status=$late
fi
if [ -n "$resender" ]; then kill "$resender" 2>/dev/null; fi
kill "$fault_watcher" 2>/dev/null

# --- requeue after USR1 (the warning before the time limit, or `scancel --signal=USR1`) ---
stopped_by=$(cat "$LAUNCHER_STOPPED_BY" 2>/dev/null)
rm -f "$LAUNCHER_STOPPED_BY"
if [ "$stopped_by" = USR1 ] || { [ -n "$stopped_by" ] && [ "$forwarded" = 1 ]; }; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -lt {{MAX_REQUEUES}} ]; then
        echo "launcher: checkpoint saved; requeueing (restart $((restarts + 1)) of at most {{MAX_REQUEUES}})"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "launcher: scontrol requeue failed; submit the same command again to resume" >&2
    else
        echo "launcher: checkpoint saved, but the job was requeued {{MAX_REQUEUES}} times already" \
            "(--max-requeues); submit the same command again to resume" >&2
    fi
    exit {{EXIT_PREEMPTED}}
fi
if [ "$status" != 0 ] && [ -s "$LAUNCHER_FAULT_FILE" ]; then
    # A rank stopped making progress; the watchdog of a live rank named it (launcher.watchdog).
    cat "$LAUNCHER_FAULT_FILE" >&2
    rm -f "$LAUNCHER_FAULT_FILE"
    echo "launcher: job failed: a rank stopped making progress (exit {{EXIT_HUNG}})" >&2
    exit {{EXIT_HUNG}}
fi
if [ "$status" != 0 ]; then
    # A node's training failed (its task exited non-zero, and srun stopped the others).
    echo "launcher: job failed: srun exited with status $status (the lines above name the node)" >&2
    exit "$status"
fi
if [ -n "$stopped_by" ]; then
    # SIGTERM alone means scancel (or a time limit reached without the warning): do not come back.
    echo "launcher: training saved a checkpoint and stopped on SIGTERM; not requeueing." \
        "Submit the same command again to resume." >&2
    exit {{EXIT_PREEMPTED}}
fi
exit "$status"
"""


def render_sbatch(options: SubmitOptions) -> str:
    """The sbatch script for resolved `options` (see `resolve`). Pure: same options, same text."""
    o = options
    if o.output_dir is None or o.log_dir is None or o.workdir is None or o.job_name is None or o.setup is None:
        raise ValueError("render_sbatch needs resolved options: call resolve() first")
    q = shlex.quote
    procs = o.processes_per_node
    cpus = o.cpus_per_task or procs
    tasks = array_tasks(o)

    header = [
        "#!/bin/bash",
        "# Rendered by `launcher submit`. It is complete: `sbatch` this file to run the same job again.",
        f"#SBATCH --job-name={o.job_name}",
        f"#SBATCH --nodes={o.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={cpus}",
    ]
    if o.gpus_per_node:
        header.append(f"#SBATCH --gpus-per-node={o.gpus_per_node}")
    if o.mem:
        header.append(f"#SBATCH --mem={o.mem}")
    header.append(f"#SBATCH --time={o.time}")
    for flag, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos),
                        ("constraint", o.constraint)):
        if value:
            header.append(f"#SBATCH --{flag}={value}")
    if tasks:
        limit = parse_array(o.array)[1] if o.array else None
        header.append(f"#SBATCH --array={_compress([i for i, _, _ in tasks])}{f'%{limit}' if limit else ''}")
    header += [
        f"#SBATCH --chdir={_sbatch_path(o.workdir)}",
        f"#SBATCH --output={_sbatch_path(o.log_dir)}/{'%x-%A_%a.out' if tasks else '%x-%j.out'}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{o.signal_grace}",
    ]

    environment = [*o.setup, *(f"export {key}={q(value)}" for key, value in o.env)]
    if o.gpus_per_node == 0:
        environment.append("export ACCELERATE_USE_CPU=true  # CPU nodes: every process joins a gloo group")
    environment.append(f"export OMP_NUM_THREADS={max(1, cpus // procs)}  # CPU threads per training process")

    sweep = ""
    if tasks:
        sweep = "\n".join([
            "# Sweep: this array task's combination, its own output dir, the sweep name as W&B group.",
            'case "${SLURM_ARRAY_TASK_ID:-none}" in',
            *(f"    {i}) TASK={q(name)}; ARGS+=({' '.join(q(a) for a in args)}) ;;" for i, name, args in tasks),
            ('    *) echo "launcher: array task ${SLURM_ARRAY_TASK_ID:-none} is not part of this sweep" >&2;'
             " exit 2 ;;"),
            "esac",
            "OUTPUT_DIR=$OUTPUT_DIR/$TASK",
            f"ARGS+=({SWEEP_GROUP_FLAG} {q(o.job_name)})",
        ]) + "\n"

    values = {
        "ENVIRONMENT": "\n".join(environment),
        "OUTPUT_DIR": q(o.output_dir),
        "ARGS": " ".join(q(a) for a in (o.script, *o.script_args, *_timeout_args(o))),
        "SWEEP": sweep,
        "PORT_BASE": str(PORT_BASE),
        "PORT_SPAN": str(PORT_SPAN),
        "ACCELERATE": _accelerate_command(o),
        "RANKS": ("process rank $SLURM_NODEID" if procs == 1 else
                  f"process ranks $((SLURM_NODEID * {procs}))-$((SLURM_NODEID * {procs} + {procs - 1}))"),
        "GRACE": str(o.signal_grace),
        "RESEND": str(USR1_RESEND_SECONDS),
        "NODES": str(o.nodes),
        "CPUS": str(cpus),
        "MAX_REQUEUES": str(o.max_requeues),
        "EXIT_PREEMPTED": str(EXIT_PREEMPTED),
        "EXIT_HUNG": str(EXIT_HUNG),
        "LOG_DIR": q(o.log_dir),
    }
    body = re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], _BODY)
    return "\n".join(header) + "\n" + body


def _timeout_args(o: SubmitOptions) -> list[str]:
    args = []
    for flag, value in (("--collective-timeout", o.collective_timeout), ("--init-timeout", o.init_timeout)):
        if value is not None:
            args += [flag, f"{value:g}"]
    return args


def _accelerate_command(o: SubmitOptions) -> str:
    parts = ["accelerate launch"]
    if o.accelerate_config:
        parts.append(f"--config_file {shlex.quote(o.accelerate_config)}")
    if o.num_processes > 1 and (o.gpus_per_node == 0 or not o.accelerate_config):
        # torchrun; with ACCELERATE_USE_CPU the processes use gloo. With a config file on GPU nodes the
        # file's distributed_type decides instead (--multi_gpu would silently override FSDP/DeepSpeed).
        parts.append("--multi_gpu")
    elif o.num_processes == 1 and o.gpus_per_node == 0:
        parts.append("--cpu")
    if o.max_restarts:
        # A failed worker makes torchrun restart this node's workers (launcher.elastic makes the restarted
        # ones find each other); srun only sees a failure once the restarts are used up.
        parts.append(f"--max_restarts {o.max_restarts}")
    # One option group per line, continued with backslashes, so the README can point at each.
    return " \\\n    ".join([
        " ".join(parts),
        f'--num_machines {o.nodes} --num_processes {o.num_processes} --machine_rank "$SLURM_NODEID"',
        '--main_process_ip "$LAUNCHER_MAIN_HOST" --main_process_port "$LAUNCHER_MAIN_PORT"',
    ])


def _compress(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (SLURM's own notation, and shorter)."""
    runs: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(runs)


def _sbatch_path(path: str) -> str:
    _check_sbatch_value("paths in #SBATCH lines", path)
    return path


# ---------------------------------------------------------------------------------------- command line


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
    repeatable = {"setup", "env", "sweep"}
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
    options = SubmitOptions(script=script[0], script_args=tuple(script[1:]), **values)
    check(options)
    return options


def _project_configs_dir() -> str | None:
    """accelerate_configs/ of this checkout (the package's parent folder), when it has one."""
    candidate = Path(__file__).resolve().parent.parent / "accelerate_configs"
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
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError("sbatch not found: run launcher submit on a SLURM login node (or use --dry-run to "
                         "see the script)")
    log_dir = Path(options.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # Saved before submitting (sbatch reads it); renamed after the job id once SLURM has given one.
    pending = log_dir / f"{options.job_name}-pending-{os.getpid()}.sbatch"
    pending.write_text(script)
    result = subprocess.run([sbatch, "--parsable", str(pending)], check=False, capture_output=True, text=True)
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
