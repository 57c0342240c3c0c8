"""Image data at scale: start-up against dataset size, decode/augment throughput, kornia vs albumentations.

    OMP_NUM_THREADS=1 python bench/images.py --out bench/images.json [--smoke]

Writes one JSON file and prints Markdown tables (bench/RESULTS.md, "Image data at scale"). Sections:
- startup: `accelerate launch bench/first_step.py` (the recipe unchanged, 1 process) on folders of 8x8 PNGs
  in class subfolders, to the first optimizer step; the old path (datasets' imagefolder builder) for scale;
- listing: launcher.data.images.list_image_folder on a folder of 1M (empty) files, and load_splits on a 1M-row
  save_to_disk dataset of PNG bytes;
- throughput: images per second in one process (= one DataLoader worker) decoded, resized and standardized
  by LazyImageDataset, with and without --augment standard, against a bare PIL decode loop; the loader
  with 0, 1, 2 workers;
- augment: kornia against albumentations, each sample seeded from (seed, epoch, index).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.data import images  # noqa: E402
from launcher.data import load_splits, make_loader  # noqa: E402


def write_folder(root: Path, n: int, size: int = 8, classes: int = 10, fmt: str = "PNG") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    suffix = ".png" if fmt == "PNG" else ".jpg"
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / f"c{i % classes}" / f"{i:07d}{suffix}", format=fmt)
    return root


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def first_step(folder: Path, tmp: Path, cache: Path) -> dict:
    out = tmp / "marks.json"
    start = time.time()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" /
           "cpu.yaml"), str(ROOT / "bench" / "first_step.py"), "--timestamps", str(out), "--dataset", str(folder),
           "--model", "cnn", "--epochs", "1", "--output-dir", str(tmp / f"run-{time.time_ns()}")]
    subprocess.run(cmd, check=True, env={**env(), "HF_DATASETS_CACHE": str(cache)}, capture_output=True)
    marks = json.loads(out.read_text())
    return {"first_step": marks["first_step"] - start, "data_and_model": marks["fit_called"] - marks["imports_done"]}


def startup(tmp: Path, sizes: list[int], repeats: int, reuse: Path | None = None) -> dict:
    """First step per folder size; `reuse`: a folder holding folder-<n> already (kept afterwards)."""
    results = {}
    for n in sizes:
        keep = reuse is not None and (reuse / f"folder-{n}").is_dir()
        folder = reuse / f"folder-{n}" if keep else write_folder(tmp / f"folder-{n}", n)
        cold = first_step(folder, tmp, tmp / f"cache-{n}")  # statistics computed (512 decodes) and cached
        warm = [first_step(folder, tmp, tmp / f"cache-{n}") for _ in range(repeats)]
        t = time.perf_counter()
        load_splits(str(folder), seed=0, image_mean=["0.5"], image_std=["0.25"])
        listed = time.perf_counter() - t
        results[n] = {"cold": cold, "warm": min(warm, key=lambda m: m["first_step"]),
                      "load_splits_s": listed, "imagefolder_builder_s": builder_time(folder, tmp / f"b-{n}")}
        print(n, results[n], flush=True)
        if not keep:
            shutil.rmtree(folder)
    return results


BUILDER_LIMIT_S = 300


def builder_time(folder: Path, cache: Path) -> float | None:
    """datasets.load_dataset('imagefolder') on the folder (the old path), None past BUILDER_LIMIT_S."""
    code = (f"import datasets, time; t = time.perf_counter(); datasets.load_dataset('imagefolder', "
            f"data_dir={str(folder)!r}, cache_dir={str(cache)!r}); print(time.perf_counter() - t)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True,
                              timeout=BUILDER_LIMIT_S, check=True)
    except subprocess.TimeoutExpired:
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def listing(tmp: Path, files: int, rows: int) -> dict:
    import datasets
    from PIL import Image

    folder = tmp / "million"
    classes = 100
    for c in range(classes):
        (folder / f"c{c:03d}").mkdir(parents=True)
    t = time.perf_counter()
    for i in range(files):
        open(folder / f"c{i % classes:03d}" / f"{i:07d}.png", "wb").close()
    created = time.perf_counter() - t
    t = time.perf_counter()
    listed = images.list_image_folder(folder)
    list_s = time.perf_counter() - t
    assert len(listed["train"]) == files
    shutil.rmtree(folder)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    import pyarrow as pa

    table = pa.table({"image": pa.StructArray.from_arrays([pa.array([png] * rows, pa.binary()),
                                                           pa.nulls(rows, pa.string())], names=["bytes", "path"]),
                      "label": pa.array(np.arange(rows) % 10)})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))
    ds.save_to_disk(str(tmp / "arrow-rows"))
    t = time.perf_counter()
    splits = load_splits(str(tmp / "arrow-rows"), seed=0)
    arrow_s = time.perf_counter() - t
    assert len(splits.train) + len(splits.val) == rows
    return {"files": files, "create_s": created, "list_s": list_s, "arrow_rows": rows, "arrow_load_splits_s": arrow_s}


def rate(fn, count: int, seconds: float) -> float:
    fn()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += count
    return done / (time.perf_counter() - start)


def throughput(tmp: Path, seconds: float) -> dict:
    cases = ((32, "PNG", 512, 256), (224, "JPEG", 128, 64))
    return {f"{size}x{size} {fmt}": _throughput_case(tmp, size, fmt, n, batch, seconds)
            for size, fmt, n, batch in cases}


def _throughput_case(tmp: Path, size: int, fmt: str, n: int, batch: int, seconds: float) -> dict:
    from PIL import Image

    folder = write_folder(tmp / f"tp-{size}", n, size=size, fmt=fmt)
    files = sorted(str(p) for p in folder.rglob("*.*"))[:batch]

    def bare() -> None:
        for f in files:
            with Image.open(f) as im:
                np.asarray(im.convert("RGB"))

    row = {"bare_pil": rate(bare, batch, seconds)}
    idx = list(range(batch))
    for augment in ("none", "standard"):
        splits = load_splits(str(folder), seed=0, augment=augment)
        row[f"lazy_{augment}"] = rate(lambda s=splits: s.train.__getitems__(idx), batch, seconds)
    splits = load_splits(str(folder), seed=0, augment="standard")
    for workers in (0, 1, 2):
        loader = make_loader(splits.train, 32, shuffle=True, num_workers=workers)
        next(iter(loader))
        start = time.perf_counter()
        count = sum(len(y) for _, y in loader)
        row[f"loader_{workers}_workers"] = count / (time.perf_counter() - start)
    return row


def augment_libraries(seconds: float) -> dict:
    return {f"{size}x{size}": _augment_case(size, batch, seconds) for size, batch in ((32, 256), (224, 64))}


def _augment_case(size: int, batch: int, seconds: float) -> dict:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import kornia.augmentation as K

    imgs = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    crop, flip = K.RandomResizedCrop((size, size)), K.RandomHorizontalFlip()
    shape = torch.Size([1, 3, size, size])

    def cat(ps: list[dict]) -> dict:
        return {k: ps[0][k] if k == "forward_input_shape" else torch.cat([p[k] for p in ps]) for k in ps[0]}

    def kornia_seeded() -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            params_c, params_f = [], []
            for i in range(batch):  # kornia draws from the global RNG: one seeded draw per sample
                torch.manual_seed(images.sample_seed(0, 0, i))
                params_c.append(crop.forward_parameters(shape))
                params_f.append(flip.forward_parameters(shape))
        return flip(crop(x, params=cat(params_c)), params=cat(params_f))

    def kornia_batch() -> torch.Tensor:  # one draw for the batch: the speed kornia has without seeding
        return flip(crop(x))

    aug = images.Augmenter("standard", size, size)
    compose = A.Compose([A.RandomResizedCrop(size=(size, size)), A.HorizontalFlip()])
    return {
        "kornia_seeded_per_sample": rate(kornia_seeded, batch, seconds),
        "kornia_one_draw_per_batch": rate(kornia_batch, batch, seconds),
        "albumentations_seeded_per_sample": rate(
            lambda: [aug(imgs[i], images.sample_seed(0, 0, i)) for i in range(batch)], batch, seconds),
        "albumentations_unseeded": rate(lambda: [compose(image=im)["image"] for im in imgs], batch, seconds),
    }


def markdown(results: dict) -> str:
    lines = ["| images | first step, stats cached (data + model) | first step, cold (data + model) | "
             "load_splits (stats given) | datasets' imagefolder builder |", "|---|---|---|---|---|"]
    for n, r in results["startup"].items():
        builder = r["imagefolder_builder_s"]
        builder = f"{builder:.2f} s" if builder is not None else f"> {BUILDER_LIMIT_S} s (stopped)"
        lines.append(f"| {int(n):,} | {r['warm']['first_step']:.2f} s ({r['warm']['data_and_model']:.2f} s) | "
                     f"{r['cold']['first_step']:.2f} s ({r['cold']['data_and_model']:.2f} s) | "
                     f"{r['load_splits_s']:.2f} s | {builder} |")
    li = results["listing"]
    lines += ["", f"list_image_folder on {li['files']:,} files: {li['list_s']:.2f} s; load_splits on a "
              f"{li['arrow_rows']:,}-row save_to_disk dataset of PNG bytes: {li['arrow_load_splits_s']:.2f} s", ""]
    tp = results["throughput"]
    keys = list(next(iter(tp.values())))
    lines += ["| images/s | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in tp.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:,.0f}" for k in keys) + " |")
    au = results["augment"]
    keys = list(next(iter(au.values())))
    lines += ["", "| images/s | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in au.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:,.0f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "images.json"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reuse", type=Path, help="folder with folder-<n> image folders made by an earlier run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes, files, rows, secs, repeats = ([200, 2000], 20_000, 20_000, 0.2, 1) if args.smoke else (
        [2000, 20_000, 200_000], 1_000_000, 1_000_000, 3.0, 1)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        import datasets

        datasets.config.HF_DATASETS_CACHE = tmp / "hf-cache"
        print("startup", flush=True)
        results = {"startup": startup(tmp, sizes, repeats, args.reuse), "listing": listing(tmp, files, rows),
                   "throughput": throughput(tmp, secs), "augment": augment_libraries(secs)}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
