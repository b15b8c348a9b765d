from __future__ import annotations

import pytest


@pytest.fixture(scope="package", autouse=True)
def untimed_kernels():
    """Every search these tests start (its driver, its local cluster, its trials) takes each
    shape's default DGC kernel untimed (``DGC_KERNEL_TIMING=0``): timing the candidates adds
    about a third to a digits trial of a few epochs (docs/benchmarks.md 6.8). The timing is
    tested in tests/dgc."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DGC_KERNEL_TIMING", "0")
        yield
