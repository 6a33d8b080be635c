"""Timers and memory meters shared by every benchmark, from well-kept libraries.

* GPU: ``triton.testing.do_bench`` (CUDA events, L2 flush between repeats), median.
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up, blocks sized to the call), median.
* Peak memory of one call above what was allocated before it: ``torch.cuda.max_memory_allocated``
  on GPU; on CPU the profiler's memory events (every allocation and free, in time order) summed to
  their running maximum, which is what a CPU user can measure.
"""

from __future__ import annotations

from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> float:
    """Median wall time of ``fn()`` in milliseconds (at least ``min_run_time`` seconds of calls; on CPU,
    ``min_run_time <= 0`` times exactly one call, for steps that take seconds)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_run_time * 1000)),
                                             return_mode="median"))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if min_run_time <= 0:
        return timer.timeit(1).median * 1000.0
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1000.0


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated while one ``fn()`` runs, above what was allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # frees outside any op come as "[memory]" events; an op's own allocations as its self usage
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak / 2**20


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn followed by torch.cuda.synchronize() on GPU, so wall-clock timers (pytest-benchmark) are honest."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
