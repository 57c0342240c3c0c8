"""Fuzzing checkpoint validation and loading, in-process, on real checkpoints (CheckpointManager.save and
save_sharded of a tiny model): every mutation of a manifest or of a file either makes `validate` raise
CheckpointError (so --resume auto falls back to the previous checkpoint), or is refused by the loaders with a
one-line CheckpointError/UsageError; never another exception, never a silent load of changed bytes.

Three families, each for a full (DDP/single-process) and a sharded (DCP) checkpoint:
- the manifest: truncated or bit-flipped JSON, keys missing, added, misspelt or of another type, entries that
  are not objects, sizes and hashes wrong, file names that leave the folder;
- a file changed under its manifest: truncated, bit-flipped, zeroed, extended, deleted, an unlisted file added;
- a file changed *and its manifest entry updated to match* (a manifest that vouches for damaged bytes): a
  truncation must still be refused (the files are checked to parse: safetensors header against its size, the
  zip directory of torch files, DCP's index against its shards, trainer_state.json), and nothing may crash.

The counts of mutations tried are printed at the end of the module (`checkpoint fuzz: N mutations`).
Hypothesis runs derandomized (the same examples every run) and without its example database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from launcher.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainerState,
    check_fits,
    latest_valid,
    loadable_checkpoint,
    read_checkpoint,
    validate,
)
from launcher.checkpoint.files import _sha256
from launcher.checkpoint.sharded import export_weights, load_sharded, load_weights, save_sharded
from launcher.cli import main as cli_main
from launcher.errors import UsageError

TRIED: Counter = Counter()
OUTCOMES: Counter = Counter()
# CHECKPOINT_FUZZ_EXAMPLES=2000 for a longer hunt; 120 per test keeps the module near 30 s on one core.
FUZZ = settings(max_examples=int(os.environ.get("CHECKPOINT_FUZZ_EXAMPLES", "120")), deadline=None, derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OLDER, NEWER = "step-00000001", "step-00000002"


def make_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    return model, optimizer, scheduler


def train_a_step(model, optimizer, scheduler):
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()


def fresh():
    model, optimizer, scheduler = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)  # unlike anything saved: a load that changed nothing would show
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{"full"|"sharded": (run folder with step-1 and step-2, the reference load of step-2)}."""
    out = {}
    for layout in ("full", "sharded"):
        run = tmp_path_factory.mktemp(f"fuzz_{layout}")
        model, optimizer, scheduler = make_model()
        manager = CheckpointManager(run)
        for step in (1, 2):
            train_a_step(model, optimizer, scheduler)
            state = TrainerState(global_step=step, epoch=0, batches_done=step, history=[{"epoch": 0}])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
                if layout == "full":
                    manager.save(state, model_state=model.state_dict(), optimizer=optimizer, scheduler=scheduler)
                else:
                    save_sharded(manager, state, model=model, optimizer=optimizer, scheduler=scheduler)
        out[layout] = run, load(layout, run / "checkpoints" / NEWER)
    return out


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    total = sum(TRIED.values())
    line = (f"checkpoint fuzz: {total} mutations ({', '.join(f'{k} {v}' for k, v in sorted(TRIED.items()))}); "
            f"outcomes: {', '.join(f'{k} {v}' for k, v in sorted(OUTCOMES.items()))}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{line}")


