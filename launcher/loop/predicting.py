"""`launcher predict RUN DATA --output preds.parquet`: new data scored with a run's stored preprocessing and
its final weights, every row once and in order, in one process or many (`accelerate launch -m launcher
predict ...`: each rank predicts its share, rank 0 writes the file); tables, images, and text runs (their
tokenizer and config from final/hf, a .txt file one text a line); and the two helpers the recipe uses so
that its models carry their preprocessing (`with_preprocessing`) and its `--predictions` name the classes
(`named_rows`). docs/predict.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from launcher.errors import EXIT_USAGE, UsageError

PROG = "launcher predict"


# ---------------------------------------------------------------------------------------------------------
# The recipe's side


def with_preprocessing(checkpointing: Any, preprocessing: dict, *, model: str, num_outputs: int) -> Any:
    """`checkpointing` (a launcher.Checkpointing) whose checkpoints carry `preprocessing` (trainer_state.json,
    extra.preprocessing) and whose final/ gets preprocessing.json, besides what it wrote before."""
    if not preprocessing:
        return checkpointing
    from launcher.checkpoint import write_json_atomic
    from launcher.data.preprocess import PREPROCESSING_FILE

    stored = {**preprocessing, "model": model, "num_outputs": int(num_outputs)}
    previous = checkpointing.export_final

    def export_final(unwrapped: Any, weights: dict, final: Path) -> None:
        write_json_atomic(Path(final) / PREPROCESSING_FILE, stored)
        if previous is not None:
            previous(unwrapped, weights, final)

    extra = {**(checkpointing.extra_state or {}), "preprocessing": stored}
    return dataclasses.replace(checkpointing, extra_state=extra, export_final=export_final)


def named_rows(rows: dict[str, list], class_names: list[str], problem_type: str) -> dict[str, list]:
    """Single-label prediction rows with class names in `label` and `prediction`, the ids kept in `label_id`
    and `prediction_id`; multi-label rows keep their id lists in `label` and `prediction` and get the class
    names besides, `label_names` and `prediction_names` (regression rows are returned as they are)."""
    if not class_names or problem_type not in ("single_label_classification", "multi_label_classification"):
        return rows
    out = dict(rows)
    name = lambda i: class_names[i] if 0 <= i < len(class_names) else str(i)  # noqa: E731
    if problem_type == "multi_label_classification":
        for key in ("label", "prediction"):
            if key in rows:
                out[f"{key}_names"] = [[name(int(i)) for i in ids] for ids in rows[key]]
        return out
    for key in ("label", "prediction"):
        if key in rows:
            out[key] = [name(int(i)) for i in rows[key]]
            out[f"{key}_id"] = [int(i) for i in rows[key]]
    return out


# ---------------------------------------------------------------------------------------------------------
# launcher predict


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_OR_FINAL", help="a run folder (its final/), a final/ folder or a "
                                                            "checkpoint folder")
    parser.add_argument("data", metavar="DATA", help="a csv/tsv/parquet/json file or folder of them, a "
                                                     "save_to_disk folder, a folder of images, or (a text run "
                                                     "with one text column) a .txt file, one example a line")
    parser.add_argument("--output", required=True, help="the parquet file to write (rank 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per forward pass per process")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    return parser


def predict_main(argv: list[str]) -> int:
    """`launcher predict ...`: bad input is one line on rank 0 and exit 2, with nothing written."""
    rank = int(os.environ.get("RANK", 0))
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else 0
    code = 0
    try:
        _predict(args)
    except UsageError as err:  # every rank reads the same files: raised alike everywhere
        if rank == 0:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return code


def _weights_of(run: Path) -> Path:
    """The folder whose weights are scored: RUN/final/, or RUN itself (a final/ or a checkpoint, sharded too)."""
    from launcher.checkpoint.sharded import is_sharded_checkpoint

    for folder in (run / "final", run):
        if (folder / "model.safetensors").is_file() or is_sharded_checkpoint(folder):
            return folder
    raise UsageError(f"{run} holds no model.safetensors (nor final/model.safetensors): pass a run folder, its "
                     f"final/ or a checkpoint folder")


def _check_output(output: Path) -> None:
    if output.suffix.lower() != ".parquet":
        raise UsageError(f"--output {output} must be a .parquet file")
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; name the parquet file to write")
    parent = output.parent if str(output.parent) else Path(".")
    above = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: {above} is not a writable folder")


def _load_data(data: str, text_column: str | None = None) -> Any:
    """DATA as one datasets.Dataset (a source with several splits must name one); with `text_column` (a text
    run's one text column), a .txt file is one example a line in that column."""
    import datasets

    from launcher.data.sources import _load_raw, _quiet

    if not Path(data).expanduser().exists():
        raise UsageError(f"DATA {data!r} does not exist")
    if text_column is not None and Path(data).suffix.lower() == ".txt" and Path(data).is_file():
        try:  # one example a line, in order; an empty line is an example too (its index stays its line)
            lines = Path(data).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read DATA {data!r}: {error}") from None
        if not lines:
            raise UsageError(f"DATA {data!r} has no rows")
        return datasets.Dataset.from_dict({text_column: lines},
                                          features=datasets.Features({text_column: datasets.Value("string")}))
    with _quiet():
        loaded = _load_raw(data)
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UsageError(f"DATA {data!r} has splits {', '.join(loaded)}; point at one split's file or folder "
                             f"(e.g. {Path(data) / next(iter(loaded))})")
        loaded = next(iter(loaded.values()))
    if len(loaded) == 0:
        raise UsageError(f"DATA {data!r} has no rows")
    return loaded


def _labels(ds: Any, column: str | None, pre: dict) -> list | None:
    """The data's label column as the run names it: class names for a single-label run, else as stored."""
    if column is None or column not in ds.features:
        return None
    import datasets

    feature = ds.features[column]
    values = ds.select_columns([column])[:][column]
    if pre["problem_type"] != "single_label_classification":
        return list(values)
    names = pre["class_names"]
    if isinstance(feature, datasets.ClassLabel):
        return [None if v is None or v < 0 else feature.int2str(int(v)) for v in values]
    out = []
    for v in values:
        if v is None or isinstance(v, str):
            out.append(v)
        else:
            out.append(names[int(v)] if 0 <= int(v) < len(names) else str(v))
    return out


def _dataset(pre: dict, ds: Any, data: str) -> Any:
    """The batched dataset of DATA's inputs, made as the run made its own (launcher.data)."""
    import numpy as np
    import torch

    from launcher.data import arrays, images
    from launcher.data.preprocess import TableEncoder
    from launcher.data.sources import _detect_image_column

    n = len(ds)
    dummy = torch.zeros(n, dtype=torch.long)
    mean, std = torch.tensor(pre["mean"], dtype=torch.float32), torch.tensor(pre["std"], dtype=torch.float32)
    kind = pre["kind"]
    if kind == "encoded_images":
        column = pre["image_column"]
        if column not in ds.features:
            column = _detect_image_column(ds.features, pre.get("label_column") or "")
        if column is None or column not in ds.features:
            raise UsageError(f"DATA {data!r} has no image column {pre['image_column']!r} (columns: "
                             f"{', '.join(ds.features)})")
        return images.LazyImageDataset(images.ImageColumn(ds, column), np.arange(n), dummy, mode=pre["mode"],
                                       size=tuple(pre["size"]), mean=mean, std=std)
    if kind not in ("tabular", "image"):
        raise UsageError(f"{kind} inputs cannot be predicted by launcher predict yet")
    missing = [c for c in pre["columns"] if c not in ds.features]
    if missing:
        raise UsageError(f"DATA {data!r} lacks column(s) {', '.join(missing)} that the model was trained on "
                         f"(DATA has: {', '.join(ds.features)})")
    spec = arrays._InputSpec(list(pre["columns"]), kind, tuple(pre["input_shape"]), tuple(pre["stored_shape"]),
                             None if pre.get("transpose") is None else tuple(pre["transpose"]),
                             float(pre.get("scale", 1.0)))
    if kind == "tabular" and pre.get("encoder"):
        spec.encoder = TableEncoder.from_json(pre["encoder"])
    view = (-1, 1, 1) if kind == "image" else (-1,)
    store = arrays._ColumnStore(ds.select_columns(spec.columns), spec)
    rows = np.arange(n)
    for start in range(0, n, arrays._STATS_BATCH):  # refused now, not in the middle of a rank's share
        arrays._require_finite(spec, store.gather(rows[start:start + arrays._STATS_BATCH]))
    return arrays.ArrowBatchedDataset(store, rows, dummy, mean.reshape(view), std.reshape(view))


def _text_dataset(pre: dict, ds: Any, data: str, tokenizer: Any, num_outputs: int) -> Any:
    """DATA's text columns tokenized as the run tokenized its own (launcher.data.text: the run's tokenizer,
    truncation to its max_length, each batch padded to its longest row)."""
    import numpy as np

    from launcher.data.text import TextOptions, is_text_feature, tokenized_splits

    columns = list(pre["text_columns"])
    missing = [c for c in columns if c not in ds.features]
    if missing:
        raise UsageError(f"DATA {data!r} lacks text column(s) {', '.join(missing)} that the model was trained on "
                         f"(DATA has: {', '.join(ds.features)})")
    wrong = [c for c in columns if not is_text_feature(ds.features[c])]
    if wrong:
        raise UsageError(f"DATA {data!r}: column(s) {', '.join(wrong)} hold {ds.features[wrong[0]]}, not text")
    options = TextOptions(lambda: tokenizer, max_length=int(pre.get("max_length", 128)),
                          pad_to_multiple_of=pre.get("pad_to_multiple_of"))
    n = len(ds)
    dummy = (np.zeros(n, dtype=np.int64) if pre["problem_type"] == "single_label_classification"
             else np.zeros((n, num_outputs), dtype=np.float32))
    part = (ds, np.arange(n), dummy)
    return tokenized_splits(options, columns, part, part)[0]  # one table: tokenized once


def _hf_sources(run: Path, weights: Path) -> list[Path]:
    """Where the run's transformers config and tokenizer are: final/hf next to the weights, or the run's."""
    return [weights / "hf", run / "final" / "hf", run / "hf", weights.parent.parent / "final" / "hf"]


def _text_model(pre: dict, run: Path, weights: Path, num_outputs: int) -> tuple[Any, Any]:
    """(model, tokenizer) of a text run: the sequence classifier built from final/hf/config.json (else the
    run's --model hf: source, with the run's head), its weights loaded from `weights` as for any model."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from launcher.checkpoint.sharded import load_weights
    from launcher.models import hf

    source = next((f for f in _hf_sources(run, weights) if (f / "config.json").is_file()), None)
    overrides: dict[str, Any] = {}
    if source is None:  # e.g. a checkpoint copied away from its run: the model the run started from
        source = Path(hf.model_name(str(pre["model"])))
        labels = dict(enumerate(pre.get("class_names") or [str(i) for i in range(num_outputs)]))
        overrides = dict(num_labels=num_outputs, id2label=labels, label2id={v: k for k, v in labels.items()},
                         problem_type=pre["problem_type"])
    tokenizer = hf.load_tokenizer(str(source))
    try:
        with hf._quiet():
            config = AutoConfig.from_pretrained(str(source), **overrides)
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise UsageError(f"{source}: cannot build the run's sequence classifier ({hf._first_line(error)})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    load_weights(model, weights)
    return model, tokenizer


def _task(pre: dict, num_outputs: int) -> Any:
    from launcher.tasks import MultiLabelClassification, Regression, SingleLabelClassification

    if pre["problem_type"] == "regression":
        return Regression(num_outputs, target_mean=pre["target_mean"], target_std=pre["target_std"])
    if pre["problem_type"] == "multi_label_classification":
        return MultiLabelClassification(num_outputs)
    return SingleLabelClassification(num_outputs)


def _predict(args: argparse.Namespace) -> None:
    run, output = Path(args.run), Path(args.output)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if not run.exists():
        raise UsageError(f"RUN {run} does not exist")
    from launcher.data.preprocess import read_preprocessing

    pre = read_preprocessing(run)
    weights = _weights_of(run)
    model_name, num_outputs = pre.get("model"), int(pre.get("num_outputs", len(pre.get("class_names", []))))
    text = pre["kind"] == "text"
    if not model_name or (str(model_name).startswith("hf:") and not text):
        raise UsageError(f"{run}: launcher predict scores text runs and the built-in and module:factory "
                         f"models; an hf: image model is read with transformers from final/hf")
    _check_output(output)
    text_columns = list(pre.get("text_columns") or []) if text else []
    if text and Path(args.data).suffix.lower() == ".txt" and len(text_columns) != 1:
        raise UsageError(f"DATA {args.data!r} is a .txt file (one text a line), but the run reads "
                         f"{len(text_columns)} text columns ({', '.join(text_columns)}); pass a csv/parquet/"
                         f"jsonl file with them")
    ds = _load_data(args.data, text_columns[0] if len(text_columns) == 1 else None)
    if text:
        model, tokenizer = _text_model(pre, run, weights, num_outputs)
        dataset = _text_dataset(pre, ds, args.data, tokenizer, num_outputs)
    else:
        dataset = _dataset(pre, ds, args.data)
    labels = _labels(ds, pre.get("label_column"), pre)

    import torch

    from launcher.checkpoint.sharded import load_weights
    from launcher.data import make_loader
    from launcher.loop.accelerator import make_accelerator
    from launcher.loop.prediction import predict
    from launcher.models import build_model

    task = _task(pre, num_outputs)
    if pre["problem_type"] == "regression":
        dataset.labels = torch.zeros(len(ds), num_outputs)
    elif pre["problem_type"] == "multi_label_classification":
        dataset.labels = torch.zeros(len(ds), num_outputs)
    if not text:
        model = build_model(model_name, tuple(pre["input_shape"]), num_outputs)
        load_weights(model, weights)
    accelerator = make_accelerator(seed=0)
    loader = make_loader(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers, seed=0)
    model = accelerator.prepare_model(model.to(accelerator.device), evaluation_mode=True)
    rows = predict(model, loader, task, accelerator=accelerator)
    failure = None
    if rows is not None:  # rank 0
        rows.pop("label", None)  # the dummy targets
        if labels is not None:
            rows["label"] = [labels[i] for i in rows["index"]]
        rows = _named(rows, pre)
        try:
            from launcher.checkpoint.files import write_parquet_atomic

            write_parquet_atomic(output, rows)
            print(f"{PROG}: {len(rows['index'])} rows of {args.data} -> {output} ({accelerator.num_processes} "
                  f"process(es), {weights})")
        except OSError as err:
            failure = f"cannot write --output {output}: {err}"
    from launcher.faults.agreement import first_failing_rank

    if first_failing_rank(failure is not None) is not None:
        raise UsageError(failure or f"cannot write --output {output} (see rank 0)")


def _named(rows: dict[str, list], pre: dict) -> dict[str, list]:
    """index, label (when DATA has it), prediction (a class name), probabilities, then the ids."""
    if pre["problem_type"] == "multi_label_classification":  # ids, then their class names
        names = pre.get("class_names") or []
        out = {k: rows[k] for k in ("index", "label", "prediction", "probabilities") if k in rows}
        out["prediction_names"] = [[names[i] if i < len(names) else str(i) for i in ids] for ids in rows["prediction"]]
        return out
    if pre["problem_type"] != "single_label_classification":
        return {k: rows[k] for k in ("index", "label", "prediction", "probabilities") if k in rows}
    names = pre["class_names"]
    out = {"index": rows["index"]}
    if "label" in rows:
        out["label"] = rows["label"]
    out["prediction"] = [names[i] if i < len(names) else str(i) for i in rows["prediction"]]
    out["probabilities"] = rows["probabilities"]
    if "label" in rows:
        out["label_id"] = [names.index(v) if v in names else None for v in rows["label"]]
    out["prediction_id"] = [int(i) for i in rows["prediction"]]
    return out
