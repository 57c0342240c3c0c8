"""`launcher export CHECKPOINT OUT.safetensors`: one plain safetensors file from any checkpoint.

Sharded (FSDP) checkpoints are read in this one process with DCP, without a process group, whatever world
size wrote them; DDP/single-process checkpoints are copied from their model.safetensors. The result loads
into the plain model with `load_state_dict(..., strict=True)`. It needs a CPU only, and memory for the whole
model once (no optimizer state is read).
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from launcher.checkpoint import CHECKPOINTS, MANIFEST, latest_valid
from launcher.checkpoint.sharded import export_weights
from launcher.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launcher export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoints/step-* folder (or checkpoints/best), or a run folder "
                                           "(its newest valid checkpoint)")
    parser.add_argument("out", help="the safetensors file to write (replaced atomically)")
    return parser


def resolve_checkpoint(arg: str) -> Path:
    path = Path(arg)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / CHECKPOINTS).is_dir():
        found = latest_valid(path)
        if found is None:
            raise UsageError(f"{arg}: that run folder has no valid checkpoint")
        return found
    if not path.is_dir():
        raise UsageError(f"{arg}: no such checkpoint folder; give a checkpoints/step-* folder or a run folder")
    if (not (path / MANIFEST).exists() and (path / "model.safetensors").is_file()
            and path.resolve().parent.name != CHECKPOINTS):
        run = path.resolve().parent
        raise UsageError(f"{arg} is a run's final weights, not a checkpoint: {path / 'model.safetensors'} is one "
                         f"plain safetensors file already (copy it); to export a checkpoint give a "
                         f"{run / CHECKPOINTS}/step-* folder or the run folder {run}")
    return path


def export_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"{args.out}: the output must be a .safetensors file")
    checkpoint = resolve_checkpoint(args.checkpoint)
    count = export_weights(checkpoint, args.out)
    print(f"exported {count} tensors from {checkpoint} to {args.out}")
    return 0