def load(layout: str, path: Path) -> dict:
    """Everything a resume would load from `path`, as plain data."""
    model, optimizer, scheduler = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layout == "full":
            loaded = read_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
            return {"weights": loaded.weights, "optimizer": loaded.optimizer, "scheduler": loaded.scheduler,
                    "state": dataclasses.asdict(loaded.state), "rng": loaded.rng, "stats": loaded.stats}
        state, rng, stats, _ = load_sharded(path, model=model, optimizer=optimizer, scheduler=scheduler)
        return {"weights": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": dataclasses.asdict(state), "rng": rng, "stats": stats}


def same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def one_line(err: BaseException) -> None:
    assert "\n" not in str(err) and str(err).strip(), repr(str(err))


@contextlib.contextmanager
def copy_of(run: Path):
    folder = Path(tempfile.mkdtemp(prefix="ckpt-fuzz-"))
    try:
        copy = folder / "run"
        shutil.copytree(run, copy, symlinks=True)
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def outcome(layout: str, run: Path, reference: dict) -> str:
    """What the checkpoint step-2 of `run` does now:
    'rejected': validate raises CheckpointError, and --resume auto's choice falls back to step-1;
    'fallback': it validates but check_fits (--resume auto's load check) raises: falls back to step-1;
    'refused': it validates but loading raises a one-line CheckpointError or UsageError;
    'same': it loads exactly the reference; 'vouched': it loads other bytes (only when the manifest vouches).
    Any other exception fails the test."""
    path = run / "checkpoints" / NEWER
    try:
        validate(path)
    except CheckpointError as err:
        one_line(err)
        assert latest_valid(run, warn=False).name == OLDER  # what --resume auto resumes from
        return "rejected"
    if latest_valid(run, warn=False).name == OLDER:  # a sharded checkpoint whose small files do not load
        assert layout == "sharded"
        return "fallback"
    if layout == "full":
        model, optimizer, scheduler = fresh()
        try:
            check_fits(path, model=model, optimizer=optimizer)  # as loadable_checkpoint calls it
        except CheckpointError as err:
            one_line(err)
            with contextlib.redirect_stderr(io.StringIO()):
                chosen = loadable_checkpoint(path, model=model, optimizer=optimizer, fallback=True, output_dir=run)
            assert chosen.name == OLDER
            return "fallback"
    try:
        loaded = load(layout, path)
    except (CheckpointError, UsageError) as err:
        one_line(err)
        return "refused"
    return "same" if same(loaded, reference) else "vouched"


def check_export(run: Path, reference: dict) -> None:
    """`launcher export` of step-2: exit 0 with the reference weights, or one line and exit 2."""
    out = run / "exported" / "w.safetensors"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(["export", str(run / "checkpoints" / NEWER), str(out)])
    if code == 0:
        assert same(load_file(str(out)), reference["weights"])
    else:
        assert code == 2 and len(stderr.getvalue().strip().splitlines()) == 1, stderr.getvalue()
        assert not out.exists() and not list(out.parent.glob(".*")) if out.parent.exists() else True


# ------------------------------------------------------------------------------------------------- mutations


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path: Path, manifest) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from(["0" * 64, "g" * 64, "A" * 64, "ab"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
BAD_NAMES = ["../x", "../../etc/passwd", "/etc/passwd", "a//b", "./model.safetensors", "", "dcp/../../x",
             "manifest.json", "..", "x\\..\\y", "dcp/", "model.safetensors/..", "nul\x00l"]
MANIFEST_OPS = ["truncate", "flip", "drop-key", "add-key", "retype-key", "drop-entry-key", "misspell-entry-key",
                "add-entry-key", "retype-entry-field", "non-dict-entry", "drop-entry", "bad-name", "rename-entry",
                "wrong-size", "wrong-hash", "not-an-object"]


ALWAYS_REJECTED = ("drop-entry-key", "misspell-entry-key", "add-entry-key", "retype-entry-field", "non-dict-entry",
                   "drop-entry", "bad-name", "rename-entry", "wrong-size", "wrong-hash", "truncate", "add-key",
                   "not-an-object")


def mutate_manifest(data, path: Path) -> str:
    op = data.draw(st.sampled_from(MANIFEST_OPS), label="op")
    text = (path / "manifest.json").read_text()
    manifest = json.loads(text)
    files = manifest["files"]
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    if op == "truncate":
        (path / "manifest.json").write_text(text[:data.draw(st.integers(0, len(text) - 1), label="cut")])
        return op
    if op == "flip":
        raw = bytearray(text.encode())
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        (path / "manifest.json").write_bytes(bytes(raw))
        return op
    if op == "drop-key":
        del manifest[data.draw(st.sampled_from(sorted(manifest)), label="key")]
    elif op == "add-key":
        manifest[data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in manifest), label="key")] = \
            data.draw(json_values, label="value")
    elif op == "retype-key":
        manifest[data.draw(st.sampled_from(sorted(manifest)), label="key")] = data.draw(json_values, label="value")
    elif op == "drop-entry-key":
        del files[name][data.draw(st.sampled_from(["size", "sha256"]), label="key")]
    elif op == "misspell-entry-key":
        key = data.draw(st.sampled_from(["size", "sha256"]), label="key")
        files[name][data.draw(st.sampled_from([key.upper(), key + " ", "s" + key, key[:-1], key[::-1]]))] = \
            files[name].pop(key)
    elif op == "add-entry-key":
        files[name][data.draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in ("size", "sha256")))] = \
            data.draw(json_values, label="value")
    elif op == "retype-entry-field":
        key = data.draw(st.sampled_from(["size", "sha256"]), label="key")
        files[name][key] = data.draw(json_values.filter(lambda v: v != files[name][key]), label="value")
    elif op == "non-dict-entry":
        files[name] = data.draw(json_values.filter(lambda v: not isinstance(v, dict)), label="value")
    elif op == "drop-entry":
        del files[name]
    elif op == "bad-name":
        files[data.draw(st.sampled_from(BAD_NAMES), label="name")] = dict(files[name])
    elif op == "rename-entry":
        files[data.draw(st.sampled_from([name + "x", name.upper(), "x" + name]), label="name")] = files.pop(name)
    elif op == "wrong-size":
        files[name]["size"] += data.draw(st.integers(-files[name]["size"], 1 << 20).filter(bool), label="delta")
    elif op == "wrong-hash":
        files[name]["sha256"] = data.draw(st.text("0123456789abcdef", min_size=64, max_size=64).filter(
            lambda h: h != files[name]["sha256"]), label="hash")
    elif op == "not-an-object":
        manifest = data.draw(json_values.filter(lambda v: not isinstance(v, dict)), label="value")
    write_manifest(path, manifest)
    return op


