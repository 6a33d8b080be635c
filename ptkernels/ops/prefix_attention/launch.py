"""Launch settings of the prefix-attention kernels, as pure functions of the device's limits.

The launchers (forward.py, backward.py) ask ``device_limits`` (the only function here that probes
a device) once per launch, and pass the ``DeviceLimits`` it returns to the functions below: block
configs that fit the device's shared memory, the interpreter's settings, tl.dot's input precision,
how many batch slices reduce a shared prefix's gradient. Given explicit limits, the same choices
can be made for any GPU on any machine: benchmarks/aot_check.py compiles the configs chosen for
sm_90 and sm_80 without a GPU and checks their real shared-memory footprint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import torch
import triton
from torch import Tensor

from .common import DROPOUT_PORTABLE, DROPOUT_PTX, DROPOUT_PTX_KEYS, KERNELS_INTERPRETED, PHILOX_ROUNDS

LOG2_E = 1.4426950408889634

# The largest head dim the Triton backend takes (BLOCK_D 256); backend="torch" has no limit.
TRITON_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What the launch settings depend on, for one device.

    max_shared_memory: bytes of shared memory one program may use (227 KiB = 232448 on H100,
        163 KiB = 166912 on A100, 99 KiB = 101376 on sm_86/sm_89 parts such as A10G, L4, RTX 4090).
    multi_processor_count: SMs, or None off CUDA (CPU tensors in the interpreter, meta tensors).
    interpreted: the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when triton was imported).
    hip: a ROCm device.
    tma: full tiles may load through TMA tensor descriptors (``tma_descriptor``): an NVIDIA GPU of
        compute capability 9.0 or newer, this triton has ``triton.tools.tensor_descriptor``, and
        PTKERNELS_TMA is not "0". Off the GPU only when asked (tests pass limits with tma=True to
        run the descriptor path in the interpreter).
    """

    max_shared_memory: int
    multi_processor_count: Optional[int]
    interpreted: bool
    hip: bool = False
    tma: bool = False


# PTKERNELS_TMA=0 turns the TMA loads off (cp.async pointer loads everywhere, as before sm_90).
TMA_ENV = "PTKERNELS_TMA"

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a triton without host-side tensor descriptors: pointer loads only
    TensorDescriptor = None


def device_limits(device) -> DeviceLimits:
    """The limits of ``device`` (a torch.device or string). The only place that probes a device."""
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceLimits(232448, None, KERNELS_INTERPRETED, bool(torch.version.hip))
    return _cuda_device_limits(device.index if device.index is not None else torch.cuda.current_device(),
                               os.environ.get(TMA_ENV))


def tma_supported(capability_major: int, hip: bool, interpreted: bool, env_value: Optional[str],
                  has_descriptors: bool = True) -> bool:
    """Whether the launchers may use TMA descriptors on a device: NVIDIA compute capability >= 9,
    compiled kernels, a triton with host-side tensor descriptors, and PTKERNELS_TMA (``env_value``)
    not "0"."""
    return (capability_major >= 9 and not hip and not interpreted and has_descriptors
            and (env_value or "1") != "0")


@functools.lru_cache(maxsize=None)
def _cuda_device_limits(index: int, tma_env: Optional[str] = None) -> DeviceLimits:
    max_shared = int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    props = torch.cuda.get_device_properties(index)
    hip = bool(torch.version.hip)
    tma = tma_supported(props.major, hip, KERNELS_INTERPRETED, tma_env, TensorDescriptor is not None)
    return DeviceLimits(max_shared, props.multi_processor_count, KERNELS_INTERPRETED, hip, tma)


# The attention kernels fold the softmax scale into one multiply-add per score (exp2(qk * scale -
# m), as Triton's tutorial does), which needs floating-point contraction. Triton 3.9 contracts by
# default but warns that 3.10 will not, so the launchers ask for it (the `enable_fp_fusion` option).
FP_FUSION = True


# A launcher is given (kernel, grid) and calls what it returns with the kernel's arguments; by default
# it launches the kernel. benchmarks/aot_check.py passes one that records the launches instead.
Launcher = Callable[[Any, tuple], Callable[..., Any]]


def launch_kernel(kernel, grid: tuple) -> Callable[..., Any]:
    """The default launcher: ``kernel[grid]``."""
    return kernel[grid]


# --------------------------------------------------------------------------------------------
# Block sizes and configs


