"""`launcher compare RUN_DIR [RUN_DIR ...] [--plot FILE]`: compare training runs from their local files.

A sweep folder (one subfolder per task, as `launcher submit --sweep` writes) stands for all its tasks.

Reads each run's metrics.jsonl (one row per completed epoch) and config.json (the resolved config under
"config" and the run facts under "run_info"), prints one column per run: the config values that differ
between the runs, then epochs, best and final validation metrics and training time. `--plot FILE` writes
the learning curves of all runs overlaid (loss, and the task's main metric: accuracy, r2, f1_micro,
perplexity... per epoch) as a PNG. Works for every task: the metrics come from the rows. Needs no W&B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UsageError

# Keys that differ between any two runs without describing the experiment.
IGNORED_KEYS = {"output_dir", "wandb_name"}
# Per-split counts that rows carry beside the metrics; and the words of metric names that improve downward.
COUNT_KEYS = {"val_samples", "val_tokens"}
LOWER_IS_BETTER = {"loss", "perplexity", "mae", "mse", "rmse", "error"}


@dataclass
class Run:
    path: Path
    label: str
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)  # config + run_info, flat


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launcher compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="training output folders (--output-dir), or a sweep folder holding them")
    parser.add_argument("--plot", metavar="FILE", help="write the learning curves of all runs to this PNG")
    return parser


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Epoch rows of a metrics.jsonl, one per epoch (the last one wins). A torn last line (a run killed
    while writing it) is ignored; a bad line elsewhere is an error."""
    lines = path.read_text().splitlines()
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UsageError(f"{path}:{number} is not valid JSON; fix or delete that line") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise UsageError(f"{path}:{number} is not a metrics row (no 'epoch'); is this a metrics.jsonl "
                             f"written by the launcher?")
        by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_settings(path: Path) -> dict[str, Any]:
    """config.json flattened: TrainConfig values, then run facts (a clashing run fact becomes run_info.KEY)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix or delete it") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object with 'config' and 'run_info'")
    config = data.get("config", {}) if isinstance(data.get("config"), dict) else {}
    settings = dict(config)
    for key, value in (data.get("run_info") or {}).items():
        settings[f"run_info.{key}" if key in config else key] = value
    return settings


def load_run(arg: str) -> Run:
    path = Path(arg)
    if not path.exists():
        raise UsageError(f"run directory {arg} does not exist")
    if not path.is_dir():
        raise UsageError(f"{arg} is not a directory; pass training output folders (--output-dir)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{arg} has no metrics.jsonl; pass a training output folder (the recipe's --output-dir) "
                         f"that has completed at least one epoch")
    return Run(path=path, label=path.resolve().name, rows=read_metrics(metrics),
               settings=read_settings(path / "config.json"))


def _unique_labels(runs: list[Run], args: list[str]) -> None:
    """Folder names as column titles; the paths as given where two folders share a name."""
    names = [r.label for r in runs]
    for run, arg in zip(runs, args):
        if names.count(run.label) > 1:
            run.label = arg.rstrip("/") or arg


def differing_keys(runs: list[Run]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.settings if k not in keys]
    missing = object()
    return [k for k in keys if k not in IGNORED_KEYS
            and len({json.dumps(r.settings.get(k, missing), sort_keys=True, default=str) for r in runs}) > 1]


def format_value(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value) or "[]"
    return str(value)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _best(rows: list[dict[str, Any]], key: str, mode: str) -> str:
    candidates = [r for r in rows if _finite(r.get(key))]
    if not candidates:
        return "-"
    pick = max if mode == "max" else min
    row = pick(candidates, key=lambda r: r[key])
    return f"{row[key]:.4f} (epoch {row['epoch']})"


def _final(rows: list[dict[str, Any]], key: str) -> str:
    return f"{rows[-1][key]:.4f}" if rows and _finite(rows[-1].get(key)) else "-"


def val_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The validation metrics the rows hold, in the order the run logged them (counts are not metrics)."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("val_") and key not in COUNT_KEYS and not isinstance(value, bool) \
                    and isinstance(value, (int, float)):
                keys[key] = None
    return list(keys)


def direction(run: Run, key: str) -> str:
    """"min" or "max": the run's own --best-mode for its --best-metric, else what the name says."""
    if run.settings.get("best_metric") == key and run.settings.get("best_mode") in ("min", "max"):
        return run.settings["best_mode"]
    words = key.removeprefix("val_").split("_")
    return "min" if any(word in LOWER_IS_BETTER for word in words) else "max"


def result_rows(run: Run, metrics: list[str], tokens: bool = False) -> list[tuple[str, str]]:
    """The results column of one run: `metrics` are the validation metrics of all compared runs (a run
    without one shows "-"), so that runs of different tasks line up; `tokens` adds the token rate."""
    rows = run.rows
    seconds = sum(r["epoch_seconds"] for r in rows if _finite(r.get("epoch_seconds")))
    out = [("epochs completed", str(rows[-1]["epoch"]) if rows else "0"),
           ("steps", str(rows[-1].get("step", "-")) if rows else "-")]
    out += [(f"best {key}", _best(rows, key, direction(run, key))) for key in metrics]
    out += [(f"final {key}", _final(rows, key)) for key in metrics]
    out += [("final train_loss", _final(rows, "train_loss")),
            ("time (train+val)", format_seconds(seconds) if rows else "-")]
    rates = [("samples_per_second", "samples/s (mean)")] + [("tokens_per_second", "tokens/s (mean)")] * tokens
    for key, title in rates:
        values = [r[key] for r in rows if _finite(r.get(key))]
        out.append((title, f"{sum(values) / len(values):.0f}" if values else "-"))
    return out