def damage(data, file: Path) -> str:
    """Change `file`'s bytes (never a no-op); returns what was done."""
    raw = bytearray(file.read_bytes())
    op = data.draw(st.sampled_from(["truncate", "flip", "zero", "append", "empty"]), label="damage")
    if op == "truncate":
        raw = raw[:data.draw(st.integers(1, len(raw) - 1), label="cut")]
    elif op == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif op == "zero":
        begin = data.draw(st.integers(0, len(raw) - 1), label="from")
        end = data.draw(st.integers(begin + 1, len(raw)), label="to")
        if not any(raw[begin:end]):
            raw[begin] = 1
        else:
            raw[begin:end] = bytes(end - begin)
    elif op == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64), label="tail")
    else:
        raw = bytearray()
    file.write_bytes(bytes(raw))
    return op


def listed(path: Path) -> list[str]:
    return sorted(manifest_of(path)["files"])


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("layout", ["full", "sharded"])
@FUZZ
@given(data=st.data())
def test_manifest_mutations_are_rejected_or_harmless(bases, layout, data):
    run, reference = bases[layout]
    with copy_of(run) as copy:
        op = mutate_manifest(data, copy / "checkpoints" / NEWER)
        TRIED[f"{layout} manifest"] += 1
        result = outcome(layout, copy, reference)
        OUTCOMES[result] += 1
        # The files are untouched: whatever passes must load exactly what was saved.
        assert result in ("rejected", "same"), (op, result)
        if op in ALWAYS_REJECTED:
            assert result == "rejected", op


@pytest.mark.parametrize("layout", ["full", "sharded"])
@FUZZ
@given(data=st.data())
def test_damaged_files_are_rejected(bases, layout, data):
    run, reference = bases[layout]
    with copy_of(run) as copy:
        path = copy / "checkpoints" / NEWER
        choice = data.draw(st.sampled_from([*listed(path), "delete", "unlisted"]), label="file")
        if choice == "delete":
            (path / data.draw(st.sampled_from(listed(path)))).unlink()
        elif choice == "unlisted":  # a file the manifest does not list would be read unverified
            target = path / data.draw(st.sampled_from(["extra.pt", "scaler.pt", "dcp/__9_0.distcp", "sub/x.pt"]))
            target.parent.mkdir(exist_ok=True)
            shutil.copy(path / "rng.pt", target)
        else:
            damage(data, path / choice)
        TRIED[f"{layout} file"] += 1
        result = outcome(layout, copy, reference)
        OUTCOMES[result] += 1
        assert result == "rejected", choice  # every file has its size and sha256 in the manifest


