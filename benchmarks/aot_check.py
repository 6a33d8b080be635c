"""Compile the prefix-attention kernels for a GPU target ahead of time, without a GPU.

CI runs the kernels in Triton's interpreter, which accepts code the real compiler rejects (type
changes across constexpr branches or loop iterations, ``tl.dot`` shape/dtype rules, ...). This script
drives the real launchers (``prefix_attention_forward`` / ``prefix_attention_backward``) with meta
tensors and a target GPU's limits (``TARGETS``: sm_90 227 KiB of shared memory, sm_80 163 KiB, ...),
passed to them as arguments, with a launcher that records every kernel launch instead of running it.
Each recorded launch is compiled with ``triton.compile`` for a ``GPUTarget``, specialising the
arguments exactly as a real launch would (ints equal to 1 and ``None`` become constants,
16-divisibility attributes, ...). It then checks what can be checked without a device: the kernel's
shared memory fits the target, the grid fits CUDA's limits, and every kernel in the launchers'
``KERNELS`` was launched.

It must run in a process where TRITON_INTERPRET is unset: with it, ``@triton.jit`` builds interpreted
functions at import time and there is nothing to compile. From the checkout's root:

    env -u TRITON_INTERPRET python benchmarks/aot_check.py [--quick | --full] [--arch 90 80]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional

import torch

# Run as a script (python benchmarks/aot_check.py), ptkernels comes from this checkout.
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# CUDA limits: grid y and z.
MAX_GRID_YZ = 65535
MAX_GRID_X = 2**31 - 1

# Per compute capability: the largest dynamic shared memory one block may use (bytes), and the SM
# count of a representative part (it sets how many batch slices reduce a shared prefix's gradient).
TARGETS = {
    80: (166912, 108),  # A100: 163 KiB
    86: (101376, 80),  # A10G: 99 KiB
    87: (166912, 16),  # Jetson AGX Orin
    89: (101376, 58),  # L4
    90: (232448, 132),  # H100 SXM: 227 KiB
}


def target_limits(arch: int):
    """The ``DeviceLimits`` of sm_<arch>, for the launchers (imported here: triton may be missing,
    and main() says so)."""
    from ptkernels.ops.prefix_attention.launch import DeviceLimits, TensorDescriptor, tma_supported

    max_shared_memory, multi_processor_count = TARGETS[arch]
    return DeviceLimits(max_shared_memory, multi_processor_count, interpreted=False, hip=False,
                        tma=tma_supported(arch // 10, False, False, "1", TensorDescriptor is not None))


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def kernels() -> dict:
    """Every prefix-attention kernel by name: the launchers' public ``KERNELS`` lists."""
    from ptkernels.ops.prefix_attention import backward, forward

    return {kernel.fn.__name__: kernel for kernel in forward.KERNELS + backward.KERNELS}


def recorder(sink: list[Launch]):
    """A launcher (see ptkernels.ops.prefix_attention.launch) that appends each launch to ``sink``
    instead of running it."""

    def launcher(kernel, grid):
        def launch(*args, **kwargs):
            sink.append(Launch(kernel, tuple(grid), args, dict(kwargs)))

        return launch

    return launcher


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of forward + backward; the flags select the kernels' constexpr branches."""

    dtype: torch.dtype
    head_dim: int
    causal: bool = False
    kpm: bool = False
    prefix: str = "shared"  # "none" | "shared" | "per_example" | "bank" (3 entries read through an index)
    dropout: bool = False
    lengths: bool = False  # prefix_lengths (per entry / example)
    prefix_dropout: bool = False  # P-Tuning v2's dropout on the prefix K/V
    varlen: bool = False  # packed sequences: batch = sequences, q/k/v (total, H, D) of B * Sq / B * Sk rows
    softcap: bool = False  # logit softcapping (Gemma 2)
    sinks: bool = False  # per-head sink logits (gpt-oss)
    window: bool = False  # a causal sliding window
    relative_bias: bool = False  # T5's relative position bias (a 32-bucket table)
    dropout_p: float = 0.1  # of dropout / prefix_dropout (2**-16: threshold 1, an int Triton specialises)
    group: int = 1
    batch: int = 2
    kv_heads: int = 2
    q_len: int = 97
    k_len: int = 113
    prefix_len: int = 20
    layout: str = "bhsd"  # "bhsd" contiguous, or "bshd" (Hugging Face buffers viewed as BHSD)
    seed: int = 2**40 + 12345  # an int64 seed, as draw_dropout_seed gives

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        flags = [f for f, on in (("causal", self.causal), ("kpm", self.kpm), ("dropout", self.dropout),
                                 ("lengths", self.lengths), ("prefix_dropout", self.prefix_dropout),
                                 ("varlen", self.varlen), ("softcap", self.softcap), ("sinks", self.sinks),
                                 ("window", self.window), ("relative_bias", self.relative_bias)) if on]
        p = f"-p{self.dropout_p:g}" if (self.dropout or self.prefix_dropout) and self.dropout_p != 0.1 else ""
        return (f"{dt}-D{self.head_dim}-{self.prefix}-g{self.group}-{'+'.join(flags) or 'plain'}{p}"
                f"-B{self.batch}Hkv{self.kv_heads}Sq{self.q_len}Sk{self.k_len}P{self.prefix_len}-{self.layout}")


