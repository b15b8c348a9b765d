from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_2cpu():
    """A real local Ray cluster with 2 CPUs (no dashboard), shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        ray.init(  # "local": its own cluster, not one a `ray start` left on the machine
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
