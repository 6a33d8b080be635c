"""Triton forward kernel for prefix attention, and its launcher.

One program handles BLOCK_M queries of one (batch, query head). It streams the keys in two loops:
first the prefix blocks, read from the prefix tensor itself (batch stride 0 when the prefix is
shared, so no expand and no concat), then the real key blocks (with the causal upper bound and the
key padding mask). Softmax is online, in fp32, in the exp2 domain. The row's log-sum-exp (log2
domain) is stored for the backward pass; a row with no visible key stores +inf and outputs zeros.

Dropout keeps attention weight (query i, key j) iff philox(seed, offset) >= p with
offset = ((b * Hq + h) * Sq + i) * (P + Sk) + j, where j indexes the concatenated keys
[prefix; real]. The backward kernels regenerate the same numbers from the same offsets.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

LOG2_E = 1.4426950408889634


@triton.jit
def _dropout_keep(seed, row_offsets, key_index, dropout_p):
    """Keep mask for a (rows, keys) tile: philox uniform >= p, shared by forward and backward."""
    return tl.rand(seed, row_offsets[:, None] + key_index[None, :]) >= dropout_p


@triton.jit
def _load_tile(base, rows, stride_row, offs_d, row_valid, d_valid, UPCAST: tl.constexpr):
    """A (rows, BLOCK_D) tile of a row-major (S, D) matrix with unit last stride; masked entries read 0.

    UPCAST: compute in fp32 (the interpreter's bf16 tl.dot is wrong)."""
    tile = tl.load(base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :],
                   mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _real_keys_visible(
    KPM, b, stride_mb, stride_mn, n, n_valid, offs_m, q_len, k_len,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N)-broadcastable mask: real key n is visible to query offs_m
    (in range, not padded, and with CAUSAL at most offs_m + Sk - Sq)."""
    visible = n_valid
    if HAS_KPM:
        attend = tl.load(KPM + b * stride_mb + n.to(tl.int64) * stride_mn, mask=n_valid, other=0)
        visible = visible & (attend != 0)
    visible_2d = visible[None, :]
    if CAUSAL:
        visible_2d = visible_2d & (n[None, :] <= offs_m[:, None] + (k_len - q_len))
    return visible_2d


@triton.jit
def _online_softmax_step(
    acc, m_i, l_i, s, v, seed, row_offsets, key_index, dropout_p, dropout_scale,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold one (BLOCK_M, BLOCK_N) tile of log2-domain scores s into the running (acc, m_i, l_i).

    With DROPOUT, weight (row, key) is kept iff _dropout_keep(seed, row_offsets, key_index) is true.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet has m_new == -inf: subtract 0 instead, so that
    # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, row_offsets, key_index, dropout_p)
        p = tl.where(keep, p * dropout_scale, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["seed"])
def _prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, KPM, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om,
    num_q_heads, q_len, k_len, prefix_len, head_dim,
    qk_scale_log2, dropout_p, dropout_scale, seed,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # A 1-D grid (query blocks fastest, then batch * heads): CUDA caps grid y/z at 65535, and
    # B * Hq can exceed that. Programs of one head stay adjacent, as with a (blocks, B * Hq) grid.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(q_len, BLOCK_M)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    kv_h = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < head_dim

    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, m_valid, d_valid, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_offsets = ((b * num_q_heads + h) * q_len + offs_m.to(tl.int64)) * (prefix_len + k_len)

    # Loop 1: prefix keys, read from their own tensor (batch stride 0 when shared).
    if HAS_PREFIX:
        pk_base = PK + b * stride_pkb + kv_h * stride_pkh
        pv_base = PV + b * stride_pvb + kv_h * stride_pvh
        for start_n in range(0, prefix_len, BLOCK_N):
            n = start_n + offs_n
            n_valid = n < prefix_len
            k = _load_tile(pk_base, n, stride_pkn, offs_d, n_valid, d_valid, UPCAST)
            v = _load_tile(pv_base, n, stride_pvn, offs_d, n_valid, d_valid, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
            s = tl.where(n_valid[None, :], s, float("-inf"))
            acc, m_i, l_i = _online_softmax_step(
                acc, m_i, l_i, s, v, seed, row_offsets, n, dropout_p, dropout_scale, DROPOUT, DOT_PRECISION)

    # Loop 2: real keys, up to the causal bound of this query block.
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + (k_len - q_len))
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    for start_n in range(0, hi, BLOCK_N):
        n = start_n + offs_n
        n_valid = n < k_len
        k = _load_tile(k_base, n, stride_kn, offs_d, n_valid, d_valid, UPCAST)
        v = _load_tile(v_base, n, stride_vn, offs_d, n_valid, d_valid, UPCAST)
        visible_2d = _real_keys_visible(KPM, b, stride_mb, stride_mn, n, n_valid, offs_m, q_len, k_len, HAS_KPM, CAUSAL)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(visible_2d, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, s, v, seed, row_offsets, prefix_len + n, dropout_p, dropout_scale, DROPOUT, DOT_PRECISION)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + (b * num_q_heads + h) * q_len + offs_m, lse, mask=m_valid)


# triton.jit chose between compiling and interpreting when this module was imported (it reads
# TRITON_INTERPRET then), so the launch settings that differ for the interpreter follow the kernels
# themselves, not the environment at launch time.
KERNELS_INTERPRETED = not isinstance(_prefix_attention_fwd_kernel, JITFunction)


@triton.jit(do_not_specialize=["seed"])
def _dropout_keep_mask_kernel(
    OUT, num_rows, num_keys, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Materialise the keep mask the attention kernels use (tests replay it through the reference)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_offsets = rows.to(tl.int64) * num_keys
    keep = _dropout_keep(seed, row_offsets, keys.to(tl.int64), dropout_p)
    mask = (rows[:, None] < num_rows) & (keys[None, :] < num_keys)
    tl.store(OUT + row_offsets[:, None] + keys[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch helpers shared with the backward pass


def block_d(head_dim: int) -> int:
    """Head dims are padded in registers to a power of two >= 16 (tl.dot's minimum), not in memory."""
    return max(16, triton.next_power_of_2(head_dim))


def upcast_in_interpreter(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly: compute those tiles in fp32."""
    return KERNELS_INTERPRETED and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for ``dtype`` tiles (it only matters for fp32; 16-bit tiles ignore it).

    On a GPU, tl.dot on fp32 defaults to TF32 (10-bit mantissa), which torch.matmul does not do by
    default. So fp32 follows torch's float32 matmul precision: "highest" (the default) gets tf32x3
    (three TF32 tensor-core products, about fp32 accuracy), "high"/"medium" (TF32 allowed, e.g.
    torch.backends.cuda.matmul.allow_tf32 = True) gets plain TF32. ROCm gets exact fp32 ("ieee").
    """
    if dtype != torch.float32:
        return "tf32"
    if torch.version.hip:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=None)
def _device_max_shared_memory(index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (227 KiB on H100, 163 KiB on A100,
    99 KiB on sm_86/sm_89 parts such as A10G, L4, RTX 4090)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 232448
    return _device_max_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)

# Block configs are (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, best first, by padded
# head dim (<= 64, 128, 256); a launcher takes the first whose shared-memory estimate, times the
# margin (what the compiler allocates beyond the operand tiles: layout conversions, the hi/lo
# halves of tf32x3 operands), fits the device. aot_check compiles them all and checks the real sizes.
# fp32 tiles (tf32x3 dots) need more registers: smaller tiles, or they spill heavily.
# Dropout: philox on a 128 x 64 tile spills at 4 warps (600+ bytes/thread at D=64): 8 warps.
_FORWARD_CANDIDATES = {
    (64, False): [(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    (64, True): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    (128, False): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    (256, False): [(64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 1), (16, 16, 4, 1)],
}
_FORWARD_CANDIDATES_FP32 = {
    64: [(64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    128: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    256: [(32, 32, 8, 1), (16, 16, 4, 1)],
}
FORWARD_SHARED_MEMORY_MARGIN = {torch.float16: 1.25, torch.bfloat16: 1.25, torch.float32: 1.4}
BACKWARD_SHARED_MEMORY_MARGIN = {torch.float16: 1.1, torch.bfloat16: 1.1, torch.float32: 1.4}


def head_dim_bucket(head_dim: int) -> int:
    return min(256, max(64, block_d(head_dim)))


def first_fitting(candidates, need, margin: float, max_shared: int) -> dict:
    """The first (BLOCK_M, BLOCK_N, num_warps, num_stages) whose need(...) * margin fits, else the last."""
    for block_m, block_n, warps, stages in candidates:
        if need(block_m, block_n, stages) * margin <= max_shared:
            break
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def forward_config(head_dim: int, dtype: torch.dtype, max_shared: int, dropout: bool = False) -> dict:
    if KERNELS_INTERPRETED:
        return dict(INTERPRETER_CONFIG)
    return gpu_forward_config(head_dim, dtype, max_shared, dropout)


def gpu_forward_config(head_dim: int, dtype: torch.dtype, max_shared: int, dropout: bool = False) -> dict:
    """Forward block config on a GPU with ``max_shared`` bytes of shared memory per program."""
    bd, size, bucket = block_d(head_dim), dtype.itemsize, head_dim_bucket(head_dim)
    if dtype == torch.float32:
        candidates = _FORWARD_CANDIDATES_FP32[bucket]
    else:
        candidates = _FORWARD_CANDIDATES.get((bucket, dropout), _FORWARD_CANDIDATES[(bucket, False)])

    def need(block_m, block_n, stages):  # the Q tile, plus num_stages (K, V) tile pairs
        return (block_m * bd + 2 * stages * block_n * bd) * size

    return first_fitting(candidates, need, FORWARD_SHARED_MEMORY_MARGIN[dtype], max_shared)


def prefix_strides(prefix: Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides; batch stride 0 for a shared (Hkv, P, D) prefix."""
    if prefix.dim() == 3:
        return 0, prefix.stride(0), prefix.stride(1)
    return prefix.stride(0), prefix.stride(1), prefix.stride(2)


def mask_strides(key_padding_mask: Optional[Tensor]) -> tuple[int, int]:
    return (0, 0) if key_padding_mask is None else (key_padding_mask.stride(0), key_padding_mask.stride(1))


def mask_as_int8(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    # bool and int8 have the same size: a free reinterpretation that Triton loads as int8.
    return None if key_padding_mask is None else key_padding_mask.view(torch.int8)


def prefix_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel. Inputs must have a unit last stride (checked by the caller).

    Returns out (B, Hq, Sq, D) laid out like q, and lse (B, Hq, Sq) float32 (log2 domain).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    prefix_len = prefix_k.shape[-2]
    out = torch.empty_like(q)
    lse = torch.empty(batch, q_heads, q_len, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out.zero_(), lse
    cfg = forward_config(head_dim, q.dtype, max_shared_memory(q.device), dropout=dropout_p > 0.0)
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]) * batch * q_heads,)
    kpm = mask_as_int8(key_padding_mask)
    _prefix_attention_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, kpm, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *prefix_strides(prefix_k),
        *prefix_strides(prefix_v),
        *mask_strides(key_padding_mask),
        out.stride(0), out.stride(1), out.stride(2),
        q_heads, q_len, k_len, prefix_len, head_dim,
        scale * LOG2_E, dropout_p, 1.0 / (1.0 - dropout_p), seed,
        GROUP=q_heads // kv_heads,
        CAUSAL=causal,
        HAS_KPM=key_padding_mask is not None,
        HAS_PREFIX=prefix_len > 0,
        DROPOUT=dropout_p > 0.0,
        UPCAST=upcast_in_interpreter(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=block_d(head_dim),
        **cfg,
    )
    return out, lse


def dropout_keep_mask(
    batch: int, q_heads: int, q_len: int, num_keys: int, dropout_p: float, seed: int, device
) -> Tensor:
    """The (B, Hq, Sq, P + Sk) bool keep mask that the kernels draw for ``seed`` (for tests/debugging)."""
    num_rows = batch * q_heads * q_len
    out = torch.empty(num_rows, num_keys, dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(num_rows, 16), triton.cdiv(num_keys, 16))
        _dropout_keep_mask_kernel[grid](out, num_rows, num_keys, dropout_p, seed, BLOCK_M=16, BLOCK_N=16)
    return out.view(batch, q_heads, q_len, num_keys).bool()


__all__ = ["prefix_attention_forward", "dropout_keep_mask", "LOG2_E"]