def _meta(shape, dtype, layout):
    if layout == "bshd" and len(shape) == 4:
        b, h, s, d = shape
        return torch.empty(b, s, h, d, dtype=dtype, device="meta").transpose(1, 2)
    return torch.empty(shape, dtype=dtype, device="meta")


def case_launches(case: Case, arch: int = 90, allow_interpreted: bool = False) -> list[Launch]:
    """The kernel launches of one forward and one backward call on sm_<arch>, recorded (nothing runs).

    In a process where the kernels are interpreted (TRITON_INTERPRET=1) the launches can be recorded
    and their grids checked (allow_interpreted=True), but not compiled.
    """
    from ptkernels.ops.prefix_attention.backward import prefix_attention_backward
    from ptkernels.ops.prefix_attention.common import KERNELS_INTERPRETED
    from ptkernels.ops.prefix_attention.forward import (
        dropout_keep_mask,
        prefix_attention_forward,
        prefix_dropout_keep_mask,
    )

    if KERNELS_INTERPRETED and not allow_interpreted:
        raise RuntimeError("aot_check needs a process without TRITON_INTERPRET (kernels would be interpreted)")

    b, hkv, d = case.batch, case.kv_heads, case.head_dim
    hq = hkv * case.group
    p = 0 if case.prefix == "none" else case.prefix_len
    q = _meta((b, hq, case.q_len, d), case.dtype, case.layout)
    k = _meta((b, hkv, case.k_len, d), case.dtype, case.layout)
    v = _meta((b, hkv, case.k_len, d), case.dtype, case.layout)
    entries = {"per_example": b, "bank": 3}.get(case.prefix)
    prefix_shape = (hkv, p, d) if entries is None else (entries, hkv, p, d)
    pk = torch.empty(prefix_shape, dtype=case.dtype, device="meta")
    pv = torch.empty(prefix_shape, dtype=case.dtype, device="meta")
    index = torch.empty(b, dtype=torch.int32, device="meta") if case.prefix == "bank" else None
    lengths = torch.empty(entries or 1, dtype=torch.int32, device="meta") if case.lengths else None
    prefix_dropout_p = case.dropout_p if case.prefix_dropout else 0.0
    prefix_seed = case.seed + 1 if case.prefix_dropout else 0
    kpm = torch.empty(b, case.k_len, dtype=torch.bool, device="meta") if case.kpm else None
    dropout_p = case.dropout_p if case.dropout else 0.0
    seed = case.seed if case.dropout else 0
    scale = d**-0.5
    limits, launches = target_limits(arch), []
    launcher = recorder(launches)
    bank = (index, lengths, prefix_dropout_p, prefix_seed)
    if case.softcap or case.sinks or case.window or case.relative_bias:
        bank += (50.0 if case.softcap else 0.0, torch.empty(hq, device="meta") if case.sinks else None,
                 48 if case.window else 0)
    if case.relative_bias:  # (Hq, num_buckets) float32 and (2L - 1,) int32, as function.py hands them over
        bank += (torch.empty(hq, 32, device="meta"),
                 torch.empty(2 * (p + case.k_len) - 1, dtype=torch.int32, device="meta"))
    varlen = None
    if case.varlen:
        from ptkernels.ops.prefix_attention.launch import Varlen

        q = torch.empty(b * case.q_len, hq, d, dtype=case.dtype, device="meta")
        k = torch.empty(b * case.k_len, hkv, d, dtype=case.dtype, device="meta")
        v = torch.empty(b * case.k_len, hkv, d, dtype=case.dtype, device="meta")
        cu = torch.empty(b + 1, dtype=torch.int32, device="meta")
        varlen, kpm = Varlen(cu, cu, case.q_len, case.k_len), None
    out, lse = prefix_attention_forward(q, k, v, pk, pv, kpm, case.causal, scale, dropout_p, seed, *bank,
                                        varlen=varlen, limits=limits, launcher=launcher)
    prefix_attention_backward(torch.empty_like(out), q, k, v, pk, pv, kpm, out, lse,
                              case.causal, scale, dropout_p, seed, *bank, varlen=varlen, limits=limits,
                              launcher=launcher)
    if case.dropout:
        dropout_keep_mask(b, hq, case.q_len, p, case.k_len, dropout_p, seed, "meta", limits=limits, launcher=launcher)
    if case.prefix_dropout:
        prefix_dropout_keep_mask(b, hkv, p, d, prefix_dropout_p, prefix_seed, "meta", launcher=launcher)
    return launches


