"""`--model hf:NAME_OR_PATH`: transformers classifiers and causal LMs, their preprocessing and their export.

- `load_model` picks AutoModelForImageClassification or AutoModelForSequenceClassification from the data,
  with the dataset's class names as `id2label`/`label2id`. A checkpoint whose head has another number of
  classes gets a new head (`ignore_mismatched_sizes`), said in one line.
- `load_causal_lm` is AutoModelForCausalLM for recipes/lm.py, from weights or (`--from-scratch`) a config;
  `load_lm_tokenizer` its tokenizer (or the built-in byte tokenizer).
- `load_tokenizer` is the model's own tokenizer, for text datasets (launcher.data.text tokenizes with it).
- `with_image_processor` makes image batches the way the model's image processor would: its size, its
  rescaling and its mean/std instead of the dataset's own standardization.
- `exporter` writes final/hf/ with `save_pretrained` (weights, config with the label names, tokenizer or
  image processor), so `from_pretrained("runs/.../final/hf")` works and the folder can go to the Hub as is.

transformers is an optional dependency (`pip install -e ".[hf]"`); it is imported only for `hf:` models.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from launcher.data.batched import BatchedDataset
from launcher.errors import UsageError

PREFIX = "hf:"
_NAMED = 4  # keys named in a notice
_TOKENIZER_FILES = "tokenizer.json, or vocab.txt with tokenizer_config.json"


def is_hf(spec: str) -> bool:
    return spec.startswith(PREFIX)


def model_name(spec: str) -> str:
    """NAME_OR_PATH of 'hf:NAME_OR_PATH', after checking that transformers can be imported."""
    name = spec[len(PREFIX):]
    if not name:
        raise UsageError("--model hf: needs a model name or folder after 'hf:' (e.g. hf:google/vit-base-patch16-224)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError(f'--model {spec} needs transformers: pip install -e ".[hf]"') from None
    return name


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers load reports or progress bars: the launcher says what matters in its own lines."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _config(name: str) -> Any:
    from transformers import AutoConfig

    try:
        with _quiet():
            return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--model hf:{name}: no transformers model there ({_first_line(error)}); name a folder "
                         f"written by save_pretrained (config.json and weights) or a model on the Hub") from None


def load_model(name: str, data: Any, notice: Callable[[str], None] = print) -> torch.nn.Module:
    """The classifier for `data` (launcher.data.DataSplits): image or text, with its class names."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = {"image": AutoModelForImageClassification, "text": AutoModelForSequenceClassification}.get(data.kind)
    if auto is None:
        raise UsageError(f"--model hf:{name} takes images or text, but dataset {data.name} is {data.kind}; "
                         f"use --model mlp for tabular data")
    config = _config(name)
    labels = dict(enumerate(data.class_names))
    try:
        with _quiet():
            model, info = auto.from_pretrained(
                name, num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
                # transformers' own name for the task, so final/hf/ round-trips (pipelines, its own loss)
                problem_type=getattr(data, "problem_type", "single_label_classification"),
                ignore_mismatched_sizes=True, output_loading_info=True,
                # transformers 5 loads in the checkpoint's dtype by default ("auto"): a bf16/fp16 checkpoint would
                # train with AdamW on half-precision weights, and fp16 mixed precision would refuse to unscale
                # fp16 gradients. Master weights are float32; mixed precision comes from the accelerate config.
                dtype=torch.float32)
    except ValueError as error:  # a config class this auto class does not know
        raise UsageError(f"--model hf:{name} is a {config.model_type} model, which transformers cannot build "
                         f"as {auto.__name__} for this {data.kind} dataset ({_first_line(error)[:120]})") from None
    except OSError as error:
        raise UsageError(f"--model hf:{name}: cannot load its weights ({_first_line(error)})") from None
    mismatched = sorted(k for k, *_ in info.get("mismatched_keys", ()))
    missing = sorted(info.get("missing_keys", ()))
    regression = getattr(data, "problem_type", None) == "regression"
    if mismatched:
        outputs = f"{len(labels)} target(s)" if regression else f"{len(labels)} classes"
        notice(f"hf:{name}: new head for {outputs} (the checkpoint's has another size): {_names(mismatched)} "
               f"re-initialised")
    if regression:
        # The model learns standardized targets: final/hf/config.json says how to get back to the label's
        # units (prediction * target_std + target_mean), which transformers keeps as extra config attributes.
        model.config.target_mean = [float(v) for v in data.target_mean]
        model.config.target_std = [float(v) for v in data.target_std]
    if missing:
        notice(f"hf:{name}: not in the checkpoint, initialised from scratch: {_names(missing)}")
    tokenizer = data.preprocessor if data.kind == "text" else None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    return model


