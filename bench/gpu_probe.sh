#!/usr/bin/env bash
# One-GPU check of the launcher: run from the repository root on a fresh machine with an NVIDIA GPU.
#
#   OUT=/path/to/results bash bench/gpu_probe.sh     # results: $OUT/summary.txt (default ./gpu_probe_out)
#
# Uses bench/gpu_probe/ (probe.py, sync_wrap.py, hang_model.py, make_synth.py, make_stream.py). How to run it
# on a borrowed machine without network (wheels of the missing packages carried in .whl/): bench/README.md.
#
# 0. Wheels: if WHEELS (default $ROOT/.whl) holds *.whl files, they are installed first with
#    `pip install --no-index --no-deps --target /tmp/gpu-probe-site` and put on PYTHONPATH (datasets, wandb
#    and their dependencies that the machine lacks; bench/gpu_probe/wheels.sh downloads them).
# 1. Python: the first of $PYTHON, python3, python that imports a CUDA torch (a torch already on the
#    machine is reused, never replaced). Without one, `pip install -e .` brings PyPI's CUDA build.
# 2. The project: imported from this checkout (PYTHONPATH); pip installs only missing dependencies, with
#    the installed torch pinned as a constraint so pip cannot swap it.
# 3. probe.py runs the checks, most valuable first, each skipped when the time left cannot cover it:
#    bf16 run + host syncs per step + SIGKILL/resume (without --deterministic: reported) + eval-only;
#    ResNet (cuDNN) kill/resume with --deterministic (must be bit-exact) and without (reported); FSDP2
#    (1 process, NCCL) sharded save, kill, resume, export, eval-only; fp16 (GradScaler) kill/resume; the
#    hang watchdog with a GPU kernel that never finishes, under torchrun and in one process without a
#    group; cpu.yaml and cpu_ddp.yaml + ACCELERATE_USE_CPU on a GPU machine; --streaming host syncs; a
#    bf16-saved transformers model under fp16; torch.compile with a 3 s step bound (recompilations);
#    2-GPU DDP if there are two GPUs; bf16/fp32 throughput; bench/gpu_check.py.
#
# Budget: PROBE_BUDGET_S (default 450 s) for everything, install included. Summary lines: PASS, FAIL, WARN,
# INFO, SKIP. Exit status 0 when nothing FAILed.

set -uo pipefail
START=$(date +%s)
ROOT=$(pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELPERS="$HERE/gpu_probe"
OUT=${OUT:-$ROOT/gpu_probe_out}
BUDGET=${PROBE_BUDGET_S:-450}
WHEELS=${WHEELS:-$ROOT/.whl}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }

if [ ! -f "$ROOT/recipes/classify.py" ] || [ ! -d "$ROOT/launcher" ]; then
    say "FAIL setup: run this from the repository root (no recipes/classify.py in $ROOT)"; exit 2
fi
if [ ! -f "$HELPERS/probe.py" ]; then
    say "FAIL setup: $HELPERS/probe.py is missing: copy gpu_probe/ next to this script"; exit 2
fi
say "INFO start: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET} s"
(nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 && nvidia-smi -L | sed 's/^/INFO nvidia-smi: /' | tee -a "$SUMMARY") \
    || say "WARN nvidia-smi: not available ($(head -c 200 "$OUT/nvidia-smi.txt" 2>/dev/null))"

# --- 1. a Python with torch (reuse the machine's torch) -------------------------------------------------
# (PROBE_MODE=cpu-selftest: probe.py's CPU self-test of the orchestration, where a CPU torch will do.)
HAS_TORCH='import os, sys, torch; sys.exit(0 if torch.cuda.is_available() or os.environ.get("PROBE_MODE") == "cpu-selftest" else 3)'
PY=
for candidate in "${PYTHON:-}" python3 python; do
    if [ -z "$candidate" ] || ! command -v "$candidate" >/dev/null 2>&1; then continue; fi
    if "$candidate" -c "$HAS_TORCH" >/dev/null 2>&1; then
        PY=$candidate; break
    fi
    [ -z "$PY" ] && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null \
        && FALLBACK=${FALLBACK:-$candidate}
done
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
pip_install() {  # pip_install TIMEOUT ARGS...: a bounded pip run, its log kept
    local limit=$1; shift
    timeout -k 10 "$limit" "$PY" -m pip install -q --retries 1 --timeout 20 "$@" >>"$OUT/pip.log" 2>&1
}
if [ -z "$PY" ]; then
    PY=${FALLBACK:-python3}
    say "INFO install: no Python here imports a CUDA torch; pip install -e . with $PY (PyPI's torch is the CUDA build)"
    pip_install 360 -e "$ROOT" || say "FAIL install: pip install -e . failed (tail of $OUT/pip.log: $(tail -n 2 "$OUT/pip.log" | tr '\n' ' '))"
    if ! "$PY" -c "$HAS_TORCH" >/dev/null 2>&1; then
        say "FAIL install: still no CUDA torch after $(elapsed) s; nothing to probe"; exit 1
    fi
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # No network on a borrowed GPU machine: the missing packages come as wheels (bench/gpu_probe/wheels.sh).
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu-probe-site "$WHEELS"/*.whl >>"$OUT/pip.log" 2>&1; then
        export PYTHONPATH="/tmp/gpu-probe-site${PYTHONPATH:+:$PYTHONPATH}"
        say "INFO install: $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS"
    else
        say "WARN install: the wheels in $WHEELS did not install (tail of $OUT/pip.log: $(tail -n 2 "$OUT/pip.log" | tr '\n' ' '))"
    fi
fi
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
say "INFO python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'), torch $TORCH ($(elapsed) s)"

# --- 2. the project's dependencies; the project itself is imported from this checkout ---------------------
MISSING=$("$PY" - <<'EOF'
import importlib.util as u
# What the checks import (W&B runs are disabled, --augment, --plot are not used: wandb, albumentations and
# matplotlib are not needed here).
need = {"accelerate": "accelerate>=1.0", "datasets": "datasets>=2.18", "safetensors": "safetensors>=0.4",
        "yaml": "pyyaml", "tqdm": "tqdm", "sklearn": "scikit-learn", "numpy": "numpy", "PIL": "pillow"}
print(" ".join(spec for module, spec in need.items() if u.find_spec(module) is None))
EOF
)
if [ -n "$MISSING" ]; then
    echo "torch==$TORCH" >"$OUT/constraints.txt"  # pip must keep the machine's torch
    say "INFO install: missing $MISSING; installing them (torch pinned to $TORCH)"
    # shellcheck disable=SC2086
    pip_install 180 -c "$OUT/constraints.txt" $MISSING \
        || say "WARN install: pip failed for some of: $MISSING (see pip.log); probing with what is there"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import accelerate, datasets, safetensors, yaml, sklearn, launcher.loop' 2>"$OUT/import-error.txt"; then
    say "FAIL install: the launcher does not import: $(tail -n 1 "$OUT/import-error.txt")"; exit 1
fi
say "INFO install: ready after $(elapsed) s ($("$PY" -c 'import accelerate; print("accelerate", accelerate.__version__)'))"

# --- 3. the checks ---------------------------------------------------------------------------------------
LEFT=$((BUDGET - $(elapsed)))
"$PY" "$HELPERS/probe.py" --out "$OUT" --budget "$LEFT" ${PROBE_ONLY:+--only "$PROBE_ONLY"} ${PROBE_MODE:+--mode "$PROBE_MODE"}
STATUS=$?
say "INFO end: $(elapsed) s in all, probe exit $STATUS"
exit $STATUS
