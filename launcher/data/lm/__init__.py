"""Language-model data: documents of text -> token ids -> fixed blocks of `--block-size` tokens.

- `corpus`: the embedded default corpus, the .py files of Python's own standard library (always installed,
  no network), split into train and validation by file, fixed;
- `tokenizers`: the byte-level tokenizer of the built-in models (256 byte ids and end-of-text) and a
  transformers model's own tokenizer for `hf:` models;
- `blocks`: any text source classify.py reads (text files and folders, `load_dataset` names, save_to_disk
  folders, parquet/json/csv, the Hub's `data/train-*.parquet` layout) tokenized once with `datasets.map`
  and cut into blocks as run_clm's `group_texts` does; `BlockDataset`, a `BatchedDataset` whose batches are
  `{"input_ids", "labels"}`;
- `streaming`: `--streaming`, documents tokenized and packed into blocks on the fly, split per rank,
  resumable mid-epoch.

Labels follow transformers' convention: they are the input ids, and the loss shifts them (position t
predicts token t+1), so a block of T tokens gives T-1 predictions.
"""