def load_causal_lm(name: str, tokenizer: Any, *, from_scratch: bool = False,
                   notice: Callable[[str], None] = print) -> torch.nn.Module:
    """AutoModelForCausalLM from `name`'s weights, or (`from_scratch`) built from its config with fresh
    weights (pretraining a transformers architecture). Embeddings smaller than the tokenizer's vocabulary
    are resized, as run_clm does."""
    from transformers import AutoModelForCausalLM

    config = _config(name)
    try:
        with _quiet():
            if from_scratch:
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            else:  # float32 master weights whatever the checkpoint's dtype (see load_model)
                model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except ValueError as error:  # a config class AutoModelForCausalLM does not know (an encoder, a classifier)
        raise UsageError(f"--model hf:{name} is a {config.model_type} model, which transformers cannot build as "
                         f"a causal language model ({_first_line(error)[:120]})") from None
    except OSError as error:
        raise UsageError(f"--model hf:{name}: cannot load its weights ({_first_line(error)}); "
                         f"--from-scratch trains one from its config instead") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        notice(f"hf:{name}: embeddings resized to the tokenizer's {len(tokenizer)} tokens")
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _names(keys: Sequence[str]) -> str:
    return ", ".join(keys[:_NAMED]) + (f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else "")


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer; a folder without one is an error (transformers 5 would build an empty one)."""
    from transformers import AutoTokenizer

    _config(name)
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--model hf:{name} has no tokenizer for the dataset's text ({_first_line(error)}); "
                         f"save one next to the model with tokenizer.save_pretrained") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise UsageError(f"--model hf:{name} has no tokenizer for the dataset's text (no vocabulary: "
                         f"{_TOKENIZER_FILES}); save one next to the model with tokenizer.save_pretrained")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-style tokenizers: batches still need padding
    return tokenizer


def load_lm_tokenizer(name: str) -> Any:
    """`byte`, or a transformers tokenizer (a folder or Hub name) that has an end-of-text token."""
    from launcher.data.lm.tokenizers import BYTE, ByteTokenizer

    if name == BYTE:
        return ByteTokenizer()
    tokenizer = load_tokenizer(name)
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {name} has no end-of-text token (eos_token) to separate documents; "
                         f"set one (tokenizer.eos_token = ...) and save it with save_pretrained")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Images the way the model's image processor makes them


def with_image_processor(data: Any, name: str, notice: Callable[[str], None] = print) -> Any:
    """`data` (image DataSplits) with batches resized, rescaled and normalized as the model's image processor
    says (size, rescale factor, mean, std), or resized to the model's image_size if it has none."""
    from transformers import AutoImageProcessor

    config = _config(name)
    channels = getattr(config, "num_channels", data.input_shape[0])
    if data.input_shape[0] not in (1, channels):
        raise UsageError(f"--model hf:{name} takes {channels}-channel images; dataset {data.name} has "
                         f"{data.input_shape[0]} channels")
    try:
        with _quiet():
            processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = None
    if processor is None:
        side = getattr(config, "image_size", data.input_shape[1:])
        size = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
        notice(f"hf:{name} has no image processor (preprocessor_config.json): images are resized to {size} and "
               f"keep the dataset's standardization")
        target = Normalization(size, 1.0, data.mean, data.std)
    else:
        target = processor_normalization(processor, channels)
    source = Normalization(tuple(data.input_shape[1:]), 1.0, data.mean, data.std)
    data.train = ProcessedImages(data.train, source, target, channels)
    data.val = ProcessedImages(data.val, source, target, channels)
    data.input_shape = (channels, *target.size)
    data.mean, data.std, data.preprocessor = list(target.mean), list(target.std), processor
    return data


