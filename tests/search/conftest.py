from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="package", autouse=True)
def untimed_kernels():
    """Every search these tests start (its driver, its local cluster, its trials) takes each
    shape's default DGC kernel untimed (``DGC_KERNEL_TIMING=0``): timing the candidates is
    most of a digits trial of a few epochs. The timing is tested in tests/dgc."""
    before = os.environ.get("DGC_KERNEL_TIMING")
    os.environ["DGC_KERNEL_TIMING"] = "0"
    yield
    if before is None:
        os.environ.pop("DGC_KERNEL_TIMING")
    else:
        os.environ["DGC_KERNEL_TIMING"] = before
