"""Datasets read from disk in their standard layouts: scikit-learn's digits (shipped in its
wheel), CIFAR-10/100's python batches, ImageFolder trees, decoded to uint8 tensors; the checks
a search runs on them before any worker starts (``describe``, ``count_training_images``).
Caching, splitting and batching them is trainables.data's.
"""

from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from trainables.config import DataParams

if TYPE_CHECKING:  # PIL is imported where images are decoded
    from PIL import Image

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
    classes = class_folders(datadir / "train")
    test_dir = datadir / "test" if (datadir / "test").is_dir() else datadir / "val"
    if not test_dir.is_dir():
        raise DatasetError(
            f"{datadir}: no test/ (or val/) folder; expected the ImageFolder layout"
            " train/<class>/*.jpg and test/<class>/*.jpg"
        )
    train = _decode_folder(datadir / "train", classes, image_size)
    test = _decode_folder(test_dir, classes, image_size or train.images.shape[-1])
    return train, test, len(classes)


def class_folders(folder: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted (their order is the labels')."""
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


_LAYOUTS = {
    "cifar10": "cifar-10-batches-py/data_batch_{1..5} and test_batch inside it",
    "cifar100": "cifar-100-python/train and test inside it",
    "imagefolder": "train/<class>/*.jpg and test/<class>/*.jpg inside it",
    "imagenet": "train/<class>/*.JPEG and val/<class>/*.JPEG inside it",
}


def data_folder(params: DataParams) -> Path:
    """``data.datadir``, which must exist; the error says what the dataset expects in it."""
    root = Path(params.datadir or "").expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"data.datadir={str(root)!r} does not exist; {params.dataset} expects "
            f"{_LAYOUTS[params.dataset]}"
        )
    return root


def count_training_images(params: DataParams) -> int:
    """Training images before the validation split, reading what would break every trial:
    CIFAR batches are loaded (keys, shapes), ImageFolder files are listed and zero-byte ones
    named. Cheap next to a trial: about a second for the real CIFAR-10.

    Raises:
        DatasetError: missing, corrupt or empty data.
    """
    if params.dataset == "digits":
        return len(load_digits_arrays()[0])
    root = data_folder(params)
    if params.dataset in CIFAR:
        return len(load_cifar_arrays(root, params.dataset)[0])
    files = [
        p
        for c in class_folders(root / "train")
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
    root = data_folder(params)
    if params.dataset in CIFAR:
        layout = CIFAR[params.dataset]
        folder = root / layout.folder
        missing = [n for n in layout.train + layout.test if not (folder / n).is_file()]
        if missing:
            raise DatasetError(
                f"{folder}: missing {', '.join(missing)}; expected {_LAYOUTS[params.dataset]}"
            )
        return layout.classes, (3, 32, 32)
    classes = class_folders(root / "train")
    if params.dataset == "imagenet":
        class_folders(root / "val")
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
