"""The recipe's configuration: one typed dataclass, filled from defaults < YAML file < command line.

Every field carries its help text, so `--help`, the YAML keys and the saved config never drift apart.
Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import secrets
import string
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UsageError
from launcher.faults.timeouts import DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_INIT_TIMEOUT, check_timeouts
from launcher.tasks import PROBLEM_TYPES

# Every validation metric a recipe run can produce, whatever its problem type (launcher.tasks); fit then
# refuses one the run's own task does not produce, before training.
VAL_METRIC_NAMES = ("val_accuracy", "val_loss", "val_precision", "val_recall", "val_f1", "val_f1_micro",
                    "val_f1_macro", "val_exact_match", "val_mae", "val_rmse", "val_r2")

WANDB_LOG_MODEL_CHOICES = ("none", "final", "best", "checkpoints")
# $WANDB_LOG_MODEL as HF Trainer and Lightning users set it, mapped onto --wandb-log-model.
WANDB_LOG_MODEL_ENV = {"end": "final", "true": "final", "1": "final", "checkpoint": "checkpoints",
                       "all": "checkpoints", "false": "none", "0": "none", "": "none", **{
                           c: c for c in WANDB_LOG_MODEL_CHOICES}}
# An --output-dir like s3://bucket/run would become a local folder named "s3:"; refuse it instead.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# What a relaunch (a resume, or --eval-only of a checkpoint) may do with each key; see docs/relaunch.md.
#   fixed:            defines the data, the model or the optimisation: taken from the checkpoint when not
#                     given, refused when given with another value
#   apply:            a later launch may change it; the change applies from now on, with one notice
#   refuse-mid-epoch: applied at an epoch boundary (the schedule is re-planned), refused mid-epoch
#   launch:           says how this launch starts; never compared, never taken from the checkpoint
RELAUNCH_RULES = ("fixed", "apply", "refuse-mid-epoch", "launch")


def _opt(default: Any, help: str, choices: tuple | None = None, relaunch: str = "apply") -> Any:
    assert relaunch in RELAUNCH_RULES, relaunch
    return field(default=default, metadata={"help": help, "choices": choices, "relaunch": relaunch})


option = _opt  # for recipes' own config dataclasses: a field with its help and relaunch rule


@dataclass
class TrainConfig:
    # data
    dataset: str = _opt(
        "digits",
        "'digits' or 'diabetes' (embedded, no network: classification, regression), a local path "
        "(imagefolder/csv/parquet/json/saved datasets folder) or a name for datasets.load_dataset",
        relaunch="fixed",
    )
    dataset_config: str | None = _opt(None, "configuration of a Hub dataset that has several (load_dataset's "
                                            "name=, e.g. mrpc for --dataset glue)", relaunch="fixed")
    image_column: str | None = _opt(None, "column holding the inputs (default: auto-detect)", relaunch="fixed")
    text_columns: list[str] | None = _opt(None, "text column, or two comma-separated for sentence pairs "
                                                "(default: the dataset's one or two string columns)",
                                          relaunch="fixed")
    max_length: int = _opt(128, "text is truncated to this many tokens (--model hf: text models)", relaunch="fixed")
    label_column: str | None = _opt(None, "column holding the labels or targets (default: auto-detect)",
                                    relaunch="fixed")
    problem_type: str | None = _opt(None, "what the label column asks (default: detected from it: integer ids or "
                                          "names -> single label, lists of ids or multi-hot -> multi-label, "
                                          "floats -> regression)", PROBLEM_TYPES, relaunch="fixed")
    val_fraction: float = _opt(0.2, "fraction carved (deterministically, by --seed) for validation "
                                    "when the dataset has no validation split", relaunch="fixed")
    num_workers: int = _opt(0, "DataLoader worker processes per training process")
    streaming: bool = _opt(False, "stream the training split (parquet/arrow shards in DATASET/train/ and a "
                                  "validation split in DATASET/validation/, or a Hub name) instead of indexing it")
    shuffle_buffer: int = _opt(10_000, "rows in the shuffle buffer of --streaming")
    augment: str = _opt("none", "training-time augmentation of image inputs (standard: random resized crop and "
                                "horizontal flip; validation is never augmented)", ("none", "standard"))
    image_size: int | None = _opt(None, "resize every image to SIZE x SIZE (default: the first training image's "
                                        "size)")
    image_mean: list[str] | None = _opt(None, "per-channel mean of image pixels in [0, 1], comma-separated "
                                              "(default: measured on a fixed sample of 512 training images)")
    image_std: list[str] | None = _opt(None, "per-channel std of image pixels in [0, 1], comma-separated "
                                             "(with --image-mean)")
    no_categorical: bool = _opt(False, "tables: refuse string columns instead of one-hot encoding them (the "
                                       "training split's most frequent values, plus one slot for any other)",
                                relaunch="fixed")
    no_impute: bool = _opt(False, "tables: refuse missing numeric values instead of filling them with the "
                                  "training mean plus a missing-value indicator feature", relaunch="fixed")
    # model
    model: str = _opt("mlp", "mlp, cnn, resnet, module.path:factory (called with input_shape, num_classes), or "
                             "hf:NAME_OR_PATH (a transformers image or text classifier, pip install -e '.[hf]')",
                      relaunch="fixed")
    find_unused_parameters: str = _opt("auto", "DDP and parameters the loss does not reach: auto (found by one "
                                               "probe step before training), on, off, or static (static_graph)",
                                       ("auto", "on", "off", "static"))
    # optimisation
    epochs: int = _opt(10, "number of epochs")
    batch_size: int = _opt(64, "batch size per process", relaunch="refuse-mid-epoch")
    eval_batch_size: int | None = _opt(None, "evaluation batch size per process (default: --batch-size)")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)", relaunch="fixed")
    weight_decay: float = _opt(0.01, "AdamW weight decay, on matrices and embeddings (parameters of 2 or more "
                                     "dimensions); biases and norm weights get none", relaunch="fixed")
    decay_all: bool = _opt(False, "weight decay on every parameter, biases and norm weights too (one optimizer "
                                  "group)", relaunch="fixed")
    scheduler: str = _opt("cosine", "learning-rate schedule", ("cosine", "constant", "plateau"),
                          relaunch="fixed")
    warmup_steps: int = _opt(0, "linear warm-up, in optimizer steps (cosine/constant)", relaunch="fixed")
    plateau_patience: int = _opt(2, "epochs without improvement before --scheduler plateau cuts the LR",
                                 relaunch="fixed")
    plateau_factor: float = _opt(0.5, "factor --scheduler plateau multiplies the LR by", relaunch="fixed")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)",
                           relaunch="refuse-mid-epoch")
    max_grad_norm: float | None = _opt(1.0, "clip gradients to this global norm (0 or omitted: no clipping)")
    ema: float | None = _opt(None, "keep an exponential moving average of the weights with this decay, e.g. 0.999 "
                                   "(default: off): validated as val_ema_*, final/ holds the EMA weights "
                                   "(docs/callbacks.md); not with FSDP yet", relaunch="fixed")
    deterministic: bool = _opt(False, "deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN "
                                      "deterministic without benchmark, CUBLAS_WORKSPACE_CONFIG): what makes a "
                                      "GPU run and its resume repeat bit for bit; slower (docs/checkpoints.md)")
    # One seed for the split and the weights: a relaunch keeps it (the split must not move under a run).
    seed: int = _opt(0, "seed for weights, data order and the validation split", relaunch="fixed")
    # validation, early stopping, best checkpoint
    best_metric: str | None = _opt(None, "validation metric for early stopping, plateau LR and the best "
                                         "checkpoint (default: the task's: val_accuracy, val_f1_micro for "
                                         "multi-label, val_loss for regression)", VAL_METRIC_NAMES, relaunch="fixed")
    best_mode: str | None = _opt(None, "whether --best-metric improves upward or downward (default: the "
                                       "metric's own direction)", ("max", "min"), relaunch="fixed")
    early_stopping_patience: int | None = _opt(None, "stop after this many epochs without improvement")
    # output, checkpoints, resume
    output_dir: str | None = _opt(None, "where metrics, checkpoints and final weights go, a local folder (default: "
                                        "runs/<time>-<random>; runs/<sweep id>/<run id> under a W&B sweep)",
                                  relaunch="launch")
    resume: str = _opt("auto", "'auto' (newest valid checkpoint in --output-dir, else start fresh), "
                               "'never' (refuse a non-empty --output-dir) or a checkpoint folder",
                       relaunch="launch")
    save_every_steps: int | None = _opt(None, "also checkpoint every N optimizer steps (mid-epoch)")
    keep_last: int = _opt(3, "number of newest checkpoints to keep (the best one is always kept)")
    eval_only: bool = _opt(False, "evaluate the weights of --resume CHECKPOINT_DIR and write eval.json",
                           relaunch="launch")
    predictions: str | None = _opt(None, "with --eval-only: write one row per validation sample (index, label, "
                                         "prediction, probabilities) to this .parquet file", relaunch="launch")
    force: bool = _opt(False, "train even when another live run holds --output-dir (its claim is broken, "
                              "with a warning; see docs/faults.md)", relaunch="launch")
    accept_data_change: bool = _opt(False, "relaunch on data that changed under the same --dataset since the run "
                                           "started (refused otherwise); the change is recorded in config.json "
                                           "(docs/relaunch.md)", relaunch="launch")
    log_every: int = _opt(50, "log the training loss every N optimizer steps")
    # faults
    collective_timeout: float = _opt(DEFAULT_COLLECTIVE_TIMEOUT,
                                     "seconds a training step may stall (a rank stopped, a collective hung) "
                                     "before the job ends naming the stalled rank, exit 76")
    init_timeout: float = _opt(DEFAULT_INIT_TIMEOUT,
                               "seconds start-up (rendezvous, data preparation, the first step and its "
                               "compilation), validation and a checkpoint write may stall; at least "
                               "--collective-timeout")
    # W&B
    wandb_mode: str | None = _opt(None, "online, offline or disabled (default: online when W&B credentials "
                                        "are configured, otherwise offline)", ("online", "offline", "disabled"))
    wandb_project: str | None = _opt(None, "W&B project (default: $WANDB_PROJECT or 'launcher')")
    wandb_entity: str | None = _opt(None, "W&B entity (default: $WANDB_ENTITY)")
    wandb_group: str | None = _opt(None, "W&B group, e.g. the sweep or experiment name")
    wandb_tags: list[str] | None = _opt(None, "W&B tags (comma-separated on the command line)")
    wandb_name: str | None = _opt(None, "W&B run name (default: the output folder's name)")
    wandb_job_type: str | None = _opt(None, "W&B job type (default: train, or eval with --eval-only)")
    wandb_log_model: str | None = _opt(None, "model artifacts to W&B: none, final (final/), best (the best "
                                             "checkpoint, alias best) or checkpoints (every checkpoint as it is "
                                             "saved, and final/) (default: $WANDB_LOG_MODEL as HF reads it, else "
                                             "none)", WANDB_LOG_MODEL_CHOICES)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "keep_last": self.keep_last, "shuffle_buffer": self.shuffle_buffer,
                    "max_length": self.max_length}
        if self.eval_batch_size is not None:
            positive["eval_batch_size"] = self.eval_batch_size
        if self.save_every_steps is not None:
            positive["save_every_steps"] = self.save_every_steps
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{_flag(name)} must be at least 1 (got {value})")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be between 0 and 1 (got {self.val_fraction})")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive (got {self.lr})")
        if self.num_workers < 0 or self.warmup_steps < 0:
            raise UsageError("--num-workers and --warmup-steps cannot be negative")
        if self.warmup_steps and self.scheduler == "plateau":
            raise UsageError("--warmup-steps works with --scheduler cosine or constant, not plateau")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise UsageError("--early-stopping-patience must be at least 1")
        if not 0.0 < self.plateau_factor < 1.0:
            raise UsageError(f"--plateau-factor must be between 0 and 1: the LR is multiplied by it on a plateau "
                             f"(got {self.plateau_factor})")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise UsageError(f"--max-grad-norm must be 0 (no clipping) or positive (got {self.max_grad_norm})")
        if not self.weight_decay >= 0 or self.plateau_patience < 0:
            raise UsageError("--weight-decay and --plateau-patience cannot be negative")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise UsageError(f"--ema must be between 0 and 1, e.g. 0.999 (got {self.ema})")
        if not math.isfinite(self.lr):
            raise UsageError(f"--lr must be a finite number (got {self.lr})")
        check_timeouts(self.collective_timeout, self.init_timeout)
        self.log_model()  # a bad $WANDB_LOG_MODEL fails here, before anything is written
        if self.output_dir and _URL.match(self.output_dir):
            raise UsageError(f"--output-dir {self.output_dir}: remote storage is not supported yet; give a local "
                             f"(or mounted) folder and copy the run afterwards")
        if self.text_columns is not None and len(self.text_columns) not in (1, 2):
            raise UsageError(f"--text-columns takes one column or two (a sentence pair), got "
                             f"{','.join(self.text_columns)!r}")
        if self.eval_only and self.resume in ("auto", "never"):
            raise UsageError("--eval-only needs --resume CHECKPOINT_DIR naming the weights to evaluate")
        if self.predictions is not None and not (self.eval_only and self.predictions.endswith(".parquet")):
            raise UsageError("--predictions FILE.parquet goes with --eval-only (it writes the evaluated split's "
                             "predictions)")
        if self.force and self.eval_only:
            raise UsageError("--force takes over a folder for training; --eval-only claims nothing, drop --force")
        for name, f in _fields(type(self)).items():
            meta = f.metadata
            if meta.get("choices") and getattr(self, name) is not None and getattr(self, name) not in meta["choices"]:
                raise UsageError(f"--{_flag(name)} must be one of {', '.join(meta['choices'])} "
                                 f"(got {getattr(self, name)!r})")

    def resolved_output_dir(self, environ: typing.Mapping[str, str] = os.environ) -> Path:
        """--output-dir, else runs/<sweep id>/<run id> under a W&B sweep agent, else runs/<time>-<random>:
        the suffix keeps launches started in the same second (an array of sweep agents) apart."""
        if self.output_dir:
            return Path(self.output_dir)
        if environ.get("WANDB_SWEEP_ID") and environ.get("WANDB_RUN_ID"):
            return Path("runs") / environ["WANDB_SWEEP_ID"] / environ["WANDB_RUN_ID"]
        suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(4))
        return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"

    def log_model(self, environ: typing.Mapping[str, str] = os.environ) -> str:
        """--wandb-log-model, else $WANDB_LOG_MODEL (HF's end/checkpoint/false), else none."""
        if self.wandb_log_model:
            return self.wandb_log_model
        value = environ.get("WANDB_LOG_MODEL", "").strip().lower()
        if value not in WANDB_LOG_MODEL_ENV:
            raise UsageError(f"WANDB_LOG_MODEL={value!r} is not understood; use one of "
                             f"{', '.join(WANDB_LOG_MODEL_ENV)}")
        return WANDB_LOG_MODEL_ENV[value]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The functions below serve any recipe's config dataclass built with `_opt` fields (`cls`), TrainConfig
# (recipes/classify.py) by default.


def _fields(cls: type | None = None) -> dict[str, dataclasses.Field]:
    """The keys a recipe takes: its dataclass's fields, less the `not_flags` it inherits but has no use for
    (recipes/lm.py has no image or label columns)."""
    cls = cls or TrainConfig
    dropped = getattr(cls, "not_flags", ())
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in dropped}


