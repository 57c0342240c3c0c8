#!/usr/bin/env python3
"""One-GPU probe of the launcher's GPU paths; gpu_probe.sh runs it from the repository root.

Every check is a real `accelerate launch` (or torchrun) of recipes/classify.py on the embedded digits, the
way a user runs it. Results go to OUT/summary.txt as they come (one line per check: PASS, FAIL, WARN, INFO,
SKIP), OUT/results.json, and OUT/runs/NAME/ (metrics.jsonl, config.json, eval.json, sync counts, the tail
of the log). Checks run in order of value and each is skipped when the time budget cannot cover it, so a
run cut short still leaves its summary.

  python probe.py --out OUT --budget 400              # on a machine with an NVIDIA GPU
  python probe.py --out OUT --mode cpu-selftest       # the same orchestration on CPU (checks the probe)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path.cwd()
HERE = Path(__file__).resolve().parent
RECIPE = ROOT / "recipes" / "classify.py"
CONFIGS = ROOT / "accelerate_configs"
FAULT_ENV = "LAUNCHER_TEST_KILL_DURING_SAVE_AT_STEP"  # launcher.checkpoint.FAULT_ENV: SIGKILL mid-save at step N
TIMING_KEYS = ("epoch_seconds", "samples_per_second")
CPU_CONFIG = {"single_gpu": "cpu", "fsdp": "cpu_fsdp", "multi_gpu": "cpu_ddp"}

# The runs (digits: 1438 training, 359 validation samples). Kill steps land mid-epoch, after a checkpoint.
MLP = ["--epochs", "3", "--batch-size", "16", "--save-every-steps", "7", "--keep-last", "2", "--lr", "3e-3"]
MLP_KILL = 126  # 90 steps/epoch: the newest checkpoint before it is step 119, 29 steps into epoch 2
RESNET = ["--model", "resnet", "--epochs", "2", "--batch-size", "32", "--save-every-steps", "9", "--keep-last", "2"]
RESNET_KILL = 63  # 45 steps/epoch: resumes from step 54, mid-epoch 2
FP16 = ["--epochs", "2", "--batch-size", "32", "--save-every-steps", "10", "--keep-last", "2", "--lr", "3e-3"]
FP16_KILL = 70  # resumes from step 60, mid-epoch 2
DETERMINISTIC = ["--deterministic"]  # launcher.loop.determinism: what GPU bit-exactness needs (docs/checkpoints.md)


# --------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_info(run: Path) -> dict:
    try:
        return json.loads((run / "config.json").read_text())["run_info"]
    except (OSError, ValueError, KeyError):
        return {}


def comparable(metric_rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in metric_rows]


def checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def read_safetensors(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """{name: (dtype, shape, raw bytes)} without torch: the header is 8 bytes of length, then JSON."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header, base = json.loads(data[8:8 + size]), 8 + size
    return {k: (v["dtype"], tuple(v["shape"]), data[base + v["data_offsets"][0]: base + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def _floats(dtype: str, raw: bytes):
    import numpy as np

    if dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    kinds = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    return np.frombuffer(raw, kinds[dtype]).astype(np.float64)


def compare_weights(a: Path, b: Path) -> tuple[bool, str]:
    """(bit-identical, description) of two safetensors files."""
    if not (a.exists() and b.exists()):
        return False, f"missing {a if not a.exists() else b}"
    wa, wb = read_safetensors(a), read_safetensors(b)
    if wa.keys() != wb.keys():
        return False, f"different tensors: {sorted(set(wa) ^ set(wb))[:4]}"
    worst, differing = (0.0, ""), 0
    for key in wa:
        if wa[key][:2] != wb[key][:2]:
            return False, f"{key}: dtype/shape {wa[key][:2]} vs {wb[key][:2]}"
        if wa[key][2] != wb[key][2]:
            differing += 1
            diff = float(abs(_floats(wa[key][0], wa[key][2]) - _floats(wb[key][0], wb[key][2])).max())
            worst = max(worst, (diff, key))
    if not differing:
        return True, f"{len(wa)} tensors bit-identical"
    return False, f"{differing}/{len(wa)} tensors differ, max |diff| {worst[0]:.3g} in {worst[1]}"


def compare_runs(a: Path, b: Path) -> tuple[bool, str]:
    same_w, how = compare_weights(a / "final" / "model.safetensors", b / "final" / "model.safetensors")
    ra, rb = comparable(rows(a)), comparable(rows(b))
    if not ra or not rb:
        return False, f"weights: {how}; metrics: missing"
    same_m = ra == rb
    if not same_m:
        keys = sorted({k for x, y in zip(ra, rb) for k in x if x.get(k) != y.get(k)})
        how_m = f"differ in {len(keys)} keys ({', '.join(keys[:4])}), e.g. val_loss " \
                f"{ra[-1].get('val_loss')} vs {rb[-1].get('val_loss')}"
    else:
        how_m = f"{len(ra)} epoch rows identical"
    return same_w and same_m, f"weights: {how}; metrics: {how_m}"


def tail(text: str, lines: int = 120) -> str:
    cleaned = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]  # progress bars: keep the last state
    return "\n".join(cleaned[-lines:]) + "\n"


def last_error(text: str) -> str:
    """The most telling line of a failed run's log."""
    cleaned = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines()]
    for pattern in (r"^\w*(Error|Exception)\b.*", r"classify\.py: error: .*", r"launcher: .*", r".*[Ee]rror.*"):
        hits = [line for line in cleaned if re.match(pattern, line)]
        if hits:
            return hits[-1][:300]
    return (cleaned[-1] if cleaned else "")[:300]


# --------------------------------------------------------------------------------------------- the probe


class Probe:
    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu-probe-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.cpu = args.mode == "cpu-selftest"
        self.only = set(args.only.split(",")) if args.only else None
        self.summary = self.out / "summary.txt"
        self.results: dict[str, list] = {}
        self.gpus = 0
        env = dict(os.environ)
        env.update({"WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.pop(FAULT_ENV, None)
        if self.cpu:
            env["OMP_NUM_THREADS"] = "1"
        self.env = env

    # ---- bookkeeping

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def report(self, status: str, name: str, detail: str) -> None:
        line = f"{status:<4} {name}: {detail}"
        print(line, flush=True)
        with open(self.summary, "a") as f:
            f.write(line + "\n")
        self.results.setdefault(name, []).append({"status": status, "detail": detail})
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def keep(self, name: str, run: Path | None, log: str) -> None:
        """Small artifacts of one run under OUT/runs/NAME/."""
        dest = self.out / "runs" / name
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "log-tail.txt").write_text(tail(log))
        if run is not None and run.is_dir():
            for fname in ("metrics.jsonl", "config.json", "eval.json"):
                if (run / fname).exists():
                    shutil.copy(run / fname, dest / fname)
            for path in run.parent.glob(f"{run.name}-sync*.json"):
                shutil.copy(path, dest / path.name)
            names = [p.name for p in checkpoints(run)]
            (dest / "checkpoints.txt").write_text("\n".join(names) + "\n")

    # ---- commands

    def config(self, name: str) -> Path:
        return CONFIGS / f"{CPU_CONFIG.get(name, name) if self.cpu else name}.yaml"

    def launch(self, config: str, args: list[str], *, nproc: int | None = None, extra: tuple = (),
               script: Path | None = None, script_args: tuple = ()) -> list[str]:
        """`accelerate launch` of the recipe (or of `script` running it) with an accelerate config."""
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(self.config(config))]
        if nproc is not None:
            cmd += ["--num_processes", str(nproc)]
        if config != "single_gpu":
            cmd += ["--main_process_port", str(free_port())]
        cmd += list(extra)
        if script is not None:
            return cmd + [str(script), *script_args, "--", *args]
        return cmd + [str(RECIPE), *args]

    def torchrun(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                str(RECIPE), *args]

    def execute(self, name: str, cmd: list[str], *, timeout: float, env: dict | None = None
                ) -> tuple[int | str, float, str]:
        """Run one launch in its own session; on timeout the whole process group is killed."""
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        timeout = max(5.0, min(timeout, self.left() - 3))
        started = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc: int | str = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            # Anything of the launch still alive (a worker torchrun did not reap) goes with its session.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        return rc, time.monotonic() - started, log.read_text(errors="replace")

    def recipe_run(self, name: str, cmd: list[str], run: Path | None, *, timeout: float,
                   env: dict | None = None) -> tuple[int | str, float, str]:
        rc, wall, log = self.execute(name, cmd, timeout=timeout, env=env)
        self.keep(name, run, log)
        return rc, wall, log

    # ---- steps

    def step(self, name: str, needs: float, fn) -> None:
        if self.only is not None and name not in self.only:
            return
        if self.left() < needs:
            self.report("SKIP", name, f"{self.left():.0f} s of the budget left, needs about {needs:.0f} s")
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - one broken check must not end the probe
            self.report("FAIL", name, f"probe error {type(err).__name__}: {err}")
            (self.out / f"probe-error-{name}.txt").write_text(traceback.format_exc())

    def check_env(self) -> bool:
        code = ("import json, torch, accelerate;"
                "c = torch.cuda.is_available();"
                "p = torch.cuda.get_device_properties(0) if c else None;"
                "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': c,"
                " 'count': torch.cuda.device_count() if c else 0,"
                " 'name': torch.cuda.get_device_name(0) if c else None,"
                " 'capability': list(torch.cuda.get_device_capability(0)) if c else None,"
                " 'memory_gib': round(p.total_memory / 2**30, 1) if c else None,"
                " 'bf16': torch.cuda.is_bf16_supported() if c else None,"
                " 'nccl': '.'.join(map(str, torch.cuda.nccl.version())) if c else None,"
                " 'cudnn': torch.backends.cudnn.version() if c else None,"
                " 'accelerate': accelerate.__version__}))")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=self.env, capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            self.report("FAIL", "env", f"torch/accelerate do not import: {last_error(result.stderr)}")
            return False
        info = json.loads(result.stdout.strip().splitlines()[-1])
        (self.out / "env.json").write_text(json.dumps(info, indent=1))
        self.gpus = info["count"]
        self.report("INFO", "env", ", ".join(f"{k} {v}" for k, v in info.items()))
        if not info["available"] and not self.cpu:
            self.report("FAIL", "env", "torch.cuda.is_available() is False: a CPU-only torch, or no driver")
            return False
        text = (ROOT / "launcher" / "checkpoint" / "layout.py").read_text()
        if FAULT_ENV not in text:
            self.report("WARN", "env", f"{FAULT_ENV} is no longer in launcher/checkpoint/layout.py: the kill checks "
                                       f"cannot kill mid-save")
        return True

    # -- 1. bf16 on one GPU: the loop, its host syncs, kill + resume bit-exactness, eval-only

    def sync_line(self, name: str, run: Path, per_step_expected: str) -> None:
        files = sorted(run.parent.glob(f"{run.name}-sync.rank*.json"))
        if not files:
            self.report("FAIL", name, "no sync counts written (the wrapper did not finish)")
            return
        data = json.loads(files[0].read_text())
        if not data["cuda"]:
            self.report("SKIP", name, "no CUDA: nothing to count")
            return
        metric_rows, info = rows(run), run_info(run)
        steps = metric_rows[-1]["step"] if metric_rows else 0
        phases = data["phases"]
        per_step = phases.get("train-step", 0) / max(steps, 1)
        cfg = json.loads((run / "config.json").read_text()).get("config", {}) if (run / "config.json").exists() else {}
        eval_bs = cfg.get("eval_batch_size") or cfg.get("batch_size") or 1
        val_batches = math.ceil(info.get("val_samples", 0) / max(eval_bs, 1)) * len(metric_rows)
        per_val = phases.get("eval-batch", 0) / max(val_batches, 1)
        counts = ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))
        step_sites = [f"{site.split(' | ', 1)[1]} x{n}" for site, n in data["sites"] if site.startswith("train-step")]
        detail = (f"{per_step:.2f} syncs per training step ({steps} steps), {per_val:.2f} per validation batch "
                  f"({val_batches}); by phase: {counts}" + (f"; per-step sites: {'; '.join(step_sites[:3])}"
                                                           if step_sites else ""))
        status = "PASS" if per_step < 0.05 and per_val < 0.05 else ("INFO" if per_step_expected else "FAIL")
        self.report(status, name, detail + (f" ({per_step_expected})" if per_step_expected else ""))

    def eval_only(self, name: str, run: Path, config: str, *, extra: tuple = (), exact: bool = True) -> None:
        best = run / "checkpoints" / "best"
        if not best.exists():
            self.report("FAIL", name, "no checkpoints/best to evaluate")
            return
        state = json.loads((best / "trainer_state.json").read_text())
        row = state["history"][state["best_epoch"] - 1]
        dest = self.work / f"{name}-out"
        cmd = self.launch(config, ["--eval-only", "--resume", str(best), "--output-dir", str(dest),
                                   "--wandb-mode", "disabled"], nproc=1 if config == "fsdp" else None, extra=extra)
        rc, wall, log = self.recipe_run(name, cmd, dest, timeout=90)
        if rc != 0 or not (dest / "eval.json").exists():
            self.report("FAIL", name, f"exit {rc} after {wall:.0f} s: {last_error(log)}")
            return
        got = json.loads((dest / "eval.json").read_text())
        keys = ("val_loss", "val_accuracy", "val_f1", "val_confusion_matrix")
        same = [k for k in keys if got.get(k) == row.get(k)]
        detail = (f"eval.json val_loss {got.get('val_loss')} vs {row.get('val_loss')} in training (epoch "
                  f"{row['epoch']}), val_accuracy {got.get('val_accuracy')} vs {row.get('val_accuracy')}")
        if len(same) == len(keys):
            self.report("PASS", name, "identical to the training-time validation; " + detail)
        elif got.get("val_accuracy") == row.get("val_accuracy") or not exact:
            self.report("WARN", name, f"not identical ({', '.join(k for k in keys if k not in same)}); " + detail)
        else:
            self.report("FAIL", name, detail)

    def kill_and_resume(self, name: str, config: str, args: list[str], kill_at: int, *, clean: Path,
                        extra: tuple = (), nproc: int | None = None, timeout: float = 120,
                        required: bool = True) -> Path | None:
        """SIGKILL mid-save at step `kill_at` (the launcher's test hook), then the same command again.
        `required`: bit-exactness is promised (--deterministic); without it a difference is reported as INFO."""
        run = self.work / f"{name}"
        cmd = self.launch(config, [*args, "--output-dir", str(run), "--wandb-mode", "disabled"],
                          nproc=nproc, extra=extra)
        rc, wall, log = self.recipe_run(f"{name}-killed", cmd, run, timeout=timeout, env={FAULT_ENV: str(kill_at)})
        if rc == 0:
            self.report("FAIL", name, f"the run was not killed at step {kill_at} (exit 0)")
            return None
        left = [p.name for p in checkpoints(run)]
        rc, wall, log = self.recipe_run(f"{name}-resumed", cmd, run, timeout=timeout)
        resumed = re.search(r"resumed from \S+", log)
        if rc != 0:
            self.report("FAIL", name, f"resume exit {rc} after {wall:.0f} s: {last_error(log)}")
            return None
        same, how = compare_runs(clean, run)
        line = resumed.group(0) if resumed else "no resume line"
        detail = f"killed at step {kill_at} ({', '.join(left)} left), {line}; {how}"
        status = "PASS" if same else ("FAIL" if required else "INFO")
        self.report(status, name, ("bit-identical to the uninterrupted run; " if same else
                                   "differs from the uninterrupted run" + ("" if required else
                                   " (not promised without --deterministic)") + "; ") + detail)
        return run

    def determinism_baseline(self, name: str, config: str, args: list[str], clean: Path, *, extra: tuple = (),
                             nproc: int | None = None) -> None:
        """Two uninterrupted runs: tells a resume bug from run-to-run nondeterminism of the kernels."""
        if self.left() < 30:
            self.report("SKIP", name, "no time left for a second uninterrupted run")
            return
        run = self.work / name
        cmd = self.launch(config, [*args, "--output-dir", str(run), "--wandb-mode", "disabled"], nproc=nproc,
                          extra=extra)
        rc, wall, log = self.recipe_run(name, cmd, run, timeout=120)
        if rc != 0:
            self.report("FAIL", name, f"exit {rc}: {last_error(log)}")
            return
        same, how = compare_runs(clean, run)
        self.report("INFO", name, ("two uninterrupted runs are bit-identical (so a resume difference is the "
                                   "resume's)" if same else "two uninterrupted runs differ: the kernels are not "
                                   "deterministic, so no resume can be bit-exact here") + f"; {how}")

    def clean_run(self, name: str, config: str, args: list[str], *, extra: tuple = (), nproc: int | None = None,
                  timeout: float = 120) -> tuple[Path | None, str]:
        """An uninterrupted run under the sync-counting wrapper (the CUDA work is the recipe's own)."""
        run = self.work / name
        cmd = self.launch(config, [*args, "--output-dir", str(run), "--wandb-mode", "disabled"], nproc=nproc,
                          extra=extra, script=HERE / "sync_wrap.py", script_args=(str(self.work / f"{name}-sync"),))
        rc, wall, log = self.recipe_run(name, cmd, run, timeout=timeout)
        if rc != 0:
            self.report("FAIL", name, f"exit {rc} after {wall:.0f} s: {last_error(log)}")
            return None, log
        metric_rows, info = rows(run), run_info(run)
        last = metric_rows[-1] if metric_rows else {}
        acc, rate = last.get("val_accuracy", float("nan")), last.get("samples_per_second", 0)
        self.report("INFO", name, f"exit 0 in {wall:.0f} s; {info.get('distributed_type')}, "
                                  f"{info.get('world_size')} process(es) on {info.get('device')}, mixed precision "
                                  f"{info.get('mixed_precision')}; val_acc {acc:.4f} after {last.get('epoch')} "
                                  f"epochs; training {rate:,.0f} samples/s (last epoch, incl. saves)")
        return run, log

    def expect_info(self, name: str, run: Path, **expected) -> None:
        info = run_info(run)
        wrong = {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}
        if wrong:
            self.report("FAIL", name, "run_info " + ", ".join(f"{k} {got!r}, expected {want!r}"
                                                               for k, (got, want) in wrong.items()))
        else:
            self.report("PASS", name, "run_info " + ", ".join(f"{k} {v}" for k, v in expected.items()))

    def bf16(self) -> None:
        device = "cpu" if self.cpu else "cuda"
        clean, _ = self.clean_run("bf16-mlp", "single_gpu", MLP)
        if clean is None:
            return
        self.expect_info("bf16-mlp-setup", clean, device=device, mixed_precision="no" if self.cpu else "bf16",
                         distributed_type="NO")
        acc = rows(clean)[-1].get("val_accuracy", 0)
        self.report("PASS" if acc >= 0.9 else "FAIL", "bf16-mlp-accuracy", f"val_accuracy {acc:.4f} (>= 0.9 expected)")
        self.sync_line("bf16-mlp-syncs", clean, "")
        resumed = self.kill_and_resume("bf16-mlp-resume", "single_gpu", MLP, MLP_KILL, clean=clean, required=False)
        if resumed is not None and not self.results["bf16-mlp-resume"][-1]["status"] == "PASS":
            self.determinism_baseline("bf16-mlp-rerun", "single_gpu", MLP, clean)
        self.eval_only("bf16-mlp-eval", clean, "single_gpu")

    # -- 2. FSDP2 through accelerate's plugin, one process (NCCL world of 1): sharded save, kill, resume

    def fsdp(self) -> None:
        args = [*RESNET, *DETERMINISTIC, "--collective-timeout", "30", "--init-timeout", "300"]
        clean, _ = self.clean_run("fsdp-resnet", "fsdp", args, nproc=1, timeout=120)
        if clean is None:
            return
        want = "FSDP2 (launcher, CPU/gloo)" if self.cpu else "FSDP2"
        self.expect_info("fsdp-setup", clean, distributed_type=want, device="cpu" if self.cpu else "cuda")
        newest = checkpoints(clean)[-1] if checkpoints(clean) else None
        sharded = newest is not None and (newest / "dcp" / ".metadata").exists()
        self.report("PASS" if sharded else "FAIL", "fsdp-sharded-checkpoint",
                    f"{newest.name if newest else 'no checkpoint'}: " + (
                        ", ".join(sorted(p.name for p in newest.iterdir())) if newest else "-"))
        self.sync_line("fsdp-resnet-syncs", clean, "")
        resumed = self.kill_and_resume("fsdp-resnet-resume", "fsdp", args, RESNET_KILL, clean=clean, nproc=1,
                                       timeout=120)
        if resumed is not None and self.results["fsdp-resnet-resume"][-1]["status"] != "PASS":
            self.determinism_baseline("fsdp-resnet-rerun", "fsdp", args, clean, nproc=1)
        if newest is not None:
            target = self.work / "fsdp-export.safetensors"
            rc, wall, log = self.execute("fsdp-export", [sys.executable, "-m", "launcher", "export", str(clean),
                                                         str(target)], timeout=60)
            self.keep("fsdp-export", None, log)
            if rc != 0:
                self.report("FAIL", "fsdp-export", f"exit {rc}: {last_error(log)}")
            else:
                same, how = compare_weights(target, clean / "final" / "model.safetensors")
                self.report("PASS" if same else "FAIL", "fsdp-export",
                            f"launcher export of {newest.name} vs final/model.safetensors: {how}")
        self.eval_only("fsdp-eval", clean, "fsdp", exact=False)

    # -- 3. fp16: GradScaler through accelerate, scaler.pt, kill + resume

    def fp16(self) -> None:
        extra = ("--mixed_precision", "fp16")
        args = [*FP16, *DETERMINISTIC]  # so that a difference after the resume is the scaler's, not the kernels'
        clean, _ = self.clean_run("fp16-mlp", "single_gpu", args, extra=extra)
        if clean is None:
            return
        self.expect_info("fp16-setup", clean, mixed_precision="fp16")
        newest = checkpoints(clean)[-1] if checkpoints(clean) else None
        has_scaler = newest is not None and (newest / "scaler.pt").exists()
        self.report("PASS" if has_scaler or self.cpu else "FAIL", "fp16-scaler-saved",
                    f"{newest.name if newest else 'no checkpoint'} has scaler.pt: {has_scaler}")
        self.sync_line("fp16-mlp-syncs", clean, "GradScaler reads found_inf once per optimizer step: expected")
        self.kill_and_resume("fp16-mlp-resume", "single_gpu", args, FP16_KILL, clean=clean, extra=extra)

    # -- 4. the hang watchdog on a GPU: a kernel that does not finish, the host blocks in a device read

    def hang(self) -> None:
        run = self.work / "hang"
        args = ["--model", f"{HERE / 'hang_model.py'}:build", "--epochs", "2", "--collective-timeout", "5",
                "--init-timeout", "60", "--log-every", "1000", "--output-dir", str(run), "--wandb-mode", "disabled"]
        where_file = self.work / "hang-where.json"
        env = {"ACCELERATE_MIXED_PRECISION": "no" if self.cpu else "bf16", "GPU_PROBE_HANG_AT": "10",
               "GPU_PROBE_WHERE": str(where_file)}
        rc, wall, log = self.recipe_run("hang-watchdog", self.torchrun(args), run, timeout=150, env=env)
        if where_file.exists():
            where = json.loads(where_file.read_text())
            shutil.copy(where_file, self.out / "runs" / "hang-watchdog" / where_file.name)
            # On gloo a healthy rank waits inside a torch collective; on a GPU the collectives are
            # asynchronous and the host waits wherever it next reads a device value.
            waiting = where["in_torch"] or where.get("gpu_busy")
            self.report("PASS" if waiting or self.cpu else "FAIL", "hang-main-thread",
                        f"3 s into a device hang the main thread waits at {where['where']} (inside torch: "
                        f"{where['in_torch']}, its GPU busy: {where.get('gpu_busy')}); a healthy rank waiting so "
                        f"is not named as a culprit (launcher/faults/watchdog.py name_stuck_ranks)")
        line = re.search(r"launcher: rank \d+ .*stopped making progress.*", log)
        started = re.search(r"distributed: (\S+), (\d+) processes on (\S+)", log)
        where = started.group(0) if started else "no start line"
        if line and rc not in (0, "timeout"):
            # Start-up is ~10-15 s, the bound 5 s, the poll 0.5 s: far beyond that, the exit waited for the
            # spinning kernel (GPU_PROBE_SLEEP_CYCLES, ~35 s).
            slow = wall >= 45
            self.report("WARN" if slow else "PASS", "hang-watchdog",
                        f"launch ended (exit {rc}) {wall:.0f} s after start ({where})"
                        f"{'; slow: did the exit wait for the running kernel?' if slow else ''}; "
                        f"{line.group(0)[:240]}")
        else:
            self.report("FAIL", "hang-watchdog", f"exit {rc} after {wall:.0f} s ({where}); watchdog line "
                                                 f"{'found' if line else 'missing'}: {last_error(log)}")

    def hang_one_process(self) -> None:
        """single_gpu.yaml: no process group at all; the watchdog must still end the run (issue 23 #7)."""
        run = self.work / "hang-one"
        args = ["--model", f"{HERE / 'hang_model.py'}:build", "--epochs", "2", "--collective-timeout", "5",
                "--init-timeout", "60", "--log-every", "1000", "--output-dir", str(run), "--wandb-mode", "disabled"]
        rc, wall, log = self.recipe_run("hang-one-process", self.launch("single_gpu", args), run, timeout=120,
                                        env={"GPU_PROBE_HANG_AT": "10"})
        line = re.search(r"launcher: rank 0 .*stopped making progress.*", log)
        if line and rc not in (0, "timeout"):
            self.report("WARN" if wall >= 45 else "PASS", "hang-one-process",
                        f"no process group: ended (exit {rc}) {wall:.0f} s after start; {line.group(0)[:200]}")
        else:
            self.report("FAIL", "hang-one-process", f"exit {rc} after {wall:.0f} s; watchdog line "
                                                    f"{'found' if line else 'missing'}: {last_error(log)}")

    # -- 5. torch.compile (accelerate's --dynamo_backend inductor): recompilations, result

    def compile(self) -> None:
        run = self.work / "compile"
        # A 3 s step bound: the recompilation for the short last batch of epoch 1 takes longer, and is bounded
        # by --init-timeout instead (launcher.faults.watchdog sees the compiler on a thread's stack).
        args = ["--epochs", "2", "--output-dir", str(run), "--wandb-mode", "disabled", "--log-every", "1000",
                "--collective-timeout", "3", "--init-timeout", "300"]
        cmd = self.launch("single_gpu", args, extra=("--dynamo_backend", "inductor"))
        rc, wall, log = self.recipe_run("compile-mlp", cmd, run, timeout=240,
                                        env={"TORCH_LOGS": "recompiles,graph_breaks"})
        recompiles = len(re.findall(r"Recompiling function", log))
        breaks = len(re.findall(r"Graph break", log))
        limit = "cache_size_limit" in log or "recompile_limit" in log
        last = rows(run)[-1] if rows(run) else {}
        detail = (f"exit {rc} in {wall:.0f} s; {recompiles} recompilations, {breaks} graph breaks"
                  f"{', recompile limit hit' if limit else ''}; val_acc {last.get('val_accuracy')}; epoch "
                  f"{last.get('epoch')} {last.get('samples_per_second', 0):,.0f} samples/s")
        if "stopped making progress" in log:
            detail += "; the watchdog ended the run during a compilation"
        ok = rc == 0 and last.get("val_accuracy", 0) >= 0.85 and not limit
        self.report("PASS" if ok else "FAIL", "compile-mlp", detail if ok else detail + f": {last_error(log)}")

    # -- 6. the same kill + resume with convolutions (cuDNN) and batch norm, no FSDP

    def resnet(self) -> None:
        """cuDNN convolutions: with --deterministic a resume must be bit-exact; without, it is reported."""
        args = [*RESNET, *DETERMINISTIC]
        clean, _ = self.clean_run("bf16-resnet-det", "single_gpu", args)
        if clean is not None:
            self.kill_and_resume("bf16-resnet-det-resume", "single_gpu", args, RESNET_KILL, clean=clean)
        if self.left() < 60:
            self.report("SKIP", "bf16-resnet", "no time left for the runs without --deterministic")
            return
        clean, _ = self.clean_run("bf16-resnet", "single_gpu", RESNET)
        if clean is None:
            return
        resumed = self.kill_and_resume("bf16-resnet-resume", "single_gpu", RESNET, RESNET_KILL, clean=clean,
                                       required=False)
        if resumed is not None and self.results["bf16-resnet-resume"][-1]["status"] != "PASS":
            self.determinism_baseline("bf16-resnet-rerun", "single_gpu", RESNET, clean)

    # -- 7. accelerate_configs/cpu.yaml on a GPU machine: "stay on the CPU even where a GPU exists"

    def cpu_config(self) -> None:
        run = self.work / "cpu-yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu.yaml"),
               str(RECIPE), "--epochs", "1", "--output-dir", str(run), "--wandb-mode", "disabled"]
        rc, wall, log = self.recipe_run("cpu-yaml", cmd, run, timeout=90)
        device = run_info(run).get("device")
        if rc != 0:
            self.report("FAIL", "cpu-yaml", f"exit {rc}: {last_error(log)}")
        else:
            self.report("PASS" if device == "cpu" else "FAIL", "cpu-yaml",
                        f"accelerate_configs/cpu.yaml (use_cpu: true) trained on {device!r}")
        # Two processes on the CPU of a GPU machine (docs/configs.md): gloo, not NCCL on a missing second GPU.
        run = self.work / "cpu-ddp-yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_ddp.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), str(RECIPE), "--epochs", "1",
               "--output-dir", str(run), "--wandb-mode", "disabled"]
        rc, wall, log = self.recipe_run("cpu-ddp-yaml", cmd, run, timeout=120, env={"ACCELERATE_USE_CPU": "true"})
        info = run_info(run)
        if rc != 0:
            self.report("FAIL", "cpu-ddp-yaml", f"exit {rc}: {last_error(log)}")
        else:
            ok = info.get("device") == "cpu" and info.get("world_size") == 2
            self.report("PASS" if ok else "FAIL", "cpu-ddp-yaml",
                        f"cpu_ddp.yaml + ACCELERATE_USE_CPU=true: {info.get('world_size')} processes on "
                        f"{info.get('device')!r} ({info.get('distributed_type')})")

    # -- 7b. --streaming: the ranks' per-batch vote and the pinned copies must not sync the host (issue 23 #4)

    def streaming(self) -> None:
        data = self.work / "digits-stream"
        if not data.exists():
            rc, wall, log = self.execute("make-stream", [sys.executable, str(HERE / "make_stream.py"), str(data)],
                                         timeout=60)
            if rc != 0:
                self.report("FAIL", "streaming", f"parquet shards: {last_error(log)}")
                return
        args = ["--streaming", "--dataset", str(data), "--epochs", "2", "--batch-size", "16", "--num-workers", "2",
                "--shuffle-buffer", "256"]
        clean, _ = self.clean_run("streaming-mlp", "single_gpu", args)
        if clean is not None:
            self.sync_line("streaming-mlp-syncs", clean, "")

    # -- 7c. a transformers checkpoint saved in bf16, trained under fp16 mixed precision (issue 23 #2)

    def hf_half(self) -> None:
        code = ("import sys, torch; sys.path.insert(0, '.'); from pathlib import Path; from tests import hf_fixtures;"
                "root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True);"
                "hf_fixtures.tiny_bert(root / 'bert-bf16', dtype='bfloat16');"
                "hf_fixtures.write_text_csv(root / 'sentences.csv')")
        assets = self.work / "hf-assets"
        rc, wall, log = self.execute("hf-assets", [sys.executable, "-c", code, str(assets)], timeout=60)
        if rc != 0:
            self.report("SKIP" if "No module named 'transformers'" in log else "FAIL", "hf-bf16-fp16",
                        f"tiny bf16 BERT: {last_error(log)}")
            return
        run = self.work / "hf-fp16"
        args = ["--dataset", str(assets / "sentences.csv"), "--model", f"hf:{assets / 'bert-bf16'}", "--epochs", "1",
                "--batch-size", "16", "--output-dir", str(run), "--wandb-mode", "disabled"]
        rc, wall, log = self.recipe_run("hf-bf16-fp16", self.launch("single_gpu", args, extra=(
            "--mixed_precision", "fp16")), run, timeout=120)
        last = rows(run)[-1] if rows(run) else {}
        if rc != 0 or not last:
            self.report("FAIL", "hf-bf16-fp16", f"exit {rc}: {last_error(log)}")
        else:
            self.report("PASS", "hf-bf16-fp16", f"a bf16-saved BERT trained under fp16 (loaded in float32): "
                                                f"val_loss {last.get('val_loss')} in {wall:.0f} s")

    # -- 8. two GPUs: DDP over NCCL, kill + resume (only where two GPUs exist)

    def ddp(self) -> None:
        if self.gpus < 2 and not self.cpu:
            self.report("SKIP", "ddp-2gpu", f"{self.gpus} GPU: NCCL cannot put two ranks on one GPU")
            return
        clean, _ = self.clean_run("ddp-mlp", "multi_gpu", MLP, nproc=2, timeout=150)
        if clean is None:
            return
        self.expect_info("ddp-setup", clean, world_size=2, device="cpu" if self.cpu else "cuda")
        self.sync_line("ddp-mlp-syncs", clean, "")
        self.kill_and_resume("ddp-mlp-resume", "multi_gpu", MLP, MLP_KILL // 2, clean=clean, nproc=2, timeout=150)

    # -- 9. throughput: ResNet-20 on 32x32 images, bf16 against fp32

    def throughput(self) -> None:
        data = self.work / "synth32"
        if not data.exists():
            rc, wall, log = self.execute("make-synth", [sys.executable, str(HERE / "make_synth.py"), str(data)],
                                         timeout=120)
            if rc != 0:
                self.report("FAIL", "throughput", f"synthetic data: {last_error(log)}")
                return
        rates = {}
        for precision in ("bf16", "no"):
            run = self.work / f"throughput-{precision}"
            args = ["--dataset", str(data), "--model", "resnet", "--batch-size", "256", "--epochs", "2",
                    "--val-fraction", "0.1", "--log-every", "100000", "--output-dir", str(run), "--wandb-mode",
                    "disabled"]
            rc, wall, log = self.recipe_run(f"throughput-{precision}", self.launch(
                "single_gpu", args, extra=("--mixed_precision", precision)), run, timeout=150)
            last = rows(run)[-1] if rows(run) else {}
            if rc != 0 or not last:
                self.report("FAIL", f"throughput-{precision}", f"exit {rc}: {last_error(log)}")
                continue
            rates[precision] = last["samples_per_second"]
        if rates:
            self.report("INFO", "throughput", "ResNet-20, 32x32x3, batch 256, epoch 2 (incl. its checkpoint): " +
                        ", ".join(f"{'fp32' if k == 'no' else k} {v:,.0f} samples/s" for k, v in rates.items()))

    # -- 10. the project's own bench/gpu_check.py (launcher fit against the leanest loop)

    def gpu_check(self) -> None:
        target = self.out / "gpu_check.json"
        rc, wall, log = self.execute("gpu-check", [sys.executable, "bench/gpu_check.py", "--workload", "cnn",
                                                   "--cnn-samples", "8000", "--epochs", "2", "--repeats", "2",
                                                   "--out", str(target)], timeout=180)
        self.keep("gpu-check", None, log)
        lines = [line for line in log.splitlines() if re.match(r"(OK|FAIL|training samples/s|batch \d+)", line)]
        self.report("PASS" if rc == 0 else "FAIL", "gpu-check", f"exit {rc} in {wall:.0f} s; " + " | ".join(lines))

    def finish(self) -> None:
        counts: dict[str, int] = {}
        for entries in self.results.values():
            for entry in entries:
                counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        self.report("INFO", "total", f"{time.monotonic() - self.started:.0f} s; " +
                    ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"; run folders in {self.work}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (summary.txt, results.json, runs/)")
    parser.add_argument("--work", help="where the run folders go (default: a new temporary folder)")
    parser.add_argument("--budget", type=float, default=400, help="seconds for all checks together")
    parser.add_argument("--mode", choices=("gpu", "cpu-selftest"), default="gpu")
    parser.add_argument("--only", help="comma-separated check names (bf16,resnet,fsdp,fp16,hang,hang-one,cpu-yaml,"
                                       "streaming,hf-half,compile,ddp,throughput,gpu-check)")
    args = parser.parse_args(argv)
    if not RECIPE.exists():
        print("probe.py: run it from the repository root (recipes/classify.py not found)", file=sys.stderr)
        return 2
    probe = Probe(args)
    if not probe.check_env():
        probe.finish()
        return 1
    gpu = not probe.cpu
    # (name, seconds it needs at least, function), in order of value
    # Findings with no CPU test first (bit-exactness, the watchdog on a GPU, compile), then the rest.
    plan = [("bf16", 60, probe.bf16), ("resnet", 60, probe.resnet), ("fsdp", 80, probe.fsdp),
            ("fp16", 45, probe.fp16), ("hang", 30, probe.hang), ("hang-one", 25, probe.hang_one_process)]
    if gpu:
        plan.append(("compile", 70, probe.compile))
    plan += [("cpu-yaml", 30, probe.cpu_config), ("streaming", 30, probe.streaming), ("hf-half", 30, probe.hf_half),
             ("ddp", 60, probe.ddp)]
    if gpu:
        plan += [("throughput", 50, probe.throughput), ("gpu-check", 60, probe.gpu_check)]
    for name, needs, fn in plan:
        probe.step(name, needs, fn)
    probe.finish()
    failed = any(e["status"] == "FAIL" for entries in probe.results.values() for e in entries)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