# --------------------------------------------------------------------------------------------
# Compilation


def _specialise(launch: Launch, backend):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run computes them for a launch."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def launch_key(launch: Launch, arch: int) -> str:
    """Identifies the compiled binary: launches with the same key compile to the same kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constexprs, attrs, options = _specialise(launch, backend)
    text = repr((launch.name, arch, sorted(signature.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted(attrs.items()), sorted(options.__dict__.items())))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class Result:
    name: str
    arch: int
    case: str
    ok: bool
    stages: tuple = ()
    shared: int = 0
    registers: int = 0  # per thread, from cuobjdump (0 when unknown)
    stack: int = 0  # bytes of local stack per thread: > 0 means register spills
    num_warps: int = 0
    num_stages: int = 0
    error: str = ""
    seconds: float = 0.0


def compile_launch(launch: Launch, arch: int, case: str = "", cubin: bool = True) -> Result:
    """Compile one recorded launch for sm_<arch>; never raises (errors go into the Result)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    start = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
        signature, constexprs, attrs, options = _specialise(launch, backend)
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        stages = tuple(s for s in ("ttir", "ttgir", "llir", "ptx", "cubin") if s in compiled.asm)
        need = ("ttgir", "llir", "ptx") + (("cubin",) if cubin else ())
        missing = [s for s in need if s not in stages]
        shared = int(compiled.metadata.shared)
        error = ""
        if missing:
            error = f"missing stages {missing}"
        limit = TARGETS[arch][0]
        if shared > limit:
            error = f"needs {shared} bytes of shared memory, sm_{arch} allows {limit} per block"
        registers, stack = _resource_usage(compiled.asm.get("cubin"))
        return Result(launch.name, arch, case, not error, stages, shared, registers, stack, options.num_warps,
                      options.num_stages, error, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        msg = f"{type(exc).__name__}: {exc}"
        return Result(launch.name, arch, case, False, error=msg[-4000:], seconds=time.perf_counter() - start)


def _resource_usage(cubin: Optional[bytes]) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a cubin, read with the cuobjdump Triton ships."""
    import re
    import subprocess
    import tempfile

    if not cubin:
        return 0, 0
    try:
        import triton.backends.nvidia as nvidia

        tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        match = re.search(r"REG:(\d+) STACK:(\d+)", text)
        return (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    except Exception:  # noqa: BLE001 - informative only
        return 0, 0


def check_grid(launch: Launch) -> Optional[str]:
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    if not (1 <= grid[0] <= MAX_GRID_X and 1 <= grid[1] <= MAX_GRID_YZ and 1 <= grid[2] <= MAX_GRID_YZ):
        return f"{launch.name}: grid {launch.grid} exceeds CUDA's limits (x < 2**31, y and z <= {MAX_GRID_YZ})"
    return None


# --------------------------------------------------------------------------------------------
# Which cases


# The quick cases CI compiles for sm_80 (by index): every kernel, the pointer-load paths that sm_90
# compiles with TMA instead, the largest shared-memory footprints (fp32 at D=128, D=256, relative
# bias at D=128 with its staged bias gathers), dropout, a bank with prefix dropout. The other flags
# (packed sequences keep pointer loads on both targets) compile the same way on both archs and are
# checked for sm_90 only; sm_80 costs about twice sm_90 per kernel (ptxas: 12 s against 4 s for the
# largest forward), so this more than halves the check's time (benchmarks/aot_check.py --arch 80
# without --quick compiles the covering set).
SM80_QUICK_CASES = (0, 2, 4, 6, 10, 12)


def quick_cases(arch: Optional[int] = None) -> list[Case]:
    """What CI compiles (about a minute a target): every kernel, every constexpr flag on and off, each
    dtype, BLOCK_D 16/64/128/256 and 64 + 32, decode shapes whose ints specialise to 1, and fp32 at D=128 (the
    largest shared-memory footprint). ``arch`` 80: the subset ``SM80_QUICK_CASES``."""
    everything = _quick_cases()
    return [everything[i] for i in SM80_QUICK_CASES] if arch == 80 else everything


def _quick_cases() -> list[Case]:
    return [
        Case(torch.float16, 64, causal=True, kpm=True, prefix="shared", dropout=True, group=4),
        Case(torch.bfloat16, 128, causal=True, kpm=True, prefix="per_example", group=2, layout="bshd"),
        Case(torch.float32, 128, prefix="shared"),
        Case(torch.float16, 16, prefix="none"),
        Case(torch.bfloat16, 256, prefix="shared"),
        Case(torch.float16, 40, causal=True, batch=1, kv_heads=1, q_len=1, k_len=1, prefix_len=1),
        Case(torch.bfloat16, 64, causal=True, kpm=True, prefix="bank", lengths=True, prefix_dropout=True, group=2),
        Case(torch.float16, 64, causal=True, prefix="shared", dropout=True, group=2, varlen=True),
        Case(torch.bfloat16, 128, causal=True, kpm=True, prefix="shared", group=2, softcap=True, sinks=True,
             window=True),
        Case(torch.bfloat16, 64, causal=True, kpm=True, prefix="shared", group=2, relative_bias=True, dropout=True),
        Case(torch.float16, 128, kpm=True, prefix="per_example", relative_bias=True),
        Case(torch.float16, 64, kpm=True, prefix="bank", prefix_dropout=True, dropout=True, dropout_p=2**-16),
        # the head dim as 64 + a 32-wide tail (launch.split_head_dim), with every tail load and store
        Case(torch.bfloat16, 96, causal=True, kpm=True, prefix="bank", lengths=True, prefix_dropout=True,
             dropout=True, group=2),
        # one KV head, one query head, one query, one prefix position: ints that specialise to the
        # constant 1 where the epilogues read the grid's sizes anew (common.program_coordinates with
        # FRESH_PID, common.opaque), which failed to compile there until 2026-12-03
        Case(torch.float16, 64, causal=True, prefix="bank", lengths=True, prefix_dropout=True, dropout=True,
             kv_heads=1, group=1, q_len=1, prefix_len=1),
        # T5's relative bias for one query: triton 3.6's pipeliner failed on the prefix dK/dV kernel with
        # q_len specialised to 1 (it now takes 1 pipeline stage there)
        Case(torch.bfloat16, 64, causal=True, prefix="shared", relative_bias=True, q_len=1, k_len=9),
    ]


def cases() -> list[Case]:
    """A covering set: every dtype x BLOCK_D with all branches on and all off, plus the other mixes."""
    out = []
    for dtype, d in itertools.product((torch.float16, torch.bfloat16, torch.float32), (16, 64, 128)):
        out.append(Case(dtype, d, causal=True, kpm=True, prefix="shared", dropout=True, group=4))
        out.append(Case(dtype, d, prefix="none", group=1))
        out.append(Case(dtype, d, causal=True, prefix="per_example", group=1, layout="bshd"))
        out.append(Case(dtype, d, kpm=True, prefix="per_example", dropout=True, group=2))
    # Non-power-of-two head dims, decode-like shapes whose ints specialise to 1, large head dim.
    out += [
        Case(torch.float16, 40, kpm=True, dropout=True, group=2, layout="bshd"),
        Case(torch.bfloat16, 80, causal=True, prefix="per_example"),
        Case(torch.float16, 64, causal=True, batch=1, kv_heads=1, q_len=1, k_len=1, prefix_len=1, group=1),
        Case(torch.bfloat16, 128, kpm=True, batch=1, kv_heads=1, q_len=1, k_len=7, prefix_len=1, group=8,
             dropout=True, seed=7),  # a seed below 2**31 is passed as i32
        Case(torch.float16, 256, causal=True, kpm=True, dropout=True, group=2),
        Case(torch.bfloat16, 256, prefix="per_example"),
        Case(torch.float16, 64, causal=True, kpm=True, prefix="bank", lengths=True, group=4),
        Case(torch.bfloat16, 128, prefix="bank", prefix_dropout=True, dropout=True, group=2, layout="bshd"),
        Case(torch.float16, 64, prefix="shared", lengths=True, prefix_dropout=True, group=1),
        Case(torch.float32, 64, causal=True, prefix="per_example", lengths=True, prefix_dropout=True),
        Case(torch.bfloat16, 128, causal=True, prefix="shared", group=4, varlen=True),
        Case(torch.float16, 64, prefix="bank", lengths=True, prefix_dropout=True, group=2, varlen=True),
        Case(torch.float16, 64, causal=True, prefix="shared", softcap=True, group=2),
        Case(torch.float16, 64, causal=True, prefix="bank", lengths=True, window=True, group=4),
        Case(torch.bfloat16, 64, kpm=True, prefix="per_example", sinks=True, dropout=True, group=8),
        Case(torch.float16, 64, causal=True, prefix="shared", relative_bias=True, group=1),
        Case(torch.bfloat16, 64, kpm=True, prefix="bank", lengths=True, relative_bias=True, group=2),
    ]
    return out


def full_cases() -> list[Case]:
    """Every combination of the constexpr flags, dtypes and BLOCK_D 16/64/128 (slow: for a one-off run)."""
    out = []
    for dtype, d, causal, kpm, prefix, dropout, group in itertools.product(
        (torch.float16, torch.bfloat16, torch.float32), (16, 64, 128, 256), (False, True), (False, True),
        ("none", "shared", "per_example"), (False, True), (1, 4),
    ):
        out.append(Case(dtype, d, causal=causal, kpm=kpm, prefix=prefix, dropout=dropout, group=group))
    return out + cases()


def grid_limit_cases() -> list[Case]:
    """Shapes whose batch * heads (or batch) exceeds 65535: the grid must still be launchable."""
    return [
        Case(torch.float16, 64, batch=8192, kv_heads=4, group=4, q_len=64, k_len=64),
        Case(torch.float16, 64, batch=70000, kv_heads=1, group=1, q_len=16, k_len=16, prefix="per_example"),
        Case(torch.float16, 64, batch=70000, kv_heads=1, group=1, q_len=16, k_len=16, prefix="shared"),
    ]


def _compile_job(job):
    launch, arch, case, cubin = job
    return compile_launch(launch, arch, case, cubin)


def not_launched(results: list[Result], archs: list[int]) -> list[str]:
    """The kernels of ``kernels()`` that no compiled launch exercised, per arch."""
    compiled = {(r.arch, r.name) for r in results}
    return [f"sm_{arch} {name}" for arch in archs for name in kernels() if (arch, name) not in compiled]


def check_grids(cases: list[Case], archs: list[int]) -> list[str]:
    """Grid-limit problems of the launches of ``cases`` (recorded only, nothing is compiled)."""
    return [f"sm_{arch} {case}: {err}" for arch in archs for case in cases
            for launch in case_launches(case, arch) if (err := check_grid(launch)) is not None]


def run(cases, archs: list[int], cubin: bool = True, workers: Optional[int] = None,
        verbose: bool = False) -> tuple[list[Result], list[str]]:
    """Compile the distinct kernels of ``cases`` (a list of Case, or {arch: list of Case}) for each
    arch, in one worker pool. Returns (results, grid problems)."""
    jobs, seen, grid_errors = [], set(), []
    for arch in archs:
        for case in cases[arch] if isinstance(cases, dict) else cases:
            for launch in case_launches(case, arch):
                if (err := check_grid(launch)) is not None:
                    grid_errors.append(f"sm_{arch} {case}: {err}")
                key = launch_key(launch, arch)
                if key not in seen:
                    seen.add(key)
                    jobs.append((launch, arch, str(case), cubin))
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        # Launch objects carry JITFunctions, which pickle by reference to their module.
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_compile_job, [_picklable(j) for j in jobs], chunksize=1))
    else:
        results = [_compile_job(j) for j in jobs]
    if verbose:
        for r in results:
            status = "ok " if r.ok else "FAIL"
            print(f"{status} sm_{r.arch} {r.name:34s} warps={r.num_warps} stages={r.num_stages} "
                  f"shared={r.shared:6d} regs={r.registers:3d} stack={r.stack:4d} {r.seconds:5.1f}s {r.case}"
                  + (f"\n    {r.error}" if r.error else ""))
    return results, grid_errors


def _picklable(job):
    from triton.runtime.jit import MockTensor

    launch, arch, case, cubin = job

    # Argument specialisation reads a tensor's dtype and data_ptr (0 here: 16-byte aligned), and a
    # tensor descriptor's base dtype and block shape.
    def mock(a):
        if isinstance(a, torch.Tensor):
            return MockTensor(a.dtype, list(a.shape))
        if type(a).__name__ == "TensorDescriptor":
            return dataclasses.replace(a, base=MockTensor(a.base.dtype, list(a.base.shape)))
        return a

    args = tuple(mock(a) for a in launch.args)
    return _PickledLaunch(launch.name, launch.grid, args, launch.kwargs), arch, case, cubin


class _PickledLaunch(Launch):
    """A Launch that pickles its kernel by name, looked up in ``kernels()`` (for the worker processes)."""

    def __init__(self, kernel_name, grid, args, kwargs):
        super().__init__(kernels()[kernel_name], grid, args, kwargs)

    def __reduce__(self):
        return (_PickledLaunch, (self.name, self.grid, self.args, self.kwargs))


def unavailable_reason() -> Optional[str]:
    """Why this triton install cannot compile for NVIDIA targets, or None when it can."""
    try:
        import triton.backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
    except Exception as exc:  # noqa: BLE001
        return f"triton is not importable ({exc})"
    if "nvidia" not in triton.backends.backends:
        return f"triton has no nvidia backend (backends: {sorted(triton.backends.backends)})"
    try:
        make_backend(GPUTarget("cuda", 90, 32))
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # older triton: get_ptxas() takes no arch
            ptxas = get_ptxas().path
    except Exception as exc:  # noqa: BLE001
        return f"the nvidia backend or its ptxas is unusable ({type(exc).__name__}: {exc})"
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"ptxas not found or not executable ({ptxas!r})"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(TARGETS))
    parser.add_argument("--quick", action="store_true", help="the small set CI compiles")
    parser.add_argument("--full", action="store_true", help="every flag combination (slow)")
    parser.add_argument("--skip-exit-code", type=int, default=0,
                        help="exit with this code (not 0) when the triton install cannot compile for NVIDIA GPUs")
    parser.add_argument("--no-cubin", action="store_true", help="stop at PTX (no ptxas)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if (reason := unavailable_reason()) is not None:
        print(f"cannot compile for NVIDIA GPUs here: {reason}")
        return args.skip_exit_code
    selected = {arch: full_cases() if args.full else quick_cases(arch) if args.quick else cases()
                for arch in args.arch}
    results, grid_errors = run(selected, args.arch, cubin=not args.no_cubin, workers=args.workers, verbose=args.verbose)
    grid_errors += check_grids(grid_limit_cases(), args.arch)
    failed = [r for r in results if not r.ok]
    missing = not_launched(results, args.arch)
    for r in failed:
        print(f"FAIL sm_{r.arch} {r.name} [{r.case}]: {r.error}")
    for e in grid_errors:
        print(f"GRID {e}")
    for m in missing:
        print(f"NOT LAUNCHED {m}")
    print(f"{len(results)} kernels compiled for sm_{'/sm_'.join(map(str, args.arch))} from "
          f"{'/'.join(str(len(selected[arch])) for arch in args.arch)} cases, "
          f"{len(failed)} failed, {len(grid_errors)} grid problems, {len(missing)} kernels not launched, "
          f"{time.perf_counter() - start:.1f}s")
    return 1 if failed or grid_errors or missing else 0


if __name__ == "__main__":
    sys.exit(main())