class Normalization:
    """How pixels in [0, 1] become model inputs: resized to `size`, times `scale`, minus mean, over std."""

    def __init__(self, size: tuple[int, int], scale: float, mean: Sequence[float], std: Sequence[float]):
        self.size, self.scale = (int(size[0]), int(size[1])), float(scale)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.mean_t = torch.tensor(self.mean).view(-1, 1, 1)
        self.std_t = torch.tensor(self.std).view(-1, 1, 1)


def processor_normalization(processor: Any, channels: int) -> Normalization:
    """Size (center crop if it crops, else resize), rescaling and mean/std of a transformers image processor."""
    size = _as_dict(processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size)
    if size.get("height") and size.get("width"):
        hw = (size["height"], size["width"])
    elif size.get("shortest_edge"):
        hw = (size["shortest_edge"], size["shortest_edge"])
    else:
        raise UsageError(f"cannot read an image size from the image processor's size {size}; "
                         f"give it height and width")
    # The launcher's pixels are uint8 / 255; a processor rescales uint8 by rescale_factor (1/255 usually).
    scale = 255.0 * processor.rescale_factor if getattr(processor, "do_rescale", True) else 255.0
    mean, std = [0.0] * channels, [1.0] * channels
    if getattr(processor, "do_normalize", True):
        mean, std = _per_channel(processor.image_mean, channels), _per_channel(processor.image_std, channels)
    return Normalization(hw, scale, mean, std)


def _as_dict(size: Any) -> dict:
    if isinstance(size, dict):
        return size
    return {k: getattr(size, k, None) for k in ("height", "width", "shortest_edge")}


def _per_channel(values: Any, channels: int) -> list[float]:
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    return values * channels if len(values) == 1 else values[:channels]


class ProcessedImages(BatchedDataset):
    """A batched image dataset (standardized by launcher.data) re-made into the model's inputs, per batch."""

    def __init__(self, base: Dataset, source: Normalization, target: Normalization, channels: int):
        self.base, self.source, self.target, self.channels = base, source, target, channels

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.base.__getitems__(indices)
        if not len(labels):  # a rank's empty share of a short last training batch: the model's input shape
            return inputs.new_zeros((0, self.channels, *self.target.size)), labels
        pixels = inputs * self.source.std_t + self.source.mean_t  # back to [0, 1]
        if pixels.shape[1] != self.channels:
            pixels = pixels.expand(-1, self.channels, -1, -1)  # grayscale to the model's channels
        if tuple(pixels.shape[-2:]) != self.target.size:
            pixels = torch.nn.functional.interpolate(pixels, size=self.target.size, mode="bilinear",
                                                     align_corners=False, antialias=True)
        if self.target.scale != 1.0:
            pixels = pixels * self.target.scale
        return (pixels - self.target.mean_t) / self.target.std_t, labels


# ---------------------------------------------------------------------------------------------------------
# final/hf/


def exporter(preprocessor: Any) -> Callable[[torch.nn.Module, dict, Path], None]:
    """`fit`'s export_final: final/hf/ by save_pretrained (written to a temporary folder, then renamed)."""

    def export(model: torch.nn.Module, weights: dict, final: Path) -> None:
        target, tmp = final / "hf", final / ".hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet():
            model.save_pretrained(tmp, state_dict={k: v.detach().cpu() for k, v in weights.items()})
            if preprocessor is not None:
                preprocessor.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    return export
