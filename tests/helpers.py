"""Helpers that tests of more than one package share: the checkout's root, small datasets on
disk in the layouts trainables/data.py reads, and hostile YAML. (Helpers of one package's tests
live in tests/<pkg>/helpers.py.)"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]  # the checkout the tests run from


def write_cifar(root: Path, n: int, classes: int, cifar100: bool = False) -> None:
    """A CIFAR-10 (or -100) python-pickle layout under ``root``, ``n`` random images a batch."""
    rng = np.random.default_rng(0)
    key = b"fine_labels" if cifar100 else b"labels"
    names = (
        ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    for name in names:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, n).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def write_imagefolder(root: Path, per_class: int = 6, size: int = 12) -> None:
    """train/ and test/ with two classes of random images, cat as PNG and dog as JPEG."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c, suffix in (("cat", ".png"), ("dog", ".jpg")):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}{suffix}")


def alias_bomb(levels: int = 8) -> str:
    """YAML of a few hundred bytes whose anchors and aliases expand to 10**(levels + 1)
    values ("billion laughs" at 8 levels)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def logged_through(log_filter: logging.Filter) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records pass ``log_filter`` into a string: (the logger, what it wrote)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(log_filter)
    logger = logging.getLogger(f"tests.{type(log_filter).__name__}")
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def graph_counter() -> tuple[list, object]:
    """A ``torch.compile`` backend that records each graph it is given and runs it as traced:
    (the graphs, the backend). Resets dynamo first, so earlier compiles do not count."""
    import torch

    graphs: list = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return graphs, backend


def python(
    code: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter (this one's), its output captured as text."""
    run = [sys.executable, "-c", code]
    return subprocess.run(run, env=env, cwd=cwd, capture_output=True, text=True)
