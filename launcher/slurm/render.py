"""The sbatch script of a `launcher submit` job: `render_sbatch`, a pure function from resolved options to text."""

from __future__ import annotations

import re
import shlex

from launcher.errors import EXIT_HUNG, EXIT_PREEMPTED
from launcher.slurm.options import (
    SWEEP_GROUP_FLAG,
    SubmitOptions,
    _check_sbatch_value,
    array_tasks,
    check_text_fields,
    parse_array,
)

PORT_BASE, PORT_SPAN = 20000, 20000
# After a USR1, the batch shell signals the training again at this interval until it has stopped.
USR1_RESEND_SECONDS = 5


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

srun --nodes={{NODES}} --ntasks-per-node=1 --cpus-per-task={{CPUS}}{{SRUN_GPUS}} --kill-on-bad-exit=1 \
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
    # A rank stopped making progress; the watchdog of a live rank named it (launcher.faults.watchdog).
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
    check_text_fields(o)  # one line each, no '%' in the paths: also for options built without check()
    q = shlex.quote
    procs = o.processes_per_node
    cpus = o.cpus
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
    if o.env_from_host:
        # sbatch's default, made explicit: the job gets the submitting environment, --env-from-host's values too.
        header.append("#SBATCH --export=ALL")

    environment = [*o.setup, *(f"export {key}={q(value)}" for key, value in o.env)]
    if o.env_from_host:
        environment.append("# --env-from-host: the values come from the environment launcher submit ran in "
                           "(sbatch --export=ALL), not from this file")
    for name in o.env_from_host:
        environment.append(f'export {name}="${{{name}?launcher: --env-from-host {name} is not set in the job '
                           'environment; export it and submit again}"')
    if o.gpus_per_node == 0:
        environment.append("export ACCELERATE_USE_CPU=true  # CPU nodes: every process joins a gloo group")
    else:
        environment.append("export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # NCCL says why it failed, in this log")
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
        # The node's one task owns all its GPUs (torchrun gives each process its own by LOCAL_RANK): asked for
        # on the step too, as --cpus-per-task is, and not bound per task.
        "SRUN_GPUS": f" --gpus-per-node={o.gpus_per_node} --gpu-bind=none" if o.gpus_per_node else "",
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
        # A failed worker makes torchrun restart this node's workers (launcher.faults.elastic makes the restarted
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