def _field_types(cls: type | None = None) -> dict[str, Any]:
    return typing.get_type_hints(cls or TrainConfig)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """int | None -> int; list[str] | None -> list."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return typing.get_origin(base) or base


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("none", "null", ""):
            return None
        if kind is list:
            return [t for t in text.split(",") if t]
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2 at the entry point) instead of printing usage."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


# --help in sections: each starts at this field and runs to the next section's (fields keep the dataclass order,
# so a new field joins the section it is declared in).
HELP_SECTIONS = {"dataset": "data", "model": "model", "epochs": "optimisation",
                 "best_metric": "validation, early stopping and the best checkpoint",
                 "output_dir": "output, checkpoints and resume", "collective_timeout": "faults",
                 "wandb_mode": "tracking (W&B)"}


_METAVARS = {int: "N", float: "X", list: "A,B"}


class _Switch(argparse.Action):
    """A boolean flag: `--streaming` alone sets it; `--streaming=false` (what a W&B sweep agent writes for a
    boolean parameter) and YAML `streaming: false` still work."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", const=True, type=_parse_bool, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None):
        setattr(namespace, self.dest, values)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Switches shown as plain flags (`--streaming`, not `--streaming [STREAMING]`)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _Switch):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def build_parser(description: str | None = None, cls: type | None = None) -> argparse.ArgumentParser:
    """Every field as `--its-name`, and hidden as `--its_name` too (sweep files and HF users write
    underscores; `--batch_size=32` and `--batch-size 32` fill the same key)."""
    parser = _Parser(description=description, formatter_class=_HelpFormatter,
                     usage="%(prog)s [--config FILE.yaml] [--flag VALUE ...]  (flags below; --help)")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of defaults; command-line flags win")
    hints = _field_types(cls)
    group: Any = parser
    for name, f in _fields(cls).items():
        if name in HELP_SECTIONS:
            group = parser.add_argument_group(HELP_SECTIONS[name])
        kind = _base_type(hints[name])
        help_text = f.metadata["help"]
        if "(default" not in help_text and kind is not bool:
            help_text += f" (default: {f.default})"
        if kind is bool:
            options: dict[str, Any] = {"action": _Switch}
        else:
            options = {"type": _parse_optional(kind), "choices": f.metadata.get("choices"),
                       "metavar": _METAVARS.get(kind) if not f.metadata.get("choices") else None}
        group.add_argument(f"--{_flag(name)}", dest=name, default=argparse.SUPPRESS, help=help_text, **options)
        if "_" in name:
            group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                               **options)
    return parser


