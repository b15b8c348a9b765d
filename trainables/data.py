"""Datasets as trials use them: decoded once to a uint8 tensor cache, held on the trial's
device, augmented there (reading each layout from disk is trainables.datasets').

Small datasets (digits, CIFAR-10/100, any ImageFolder that fits in memory) become ``Splits``
of uint8 tensors: decoded once into a cache file (written atomically under a file lock, so
concurrent trials share it safely), carved into train/validation with a fixed split seed,
and served by ``DeviceLoader`` with batched on-device augmentation (pad-4 random crop and
horizontal flip) and ``randperm`` batches: no per-sample Python work per step (airbench style).
ImageNet goes through torchvision's ``ImageFolder`` and a ``DataLoader`` sized to the trial's CPUs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from torch import Tensor

from trainables.config import DataParams
from trainables.datasets import CIFAR
from trainables.datasets import DatasetError
from trainables.datasets import Split
from trainables.datasets import class_folders
from trainables.datasets import data_folder
from trainables.datasets import load_cifar_arrays
from trainables.datasets import load_digits_arrays
from trainables.datasets import load_imagefolder_arrays

if TYPE_CHECKING:  # torchvision is imported where ImageNet is read
    from torchvision.datasets import ImageFolder

log = logging.getLogger(__name__)

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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


# ----------------------------------------------------------------------------- caching
def cached_arrays(params: DataParams) -> tuple[Split, Split, int]:
    """Decoded (train, test, num_classes), from the cache file if one exists for this source."""
    if params.dataset == "digits":
        return load_digits_arrays()
    datadir = data_folder(params).resolve()
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
        class_folders(root / sub)
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
