"""Benchmark and verification machinery behind ``ptkernels verify`` and ``ptkernels bench``.

Nothing here is part of the public API. Modules:

    env        device, library versions, optional ops (imported lazily, missing ones skipped)
    cases      the verify grids and the embedded bench configs (CPU default, GPU default, quick)
    peers      the implementations compared by ``bench`` (naive concat, PEFT path, SDPA, Flex, ptkernels)
    timing     warmup + median timing (CUDA events on GPU, perf_counter on CPU), peak memory
    verify     the kernel-vs-fp64 comparison (FlashAttention error rule) and the verify table
    bench      the op benchmarks (prefix attention, prompt embedding)
    e2e        one PEFT prefix-tuning training step, unpatched vs ptkernels.patch
    report     tables, JSON / CSV files, matplotlib plots
"""
