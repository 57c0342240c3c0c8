"""A cheap fingerprint of a run's data, recorded beside `--dataset` so that a relaunch notices data that
changed under the same name (docs/relaunch.md).

- A local file or folder: every file's relative path, size and modification time (`st_mtime_ns`), walked
  once, hashed into one short digest (`listing`); when the files total at most CONTENT_LIMIT bytes their
  contents are hashed too (`content`), so a copy that only renewed the modification times is still the
  same data. Hidden files and folders (a leading dot) and `__pycache__` are left out, as the loaders do.
- The embedded datasets: digits and diabetes, the version of scikit-learn that ships them and the sizes
  of their files; `stdlib` (recipes/lm.py), the Python version and the corpus files with their sizes.
- A Hub name: the revision (commit) the Hugging Face cache holds for it (`refs/main`), when it holds one;
  otherwise nothing that can be compared (`revision` None).

`data_change(old, new)` says in a few words what differs, or None when the data is the same (or when
there is nothing to compare: a run recorded before fingerprints, a Hub dataset without a cached revision).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

CONTENT_LIMIT = 32 * 2**20  # contents are hashed too when all the files together are at most this big
ENTRIES_LIMIT = 256  # up to this many files, each one's size and time is kept, to say which ones changed
EMBEDDED_FILES = {"digits": ("digits",), "diabetes": ("diabetes",)}  # sklearn/datasets/data/<prefix>*
SKIPPED_FOLDERS = frozenset({"__pycache__"})


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def data_fingerprint(dataset: str, dataset_config: str | None = None) -> dict[str, Any]:
    """The fingerprint of `--dataset` as the recipes resolve it (embedded name, local path, Hub name)."""
    if dataset in EMBEDDED_FILES:
        return _embedded(dataset)
    path = Path(dataset).expanduser()
    if path.exists():
        return local_fingerprint(path)
    from launcher.data.lm.corpus import NAME as STDLIB

    if dataset == STDLIB:
        return _stdlib()
    return _hub(dataset, dataset_config)


def list_files(path: Path) -> list[tuple[str, int, int]]:
    """(relative POSIX path, size, mtime_ns) of every file under `path` (or of `path` itself), sorted."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)  # follows a link to the file it names
            except OSError:  # a dangling link: not data any loader reads
                continue
            found.append((Path(full).relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(found)


def local_fingerprint(path: Path) -> dict[str, Any]:
    files = list_files(path)
    total = sum(size for _, size, _ in files)
    found: dict[str, Any] = {
        "source": "file" if path.is_file() else "folder", "path": str(path), "files": len(files), "bytes": total,
        "listing": _digest([f"{name}\0{size}\0{mtime}" for name, size, mtime in files]),
        "content": _content(path, files) if total <= CONTENT_LIMIT else None,
    }
    if len(files) <= ENTRIES_LIMIT:
        found["entries"] = {name: [size, mtime] for name, size, mtime in files}
    return found


def _content(path: Path, files: list[tuple[str, int, int]]) -> str | None:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(name.encode() + b"\0")
        try:
            with open(path / name if path.is_dir() else path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            return None
    return digest.hexdigest()[:16]


def _embedded(name: str) -> dict[str, Any]:
    """digits/diabetes: the scikit-learn version and its data files' sizes (found without importing it)."""
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    spec = importlib.util.find_spec("sklearn")
    sizes = []
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        data = Path(folder) / "datasets" / "data"
        if data.is_dir():
            sizes = sorted((p.name, p.stat().st_size) for p in data.iterdir()
                           if p.is_file() and p.name.startswith(EMBEDDED_FILES[name]))
            break
    return {"source": "embedded", "name": name, "version": f"scikit-learn {version}", "files": len(sizes),
            "bytes": sum(s for _, s in sizes), "listing": _digest([f"{n}\0{s}" for n, s in sizes])}


def _stdlib() -> dict[str, Any]:
    """The standard-library corpus: the Python version and the corpus files with their sizes (not their
    times: a reinstalled Python of the same version has the same corpus). Walked with the excluded folders
    pruned (site-packages is most of the tree), so it takes milliseconds."""
    from launcher.data.lm.corpus import EXCLUDED_FOLDERS, stdlib_root

    root = stdlib_root()
    sizes = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_FOLDERS]
        for name in files:
            full = os.path.join(folder, name)
            if name.endswith(".py") and os.path.isfile(full):
                sizes.append((Path(full).relative_to(root).as_posix(), os.stat(full).st_size))
    sizes.sort()
    return {"source": "embedded", "name": "stdlib", "version": f"Python {sys.version.split()[0]}",
            "files": len(sizes), "bytes": sum(s for _, s in sizes),
            "listing": _digest([f"{n}\0{s}" for n, s in sizes])}


def _hub(name: str, config: str | None) -> dict[str, Any]:
    """The commit the local Hugging Face cache holds for a Hub dataset (None when it holds none)."""
    revision = None
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="dataset") / "refs" / "main"
        revision = ref.read_text().strip() or None
    except (ImportError, OSError, ValueError):
        pass
    return {"source": "hub", "name": name, "config": config, "revision": revision}


_TAKEN: dict[tuple[str, str | None], dict[str, Any]] = {}  # this launch's, so that a folder is walked once


def forget_launch_fingerprints() -> None:
    """A new launch in this process (launcher.loop.launch, a sweep agent calling main again): take them anew."""
    _TAKEN.clear()


def launch_fingerprint(dataset: str, dataset_config: str | None = None, *, again: bool = False) -> dict[str, Any]:
    """`data_fingerprint` taken once per launch by rank 0 and broadcast to every rank (nodes may see a shared
    file system's times differently). `again`: a Hub revision is read anew (loading may have fetched a newer
    one); local files are not walked twice."""
    key = (dataset, dataset_config)
    found = _TAKEN.get(key)
    if found is not None and not (again and found.get("source") == "hub"):
        return found
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    answer: list[Any] = [data_fingerprint(dataset, dataset_config) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    _TAKEN[key] = answer[0]
    return answer[0]


def _count(n: int, what: str) -> str:
    return f"{n} file{'s' if n != 1 else ''}{' ' + what if what else ', '}"


def data_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in a few words; None when the data is the same or when there
    is nothing to compare."""
    if not old:
        return None
    if old.get("source") != new.get("source") and {old.get("source"), new.get("source")} != {"file", "folder"}:
        return f"it was a {old.get('source')} dataset and is now a {new.get('source')} one"
    if new.get("source") == "hub":
        before, after = old.get("revision"), new.get("revision")
        if before and after and before != after:
            return f"revision {before[:12]} -> {after[:12]}"
        return None
    if old.get("listing") == new.get("listing") and old.get("source") == new.get("source"):
        return None
    if old.get("content") and old.get("content") == new.get("content"):
        return None  # the same bytes under new modification times (copied again, touched)
    totals = (f"{_count(old.get('files', 0), '')}{old.get('bytes', 0):,} bytes -> "
              f"{_count(new.get('files', 0), '')}{new.get('bytes', 0):,} bytes")
    if new.get("source") == "embedded":
        versions = f"{old.get('version')} -> {new.get('version')}; " if old.get("version") != new.get("version") else ""
        return f"{versions}its files differ: {totals}"
    before, after = old.get("entries"), new.get("entries")
    if before is None or after is None:
        return f"sizes/mtimes differ: {totals}"
    resized = [n for n in after if n in before and after[n][0] != before[n][0]]
    touched = [n for n in after if n in before and after[n][0] == before[n][0] and after[n][1] != before[n][1]]
    added, removed = [n for n in after if n not in before], [n for n in before if n not in after]
    parts = [_count(len(names), what) for names, what in (
        (resized, "of another size"), (touched, "with a new modification time"), (added, "added"),
        (removed, "removed")) if names]
    if not parts:  # the same names, sizes and times, yet another digest: a renamed file or folder
        parts = ["the file list differs"]
    return f"sizes/mtimes differ: {', '.join(parts)}; {totals}"
