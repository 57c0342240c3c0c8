"""`launcher compare`: the table and the PNG from runs' metrics.jsonl and config.json, no W&B involved."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main as cli_main
from launcher.tracking.compare import compare_main
from launcher.config import TrainConfig
from launcher.errors import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, rows: list[dict], **config: object) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"config": TrainConfig(output_dir=str(run), **config).to_dict(),
                "run_info": {"world_size": 1, "dataset": "digits", "num_classes": 10}}
    (run / "config.json").write_text(json.dumps(settings))
    return run


def rows(accuracies: list[float], losses: list[float], seconds: float = 30.0) -> list[dict]:
    return [{"epoch": i + 1, "step": 10 * (i + 1), "train_loss": loss + 0.1, "val_loss": loss,
             "val_accuracy": acc, "val_f1": acc - 0.01, "epoch_seconds": seconds, "samples_per_second": 500.0}
            for i, (acc, loss) in enumerate(zip(accuracies, losses))]


def parse_table(out: str) -> dict[str, list[str]]:
    """{row title: cells} of the printed table (cells are separated by two or more spaces)."""
    table = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if line.startswith("  ") and len(cells) > 1:
            table[cells[0]] = cells[1:]
    return table


def test_table_shows_differing_config_best_and_final_metrics(tmp_path, capsys):
    a = make_run(tmp_path, "lr-small", rows([0.5, 0.8, 0.7], [1.0, 0.4, 0.6]), lr=0.001, epochs=3)
    b = make_run(tmp_path, "lr-big", rows([0.6, 0.9], [0.9, 0.3], seconds=40.0), lr=0.01, epochs=3)
    assert compare_main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.split()[:2] == ["lr-small", "lr-big"]
    table = parse_table(out)
    assert table["lr"] == ["0.001", "0.01"]
    # Equal values, and the output folder (which always differs), are not config differences.
    assert "epochs" not in table and "batch_size" not in table and "output_dir" not in table
    assert table["epochs completed"] == ["3", "2"]
    assert table["best val_accuracy"] == ["0.8000 (epoch 2)", "0.9000 (epoch 2)"]
    assert table["best val_loss"] == ["0.4000 (epoch 2)", "0.3000 (epoch 2)"]
    assert table["final val_accuracy"] == ["0.7000", "0.9000"]
    assert table["final val_loss"] == ["0.6000", "0.3000"]
    assert table["time (train+val)"] == ["1m30s", "1m20s"]


def test_plot_is_a_png_and_bad_paths_are_usage_errors(tmp_path, capsys):
    a = make_run(tmp_path, "a", rows([0.5, 0.8], [1.0, 0.4]), lr=0.001)
    b = make_run(tmp_path, "b", rows([0.6, 0.9], [0.9, 0.3]), lr=0.01)
    plot = tmp_path / "curves.png"
    assert compare_main([str(a), str(b), "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(PNG_MAGIC) and plot.stat().st_size > 10_000
    with pytest.raises(UsageError, match="does not exist"):
        compare_main([str(a), "--plot", str(tmp_path / "missing" / "x.png")])
    with pytest.raises(UsageError, match="is a directory"):
        compare_main([str(a), "--plot", str(tmp_path)])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="permission denied"):
            compare_main([str(a), "--plot", str(locked / "x.png")])


def test_bad_run_directories_are_one_line_usage_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="does not exist"):
        compare_main([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no metrics.jsonl"):
        compare_main([str(tmp_path / "empty")])
    # Through the console script: exit 2 and one line on stderr.
    assert cli_main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launcher compare: error:") and "metrics.jsonl" in err[0]
    assert cli_main(["compare"]) == 2


def test_a_torn_last_line_is_ignored_but_a_broken_middle_line_is_an_error(tmp_path, capsys):
    run = make_run(tmp_path, "killed", rows([0.5, 0.8], [1.0, 0.4]))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_acc')  # killed mid-write
    assert compare_main([str(run)]) == 0
    assert parse_table(capsys.readouterr().out)["epochs completed"] == ["2"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(UsageError, match=r"metrics.jsonl:2 is not valid JSON"):
        compare_main([str(run)])


def test_a_sweep_folder_compares_its_task_folders(tmp_path, capsys):
    """`launcher submit --sweep` writes runs/SWEEP/<task>/: the sweep folder stands for its tasks."""
    sweep = tmp_path / "sweep"
    make_run(sweep, "lr=0.01", rows([0.6], [0.9]), lr=0.01)
    make_run(sweep, "lr=0.1", rows([0.7], [0.8]), lr=0.1)
    (sweep / "slurm-logs").mkdir()  # not a run: skipped
    assert cli_main(["compare", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.split()[:2] == ["lr=0.01", "lr=0.1"]
    assert parse_table(out)["lr"] == ["0.01", "0.1"]


def test_same_folder_names_get_their_paths_as_titles(tmp_path, capsys):
    a = make_run(tmp_path / "x", "run", rows([0.5], [1.0]), seed=1)
    b = make_run(tmp_path / "y", "run", rows([0.6], [0.9]), seed=2)
    compare_main([str(a), str(b)])
    assert capsys.readouterr().out.splitlines()[0].split() == [str(a), str(b)]


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_two_real_runs_with_different_learning_rates(tmp_path):
    from helpers import ROOT
    from helpers import run as run_recipe

    dirs = []
    for lr in ("0.001", "0.01"):
        out = tmp_path / f"lr{lr}"
        run_recipe(["--epochs", "2", "--lr", lr, "--output-dir", str(out)])  # W&B disabled
        dirs.append(out)
    plot = tmp_path / "curves.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-m", "launcher", "compare", *map(str, dirs), "--plot", str(plot)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    print(result.stdout)  # the table, for the record (pytest -s)
    lr_line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["lr"])
    assert lr_line.split()[1:] == ["0.001", "0.01"]
    assert "best val_accuracy" in result.stdout and "final val_loss" in result.stdout
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_plot_legend_names_the_effective_batch_and_covers_no_point(tmp_path):
    from launcher.tracking.compare import curves_figure, load_run

    runs = []
    for name, world_size, acc in (("tour-1proc", 1, [0.88, 0.95]), ("tour-2proc", 2, [0.80, 0.93])):
        path = make_run(tmp_path, name, rows(acc, [0.9, 0.3]))
        settings = json.loads((path / "config.json").read_text())
        settings["run_info"].update(world_size=world_size, effective_batch_size=64 * world_size)
        (path / "config.json").write_text(json.dumps(settings))
        runs.append(load_run(str(path)))
    fig = curves_figure(runs)
    fig.canvas.draw()
    [legend] = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["tour-1proc (effective batch 64, world_size=1)", "tour-2proc (effective batch 128, world_size=2)"]
    box = legend.get_window_extent()
    for ax in fig.axes:
        for line in ax.get_lines():
            for x, y in ax.transData.transform(line.get_xydata()):
                assert not box.contains(x, y), (line.get_label(), x, y)


def test_runs_of_other_tasks_show_their_own_metrics_each_in_its_direction(tmp_path, capsys):
    """A regression run and a language-model run: their metrics, best by their own direction, no accuracy."""
    from launcher.tracking.compare import curves_figure, load_run

    regression = make_run(tmp_path, "diabetes", [
        {"epoch": e, "step": 5 * e, "train_loss": 1.0 / e, "val_loss": loss, "val_mae": mae, "val_rmse": mae * 1.2,
         "val_r2": r2, "val_samples": 89, "epoch_seconds": 2.0, "samples_per_second": 100.0}
        for e, loss, mae, r2 in ((1, 0.9, 60.0, 0.30), (2, 0.5, 45.0, 0.48), (3, 0.6, 47.0, 0.45))])
    lm = make_run(tmp_path, "gpt", [
        {"epoch": e, "step": 10 * e, "train_loss": loss + 0.1, "val_loss": loss, "val_perplexity": 2.718 ** loss,
         "val_token_accuracy": acc, "val_tokens": 5000, "epoch_seconds": 3.0, "samples_per_second": 50.0,
         "tokens_per_second": 6400.0} for e, loss, acc in ((1, 2.5, 0.30), (2, 2.1, 0.41))])
    assert compare_main([str(regression), str(lm)]) == 0
    table = parse_table(capsys.readouterr().out)
    assert table["best val_r2"] == ["0.4800 (epoch 2)", "-"]  # higher is better
    assert table["best val_mae"] == ["45.0000 (epoch 2)", "-"]  # lower is better
    assert table["best val_perplexity"][1].endswith("(epoch 2)") and table["best val_perplexity"][0] == "-"
    assert table["best val_token_accuracy"] == ["-", "0.4100 (epoch 2)"]
    assert table["tokens/s (mean)"] == ["-", "6400"]
    assert not any("accuracy" in title for title in table if "token" not in title)
    assert "best val_samples" not in table and "best val_tokens" not in table  # counts are not metrics
    fig = curves_figure([load_run(str(regression))])
    assert fig.axes[1].get_title() == "validation mae"  # the first metric after the loss
    assert [line.get_ydata().tolist() for line in fig.axes[1].get_lines()] == [[60.0, 45.0, 47.0]]
