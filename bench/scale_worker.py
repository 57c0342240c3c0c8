"""One process of bench/scale.py: what the loop adds per step, per checkpoint and per resume.

A probe wraps every Python-level torch.distributed call (DDP's gradient buckets run in C++ and are not
counted: they are the training itself) and launcher's sha256, then:
1. `fit` trains one epoch with a checkpoint every `--save-every` steps (phases: the steps, each save);
2. a second `fit` resumes the newest checkpoint the way recipes/classify.py does: `choose_checkpoint` (rank 0
   chooses), `loadable_checkpoint`, then `fit(resume_from=...)` (phase: resume, up to the first step).
Each rank writes its counts to --out/rank-R.json. Runs on whichever launcher is first on PYTHONPATH (the bench
measures the code before and after a change with the same script).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PROBED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
          "broadcast_object_list", "gather", "gather_object", "reduce", "scatter", "scatter_object_list",
          "reduce_scatter", "all_to_all", "barrier", "monitored_barrier", "send", "recv", "new_group")


class Probe:
    def __init__(self) -> None:
        self.phase = "other"
        self.counts: dict[str, dict] = {}

    def _bucket(self) -> dict:
        return self.counts.setdefault(self.phase, {"collectives": 0, "by_name": {}, "bytes_received": 0,
                                                   "sha256_files": 0, "sha256_bytes": 0, "seconds": 0.0})

    @contextlib.contextmanager
    def in_phase(self, name: str):
        outer, self.phase = self.phase, name
        started = time.perf_counter()
        try:
            yield
        finally:
            self._bucket()["seconds"] += time.perf_counter() - started
            self.phase = outer

    def install(self) -> None:
        for name in PROBED:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))
        import launcher.checkpoint.files as files

        sha = files._sha256

        def counted_sha(path):
            bucket = self._bucket()
            bucket["sha256_files"] += 1
            bucket["sha256_bytes"] += Path(path).stat().st_size
            return sha(path)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("launcher") and getattr(module, "_sha256", None) is sha:
                module._sha256 = counted_sha

    def _wrap(self, name, fn):
        def probed(*args, **kwargs):
            result = fn(*args, **kwargs)
            if name == "new_group":
                self._bucket()["by_name"]["new_group"] = self._bucket()["by_name"].get("new_group", 0) + 1
                return result
            bucket = self._bucket()
            bucket["collectives"] += 1
            bucket["by_name"][name] = bucket["by_name"].get(name, 0) + 1
            bucket["bytes_received"] += _received(name, args, kwargs)
            return result
        return probed


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _pickled(obj) -> int:
    try:
        return len(pickle.dumps(obj))
    except Exception:  # noqa: BLE001 - a size estimate only
        return 0


def _received(name: str, args, kwargs) -> int:
    """What this rank received in the call (the others' contributions), approximately."""
    rank = dist.get_rank()
    first = args[0] if args else None
    if name in ("all_reduce", "reduce", "broadcast"):
        src = kwargs.get("src", args[1] if name == "broadcast" and len(args) > 1 else 0)
        dst = kwargs.get("dst", args[1] if name == "reduce" and len(args) > 1 else 0)
        if name == "broadcast" and rank == src or name == "reduce" and rank != dst:
            return 0
        return _nbytes(first)
    if name == "all_gather":
        return sum(_nbytes(t) for i, t in enumerate(first) if i != rank)
    if name == "all_gather_into_tensor":
        return _nbytes(first) - _nbytes(args[1])
    if name == "all_gather_object":
        return sum(_pickled(o) for i, o in enumerate(first) if i != rank)
    if name == "gather_object":
        out = args[1] if len(args) > 1 else kwargs.get("object_gather_list")
        return sum(_pickled(o) for i, o in enumerate(out or []) if i != rank)
    if name == "broadcast_object_list":
        src = kwargs.get("src", args[1] if len(args) > 1 else 0)
        return 0 if rank == src else sum(_pickled(o) for o in first)
    return 0


def build(seed: int, samples: int, features: int, classes: int):
    from accelerate.utils import set_seed

    from launcher.data import TensorBatchedDataset, make_loader

    set_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    y = torch.randint(0, classes, (samples,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))
    train = make_loader(TensorBatchedDataset(x, y), 8, shuffle=True, seed=seed)
    val = make_loader(TensorBatchedDataset(x[:64], y[:64]), 32, shuffle=False, seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), train, val


def build_streaming(seed: int, shards: Path, classes: int):
    """The same model, with a --streaming loader over parquet shards (each rank keeps its own position)."""
    from accelerate.utils import set_seed

    from launcher.data import make_loader
    from launcher.data.streaming import load_stream_splits

    set_seed(seed)
    splits = load_stream_splits(str(shards), seed=seed, buffer=64)
    model = torch.nn.Sequential(torch.nn.Linear(splits.input_shape[0], 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, classes))
    train = make_loader(splits.train, 8, shuffle=True, seed=seed)
    val = make_loader(splits.val, 32, shuffle=False, seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), train, val


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streaming", type=Path, help="parquet shards (train/, validation/): a --streaming loader")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of the training epoch")
    p.add_argument("--save-every", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    import launcher.loop.training as training
    from launcher import Checkpointing, fit, make_accelerator
    from launcher.checkpoint import loadable_checkpoint
    from launcher.checkpoint.relaunch import choose_checkpoint

    probe = Probe()
    probe.install()
    for name, phase in (("_save", "save"), ("_resume", "resume_fit"), ("_train_epoch", "steps")):
        original = getattr(training, name)

        def phased(*a, _original=original, _phase=phase, **kw):
            with probe.in_phase(f"{_phase}_{kw['reason']}" if _phase == "save" else _phase):
                return _original(*a, **kw)
        setattr(training, name, phased)
    accelerator = make_accelerator(seed=0)
    world = accelerator.num_processes
    out = Path(args.out) / "run"
    samples = args.steps * 8 * world
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        make = ((lambda: build_streaming(0, args.streaming, args.classes)) if args.streaming else
                (lambda: build(0, samples, 32, args.classes)))
        model, opt, train, val = make()
        fit(model, opt, train, val, torch.nn.CrossEntropyLoss(), epochs=1, num_classes=args.classes,
            accelerator=accelerator, progress=False, log_every=10**9,
            checkpointing=Checkpointing(out, save_every_steps=args.save_every, keep_last=2))
        model, opt, train, val = make()
        with probe.in_phase("resume_choose"):
            # A mid-epoch checkpoint: it carries the partial-epoch statistics and every rank's RNG.
            chosen = choose_checkpoint(str(out / "checkpoints" / f"step-{args.steps - args.save_every:08d}"), out)
            chosen = loadable_checkpoint(chosen, model=model, optimizer=opt, fallback=True, output_dir=out,
                                         is_main=accelerator.is_main_process)
        fit(model, opt, train, val, torch.nn.CrossEntropyLoss(), epochs=2, num_classes=args.classes,
            accelerator=accelerator, progress=False, log_every=10**9,
            checkpointing=Checkpointing(out, save_every_steps=10**9, keep_last=2, resume_from=chosen))
    report = {"rank": accelerator.process_index, "world": world, "steps": 2 * args.steps + args.save_every,
              "step_saves": args.steps // args.save_every - 1, "epoch_saves": 3, "counts": probe.counts}
    (Path(args.out) / f"rank-{accelerator.process_index}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
