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

The package, one layer per module (a name is looked up, and so patched, in the module that uses it):
- `options`: SubmitOptions and its defaults, resolve, check (time limits, sizes, flags the job owns), the
  array and sweep specs (parse_array, parse_sweep, sweep_grid, array_tasks);
- `render`: render_sbatch, the script's body and its helpers;
- `cli`: the argument parser, parse_submit_args, submit_main and describe_submission.
"""

from launcher.slurm.cli import build_parser, describe_submission, parse_submit_args, submit_main
from launcher.slurm.options import (
    OWNED_SCRIPT_FLAGS,
    SWEEP_GROUP_FLAG,
    SubmitOptions,
    array_tasks,
    check,
    default_accelerate_config,
    default_setup,
    parse_array,
    parse_sweep,
    resolve,
    sweep_grid,
    time_limit_seconds,
)
from launcher.slurm.render import PORT_BASE, PORT_SPAN, USR1_RESEND_SECONDS, render_sbatch

__all__ = [
    "OWNED_SCRIPT_FLAGS",
    "PORT_BASE",
    "PORT_SPAN",
    "SWEEP_GROUP_FLAG",
    "USR1_RESEND_SECONDS",
    "SubmitOptions",
    "array_tasks",
    "build_parser",
    "check",
    "default_accelerate_config",
    "default_setup",
    "describe_submission",
    "parse_array",
    "parse_submit_args",
    "parse_sweep",
    "render_sbatch",
    "resolve",
    "submit_main",
    "sweep_grid",
    "time_limit_seconds",
]
