"""Datasets: decoded once to a uint8 tensor cache, held on the trial's device, augmented there.

Small datasets (digits, CIFAR-10/100, any ImageFolder that fits in memory) become ``Splits``
of uint8 tensors: decoded once into a cache file (written atomically under a file lock, so
concurrent trials share it safely), carved into train/validation with a fixed split seed,
and served by ``DeviceLoader`` with batched on-device augmentation (pad-4 random crop and
horizontal flip) and ``randperm`` batches: no per-sample Python work per step (airbench style).
ImageNet goes through torchvision's ``ImageFolder`` and a ``DataLoader`` sized to the trial's CPUs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

from trainables.config import DataParams

if TYPE_CHECKING:  # PIL and torchvision are imported where images are decoded
    from PIL import Image
    from torchvision.datasets import ImageFolder

log = logging.getLogger(__name__)

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
DIGITS_TEST_FRACTION = 0.2


class DatasetError(ValueError):
    """A dataset is missing or not in the expected layout."""


@dataclass(frozen=True)
class Split:
    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.numel()

    def take(self, index: Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Splits:
    """Decoded train/validation/test sets and how to normalise them."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


# ----------------------------------------------------------------------------- decoding
def load_digits_arrays() -> tuple[Split, Split, int]:
    """scikit-learn's 8x8 digits (1,797 images shipped in the wheel), a fixed 20% test split."""
    flat, target = _digits()  # (1797, 64) float64 in 0..16, (1797,)
    images = torch.as_tensor(flat.reshape(-1, 8, 8) * 16).clamp(0, 255).to(torch.uint8)
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = round(DIGITS_TEST_FRACTION * len(labels))
    full = Split(images, labels)
    return full.take(perm[n_test:]), full.take(perm[:n_test]), 10


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels and labels as ``sklearn.datasets.load_digits`` returns them, read
    from the file it reads (in the wheel) without importing scikit-learn: its import is about
    1 s of every trial process, for a 0.1 s read. ``load_digits`` where the file is not
    there."""
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    csv = Path(roots[0], "datasets", "data", "digits.csv.gz") if roots else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(csv, delimiter=",")  # (1797, 65): 64 pixels, then the label
    return table[:, :-1], table[:, -1].astype(np.int64)


@dataclass(frozen=True)
class CifarLayout:
    """The official python layout of one CIFAR version."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    classes: int


CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
    ),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}


def load_cifar_arrays(datadir: Path, dataset: str) -> tuple[Split, Split, int]:
    """CIFAR-10/100 in the standard python layout (cifar-10-batches-py/, cifar-100-python/)."""
    layout = CIFAR[dataset]
    root = datadir / layout.folder
    return (
        _cifar_split(root, layout.train, layout.label_key),
        _cifar_split(root, layout.test, layout.label_key),
        layout.classes,
    )


