"""The timing protocol of ../shared/bench/WORKLOADS.md, shared by the bench scripts:
one untimed warm-up call (compile included, reported separately), then `reps` timed calls."""

import time


def timed(fn, reps: int) -> tuple[float, list[float]]:
    """(seconds of the first call, [seconds of each of `reps` later calls])."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times