def block_d(head_dim: int) -> int:
    """Head dims are padded in registers to a power of two >= 16 (tl.dot's minimum), not in memory."""
    return max(16, triton.next_power_of_2(head_dim))


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D_TAIL): how the attention kernels (forward, dQ, dK/dV, prefix dK/dV) tile the
    head dim. 64 < D <= 96 (Phi-2's 80, Phi-3's 96) as a 64-channel part plus a 16- or 32-channel
    tail, each its own tile and tl.dot, rather than padded to 128: on sm_90 their wgmmas then run
    80 / 96 channels instead of 128 (a static model puts the D=128 loops at the tensor-core bound:
    README, "D = 80 and 96").
    Elsewhere (block_d(D), 0): one tile, padded to a power of two. PTKERNELS_SPLIT_HEAD_DIM=0 in the
    environment pads every head dim (to compare the two on a GPU, or in benchmarks/static_report.py)."""
    if 64 < head_dim <= 96 and os.environ.get("PTKERNELS_SPLIT_HEAD_DIM", "1") != "0":
        return 64, max(16, triton.next_power_of_2(head_dim - 64))
    return block_d(head_dim), 0


def head_dim_parts(head_dim: int) -> dict:
    """The attention kernels' head-dim constexprs (``split_head_dim``): BLOCK_D, EVEN_D (the first
    BLOCK_D channels all lie below head_dim), BLOCK_D_TAIL and EVEN_TAIL (head_dim == BLOCK_D +
    BLOCK_D_TAIL, no mask on the tail's channels)."""
    bd, tail = split_head_dim(head_dim)
    return dict(BLOCK_D=bd, EVEN_D=bd <= head_dim, BLOCK_D_TAIL=tail, EVEN_TAIL=bd + tail == head_dim)


def tail_views(tensors: tuple, first_channel: int) -> tuple:
    """The tensors' channels first_channel.. (views, for the tail part's TMA descriptors)."""
    return tuple(t[..., first_channel:] for t in tensors)


def head_dim_bucket(head_dim: int) -> int:
    return min(256, max(64, block_d(head_dim)))


def upcast_in_interpreter(dtype: torch.dtype, interpreted: bool) -> bool:
    """Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly: compute those tiles in fp32."""
    return interpreted and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype, hip: bool = bool(torch.version.hip),
                  float32_matmul_precision: Optional[str] = None) -> str:
    """tl.dot input precision for ``dtype`` tiles (it only matters for fp32; 16-bit tiles ignore it).

    On a GPU, tl.dot on fp32 defaults to TF32 (10-bit mantissa), which torch.matmul does not do by
    default. So fp32 follows torch's float32 matmul precision (``float32_matmul_precision``, read from
    torch.get_float32_matmul_precision() when None): "highest" (the default) gets tf32x3 (three TF32
    tensor-core products, about fp32 accuracy), "high"/"medium" (TF32 allowed, e.g.
    torch.backends.cuda.matmul.allow_tf32 = True) gets plain TF32. ROCm (``hip``) gets exact fp32 ("ieee").
    """
    if dtype != torch.float32:
        return "tf32"
    if hip:
        return "ieee"
    if float32_matmul_precision is None:
        float32_matmul_precision = torch.get_float32_matmul_precision()
    return "tf32x3" if float32_matmul_precision == "highest" else "tf32"


INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)