def _cifar_split(root: Path, files: tuple[str, ...], key: bytes) -> Split:
    images, labels = [], []
    for name in files:
        path = root / name
        if not path.is_file():
            raise DatasetError(
                f"{path}: missing; expected the CIFAR python layout "
                f"({root.name}/{name}, as in the official cifar-*-python.tar.gz)"
            )
        try:
            with open(path, "rb") as f:
                batch = _CifarUnpickler(f, encoding="bytes").load()
            images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[key], dtype=torch.long))
        except (pickle.UnpicklingError, KeyError, RuntimeError, EOFError) as err:
            raise DatasetError(
                f"{path}: not a CIFAR python batch ({err!r}); expected a pickled "
                f"dict with b'data' (N x 3072 uint8) and {key!r}"
            ) from err
    return Split(torch.cat(images), torch.cat(labels))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what the CIFAR python format holds (dicts, lists, bytes, numpy arrays) and
    refuses every other global: a crafted batch in a data folder must not run code."""

    # (module, name) -> where it lives now; the official files were written with Python 2 and
    # numpy 1.x (numpy.core), files re-pickled by Python 3 add _codecs.encode for bytes.
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR batch holds only dicts, "
                "lists, bytes and numpy arrays"
            )
        return super().find_class(*target)


def load_imagefolder_arrays(datadir: Path, image_size: int | None) -> tuple[Split, Split, int]:
    """``train/<class>/*`` and ``test/<class>/*`` (or ``val/``), decoded to uint8 RGB."""
    classes = _classes(datadir / "train")
    test_dir = datadir / "test" if (datadir / "test").is_dir() else datadir / "val"
    if not test_dir.is_dir():
        raise DatasetError(
            f"{datadir}: no test/ (or val/) folder; expected the ImageFolder layout"
            " train/<class>/*.jpg and test/<class>/*.jpg"
        )
    train = _decode_folder(datadir / "train", classes, image_size)
    test = _decode_folder(test_dir, classes, image_size or train.images.shape[-1])
    return train, test, len(classes)


def _classes(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DatasetError(
            f"{folder}: no class folders; expected the ImageFolder layout "
            "train/<class>/*.jpg and test/<class>/*.jpg"
        )
    return classes


def _decode_folder(folder: Path, classes: list[str], size: int | None) -> Split:
    from PIL import Image
    from tqdm import tqdm

    files = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((folder / c).glob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DatasetError(f"{folder}: no images (.jpg/.png) under {', '.join(classes[:3])}...")
    images, bad = [], []
    for path, _ in tqdm(
        files, desc=f"decoding {folder}", unit="img", mininterval=5, disable=len(files) < 2000
    ):
        try:
            im = _open_rgb(path)
        except DatasetError as err:
            bad.append(str(err))
            continue
        size = size or im.width
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        images.append(
            torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            .view(size, size, 3)
            .permute(2, 0, 1)
        )
    if bad:
        raise DatasetError(f"{len(bad)} unreadable image file(s) in {folder}: {'; '.join(bad[:3])}")
    return Split(torch.stack(images), torch.tensor([i for _, i in files]))


def _open_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as RGB, decoded now.

    Raises:
        DatasetError: not an image PIL can read (wrong content behind an image suffix,
            truncated file).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise DatasetError(
            f"{path}: not a readable image ({type(err).__name__}: {str(err)[:120]}); remove or "
            "replace it"
        ) from err


# ----------------------------------------------------------------------------- caching
def cached_arrays(params: DataParams) -> tuple[Split, Split, int]:
    """Decoded (train, test, num_classes), from the cache file if one exists for this source."""
    if params.dataset == "digits":
        return load_digits_arrays()
    datadir = _datadir(params).resolve()
    key = hashlib.sha1(f"{params.dataset}|{datadir}|{params.image_size}".encode()).hexdigest()[:12]
    cache_dir = Path(params.cache_dir).expanduser() if params.cache_dir else datadir / ".dgc_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{params.dataset}-{key}.pt"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            blob = torch.load(path, weights_only=True)
        else:
            blob = _decode_to_blob(params, datadir)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(blob, tmp)
            os.replace(tmp, path)  # atomic: readers see the old state or the whole file
            log.info("cached %s to %s", params.dataset, path)
    return (
        Split(blob["train_x"], blob["train_y"]),
        Split(blob["test_x"], blob["test_y"]),
        int(blob["num_classes"]),
    )


def _datadir(params: DataParams) -> Path:
    root = Path(params.datadir or "").expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"data.datadir={str(root)!r} does not exist; {params.dataset} expects "
            f"{_LAYOUTS[params.dataset]}"
        )
    return root


def split_indices(val_size: float, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(validation, training) indices: ``val_size`` images (a count, or a fraction if < 1)
    carved from ``n`` with a fixed seed, so every trial of a search sees the same split."""
    n_val = int(val_size) if val_size >= 1 else round(val_size * n)
    if not 0 < n_val < n:
        raise DatasetError(
            f"data.val_size={val_size} gives {n_val} validation images of {n} training "
            "images; it must leave both sides non-empty"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_val], perm[n_val:]


def _decode_to_blob(params: DataParams, datadir: Path) -> dict[str, Tensor | int]:
    if params.dataset in CIFAR:
        train, test, classes = load_cifar_arrays(datadir, params.dataset)
    else:
        train, test, classes = load_imagefolder_arrays(datadir, params.image_size)
    return {
        "train_x": train.images,
        "train_y": train.labels,
        "test_x": test.images,
        "test_y": test.labels,
        "num_classes": classes,
    }


_LAYOUTS = {
    "cifar10": "cifar-10-batches-py/data_batch_{1..5} and test_batch inside it",
    "cifar100": "cifar-100-python/train and test inside it",
    "imagefolder": "train/<class>/*.jpg and test/<class>/*.jpg inside it",
    "imagenet": "train/<class>/*.JPEG and val/<class>/*.JPEG inside it",
}


def load_splits(params: DataParams) -> Splits:
    """Decode (or read the cache), carve the validation split, pick normalisation constants."""
    train, test, classes = cached_arrays(params)
    val_idx, train_idx = split_indices(params.val_size, len(train), params.split_seed)
    val, rest = train.take(val_idx), train.take(train_idx)
    if params.train_subset:
        rest = rest.take(torch.arange(min(params.train_subset, len(rest))))
    mean, std = CIFAR_STATS.get(params.dataset) or _channel_stats(rest.images)
    return Splits(rest, val, test, classes, mean, std)


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


# ----------------------------------------------------------------------------- loading
class DeviceLoader:
    """Batches of a uint8 split held on ``device``: normalised floats, optionally augmented.

    Args:
        split: the images and labels.
        batch_size: images per batch; the last partial batch is dropped when training.
        mean, std: per-channel normalisation constants.
        augment: pad-4 random crop + horizontal flip, on the device, per batch.
        train: shuffle and drop the last partial batch.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        train: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.augment, self.train = batch_size, augment, train
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        n = len(self.labels)
        return (
            n // self.batch_size
            if self.train and n >= self.batch_size
            else -(-n // self.batch_size)
        )

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.train else len(self.labels)

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass; ``generator`` (CPU) drives the order and the augmentation."""
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size].to(self.images.device)
            x = self.images[idx]  # (B, C, H, W) uint8
            if self.augment:
                x = _crop_flip(x, generator)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield x, self.labels[idx]


def _crop_flip(x: Tensor, generator: torch.Generator | None, pad: int = 4) -> Tensor:
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B,1,H,1)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]  # (B, C, H, W)


class FolderLoader:
    """ImageNet-style loader: torchvision ImageFolder, standard transforms, worker processes."""

    def __init__(
        self,
        dataset: torch.utils.data.Subset | ImageFolder,
        batch_size: int,
        train: bool,
        workers: int,
        channels_last: bool = False,
    ) -> None:
        self.dataset, self.batch_size, self.train, self.workers = (
            dataset,
            batch_size,
            train,
            workers,
        )
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.train else len(self.dataset)

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            self.batch_size,
            shuffle=self.train,
            generator=generator,
            num_workers=self.workers,
            drop_last=self.train,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.contiguous(memory_format=self.memory_format), y


def imagenet_loaders(
    params: DataParams, workers: int, channels_last: bool
) -> tuple[FolderLoader, FolderLoader, FolderLoader, int]:
    """(train, val, test, num_classes): val carved from train/ with the split seed; test = val/."""
    from torchvision import datasets
    from torchvision import transforms as T

    root = Path(params.datadir or "").expanduser()
    for sub in ("train", "val"):
        _classes(root / sub)
    norm = T.Normalize(*IMAGENET_STATS)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    train_set = datasets.ImageFolder(str(root / "train"), train_tf)
    val_idx, train_idx = split_indices(params.val_size, len(train_set), params.split_seed)
    val_set = torch.utils.data.Subset(
        datasets.ImageFolder(str(root / "train"), eval_tf), val_idx.tolist()
    )
    train_sub = torch.utils.data.Subset(train_set, train_idx.tolist())
    test_set = datasets.ImageFolder(str(root / "val"), eval_tf)
    mk = lambda ds, bs, tr: FolderLoader(ds, bs, tr, workers, channels_last)  # noqa: E731
    return (
        mk(train_sub, params.batch_size, True),
        mk(val_set, params.eval_batch_size, False),
        mk(test_set, params.eval_batch_size, False),
        len(train_set.classes),
    )


def count_training_images(params: DataParams) -> int:
    """Training images before the validation split, reading what would break every trial:
    CIFAR batches are loaded (keys, shapes), ImageFolder files are listed and zero-byte ones
    named. Cheap next to a trial: about a second for the real CIFAR-10.

    Raises:
        DatasetError: missing, corrupt or empty data.
    """
    if params.dataset == "digits":
        return len(load_digits_arrays()[0])
    root = _datadir(params)
    if params.dataset in CIFAR:
        return len(load_cifar_arrays(root, params.dataset)[0])
    files = [
        p
        for c in _classes(root / "train")
        for p in (root / "train" / c).iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if params.dataset == "imagefolder":
        empty = [str(p) for p in files if p.stat().st_size == 0]
        if empty:
            raise DatasetError(
                f"{len(empty)} empty image file(s), e.g. {', '.join(empty[:3])}; remove or "
                "replace them"
            )
    if not files:
        raise DatasetError(f"{root / 'train'}: no image files ({sorted(IMAGE_SUFFIXES)})")
    return len(files)


def describe(params: DataParams) -> tuple[int, tuple[int, int, int]]:
    """(num_classes, input size C x H x W) without decoding the dataset; checks the layout.

    Raises:
        DatasetError: the dataset is missing or not in its expected layout.
    """
    if params.dataset == "digits":
        return 10, (1, 8, 8)
    root = _datadir(params)
    if params.dataset in CIFAR:
        layout = CIFAR[params.dataset]
        folder = root / layout.folder
        missing = [n for n in layout.train + layout.test if not (folder / n).is_file()]
        if missing:
            raise DatasetError(
                f"{folder}: missing {', '.join(missing)}; expected {_LAYOUTS[params.dataset]}"
            )
        return layout.classes, (3, 32, 32)
    classes = _classes(root / "train")
    if params.dataset == "imagenet":
        _classes(root / "val")
        return len(classes), (3, 224, 224)
    if not ((root / "test").is_dir() or (root / "val").is_dir()):
        raise DatasetError(f"{root}: no test/ (or val/) folder; expected {_LAYOUTS['imagefolder']}")
    side = params.image_size or _first_image_size(root / "train", classes)
    return len(classes), (3, side, side)


def _first_image_size(folder: Path, classes: list[str]) -> int:

    for c in classes:
        for p in sorted((folder / c).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                return _open_rgb(p).width
    raise DatasetError(f"{folder}: no images (.jpg/.png) in its class folders")