@pytest.mark.parametrize("layout", ["full", "sharded"])
@FUZZ
@given(data=st.data())
def test_damage_the_manifest_vouches_for_never_crashes_and_truncation_never_loads(bases, layout, data):
    run, reference = bases[layout]
    with copy_of(run) as copy:
        path = copy / "checkpoints" / NEWER
        name = data.draw(st.sampled_from(listed(path)), label="file")
        op = damage(data, path / name)
        manifest = manifest_of(path)
        manifest["files"][name] = {"size": (path / name).stat().st_size, "sha256": _sha256(path / name)}
        write_manifest(path, manifest)
        TRIED[f"{layout} vouched"] += 1
        result = outcome(layout, copy, reference)
        OUTCOMES[f"{layout} vouched-for {result}"] += 1
        if op in ("truncate", "empty"):
            assert result in ("rejected", "fallback", "refused"), (name, op, result)
        if op == "append":  # bytes after the end: nothing reads them, or the file is refused
            assert result != "vouched", (name, op, result)
        if result in ("rejected", "fallback") and data.draw(st.integers(0, 3), label="export?") == 0:
            check_export(copy, reference)


DETERMINISTIC = [
    ("misspelt size", lambda m, n: m["files"][n].__setitem__("szie", m["files"][n].pop("size"))),
    ("sha256 deleted", lambda m, n: m["files"][n].pop("sha256")),
    ("size deleted", lambda m, n: m["files"][n].pop("size")),
    ("entry a list", lambda m, n: m["files"].__setitem__(n, [1, 2])),
    ("entry a string", lambda m, n: m["files"].__setitem__(n, "x")),
    ("size a string", lambda m, n: m["files"][n].__setitem__("size", str(m["files"][n]["size"]))),
    ("size a bool", lambda m, n: m["files"][n].__setitem__("size", True)),
    ("size a float", lambda m, n: m["files"][n].__setitem__("size", float(m["files"][n]["size"]))),
    ("sha256 upper case", lambda m, n: m["files"][n].__setitem__("sha256", m["files"][n]["sha256"].upper())),
    ("sha256 short", lambda m, n: m["files"][n].__setitem__("sha256", m["files"][n]["sha256"][:-1])),
    ("entry dropped", lambda m, n: m["files"].pop(n)),
    ("escaping name", lambda m, n: m["files"].__setitem__("../" + n, m["files"].pop(n))),
    ("absolute name", lambda m, n: m["files"].__setitem__("/tmp/" + n, m["files"].pop(n))),
]


@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_every_entry_of_every_file_deterministic(bases, layout):
    """Each named mutation on each file's entry, and a truncation and a flip of each file: all rejected."""
    run, reference = bases[layout]
    for name in listed(run / "checkpoints" / NEWER):
        for label, mutate in DETERMINISTIC:
            with copy_of(run) as copy:
                path = copy / "checkpoints" / NEWER
                manifest = manifest_of(path)
                mutate(manifest, name)
                write_manifest(path, manifest)
                TRIED[f"{layout} deterministic"] += 1
                assert outcome(layout, copy, reference) == "rejected", (name, label)
        for label in ("truncate", "flip", "zero weights"):
            with copy_of(run) as copy:
                file = copy / "checkpoints" / NEWER / name
                raw = bytearray(file.read_bytes())
                if label == "truncate":
                    raw = raw[:-1]
                elif label == "flip":
                    raw[len(raw) // 2] ^= 0x10
                else:
                    raw[len(raw) // 2:] = bytes(len(raw) - len(raw) // 2)
                file.write_bytes(bytes(raw))
                TRIED[f"{layout} deterministic"] += 1
                assert outcome(layout, copy, reference) == "rejected", (name, label)


def test_unchanged_checkpoints_load_and_export(bases, tmp_path):
    for layout, (run, reference) in bases.items():
        path = run / "checkpoints" / NEWER
        assert sorted(validate(path)["files"]) == listed(path)
        assert all(len(meta["sha256"]) == 64 for meta in validate(path)["files"].values())
        assert same(load(layout, path), reference)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert export_weights(path, tmp_path / f"{layout}.safetensors") == 2
        model = nn.Linear(3, 2)
        load_weights(model, path)
        assert same(model.state_dict(), reference["weights"])