def primary_metric(runs: list[Run]) -> str | None:
    """The metric of the second plot panel: the first run's --best-metric where that is not the loss,
    else the first validation metric other than the loss (accuracy, r2, f1_micro, perplexity...)."""
    for run in runs:
        chosen = run.settings.get("best_metric")
        if chosen and chosen != "val_loss" and any(chosen in r for r in run.rows):
            return chosen
    others = [k for k in val_metrics([r for run in runs for r in run.rows]) if k != "val_loss"]
    return others[0] if others else None


def render_table(runs: list[Run]) -> str:
    """One column per run: the config keys that differ, then the results."""
    keys = differing_keys(runs)
    lines: list[list[str]] = [["", *[r.label for r in runs]]]
    sections: list[tuple[str, list[list[str]]]] = []
    if len(runs) > 1:
        config_lines = [[k, *[format_value(r.settings[k]) if k in r.settings else "-" for r in runs]]
                        for k in keys]
        sections.append(("config (differing)" if keys else "config: no differences", config_lines))
    metrics = val_metrics([row for run in runs for row in run.rows])
    tokens = any("tokens_per_second" in row for run in runs for row in run.rows)
    results = [result_rows(r, metrics, tokens) for r in runs]
    sections.append(("results", [[name, *[res[i][1] for res in results]]
                                 for i, (name, _) in enumerate(results[0])]))
    rows_out: list[list[str] | str] = [lines[0]]
    for title, body in sections:
        rows_out.append(title)
        rows_out += [["  " + row[0], *row[1:]] for row in body]
    table_rows = [r for r in rows_out if isinstance(r, list)]
    widths = [max(len(r[i]) for r in table_rows) for i in range(len(runs) + 1)]
    out = []
    for row in rows_out:
        if isinstance(row, str):
            out.append(row)
        else:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(out)


def _check_plot_path(arg: str) -> Path:
    path = Path(arg)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"--plot {arg} is a directory; give a file name such as {arg.rstrip('/')}/curves.png")
    if not parent.is_dir():
        raise UsageError(f"cannot write --plot {arg}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write --plot {arg}: permission denied; choose a writable path")
    if path.suffix.lower() not in ("", ".png"):
        raise UsageError(f"--plot {arg}: the plot is a PNG; use a .png file name")
    return path


def curves_figure(runs: list[Run]) -> Any:
    """The figure of `plot_curves`. Each run's legend entry names its effective batch size (the usual reason
    two curves differ, e.g. 1 vs 2 processes) and the settings that differ; the legend sits below the axes,
    where it covers no point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in differing_keys(runs) if k != "effective_batch_size"][:3]
    metric = primary_metric(runs)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        details = [f"{k}={format_value(run.settings.get(k, '-'))}" for k in keys]
        if "effective_batch_size" in run.settings:
            details.insert(0, f"effective batch {run.settings['effective_batch_size']}")
        label = f"{run.label} ({', '.join(details)})" if details else run.label
        epochs = [r["epoch"] for r in run.rows]
        for key, style, ax, name in (("val_loss", "-", ax_loss, label), ("train_loss", "--", ax_loss, None),
                                     (metric, "-", ax_acc, None)):
            points = [(e, r[key]) for e, r in zip(epochs, run.rows) if _finite(r.get(key))]
            if points:
                ax.plot(*zip(*points), style, color=color, marker="o", markersize=3, label=name)
    ax_loss.set(title="loss (validation solid, training dashed)", xlabel="epoch", ylabel="loss")
    name = metric.removeprefix("val_") if metric else "no other metric"
    ax_acc.set(title=f"validation {name}", xlabel="epoch", ylabel=name)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    rows = min(len(runs), 4)
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="lower center", fontsize=8,
               ncol=max(1, math.ceil(len(runs) / rows)), frameon=False)
    fig.tight_layout(rect=(0, 0.05 * rows + 0.03, 1, 1))
    return fig


def plot_curves(runs: list[Run], path: Path) -> None:
    """Loss (validation solid, training dashed) and the main validation metric per epoch, one colour per run."""
    import matplotlib.pyplot as plt

    fig = curves_figure(runs)
    try:
        fig.savefig(path, format="png", dpi=120)
    except OSError as err:
        raise UsageError(f"cannot write --plot {path}: {err.strerror}") from None
    finally:
        plt.close(fig)


def expand_sweeps(args: list[str]) -> list[str]:
    """A sweep folder (`launcher submit --sweep` writes one subfolder per task) stands for its task folders:
    a folder without metrics.jsonl whose subfolders have one."""
    expanded: list[str] = []
    for arg in args:
        path = Path(arg)
        tasks = sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file()) \
            if path.is_dir() and not (path / "metrics.jsonl").exists() else []
        expanded += [str(p) for p in tasks] or [arg]
    return expanded


def compare_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    plot_path = _check_plot_path(args.plot) if args.plot else None
    run_args = expand_sweeps(args.runs)
    runs = [load_run(arg) for arg in run_args]
    _unique_labels(runs, run_args)
    print(render_table(runs))
    if plot_path is not None:
        plot_curves(runs, plot_path)
        print(f"learning curves: {plot_path}")
    return 0
