"""The benchmark still runs end to end and reports every loop and section. Timings are not asserted: they
belong to bench/RESULTS.md, not to a test on a shared machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.loops import VARIANTS
from bench.run import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_run_reports_every_loop_and_section(tmp_path):
    pytest.importorskip("lightning", reason="the benchmark compares against Lightning: pip install '.[bench]'")
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["sections"]) == set(SECTIONS)
    for workload in ("mlp", "cnn"):
        loops = results["sections"]["loops"][workload]["variants"]
        assert set(loops) == set(VARIANTS)
        for name, row in loops.items():
            assert row["cpu_s"] > 0 and row["wall_s"] > 0, name
            assert 0.0 <= row["final"]["val_accuracy"] <= 1.0, name  # every loop trained and validated
    scaling = results["sections"]["scaling"]
    assert scaling["cnn"]["2x1"]["processes"] == 2
    evals = scaling["cnn"]["2x1"]["collectives"]
    # launcher's evaluation all-reduces the same few bytes whatever the validation set's size
    assert evals["eval_launcher_1"]["bytes"] == evals["eval_launcher_4"]["bytes"] > 0
    assert results["sections"]["startup"]["1"]["first_step"] > 0
    assert "| launcher_fit" in proc.stdout  # the Markdown table is printed
