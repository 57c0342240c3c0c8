"""Offline stand-ins for the Hub: a tiny BERT with its tokenizer, a tiny ViT with its image processor, and a
small text dataset whose label is learnable from one word. Each model folder is written by save_pretrained
and loads in a few milliseconds. Also used by bench/hf_text.py."""

from __future__ import annotations

import random
from pathlib import Path

FILLER = ("the a this that movie film story plot actor scene music ending was is felt looked seemed really "
          "very quite rather truly somewhat and but so").split()
CLASS_WORDS = {"negative": ("bad", "awful", "boring"), "neutral": ("okay", "average", "fine"),
               "positive": ("good", "great", "lovely")}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """(sentence, label) pairs of 3 to 11 words; exactly one word says the label."""
    rng = random.Random(seed)
    names = list(CLASS_WORDS)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 10))]
        words.insert(rng.randint(0, len(words)), rng.choice(CLASS_WORDS[label]))
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def write_text_csv(path: Path, n: int = 300, seed: int = 0) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(sentences(n, seed))
    return path


def vocabulary() -> dict[str, int]:
    words = SPECIALS + list(FILLER) + [w for ws in CLASS_WORDS.values() for w in ws]
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def tiny_bert(folder: Path, *, num_labels: int = 2, hidden: int = 32, tokenizer: bool = True,
              dtype: str = "float32") -> Path:
    """A 1-layer BERT classifier (num_labels=2, so a 3-class dataset gets a new head) and its tokenizer,
    its weights saved in `dtype` (as Hub checkpoints often are in bfloat16)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(0)
    vocab = vocabulary()
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(config).to(getattr(torch, dtype)).save_pretrained(folder)
    if tokenizer:
        # transformers 5: a tokenizer is built from its vocabulary with vocab=; vocab_file= is for from_pretrained.
        BertTokenizer(vocab=vocab, model_max_length=64).save_pretrained(folder)
    return folder


def tiny_vit(folder: Path, *, num_labels: int = 10, image_size: int = 12) -> Path:
    """A 1-layer ViT for 1-channel images of image_size (the 8x8 digits get resized) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5], image_std=[0.5]
                      ).save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path, texts: list[str], *, n_positions: int = 64, tokenizer: bool = True) -> Path:
    """A 2-layer GPT-2 built from a config (tied embeddings, as GPT-2) with a byte-level BPE tokenizer
    trained on `texts` (tokenizers' trainer, no download): what `--model hf:` loads."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   model_max_length=n_positions)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(fast), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    if tokenizer:
        fast.save_pretrained(folder)
    return folder
