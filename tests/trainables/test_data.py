"""trainables.data: the decoded cache, the validation split, the loaders and their
augmentation; ImageNet through torchvision."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import write_cifar
from tests.helpers import write_imagefolder
from trainables import data as D
from trainables import datasets
from trainables.config import DataParams


def test_cifar10_python_layout(tmp_path):
    write_cifar(tmp_path, 20, 10)
    s = D.load_splits(DataParams(dataset="cifar10", datadir=str(tmp_path), val_size=10))
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (3, 32, 32)
    assert s.num_classes == 10 and s.mean == D.CIFAR_STATS["cifar10"][0]


def test_cifar100_python_layout(tmp_path):
    write_cifar(tmp_path, 30, 100, cifar100=True)
    s = D.load_splits(DataParams(dataset="cifar100", datadir=str(tmp_path), val_size=0.2))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (24, 6, 30, 100)


def test_imagefolder_layout_png_and_jpeg_and_cache_reuse(tmp_path, monkeypatch):
    write_imagefolder(tmp_path)
    params = DataParams(
        dataset="imagefolder", datadir=str(tmp_path), val_size=2, cache_dir=str(tmp_path / "cache")
    )
    s = D.load_splits(params)
    assert s.num_classes == 2 and s.train.images.shape[1:] == (3, 12, 12)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 2, 12)
    png = np.asarray(Image.open(tmp_path / "test" / "cat" / "0.png"))
    assert torch.equal(s.test.images[0], torch.from_numpy(png).permute(2, 0, 1))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(D, "_decode_to_blob", fail)
    again = D.load_splits(params)
    assert torch.equal(again.train.images, s.train.images)


def _load_in_child(args: tuple[str, str, str]) -> int:
    import time

    datadir, cache, decodes = args
    decode = D._decode_to_blob

    def counted(*a, **k):  # record each decode; linger so that a second writer would overlap
        with open(decodes, "a") as f:
            f.write("decode\n")
        time.sleep(1.0)
        return decode(*a, **k)

    D._decode_to_blob = counted
    train, _, _ = D.cached_arrays(
        DataParams(dataset="imagefolder", datadir=datadir, cache_dir=cache)
    )
    return int(train.images.sum())


def test_cache_survives_two_concurrent_writers(tmp_path):
    write_imagefolder(tmp_path, per_class=40)
    cache, decodes = str(tmp_path / "cache"), tmp_path / "decodes.log"
    with mp.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_load_in_child, [(str(tmp_path), cache, str(decodes))] * 2, chunksize=1)
    assert sums[0] == sums[1]
    assert decodes.read_text().count("decode") == 1  # the lock: one decodes, the other reads
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([f for f in files if f.endswith(".pt")]) == 1 and not [
        f for f in files if ".tmp" in f
    ]


def test_validation_split_is_fixed_by_split_seed_and_disjoint():
    a = D.load_splits(DataParams(val_size=100, split_seed=3))
    b = D.load_splits(DataParams(val_size=100, split_seed=3))
    c = D.load_splits(DataParams(val_size=100, split_seed=4))
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    assert len(a.train) + len(a.val) == 1797 - 359
    assert a.in_chans == 1 and a.image_size == 8


@pytest.mark.parametrize(
    "dataset,expect",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("imagefolder", "train/<class>"),
    ],
)
def test_missing_dataset_names_path_and_layout(tmp_path, dataset, expect):
    with pytest.raises(datasets.DatasetError) as info:
        D.load_splits(DataParams(dataset=dataset, datadir=str(tmp_path)))
    assert str(tmp_path) in str(info.value) and expect in str(info.value)


def test_device_loader_batches_normalises_and_drops_last():
    split = datasets.Split(torch.full((10, 1, 4, 4), 255, dtype=torch.uint8), torch.arange(10))
    train = D.DeviceLoader(split, 4, torch.device("cpu"), (0.5,), (0.25,), train=True)
    batches = list(train.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(train) == 2 and train.num_images == 8
    assert torch.allclose(batches[0][0], torch.full((4, 1, 4, 4), 2.0))
    evals = list(D.DeviceLoader(split, 4, torch.device("cpu"), (0.5,), (0.25,)).epoch())
    assert [len(y) for _, y in evals] == [4, 4, 2]


def test_crop_flip_is_a_shifted_possibly_mirrored_window():
    img = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(64, 1, 1, 1)
    out = D._crop_flip(img, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(img[0], (2, 2, 2, 2))[0]
    windows = {padded[r : r + 8, c : c + 8] for r in range(5) for c in range(5)}
    keys = {w.numpy().tobytes() for w in windows} | {w.flip(-1).numpy().tobytes() for w in windows}
    assert all(o[0].numpy().tobytes() in keys for o in out)
    assert len({o.numpy().tobytes() for o in out}) > 10  # really random


def test_imagenet_layout_uses_standard_transforms(tmp_path):
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(
                    tmp_path / split / c / f"{i}.JPEG"
                )
    params = DataParams(
        dataset="imagenet", datadir=str(tmp_path), val_size=2, batch_size=4, eval_batch_size=3
    )
    train, val, test, classes = D.imagenet_loaders(params, workers=0, channels_last=False)
    assert classes == 2 and len(train.dataset) == 8 and len(val.dataset) == 2
    x, y = next(train.epoch(torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 224, 224) and y.dtype == torch.long
    xs = [x for x, _ in test.epoch()]
    assert [len(x) for x in xs] == [3, 3, 3, 1] and xs[0].shape[-2:] == (224, 224)
    assert datasets.describe(params) == (2, (3, 224, 224))
