"""Test-wide setup: 8 fake CPU devices for sharding tests (set before JAX initialises)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Longest first: with `pytest -n 2` the load scheduler hands tests out in collection order, so
# a multi-minute test collected last leaves one worker idle at the end. These modules hold the
# longest tests (`--durations` on CPU-2); moving them (and tests marked `slow`) to the front
# shortens the wall time without changing what runs.
LONGEST_FIRST = (
    "test_distributed_multiprocess.py",
    "test_train_resume.py",
    "test_rl_demo.py",
    "test_demo_prepare.py",
    "test_train_loop.py",
    "test_rl_algorithms.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        if module in LONGEST_FIRST:
            return LONGEST_FIRST.index(module)
        return len(LONGEST_FIRST) if item.get_closest_marker("slow") else len(LONGEST_FIRST) + 1

    items.sort(key=rank)  # stable: the order inside each group is unchanged