def load_yaml(path: str, cls: type | None = None) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UsageError(f"cannot read config file {path}: {err.strerror}; check the --config path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise UsageError(f"config file {path} is not valid YAML ({first}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    known = _fields(cls)
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"unknown key {key!r} in {path}; valid keys are: {', '.join(known)}")
        values[name] = value
    return values


def _coerce(name: str, value: Any, cls: type | None = None) -> Any:
    """Type-check a YAML value against the field's annotation.

    A string is parsed exactly as the command line parses it: YAML 1.1 reads `lr: 3e-4` (no dot) as the
    string '3e-4', and `epochs: "5"` is a string too.
    """
    if value is None:
        return None
    kind = _base_type(_field_types(cls)[name])
    if isinstance(value, str) and kind in (int, float, bool):
        parse = _parse_bool if kind is bool else _parse_optional(kind)
        try:
            return parse(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise UsageError(f"config key {name!r} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, str):
        return [t for t in value.split(",") if t]
    if kind is list and isinstance(value, list):
        return [str(v) for v in value]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"config key {name!r} must be {kind.__name__}, got {value!r}")
    return value


def parse_values(argv: list[str] | None = None, description: str | None = None,
                 cls: type | None = None) -> dict[str, Any]:
    """The keys given explicitly (--config FILE.yaml < command-line flags), typed; defaults left out.

    A relaunch needs to know what was given: keys not given come from the checkpoint (launcher.checkpoint.relaunch).
    """
    args = vars(build_parser(description, cls).parse_args(argv))
    config_file = args.pop("config", None)
    values = {k: _coerce(k, v, cls) for k, v in load_yaml(config_file, cls).items()} if config_file else {}
    values.update(args)
    return values


def parse_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """defaults < --config FILE.yaml < command-line flags. Raises UsageError on any bad input."""
    return TrainConfig(**parse_values(argv, description))


def relaunch_rule(name: str, cls: type | None = None) -> str:
    """The key's rule for a relaunch (see RELAUNCH_RULES)."""
    return next(f for f in dataclasses.fields(cls or TrainConfig) if f.name == name).metadata.get("relaunch", "apply")


def wandb_credentials_configured() -> bool:
    """True when W&B could log online: an API key in the environment or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
