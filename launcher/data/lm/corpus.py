"""The embedded default corpus: the .py source files of Python's own standard library.

Always installed, so a language model trains on it with no network and no download. The files
are those under `sysconfig.get_paths()["stdlib"]`, sorted by path, without the test suites (`test/`,
`tests/`, `idle_test/`), installed packages (`site-packages/`, `dist-packages/`) and caches. A file goes to
validation when the SHA-256 of its relative path falls in the validation fraction: the split is fixed
(the same on every rank, machine and run, independent of --seed) and a file never moves when other files
come or go. Its size depends on the Python version (3.11: about 730 files, 12 MB).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import datasets

EXCLUDED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
VAL_PERCENT = 5  # percent of the files (by path hash) that go to validation
NAME = "stdlib"  # --dataset stdlib (the default)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (POSIX) of the corpus files, sorted."""
    root = root or stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_FOLDERS.isdisjoint(relative.parts[:-1]) and path.is_file():
            found.append(relative.as_posix())
    return sorted(found)


def is_validation(relative_path: str, val_percent: int = VAL_PERCENT) -> bool:
    """Whether a file belongs to validation: a fixed function of its path alone."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < val_percent


def split_files(files: list[str], val_percent: int = VAL_PERCENT) -> tuple[list[str], list[str]]:
    train = [f for f in files if not is_validation(f, val_percent)]
    val = [f for f in files if is_validation(f, val_percent)]
    return train, val


def _documents(root: str, files: list[str]) -> Iterator[dict]:
    for relative in files:
        # A few files are not UTF-8 (their coding cookie says so); a replacement character is harmless here.
        text = (Path(root) / relative).read_bytes().decode("utf-8", errors="replace")
        yield {"path": relative, "text": text}


def stdlib_corpus(root: Path | None = None) -> datasets.DatasetDict:
    """The corpus as {"train", "validation"} datasets of documents (columns `path`, `text`).

    Built with `Dataset.from_generator`, which writes the Arrow files into the datasets cache once (keyed by
    the file list): the next run reads them back, and `datasets.map` over them is cached too.
    """
    root = root or stdlib_root()
    train, val = split_files(stdlib_files(root))
    features = datasets.Features({"path": datasets.Value("string"), "text": datasets.Value("string")})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_generator(_documents, features=features,
                                               gen_kwargs={"root": str(root), "files": files})
        for split, files in (("train", train), ("validation", val))
    })


def describe(num_train_files: int, num_val_files: int, train_tokens: int, val_tokens: int) -> str:
    """The corpus line the recipe prints."""
    return (f"corpus: {num_train_files + num_val_files} Python files of the standard library "
            f"({num_train_files} train, {num_val_files} validation), {train_tokens:,} train tokens, "
            f"{val_tokens:,} validation tokens")
