from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under xdist (``-n 2``, the README's command) each worker's torch takes one thread: two
    workers of two threads each, beside the trials of their Ray clusters, slowed the CPU-bound
    tests several times over. (Ray's trials set their own thread counts.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def ray_2cpu():
    """A real local Ray cluster with 2 CPUs (no dashboard), shared by the tests that need one.

    Its workers (the trials) take each shape's default DGC kernel untimed
    (``DGC_KERNEL_TIMING=0``): timing them adds about a third to a digits trial of a few
    epochs (docs/benchmarks.md 6.8). The timing is tested in tests/dgc; this process keeps it.
    """
    import ray

    if not ray.is_initialized():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DGC_KERNEL_TIMING", "0")  # the raylet, and so every worker, inherits it
            ray.init(  # "local": its own cluster, not one a `ray start` left on the machine
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
    yield ray
    ray.shutdown()