# Block configs are (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, best first, by padded
# head dim (<= 64, 128, 256); a launcher takes the first whose shared-memory estimate, times the
# margin (what the compiler allocates beyond the operand tiles: layout conversions, the hi/lo
# halves of tf32x3 operands), fits the device. benchmarks/aot_check.py compiles them all and checks
# the real sizes.
# fp32 tiles (tf32x3 dots) need more registers: smaller tiles, or they spill heavily.
# Dropout at D=64: 4 warps (the philox draw lands in the MMA layout itself, see
# common.attention_dropout_keep; 8 warps take more issue slots per score).
# D=128: 128 x 128 tiles (Triton's tutorial's) where 2 stages fit (sm_90), else 128 x 64.
_FORWARD_CANDIDATES = {
    (64, False): [(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    (64, True): [(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    (128, False): [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    (128, True): [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    (256, False): [(64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 1), (16, 16, 4, 1)],
}
_FORWARD_CANDIDATES_FP32 = {
    64: [(64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    128: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    256: [(32, 32, 8, 1), (16, 16, 4, 1)],
}
# Backward: the dQ kernel and the two dK/dV kernels (real keys, prefix) each get their own config,
# keyed by (kernel kind, padded head dim, attention dropout); a key with dropout that is not listed
# takes the entry without (as the forward's table). dQ: BLOCK_M queries per program, BLOCK_N keys
# per iteration. dK/dV: BLOCK_N keys per program, BLOCK_M queries per iteration.
# 8 warps only where the score tile has 128 MMA rows: a Hopper wgmma covers 64 rows per warpgroup,
# and on a 64-row tile Triton's 8 warps (warpsPerCTA [8, 1]) compute it twice, once per warpgroup.
# The rows are dQ's queries; dK/dV's keys without dropout (it computes the scores transposed, keys x
# queries, as Triton's tutorial) and its queries with dropout (queries x keys, where the keep mask
# is drawn). Chosen from the sm_90 static report (benchmarks/static_report.py) for spills and issue
# slots per (query x key): against the shared 64 x 64 configs they replace, D=64 dK/dV costs 2-4%
# more and no longer spills, D=128 0.36-0.60x; dK/dV dropout at D=64 and D=128 takes 1 stage (2
# stages spill there). D=256 keeps the old shared 64 x 64 tiles.
_BACKWARD_CANDIDATES = {
    ("dq", 64, False): [(64, 64, 4, 2), (64, 64, 4, 1), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    ("dkdv", 64, False): [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 1), (32, 32, 4, 2), (32, 32, 4, 1),
                          (16, 16, 4, 1)],
    ("dkdv", 64, True): [(64, 64, 4, 1), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    ("dq", 128, False): [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 1), (32, 32, 4, 2), (32, 32, 4, 1),
                         (16, 16, 4, 1)],
    ("dkdv", 128, False): [(32, 128, 8, 2), (32, 128, 8, 1), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1),
                           (16, 16, 4, 1)],
    ("dkdv", 128, True): [(128, 64, 8, 1), (64, 64, 4, 1), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    ("dq", 256, False): [(64, 64, 8, 2), (64, 64, 8, 1), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    ("dkdv", 256, False): [(64, 64, 8, 2), (64, 64, 8, 1), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
}
# With T5's relative bias (a trainable table: dQ also sums dS per bucket), dQ at D=128 on 128 x 64
# tiles spilled 360 bytes, 10-12 local accesses in every key iteration (its key loop holds the
# bucket loop); on 128 x 32 none, at the same instructions per key outside the bucket loop (494-656
# per 32 keys against 991-1374 per 64) and fewer inside it (306 per bucket and 32 keys against 677
# per 64). (The other kinds and head dims keep the table above: they did not spill.)
_BACKWARD_BIAS_CANDIDATES = {
    ("dq", 128): [(128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 4, 1), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
}
_BACKWARD_CANDIDATES_FP32 = {
    64: [(32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    128: [(32, 32, 8, 2), (32, 32, 8, 1), (16, 16, 4, 1)],
    256: [(32, 32, 8, 1), (16, 16, 4, 1)],
}
BACKWARD_KINDS = ("dq", "dkdv")
FORWARD_SHARED_MEMORY_MARGIN = {torch.float16: 1.25, torch.bfloat16: 1.25, torch.float32: 1.4}
BACKWARD_SHARED_MEMORY_MARGIN = {torch.float16: 1.1, torch.bfloat16: 1.1, torch.float32: 1.4}


def first_fitting(candidates, need, margin: float, max_shared: int) -> dict:
    """The first (BLOCK_M, BLOCK_N, num_warps, num_stages) whose need(...) * margin fits, else the last."""
    return all_fitting(candidates, need, margin, max_shared)[0]


def all_fitting(candidates, need, margin: float, max_shared: int) -> list[dict]:
    """Every candidate whose need(...) * margin fits, in the candidates' order (else the last one)."""
    fits = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in candidates
            if need(m, n, st) * margin <= max_shared]
    if not fits:
        m, n, w, st = candidates[-1]
        fits = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)]
    return fits


# Opt-in autotuning: PTKERNELS_AUTOTUNE=1 makes the launchers time every fitting candidate config
# once per process and shape bucket (triton.testing.do_bench on the real inputs) and keep the
# fastest. Off by default: the heuristic choice above is deterministic and compiles one kernel.
AUTOTUNE_ENV = "PTKERNELS_AUTOTUNE"
_tuned_configs: dict = {}


def autotune_requested(limits: "DeviceLimits") -> bool:
    """True when PTKERNELS_AUTOTUNE=1 and the kernels are compiled (autotuning the interpreter is moot)."""
    return os.environ.get(AUTOTUNE_ENV, "0") == "1" and not limits.interpreted


def tuned_config(key: tuple, configs: list[dict], measure: Callable[[dict], float]) -> dict:
    """The config of ``configs`` with the smallest ``measure(config)`` (milliseconds), measured once
    per ``key`` and process; a tie keeps the earlier (heuristic-first) config."""
    if key not in _tuned_configs:
        times = [measure(config) for config in configs]
        _tuned_configs[key] = configs[times.index(min(times))]
    return _tuned_configs[key]


def shape_bucket(n: int) -> int:
    """Sequence lengths share a tuned config per power of two."""
    return 1 << max(n - 1, 0).bit_length()


def dropout_threshold(dropout_p: float) -> tuple[int, float]:
    """(t, scale) of the kernels' dropout: a weight is kept iff its 16-bit random lane is >= t,
    t = round(p * 65536), so P(keep) = 1 - t / 65536 (within 2**-17 of 1 - p, as FlashAttention
    quantises p, to 8 bits there), and kept weights are scaled by 1 / P(keep)."""
    t = min(round(dropout_p * 65536), 65535)
    return t, 65536.0 / (65536 - t)


def philox_mode(limits: DeviceLimits) -> int:
    """Which Philox the kernels run on a device (same bits either way): ``common.DROPOUT_PTX``
    (``common.philox``'s inline PTX wide multiplies) in kernels compiled for an NVIDIA GPU,
    ``common.DROPOUT_PORTABLE`` (tl.philox) in the interpreter and on ROCm."""
    return int(DROPOUT_PORTABLE if limits.interpreted or limits.hip else DROPOUT_PTX)


def dropout_mode(dropout_p: float, limits: DeviceLimits) -> int:
    """The attention kernels' DROPOUT constexpr: 0 without attention dropout, else ``philox_mode``."""
    return philox_mode(limits) if dropout_p > 0.0 else 0


def keyed_dropout_mode(mode: int) -> int:
    """The DROPOUT constexpr of a kernel that takes the round keys (``philox_round_keys``): the
    compiled NVIDIA Philox takes them as DROPOUT_PTX_KEYS; the others draw from the seed."""
    return int(DROPOUT_PTX_KEYS) if mode == DROPOUT_PTX else mode


# The kernel arguments of philox_round_keys (kept out of Triton's integer specialisation).
ROUND_KEY_ARGS = tuple(f"round_key_{i}" for i in range(2 * PHILOX_ROUNDS.value))


def philox_round_keys(seed: int) -> tuple:
    """The 2 x PHILOX_ROUNDS (14) round keys of Philox4x32-7 for ``seed`` (``tl.philox``'s key schedule: the key words
    seed mod 2**32 and seed >> 32, plus r times 0x9E3779B9 and 0xBB67AE85 in round r, mod 2**32),
    round by round, each plus 2**32: Triton types an int argument by its value (int32 below 2**31),
    so a fixed range [2**32, 2**33) compiles one kernel for every seed; the kernel reads the low 32
    bits (``common.philox_keyed``)."""
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    keys = []
    for r in range(PHILOX_ROUNDS.value):
        keys += [((k0 + r * 0x9E3779B9) & 0xFFFFFFFF) + 2**32, ((k1 + r * 0xBB67AE85) & 0xFFFFFFFF) + 2**32]
    return tuple(keys)


def forward_config(head_dim: int, dtype: torch.dtype, limits: DeviceLimits, dropout: bool = False,
                   bias: bool = False) -> dict:
    """Forward block config (BLOCK_M, BLOCK_N, num_warps, num_stages) on a device with ``limits``."""
    if limits.interpreted:
        return dict(INTERPRETER_CONFIG)
    return gpu_forward_config(head_dim, dtype, limits.max_shared_memory, dropout, bias)


def gpu_forward_config(head_dim: int, dtype: torch.dtype, max_shared: int, dropout: bool = False,
                       bias: bool = False) -> dict:
    """Forward block config on a GPU with ``max_shared`` bytes of shared memory per program."""
    return gpu_forward_configs(head_dim, dtype, max_shared, dropout, bias)[0]


def gpu_forward_configs(head_dim: int, dtype: torch.dtype, max_shared: int, dropout: bool = False,
                        bias: bool = False) -> list[dict]:
    """Every forward candidate that fits, the heuristic choice first (the autotuning space).
    bias (T5's relative bias): the pipeliner also stages the per-tile bias gathers; 8 bytes per score
    per stage is what the compiled kernels need (147 KB at D=64, 180 KB at D=128 with 2 stages on
    sm_90, benchmarks/static_report.py), so the sm_80 and sm_90 choices fit."""
    bd, size, bucket = block_d(head_dim), dtype.itemsize, head_dim_bucket(head_dim)
    if dtype == torch.float32:
        candidates = _FORWARD_CANDIDATES_FP32[bucket]
    else:
        candidates = _FORWARD_CANDIDATES.get((bucket, dropout), _FORWARD_CANDIDATES[(bucket, False)])

    def need(block_m, block_n, stages):  # the Q tile, plus num_stages (K, V) tile pairs (and bias gathers)
        return (block_m * bd + 2 * stages * block_n * bd) * size + (stages * block_m * block_n * 8 if bias else 0)

    return all_fitting(candidates, need, FORWARD_SHARED_MEMORY_MARGIN[dtype], max_shared)


def backward_config(head_dim: int, dtype: torch.dtype, limits: DeviceLimits, dropout: bool = False,
                    bias: bool = False) -> dict:
    """The backward kernels' block configs on a device with ``limits``: {"dq": config, "dkdv": config}
    (the dK/dV config serves the real-key and the prefix dK/dV kernels), each a dict of BLOCK_M,
    BLOCK_N, num_warps, num_stages."""
    if limits.interpreted:
        return {kind: dict(INTERPRETER_CONFIG) for kind in BACKWARD_KINDS}
    return gpu_backward_config(head_dim, dtype, limits.max_shared_memory, dropout, bias)


def gpu_backward_config(head_dim: int, dtype: torch.dtype, max_shared: int, dropout: bool = False,
                        bias: bool = False) -> dict:
    """The backward configs on a GPU with ``max_shared`` bytes of shared memory per program
    (bias: with T5's relative bias)."""
    return {kind: gpu_backward_kernel_configs(kind, head_dim, dtype, max_shared, dropout, bias)[0]
            for kind in BACKWARD_KINDS}


def gpu_backward_configs(head_dim: int, dtype: torch.dtype, max_shared: int, dropout: bool = False,
                         bias: bool = False) -> list[dict]:
    """The autotuning space: the heuristic choice first, then the other fitting dK/dV configs with
    the chosen dQ config, then the other dQ configs with the chosen dK/dV config (the kernels are
    timed together, so the two are tuned one after the other rather than as a product)."""
    dq = gpu_backward_kernel_configs("dq", head_dim, dtype, max_shared, dropout, bias)
    dkdv = gpu_backward_kernel_configs("dkdv", head_dim, dtype, max_shared, dropout, bias)
    return [dict(dq=dq[0], dkdv=c) for c in dkdv] + [dict(dq=c, dkdv=dkdv[0]) for c in dq[1:]]


def gpu_backward_kernel_configs(kind: str, head_dim: int, dtype: torch.dtype, max_shared: int,
                                dropout: bool = False, bias: bool = False) -> list[dict]:
    """Every candidate config of one backward kernel kind ("dq" or "dkdv") that fits, best first."""
    bd, size, bucket = block_d(head_dim), dtype.itemsize, head_dim_bucket(head_dim)
    if dtype == torch.float32:
        candidates = _BACKWARD_CANDIDATES_FP32[bucket]
    elif bias and (kind, bucket) in _BACKWARD_BIAS_CANDIDATES:
        candidates = _BACKWARD_BIAS_CANDIDATES[(kind, bucket)]
    else:
        candidates = _BACKWARD_CANDIDATES.get((kind, bucket, dropout), _BACKWARD_CANDIDATES[(kind, bucket, False)])

    def need(block_m, block_n, stages):
        return backward_shared_memory(kind, block_m, block_n, stages, bd, size, dropout)

    return all_fitting(candidates, need, BACKWARD_SHARED_MEMORY_MARGIN[dtype], max_shared)


def backward_shared_memory(kind: str, block_m: int, block_n: int, stages: int, bd: int, size: int,
                           dropout: bool) -> int:
    """Operand bytes of a backward kernel: dQ holds its Q and dO tiles (BLOCK_M x BLOCK_D) and streams
    num_stages (K, V) tile pairs (BLOCK_N x BLOCK_D); dK/dV holds K and V (BLOCK_N) and streams (Q, dO)
    pairs (BLOCK_M), and with dropout also transposes P and dS (BLOCK_M x BLOCK_N) through shared memory."""
    if kind == "dq":
        return (2 * block_m * bd + 2 * stages * block_n * bd) * size
    return (2 * block_n * bd + 2 * stages * block_m * bd + (2 * block_m * block_n if dropout else 0)) * size


def shared_prefix_splits(batch: int, prefix_blocks: int, kv_heads: int, multi_processor_count: Optional[int]) -> int:
    """How many batch slices reduce a shared prefix's gradient in parallel (fp32 partials, fixed order).

    About two programs per SM. There is no fixed cap: with few kv heads and a short prefix (MQA, P <= 64
    gives prefix_blocks * kv_heads = 1) a cap of 8 left 8 programs on a 132-SM H100, each looping over
    B / 8 examples x the GQA group x all query blocks. The partials stay small: splits * Hkv * P is
    about 2 * SMs * BLOCK_N rows of D fp32 (17 MB at D = 128 on an H100, K and V together).
    Off CUDA (multi_processor_count None: the interpreter) 2, so that CI exercises the partial-sum path.
    """
    if batch <= 1:
        return 1
    if multi_processor_count is None:
        return min(batch, 2)
    want = triton.cdiv(2 * multi_processor_count, max(1, prefix_blocks * kv_heads))
    return max(1, min(batch, want))


def bank_splits(batch: int, entries: int, prefix_blocks: int, kv_heads: int,
                multi_processor_count: Optional[int]) -> int:
    """How many slices each bank entry's examples are split into for the gradient reduction: about
    two programs per SM over all A entries (the per-entry counts are not read on the host, so a
    split takes ceil(B / splits) examples of its entry's list; splits past an entry's count are empty).
    Off CUDA 2 (when B > 1), so that CI exercises the partial-sum path."""
    if batch <= 1:
        return 1
    if multi_processor_count is None:
        return min(batch, 2)
    want = triton.cdiv(2 * multi_processor_count, max(1, prefix_blocks * kv_heads * entries))
    return max(1, min(batch, want))


# --------------------------------------------------------------------------------------------
# Kernel arguments


def mask_strides(key_padding_mask: Optional[Tensor]) -> tuple[int, int]:
    """(batch, key) strides of a (B, Sk) key padding mask; (0, 0) without one."""
    return (0, 0) if key_padding_mask is None else (key_padding_mask.stride(0), key_padding_mask.stride(1))


def key_bounds_reference(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """``forward.key_bounds_of`` in PyTorch (about 14 small launches where the kernel takes one):
    (B, 3) int32 per example: first attended key, one past the last, and 1 when every key in
    between is attended, else 0 ((0, 0, 1) for a row with none); None without a mask."""
    if key_padding_mask is None:
        return None
    mask = key_padding_mask.to(torch.int32)
    batch, k_len = mask.shape
    if k_len == 0:  # no keys: every row is an empty run
        return torch.tensor([0, 0, 1], dtype=torch.int32, device=mask.device).repeat(batch, 1)
    count = mask.sum(1)
    first = mask.argmax(1)
    last = k_len - mask.flip(1).argmax(1)
    empty = count == 0
    first = torch.where(empty, 0, first)
    last = torch.where(empty, 0, last)
    return torch.stack([first, last, (count == last - first).to(first.dtype)], 1).to(torch.int32)


@dataclasses.dataclass(frozen=True)
class Varlen:
    """Packed sequences (flash-attention's varlen layout) for the launchers: q (total_q, Hq, D), k / v
    (total_k, Hkv, D), sequence n's queries rows cu_seqlens_q[n]..cu_seqlens_q[n + 1] (int32 (N + 1,)),
    its keys likewise; max_seqlen_q / max_seqlen_k bound every sequence's lengths (the grid's extent)."""

    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def qkv_strides(t: Tensor, varlen: Optional[Varlen]) -> tuple[int, int, int]:
    """(batch, head, row) strides the kernels address q / k / v / out / their gradients with:
    (B, H, S, D) as it is; a packed (total, H, D) tensor as one batch (batch stride 0) whose
    sequences start at their cu_seqlens row."""
    if varlen is None:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(1), t.stride(0)


def tma_descriptor(t: Tensor, block_rows: int, block_d: int, varlen: bool = False, limits: Optional[DeviceLimits] = None):
    """A TMA tensor descriptor of ``t`` as a 4-D (batch, head, row, D) tensor with (1, 1, block_rows,
    block_d) boxes, or None where TMA cannot read it (then the kernels load through pointers):

    t: (B, H, S, D) q / k / v, or (total, H, D) packed (``varlen``: one batch of total rows), or a
    prefix (Hkv, P, D) shared (one entry) or (A, Hkv, P, D). None when ``limits.tma`` is off, for a
    dtype other than fp16 / bf16, an empty tensor, a base address not 16-byte aligned, a stride of 0
    (an expanded tensor) or one that is not a multiple of 16 bytes or not below 2**40 bytes, or a dim
    of 2**31 or more (the kernels' coordinates are int32) (TMA's rules; the last stride is 1, as the
    launchers require anyway). Boxes past the tensor's end read zeros: channels past D
    when block_d > D, rows past the end."""
    if limits is None or not limits.tma or TensorDescriptor is None:
        return None
    if t.dtype not in (torch.float16, torch.bfloat16) or t.numel() == 0:
        return None
    if varlen:
        t = t.unsqueeze(0).transpose(1, 2)  # (1, H, total, D)
    elif t.dim() == 3:
        t = t.unsqueeze(0)  # a shared prefix: entry 0
    size = t.element_size()
    strides = list(t.stride())
    # A size-1 dim's stride is never stepped: give it a legal one.
    strides = [s if n > 1 else t.shape[-1] * 8 for s, n in zip(strides, t.shape)]
    if strides[-1] != 1 or any(s <= 0 or s * size % 16 or s * size >= 2**40 for s in strides[:-1]):
        return None
    if any(n >= 2**31 for n in t.shape) or t.data_ptr() % 16:
        return None
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block_rows, block_d])


TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


def half_width_edge_tma(head_dim: int, triton_version: tuple = TRITON_VERSION) -> bool:
    """Whether the forward kernel may load its half-width masked real-key tiles (EDGE_N < BLOCK_N)
    through TMA. Triton 3.6's ptxas (CUDA 12.8; the GPU image's) crashes (SIGSEGV) on the D = 80 / 96
    / 128 forward that does so (with attention dropout and no padding mask, or a bank with prefix
    dropout), and compiles it with pointer loads there; triton 3.9's (CUDA 12.9) compiles both, and
    the TMA loads keep those masked loops 8-11% shorter (676 against 735 instructions at D=128 with
    dropout). D=64 compiles either way."""
    return head_dim <= 64 or triton_version >= (3, 9)


def forward_edge_block(block_n: int, head_dim: int, dropout: bool = False, padding: bool = False,
                       varlen: bool = False, softcap: bool = False, bias: bool = False,
                       prefix_dropout: bool = False) -> int:
    """EDGE_N, the key width of the forward's masked tiles (the prefix's last partial tile, the
    real keys' edges, a padding mask's tiles), for full tiles BLOCK_N = ``block_n`` keys wide:
    half of it where the masked loops ran out of registers on sm_90 (static report, triton 3.9),
    else block_n. Under P-Tuning v2's prefix dropout the prefix's full tiles take this width too
    (the forward's PREFIX_N).

    A masked loop holds what the full loops do (the accumulator, the scores and their 16-bit copy)
    plus each key column's index in the score tile (32 per thread on 128 x 128 tiles), the mask and,
    under a padding mask or packed sequences, the pointer tiles of its loads; the compiler computes
    the column indices once, ahead of all the loops. With attention dropout (D <= 128), or at D = 128
    with a padding mask, packed sequences, softcap or T5's relative bias, that spilled (32-436 bytes
    a kernel); on half-width masked tiles none of it does (the 16 bytes they left outside the loops
    at D=64 with dropout + causal + padding + GQA went with the epilogue's fresh program
    coordinates, ``program_coordinates(..., FRESH_PID)``). A masked key costs 0.95-1.27x the instructions there (a
    half tile's count x 2 against a whole one's); a plain prefix's masked tiles (the causal diagonal,
    no padding: 449 per 64 keys against 701 per 128 at D=128) would pay 1.28x with no spill to save,
    so the sets that did not spill keep whole tiles, and so does D=64's relative bias (half tiles
    spilled more there, 48 -> 424 bytes). With a bank's prefix dropout at D=128 the prefix loops
    drop each loaded K / V tile in registers (188-228 bytes, 10 local accesses per prefix tile on
    whole tiles; none on half ones, at 1.08-1.09x the instructions per key). Tiles narrower than 64
    keys (fp32, D = 256, the interpreter's) are not split."""
    bucket = head_dim_bucket(head_dim)
    if block_n < 64 or bucket > 128:
        return block_n
    if dropout or (bucket == 128 and (padding or varlen or softcap or bias or prefix_dropout)):
        return block_n // 2
    return block_n


def tma_descriptors(real: tuple, prefix: tuple, block_rows: int, block_d: int, varlen: bool,
                    limits: DeviceLimits) -> Optional[tuple]:
    """Descriptors (``tma_descriptor``) of the ``real`` tensors (q / k / v / ... rows of the real
    sequence), then of the ``prefix`` tensors (empty prefixes get none: their loops never run), or
    None unless every one of them can be read by TMA (a kernel takes all of them or none)."""
    descs = [tma_descriptor(t, block_rows, block_d, varlen, limits) for t in real]
    descs += [tma_descriptor(t, block_rows, block_d, False, limits) if t.shape[-2] > 0 else None for t in prefix]
    if any(d is None for d in descs[:len(real)]) or any(
            d is None and t.shape[-2] > 0 for d, t in zip(descs[len(real):], prefix)):
        return None
    return tuple(descs)


def split_tma_descriptors(real: tuple, prefix: tuple, block_rows: int, head_dim: int, varlen: bool,
                          limits: DeviceLimits) -> Optional[tuple]:
    """``tma_descriptors`` of the head dim's parts (``split_head_dim``): the first BLOCK_D channels' of
    the ``real`` then the ``prefix`` tensors, then as many of their tails (views from channel
    BLOCK_D on, BLOCK_D_TAIL-wide boxes; None without a tail), or None unless every one can be made."""
    bd, tail = split_head_dim(head_dim)
    descs = tma_descriptors(real, prefix, block_rows, bd, varlen, limits)
    if descs is None or not tail:
        return None if descs is None else descs + (None,) * len(descs)
    tails = tma_descriptors(tail_views(real, bd), tail_views(prefix, bd), block_rows, tail, varlen, limits)
    return None if tails is None else descs + tails


def softcap_args(scale: float, softcap: float) -> tuple[float, float]:
    """(softcap_in, softcap_out) of ``common.log2_scores``: scale / softcap and softcap * log2(e)
    ((0, 0) with softcap 0: off)."""
    if softcap <= 0.0:
        return 0.0, 0.0
    return scale / softcap, softcap * LOG2_E


def entry_step(prefix_k: Tensor, prefix_index: Optional[Tensor]) -> int:
    """How the kernels find example b's prefix entry without an index: b * entry_step, 1 for a
    per-example (B, Hkv, P, D) prefix, 0 for a shared (Hkv, P, D) one (0 with an index: unused)."""
    return 1 if prefix_k.dim() == 4 and prefix_index is None else 0


def mask_as_int8(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The (B, Sk) bool mask viewed as int8, which Triton loads (bool and int8 have the same size:
    a free reinterpretation)."""
    return None if key_padding_mask is None else key_padding_mask.view(torch.int8)


def relative_bias_args(table: Optional[Tensor], buckets: Optional[Tensor]) -> tuple:
    """The relative-bias arguments every kernel takes: (BIAS_TABLE, BIAS_BUCKETS, bias_row_len,
    bias_center, bias_last), or (None, None, 0, 0, 0) without a bias. table: (Hq, num_buckets) float32,
    buckets: (2L - 1,) int32, both contiguous (``function.prefix_attention_triton`` prepares them);
    the kernels get the table gathered through the buckets once here, (Hq, 2L - 1) float32 (the bias
    of every relative position: one gather per score instead of two dependent ones), and the buckets
    themselves for the table's gradient."""
    if table is None:
        return None, None, 0, 0, 0
    values = table.detach()[:, buckets.long()].contiguous()  # tiny: Hq x (2L - 1)
    return values, buckets, values.shape[1], (buckets.shape[0] - 1) // 2, buckets.shape[0] - 1
