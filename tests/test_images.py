"""Image folders and image datasets are listed at start-up and decoded per batch; augmentation is a function
of (seed, epoch, sample index) and never touches validation."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from launcher.data import images
from launcher.data import load_splits, make_loader
from launcher.errors import UsageError
from tests.helpers import read_metrics, run


class EpochIndices(list):
    """What launcher.data.sampling's batch sampler yields: a batch of indices that knows its epoch."""

    epoch = 0


def batch(indices, epoch):
    out = EpochIndices(indices)
    out.epoch = epoch
    return out


def write_folder(root, n, classes=4, size=8, noise=True):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if noise else np.full(
            (size, size, 3), 40 * (i % classes), np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % classes}" / f"{i:06d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folders of 2,000 and 20,000 8x8 PNGs in class subfolders, written once for the module."""
    root = tmp_path_factory.mktemp("image-folders")
    return {n: write_folder(root / f"n{n}", n) for n in (2000, 20000)}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def decodes_during(action):
    before = images.decode_count
    result = action()
    return result, images.decode_count - before


@pytest.mark.parametrize("n", [2000, 20000])
def test_start_up_decodes_a_fixed_sample_and_batches_decode_themselves(folders, n):
    splits, decoded = decodes_during(lambda: load_splits(str(folders[n]), seed=0))
    assert isinstance(splits.train, images.LazyImageDataset)
    assert len(splits.train) + len(splits.val) == n and splits.input_shape == (3, 8, 8)
    assert decoded == images.STATS_SAMPLE  # the standardization sample, the same for 2k and 20k images
    # Statistics are cached: a second start-up decodes nothing, and neither does one given the statistics.
    _, decoded = decodes_during(lambda: load_splits(str(folders[n]), seed=0))
    assert decoded == 0
    given = {"image_mean": ["0.5"], "image_std": ["0.25"]}
    splits, decoded = decodes_during(lambda: load_splits(str(folders[n]), seed=1, **given))
    assert decoded == 0 and splits.mean == [0.5] * 3
    (x, y), decoded = decodes_during(lambda: next(iter(make_loader(splits.train, 32, shuffle=True))))
    assert decoded == 32 and x.shape == (32, 3, 8, 8) and x.dtype == torch.float32 and y.shape == (32,)


def test_image_dataset_with_embedded_bytes_is_read_lazily(tmp_path):
    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)) for _ in range(40)]
    ds = datasets.Dataset.from_dict({"img": pics, "label": [i % 2 for i in range(40)]})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    splits, decoded = decodes_during(lambda: load_splits(str(tmp_path / "saved"), seed=0))
    assert decoded == 32 and splits.input_shape == (1, 6, 6)  # 32 training rows: the whole sample
    x, _ = splits.train.__getitems__([0, 1])
    pixels = x * splits.std[0] + splits.mean[0]
    row = int(splits.train.rows[0])
    assert torch.allclose(pixels[0, 0], torch.from_numpy(np.array(pics[row])).float() / 255, atol=1e-5)


def test_augmentation_changes_training_pixels_and_never_validation(folders):
    plain = load_splits(str(folders[2000]), seed=0)
    aug = load_splits(str(folders[2000]), seed=0, augment="standard")
    rows = list(range(64))
    x_plain, y_plain = plain.train.__getitems__(batch(rows, 0))
    x_aug, y_aug = aug.train.__getitems__(batch(rows, 0))
    assert torch.equal(y_plain, y_aug)
    changed = (x_plain != x_aug).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.9  # crops of random noise: almost every sample differs
    for epoch in (0, 1):
        assert torch.equal(aug.val.__getitems__(batch(rows, epoch))[0], plain.val.__getitems__(rows)[0])


def test_augmentation_is_a_function_of_seed_epoch_and_index(folders):
    splits = load_splits(str(folders[2000]), seed=0, augment="standard")
    ds = splits.train
    first = ds.__getitems__(batch([5, 9, 11], 3))[0]
    # The same sample in another batch, position or process gives the same pixels; another epoch does not.
    assert torch.equal(ds.__getitems__(batch([11, 5], 3))[0][1], first[0])
    assert not torch.equal(ds.__getitems__(batch([5], 4))[0][0], first[0])
    other_seed = load_splits(str(folders[2000]), seed=0, augment="standard")
    other_seed.train.seed = 1
    assert not torch.equal(other_seed.train.__getitems__(batch([5], 3))[0][0], first[0])

    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:96].tolist()
    batches = [batch(order[i:i + 16], 2) for i in range(0, 96, 16)]

    def epoch_with(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=lambda b: b,
                                             num_workers=workers)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch_with(0), epoch_with(2))


def test_augmentation_of_array_images_in_memory():
    plain = load_splits("digits", seed=0)
    aug = load_splits("digits", seed=0, augment="standard")
    x_plain, _ = plain.train.__getitems__(list(range(32)))
    x_aug, _ = aug.train.__getitems__(batch(list(range(32)), 0))
    assert x_aug.shape == x_plain.shape and (x_aug != x_plain).flatten(1).any(dim=1).float().mean() > 0.5
    assert torch.equal(aug.val.__getitems__(list(range(32)))[0], plain.val.__getitems__(list(range(32)))[0])


@pytest.mark.parametrize("kwargs, expected", [
    ({"image_mean": ["0.5"]}, "--image-mean and --image-std go together"),
    ({"image_mean": ["0.5", "0.5"], "image_std": ["1"]}, "--image-mean has 2 values but the images have 3"),
    ({"image_mean": ["a"], "image_std": ["1"]}, "--image-mean takes comma-separated numbers"),
    ({"augment": "heavy"}, "--augment must be one of none, standard"),
])
def test_bad_image_options_are_one_clear_line(tmp_path, kwargs, expected):
    root = write_folder(tmp_path / "small", 8, classes=2)
    with pytest.raises(UsageError, match=expected):
        load_splits(str(root), **kwargs)


def test_augmenting_tabular_inputs_is_refused(tmp_path):
    datasets.Dataset.from_dict({"a": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 0, 1]}).to_csv(tmp_path / "t.csv")
    with pytest.raises(UsageError, match="--augment standard needs image inputs"):
        load_splits(str(tmp_path / "t.csv"), augment="standard")


@pytest.mark.slow
def test_recipe_trains_on_an_image_folder_with_augmentation_in_workers(tmp_path):
    root = write_folder(tmp_path / "pics", 160, classes=2, noise=False)
    out = tmp_path / "run"
    run(["--dataset", str(root), "--model", "cnn", "--epochs", "1", "--batch-size", "16", "--augment", "standard",
         "--num-workers", "2", "--image-size", "12", "--output-dir", str(out)], timeout=240)
    (row,) = read_metrics(out)
    assert row["epoch"] == 1 and 0.0 <= row["val_accuracy"] <= 1.0


def test_a_folder_is_listed_once_and_listed_again_when_its_files_change(tmp_path, monkeypatch):
    """The first process scans the class folders and keeps the listing in the datasets cache; the next one
    (another rank, node or run) reads it and scans none, until a file is added, removed or renamed."""
    root = write_folder(tmp_path / "imgs", 12, classes=3, noise=False)
    scans = []
    real = images._image_files
    monkeypatch.setattr(images, "_image_files", lambda folder: scans.append(folder) or real(folder))
    first = images.list_image_folder(root)
    assert len(scans) == 3
    again = images.list_image_folder(root)
    assert len(scans) == 3, "the cached listing was not used"
    assert again["train"]["image"] == first["train"]["image"] and again["train"]["label"] == first["train"]["label"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "class1" / "new.png")
    changed = images.list_image_folder(root)
    assert len(scans) == 6 and changed.num_rows["train"] == 13
    assert any(cell["path"].endswith("new.png") for cell in changed["train"]["image"])
