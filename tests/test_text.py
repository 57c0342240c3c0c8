"""Text datasets, model outputs of any shape, keyword inputs and the unused-parameter probe, in-process."""

from __future__ import annotations

import datasets
import pytest
import torch

from launcher.data import load_splits
from launcher.errors import UsageError
from launcher.loop import default_unpack, forward, logits_of
from tests import hf_fixtures

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = hf_fixtures.tiny_bert(tmp_path_factory.mktemp("bert"))
    return transformers.AutoTokenizer.from_pretrained(folder)


def text_options(tokenizer, **kw):
    from launcher.data.text import TextOptions

    return TextOptions(lambda: tokenizer, **kw)


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    """Sentence pairs saved with save_to_disk, train and validation splits, ClassLabel labels."""
    rows = hf_fixtures.sentences(120)
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=list(hf_fixtures.CLASS_WORDS))})
    table = {"premise": [r[0] for r in rows], "hypothesis": [r[0][::-1] for r in rows], "idx": list(range(120)),
             "label": [list(hf_fixtures.CLASS_WORDS).index(r[1]) for r in rows]}
    ds = datasets.Dataset.from_dict(table, features=features)
    folder = tmp_path_factory.mktemp("pairs") / "saved"
    datasets.DatasetDict({"train": ds.select(range(90)), "validation": ds.select(range(90, 120))}).save_to_disk(folder)
    return folder


def test_csv_text_is_tokenized_and_padded_per_batch(tmp_path, tokenizer):
    csv = hf_fixtures.write_text_csv(tmp_path / "s.csv", n=60)
    data = load_splits(str(csv), text=text_options(tokenizer, max_length=6), val_fraction=0.25)
    assert (data.kind, data.num_classes, len(data.train), len(data.val)) == ("text", 3, 45, 15)
    assert data.class_names == ["negative", "neutral", "positive"] and data.preprocessor is tokenizer
    batch = data.train.__getitems__([0, 1, 2, 3])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max() <= 6  # longest in the batch, truncated to --max-length
    first = data.train.__getitems__([0])["input_ids"][0]
    assert torch.equal(batch["input_ids"][0, : len(first)], first)
    inputs, labels = default_unpack(batch)
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask"} and labels.dtype == torch.int64


def test_sentence_pairs_are_detected_and_padded_to_a_multiple_of_8(pair_folder, tokenizer):
    data = load_splits(str(pair_folder), text=text_options(tokenizer, pad_to_multiple_of=8))
    assert (len(data.train), len(data.val), data.val_source) == (90, 30, "split 'validation'")
    batch = data.val.__getitems__(list(range(5)))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["token_type_ids"] == 1).any()  # the second sentence of each pair
    named = load_splits(str(pair_folder), text=text_options(tokenizer), text_columns=["hypothesis"])
    assert not (named.val.__getitems__([0])["token_type_ids"] == 1).any()


def test_text_column_errors_name_the_flag(pair_folder, tmp_path, tokenizer):
    with pytest.raises(UsageError, match="--model hf:NAME_OR_PATH"):
        load_splits(str(pair_folder))
    with pytest.raises(UsageError, match="--text-columns 'nope'"):
        load_splits(str(pair_folder), text=text_options(tokenizer), text_columns=["nope"])
    three = datasets.Dataset.from_dict({"a": ["x y"] * 4, "b": ["y"] * 4, "c": ["z"] * 4, "label": [0, 1] * 2})
    three.to_parquet(tmp_path / "three.parquet")
    with pytest.raises(UsageError, match="--text-columns a,b"):
        load_splits(str(tmp_path / "three.parquet"), text=text_options(tokenizer))


def test_dataset_config_is_passed_to_load_dataset(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None):
        seen.update(path=path, name=name)
        return datasets.Dataset.from_dict({"x": [1.0, 2.0, 3.0, 4.0, 5.0], "label": [0, 1, 0, 1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_splits("nyu-mll/glue", dataset_config="mrpc", val_fraction=0.4)
    assert seen == {"path": "nyu-mll/glue", "name": "mrpc"}
    with pytest.raises(UsageError, match="--dataset-config"):
        load_splits("digits", dataset_config="mrpc")


def test_logits_from_any_output_shape():
    from transformers.modeling_outputs import SequenceClassifierOutput

    logits = torch.randn(3, 4)
    for outputs in (logits, SequenceClassifierOutput(loss=torch.tensor(9.0), logits=logits), {"logits": logits},
                    (logits, torch.zeros(3)), [logits]):
        assert logits_of(outputs) is logits
    with pytest.raises(TypeError, match="cannot find logits"):
        logits_of({"scores": logits})

    class Keywords(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SequenceClassifierOutput(logits=(input_ids * attention_mask).float())

    batch = {"input_ids": torch.ones(2, 3), "attention_mask": torch.zeros(2, 3), "labels": torch.zeros(2)}
    inputs, _ = default_unpack(batch)
    assert torch.equal(forward(Keywords(), inputs), torch.zeros(2, 3))
    single, _ = default_unpack({"image": logits, "label": torch.zeros(3)})  # one input: passed positionally
    assert single is logits


def test_probe_names_unused_parameters_and_leaves_everything_as_it_was():
    from accelerate import Accelerator

    from launcher.checkpoint import capture_rng
    from launcher.loop import per_sample_loss_fn
    from launcher.parallel.unused_parameters import first_batch, unused_parameters

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"body": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                                             torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)),
                                 "aux": torch.nn.Linear(8, 2)})
    model.forward = lambda x: model["body"](x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10) % 3),
                                         batch_size=4, shuffle=True)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = capture_rng()["torch"]
    per_sample = per_sample_loss_fn(torch.nn.CrossEntropyLoss())

    def batch_loss(module, batch):
        inputs, targets = default_unpack(batch)
        return per_sample(forward(module, inputs), targets).mean()

    unused = unused_parameters(model, first_batch(loader), batch_loss, Accelerator(cpu=True))
    assert unused == ["aux.weight", "aux.bias"]
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch-norm statistics too
    assert torch.equal(capture_rng()["torch"], rng)
