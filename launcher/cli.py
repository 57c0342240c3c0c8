"""The `launcher` console script: `launcher submit ...` (SLURM), `launcher compare ...` (local runs),
`launcher export ...` (one safetensors file from any checkpoint) and `launcher predict ...` (new data scored
with a run's stored preprocessing: docs/predict.md)."""

from __future__ import annotations

import sys

from launcher.errors import EXIT_USAGE, RunStopped, UsageError

USAGE = """usage: launcher {submit,compare,export,predict} ...

  submit   render an sbatch script for a (multi-node) training job and submit it
  compare  compare runs from their metrics.jsonl and saved configs
  export   write one plain safetensors file from a checkpoint, sharded (FSDP) or not
  predict  score new data (a table, an image folder) with a run's stored preprocessing and final weights
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    try:
        if command == "submit":
            from launcher.slurm import submit_main

            return submit_main(rest)
        if command == "compare":
            from launcher.tracking.compare import compare_main

            return compare_main(rest)
        if command == "export":
            from launcher.checkpoint.export import export_main

            return export_main(rest)
        if command == "predict":  # several processes: accelerate launch -m launcher predict ...
            from launcher.loop.predicting import predict_main

            return predict_main(rest)
        raise UsageError(f"unknown command {command!r}: use 'launcher submit', 'launcher compare', 'launcher export' "
                         f"or 'launcher predict'")
    except UsageError as err:
        print(f"launcher {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RunStopped as err:  # export: a write that failed (a full disk), one line and its exit code
        if command != "export":
            raise
        print(f"launcher {command}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
