"""Time-honoured timing: warmup, then the median of repeats.

GPU: CUDA events around each call, after torch.cuda.synchronize(); the L2 cache is flushed between
repeats (as triton.testing.do_bench does). CPU: time.perf_counter around each call. Peak memory is
torch.cuda.max_memory_allocated above what was allocated before the call (GPU only; on CPU it is
reported as n/a rather than guessed).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    reps: int = 20,
    min_reps: int = 3,
    max_time_s: float = 2.0,
) -> Timing:
    """Median wall time of ``fn()`` in milliseconds.

    Runs ``warmup`` untimed calls, then up to ``reps`` timed calls, stopping early (after at least
    ``min_reps``) once ``max_time_s`` of timed calls have been spent.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        flush = torch.empty(64 * 1024 * 1024, dtype=torch.int8, device=device)  # > L2 of H100/H200
        spent = 0.0
        for i in range(reps):
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end)
            times.append(ms)
            spent += ms / 1000.0
            if i + 1 >= min_reps and spent > max_time_s:
                break
        del flush
    else:
        begin = time.perf_counter()
        for i in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
            if i + 1 >= min_reps and time.perf_counter() - begin > max_time_s:
                break
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated by one ``fn()`` call above what was allocated before it, in MiB.

    None on CPU: torch has no allocator statistics there and we do not guess.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn followed by torch.cuda.synchronize() on GPU, so wall-clock timers (pytest-benchmark) are honest."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
