"""The op benchmarks behind ``ptkernels bench`` (after its end-to-end headline) and ``ptkernels verify``.

Shaped like flash-linear-attention's ``benchmarks/ops``:

    registry   the cases: verify grids and the embedded bench configs (CPU default, GPU default, quick)
    peers      the implementations compared (naive concat, PEFT's path, SDPA, FlexAttention, ptkernels)
    run        the runner: every peer on every case, side by side, medians and peak memory
    verify     the verifier: every op and backend against an fp64 reference (the FlashAttention rule)
    report     tables, JSON / CSV files, matplotlib plots

Timers and memory meters are ``benchmarks/timing.py``; machine facts ``benchmarks/env.py``.
"""
