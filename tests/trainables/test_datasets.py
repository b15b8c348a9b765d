"""trainables.datasets: each layout read from disk, what a bad file in it is told as, and the
checks a search makes before any worker starts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tests.helpers import python
from tests.helpers import write_cifar
from tests.helpers import write_imagefolder
from trainables import datasets as D
from trainables.config import DataParams


def test_digits_are_scikit_learns_read_without_importing_it():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    flat, target = D._digits()
    assert np.array_equal(flat, bunch.data) and np.array_equal(target, bunch.target)
    code = (
        "import sys\n"
        "from trainables.datasets import load_digits_arrays\n"
        "train, test, classes = load_digits_arrays()\n"
        "assert (len(train.labels), len(test.labels), classes) == (1438, 359, 10)\n"
        "assert 'sklearn' not in sys.modules\n"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr


def test_malformed_cifar_batch_is_reported(tmp_path):
    write_cifar(tmp_path, 4, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(D.DatasetError, match="data_batch_3: not a CIFAR python batch"):
        D.load_cifar_arrays(tmp_path, "cifar10")


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted CIFAR batch could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_batch_that_would_run_code_is_refused_and_named(tmp_path):
    write_cifar(tmp_path, 4, 10)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps({b"data": _Payload(str(marker)), b"labels": [0]}))
    with pytest.raises(D.DatasetError, match=r"data_batch_2.*refusing to load global io\.open"):
        D.load_cifar_arrays(tmp_path, "cifar10")
    assert not marker.exists()


def test_cifar_batch_in_the_official_python2_numpy1_spelling_loads(tmp_path):
    write_cifar(tmp_path, 4, 10)
    folder = tmp_path / "cifar-10-batches-py"
    batch = {b"data": np.arange(4 * 3072, dtype=np.uint8).reshape(4, 3072), b"labels": [1, 2, 3, 4]}
    raw = pickle.dumps(batch, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    assert b"numpy.core.multiarray" in raw
    (folder / "test_batch").write_bytes(raw)
    _, test, _ = D.load_cifar_arrays(tmp_path, "cifar10")
    assert test.labels.tolist() == [1, 2, 3, 4]
    assert torch.equal(test.images.flatten(1)[0, :5], torch.arange(5, dtype=torch.uint8))


def test_count_training_images_names_empty_files(tmp_path):
    write_imagefolder(tmp_path)
    params = DataParams(dataset="imagefolder", datadir=str(tmp_path))
    assert D.count_training_images(params) == 12
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"")
    with pytest.raises(D.DatasetError, match=r"1 empty image file\(s\), e.g. .*dog/broken.jpg"):
        D.count_training_images(params)


def test_a_file_with_an_image_suffix_that_is_not_an_image_is_named(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "dog" / "zz_notes.jpg").write_text("not an image, a text file\n")
    (tmp_path / "train" / "dog" / "zz_cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(
        D.DatasetError,
        match=r"2 unreadable image file\(s\) in .*train: .*"
        r"zz_cut.png: not a readable image .*remove or replace it",
    ):
        D.load_imagefolder_arrays(tmp_path, None)
