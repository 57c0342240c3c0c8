"""Tokenizers for language models: bytes for the built-in models, a transformers model's own otherwise.

`ByteTokenizer` maps UTF-8 bytes to ids 0..255 and adds one end-of-text id (256): no vocabulary to train
or download, every text encodes, and decoding never fails (invalid UTF-8 becomes U+FFFD). It answers the
few calls the data pipeline makes of a transformers tokenizer (`__call__` on a batch of texts,
`eos_token_id`, `decode`, `len`), so both kinds go through the same `datasets.map`.
"""

from __future__ import annotations

from typing import Any


BYTE = "byte"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text 256."""

    vocab_size = 257
    eos_token_id = 256
    eos_token = "<|endoftext|>"
    name_or_path = BYTE

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        pieces, current = [], bytearray()
        for token in ids:
            if token == self.eos_token_id:
                pieces.append(current.decode("utf-8", errors="replace"))
                current = bytearray()
                if not skip_special_tokens:
                    pieces.append(self.eos_token)
            else:
                current.append(int(token))
        pieces.append(current.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __call__(self, texts: list[str] | str, **_: Any) -> dict[str, list]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(t) for t in texts]}

    def __repr__(self) -> str:  # datasets fingerprints map() by its arguments; keep this stable
        return "ByteTokenizer()"
