"""``@triton.jit`` helpers shared by the forward and backward kernels (forward.py, backward.py).

Every attention kernel runs on a 1-D grid laid out as (blocks of rows fastest, then heads, then an
outer index: the batch example, or the batch split of the shared-prefix gradient);
``program_coordinates`` turns the program id into those coordinates. CUDA caps grid y and z at
65535, and B * H can exceed that, so nothing sits on y or z.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def program_coordinates(num_rows, num_heads, BLOCK: tl.constexpr):
    """(outer, head, start, offs) of this program in a 1-D grid of cdiv(num_rows, BLOCK) row blocks
    (fastest) x num_heads x outer: outer and head as int64, the block's first row ``start`` and its
    rows ``offs`` = start + arange(BLOCK) (some past num_rows in the last block)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(num_rows, BLOCK)
    start = (pid % num_blocks) * BLOCK
    pid_outer_head = pid // num_blocks
    outer = (pid_outer_head // num_heads).to(tl.int64)
    head = (pid_outer_head % num_heads).to(tl.int64)
    return outer, head, start, start + tl.arange(0, BLOCK)


@triton.jit
def dropout_keep(seed, row_offsets, key_index, dropout_p):
    """Keep mask for a (rows, keys) tile: philox uniform >= p, shared by forward and backward.

    row_offsets: (rows,) int64 philox offset of each row's key 0; key_index: (keys,) key positions
    in the concatenated [prefix; real] keys."""
    return tl.rand(seed, row_offsets[:, None] + key_index[None, :]) >= dropout_p


@triton.jit
def load_tile(base, rows, stride_row, offs_d, row_valid, d_valid, UPCAST: tl.constexpr):
    """A (rows, BLOCK_D) tile of a row-major (S, D) matrix with unit last stride; masked entries read 0.

    UPCAST: compute in fp32 (the interpreter's bf16 tl.dot is wrong)."""
    tile = tl.load(base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :],
                   mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def real_keys_visible(
    KEY_PADDING_MASK, b, stride_mb, stride_mn, n, n_valid, offs_m, q_len, k_len,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N)-broadcastable mask: real key n is visible to query offs_m
    (in range, not padded in the (B, Sk) key padding mask KEY_PADDING_MASK, and with CAUSAL at most
    offs_m + Sk - Sq)."""
    visible = n_valid
    if HAS_KPM:
        attend = tl.load(KEY_PADDING_MASK + b * stride_mb + n.to(tl.int64) * stride_mn, mask=n_valid, other=0)
        visible = visible & (attend != 0)
    visible_2d = visible[None, :]
    if CAUSAL:
        visible_2d = visible_2d & (n[None, :] <= offs_m[:, None] + (k_len - q_len))
    return visible_2d


# triton.jit chose between compiling and interpreting when this module was imported (it reads
# TRITON_INTERPRET then), for these helpers and for the kernels that import them alike. So the
# launch settings that differ for the interpreter follow the kernels themselves, not the
# environment at launch time (launch.device_limits reads this).
KERNELS_INTERPRETED = not isinstance(load_tile, JITFunction)
