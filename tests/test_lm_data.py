"""launcher.data.lm: the standard-library corpus, the byte tokenizer, group_texts, every text source, the block
datasets under make_loader, and bad input."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from launcher.data import make_loader
from launcher.data.lm import corpus
from launcher.data.lm.blocks import BlockDataset, group_texts, load_documents, load_lm_splits
from launcher.data.lm.tokenizers import ByteTokenizer
from launcher.errors import UsageError

EOS = ByteTokenizer.eos_token_id


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' + '\u20ac'\n"
    ids = tok.encode(text)
    assert len(tok) == 257 and max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode([*tok.encode("a"), EOS, *tok.encode("b")]) == "a<|endoftext|>b"
    assert tok.decode([*tok.encode("a"), EOS], skip_special_tokens=True) == "a"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence decodes, replaced
    assert tok(["ab", ""]) == {"input_ids": [[97, 98], []]}


def test_group_texts_puts_end_of_text_between_documents_and_drops_the_tail():
    out = group_texts({"input_ids": [[1, 2, 3], [], [4, 5]]}, block_size=3, eos_token_id=9)
    # stream 1 2 3 9 4 5 9: two blocks, the partial [9] dropped, the empty document skipped
    assert np.asarray(out["input_ids"]).tolist() == [[1, 2, 3], [9, 4, 5]]
    assert np.asarray(group_texts({"input_ids": [[1]]}, 4, 9)["input_ids"]).size == 0


def test_stdlib_corpus_files_exclude_tests_and_split_by_path(tmp_path):
    for relative in ("a.py", "pkg/b.py", "test/test_a.py", "pkg/tests/t.py", "idlelib/idle_test/x.py",
                     "site-packages/numpy/c.py", "notes.txt"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    assert corpus.stdlib_files(tmp_path) == ["a.py", "pkg/b.py"]
    # The real one: sorted, no tests, split fixed by path and near the documented fraction.
    files = corpus.stdlib_files()
    assert files == sorted(files) and len(files) > 200
    assert not any(set(f.split("/")[:-1]) & corpus.EXCLUDED_FOLDERS for f in files)
    train, val = corpus.split_files(files)
    assert sorted(train + val) == files and not set(train) & set(val)
    assert 0.02 < len(val) / len(files) < 0.10
    assert corpus.split_files(list(reversed(files))) == (train[::-1], val[::-1])  # a function of the path alone
    assert corpus.split_files(files[: len(files) // 2])[1] == [f for f in val if f in files[: len(files) // 2]]


@pytest.fixture(scope="module")
def stdlib_blocks():
    return load_lm_splits("stdlib", ByteTokenizer(), block_size=128)


def test_stdlib_blocks_are_the_corpus_bytes_with_end_of_text_between_files(stdlib_blocks):
    splits = stdlib_blocks
    train_files, val_files = corpus.split_files(corpus.stdlib_files())
    assert (splits.num_train_docs, splits.num_val_docs) == (len(train_files), len(val_files))
    root = corpus.stdlib_root()
    first = [(root / f).read_bytes() for f in train_files[:3]]
    stream = b"".join(first[0:1])
    got = splits.train.blocks[: len(stream) // 128 + 1].reshape(-1)
    assert bytes(got[: len(stream)].astype(np.uint8)) == stream  # the first file, byte for byte
    assert got[len(stream)] == EOS  # then end-of-text, then the second file
    assert bytes(got[len(stream) + 1: len(stream) + 11].astype(np.uint8)) == first[1][:10]
    # Every token of the corpus is in a block except at most one partial block per map batch of files.
    total = sum((root / f).stat().st_size + 1 for f in train_files)
    assert total - 128 * (len(train_files) // 1000 + 1) <= splits.train.token_count() <= total
    line = splits.describe()
    assert line.startswith(f"corpus: {len(train_files) + len(val_files)} Python files of the standard library")
    assert f"{splits.train.token_count():,} train tokens" in line and "validation tokens" in line


def test_blocks_feed_the_elastic_sampler_each_block_once(stdlib_blocks):
    val = stdlib_blocks.val
    batch = val.__getitems__([0, 3])
    assert batch["input_ids"].shape == (2, 128) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["labels"] is not batch["input_ids"]
    import pickle

    copy = pickle.loads(pickle.dumps(val))  # as a DataLoader worker gets it: the cache file, mapped again
    assert len(pickle.dumps(val)) < val.blocks.nbytes // 10 and np.array_equal(copy.blocks, val.blocks)
    small = BlockDataset(val.blocks[:37], 128)
    seen = []
    for rank in range(3):
        loader = make_loader(small, 4, shuffle=True, seed=1, rank=rank, world_size=3)
        loader.batch_sampler.set_epoch(2)
        for b in loader:
            seen += [bytes(row.numpy().astype(np.uint8)) for row in b["input_ids"]]
    assert sorted(seen) == sorted(bytes(row.astype(np.uint8)) for row in small.blocks)


def _write_docs(folder, names_and_texts):
    for name, text in names_and_texts:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_folder_of_text_files_is_one_document_per_file(tmp_path):
    texts = [(f"doc{i}.txt", f"document {i}\n" * 20) for i in range(10)]
    _write_docs(tmp_path, texts)
    docs = load_documents(str(tmp_path), val_fraction=0.2, seed=0)
    assert len(docs.train) + len(docs.val) == 10 and len(docs.val) == 2
    assert sorted(list(docs.train["text"]) + list(docs.val["text"])) == sorted(t for _, t in texts)
    again = load_documents(str(tmp_path), val_fraction=0.2, seed=0)
    assert list(again.val["text"]) == list(docs.val["text"])  # the carve is a function of the seed
    # train/ and validation/ subfolders are the splits.
    split = tmp_path / "split"
    _write_docs(split, [("train/a.md", "aaaa " * 50), ("train/b.md", "bbbb " * 50), ("validation/c.md", "cc " * 50)])
    docs = load_documents(str(split))
    assert sorted(docs.train["text"]) == ["aaaa " * 50, "bbbb " * 50] and list(docs.val["text"]) == ["cc " * 50]
    splits = load_lm_splits(str(split), ByteTokenizer(), block_size=16)
    assert len(splits.train) == (2 * 251) // 16 and len(splits.val) == 151 // 16


def test_hub_parquet_layout_and_other_sources(tmp_path):
    rows = {"id": list(range(40)), "content": [f"row {i} " * 30 for i in range(40)]}
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for shard in range(2):  # as a downloaded Hub dataset lays it out
        pd.DataFrame({k: v[shard * 15:(shard + 1) * 15] for k, v in rows.items()}).to_parquet(
            hub / f"train-0000{shard}-of-00002.parquet")
    pd.DataFrame({k: v[30:] for k, v in rows.items()}).to_parquet(hub / "validation-00000-of-00001.parquet")
    docs = load_documents(str(tmp_path / "hub"))
    assert (len(docs.train), len(docs.val), docs.column) == (30, 10, "content")
    assert docs.val_source == "split 'validation'"
    # save_to_disk folders and json lines with a named column
    datasets.Dataset.from_dict({"body": rows["content"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_documents(str(tmp_path / "saved")).column == "body"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"a": t, "b": "x"}) + "\n" for t in rows["content"]))
    assert load_documents(str(tmp_path / "d.jsonl"), text_column="a").column == "a"


def test_tokenized_once_then_read_from_the_cache(tmp_path):
    _write_docs(tmp_path, [(f"{i}.txt", "tokens " * 100) for i in range(6)])
    first = load_lm_splits(str(tmp_path), ByteTokenizer(), block_size=32)
    second = load_lm_splits(str(tmp_path), ByteTokenizer(), block_size=32)
    assert np.array_equal(first.train.blocks, second.train.blocks)
    cache = [p for p in datasets.config.HF_DATASETS_CACHE.rglob("cache-*.arrow")]
    assert cache  # datasets.map wrote its results to the cache


def test_bad_input_is_one_line(tmp_path):
    pd.DataFrame({"x": [1, 2, 3], "y": [0.5, 1.0, 2.0]}).to_csv(tmp_path / "numbers.csv", index=False)
    with pytest.raises(UsageError, match="no text column found .* name it with --text-column; the dataset's "
                                         "columns: x, y"):
        load_documents(str(tmp_path / "numbers.csv"))
    pd.DataFrame({"a": ["p", "q"], "b": ["r", "s"]}).to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(UsageError, match="no text column found"):
        load_documents(str(tmp_path / "two.csv"))
    with pytest.raises(UsageError, match="--text-column 'c' is not a text column of the dataset; its text "
                                         "columns: a, b"):
        load_documents(str(tmp_path / "two.csv"), text_column="c")
    small = tmp_path / "small"
    _write_docs(small, [("train/a.txt", "x" * 100), ("validation/b.txt", "y" * 100)])
    with pytest.raises(UsageError, match=r"makes 1 block\(s\) of 64 tokens, fewer than the 2 process\(es\)"):
        load_lm_splits(str(small), ByteTokenizer(), block_size=64, world_size=2)
    _write_docs(small, [("train/a.txt", "x" * 300)])
    with pytest.raises(UsageError, match="validation text of .* is shorter than one block of 128 tokens"):
        load_lm_splits(str(small), ByteTokenizer(), block_size=128)
    with pytest.raises(UsageError, match="--block-size must be at least 2"):
        load_lm_splits(str(small), ByteTokenizer(), block_size=1)
    with pytest.raises(UsageError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------------------------------------
# --streaming


def _stream_docs(n: int = 40) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict({"text": [f"doc{i}:" + "ab" * int(rng.integers(0, 40)) for i in range(n)]})


def test_packing_on_the_fly_matches_group_texts_and_resumes_at_any_block():
    from launcher.data.lm.streaming import pack_blocks

    tok = ByteTokenizer()
    texts = list(_stream_docs()["text"]) + [""]
    packed = list(pack_blocks(iter(texts), tok, 16))
    blocks = np.stack([b for b, _ in packed])
    whole = group_texts({"input_ids": [tok.encode(t) for t in texts]}, 16, EOS)["input_ids"]
    assert np.array_equal(blocks, whole)  # the same blocks as group_texts over the whole stream
    for k, (_, (doc, offset)) in enumerate(packed):
        rest = list(pack_blocks(iter(texts[doc:]), tok, 16, start=(doc, offset)))
        assert np.array_equal(np.stack([b for b, _ in rest]) if rest else blocks[:0], blocks[k + 1:]), k
        assert [p for _, p in rest] == [p for _, p in packed[k + 1:]]


def test_streaming_loader_splits_per_rank_and_resumes_mid_epoch():
    from launcher.data.lm.streaming import LMStreamingLoader, LMStreamingTrain

    train = LMStreamingTrain(_stream_docs(), "text", ByteTokenizer(), block_size=16, seed=3, num_shards=4)

    def batches(rank, world, state=None, stop=None):
        loader = LMStreamingLoader(train, 2, rank=rank, world_size=world, device=torch.device("cpu"))
        loader.set_epoch(1)
        if state is not None:
            loader.load_state_dict(state)
        out = []
        for batch in loader:
            assert torch.equal(batch["labels"], batch["input_ids"])
            out.append(batch["input_ids"])
            if stop is not None and len(out) == stop:
                return out, loader.state_dict()
        return out, loader.state_dict()

    whole, end = batches(0, 1)
    assert end["done"] and len(whole) > 4
    assert isinstance(make_loader(train, 2, shuffle=True), LMStreamingLoader)  # what the recipe gets
    head, state = batches(0, 1, stop=3)
    tail, _ = batches(0, 1, state=state)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole)) and len(head) + len(tail) == len(whole)
    # Two ranks read disjoint documents: together, every document's text is in exactly one rank's blocks.
    # (The epoch ends when the first rank runs out, so the other rank's last documents may be unread.)
    joined = [bytes(torch.cat(batches(rank, 2)[0]).flatten().clamp(max=255).numpy().astype(np.uint8))
              for rank in (0, 1)]
    counts = [sum(f"doc{i}:".encode() in j for j in joined) for i in range(40)]
    assert max(counts) == 1 and sum(counts) >= 30
