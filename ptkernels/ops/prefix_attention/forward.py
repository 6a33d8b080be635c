"""Triton forward kernel for prefix attention, and its launcher.

One program handles BLOCK_M queries of one (batch, query head). It streams the keys in two loops:
first the prefix blocks, read from the prefix tensor itself (batch stride 0 when the prefix is
shared, so no expand and no concat), then the real key blocks (with the causal upper bound and the
key padding mask). Softmax is online, in fp32, in the exp2 domain. The row's log-sum-exp (log2
domain) is stored for the backward pass; a row with no visible key stores +inf and outputs zeros.

Dropout keeps attention weight (query i, key j) iff its 16-bit philox lane is >= round(p * 65536),
drawn by ``common.attention_dropout_keep`` from the query's row id ((b * Hq + h) * Sq + i, or
h * total_q + row with packed sequences) and the key's lane (prefix key n: n; real key n:
round_up(P, 16) + n), eight lanes per philox call in the cells one thread holds of the MMA
accumulator. The backward kernels regenerate the same numbers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..utils import batch_strides
from .common import (
    DROPOUT_PTX,
    add_relative_bias,
    bounded_keys_visible,
    drop_prefix_kv,
    attention_dropout_keep,
    dropout_real_lane,
    example_prefix,
    in_window,
    prefix_tile_ranges,
    window_key_bounds,
    key_bounds,
    descriptor_batch,
    dot_tail,
    load_edge_rows,
    load_edge_tail_rows,
    load_full_rows,
    load_full_tail_rows,
    load_tail_tile,
    load_tile,
    log2_scores,
    prefix_dropout_keep,
    program_coordinates,
    query_rows,
    real_keys_visible,
    runtime_zero,
)
from .launch import (
    FP_FUSION,
    LOG2_E,
    DeviceLimits,
    Varlen,
    Launcher,
    autotune_requested,
    block_d,
    device_limits,
    dot_precision,
    dropout_mode,
    dropout_threshold,
    entry_step,
    softcap_args,
    forward_config,
    gpu_forward_configs,
    launch_kernel,
    philox_mode,
    relative_bias_args,
    mask_as_int8,
    mask_strides,
    qkv_strides,
    shape_bucket,
    head_dim_parts,
    split_tma_descriptors,
    forward_edge_block,
    half_width_edge_tma,
    tuned_config,
    upcast_in_interpreter,
)


@triton.jit
def _online_softmax_step(
    acc, acc_tail, m_i, l_i, s, v, v_tail, seed, first_row, key_lane, dropout_threshold,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fold one (BLOCK_M, BLOCK_N) tile of log2-domain scores s into the running (acc, acc_tail,
    m_i, l_i): acc (BLOCK_M, BLOCK_D) += p @ v, and with a head-dim tail (v_tail (BLOCK_N,
    BLOCK_D_TAIL), not None) acc_tail (BLOCK_M, BLOCK_D_TAIL) += p @ v_tail.

    With DROPOUT, weight (row, key) is kept iff attention_dropout_keep(seed, first_row, key_lane) is true.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet has m_new == -inf: subtract 0 instead, so that
    # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = attention_dropout_keep(seed, first_row, key_lane, dropout_threshold, BLOCK_M, BLOCK_N, DROPOUT)
        p = tl.where(keep, p, 0.0)  # kept weights are scaled by 1 / P(keep) once, at the end
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    if v_tail is not None:
        acc_tail = acc_tail * alpha[:, None] + tl.dot(p.to(v.dtype), v_tail, input_precision=DOT_PRECISION)
    return acc, acc_tail, m_new, l_i


@triton.jit
def _online_softmax_step_full(
    acc, acc_tail, m_i, l_i, qk, v, v_tail, qk_scale_log2, seed, first_row, key_lane, dropout_threshold,
    softcap_in, softcap_out,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, bias_row=None, key_pos=None, query_pos=None, bias_center=0, bias_last=0,
    BIAS: tl.constexpr = False,
):
    """``_online_softmax_step`` for a tile where every key is visible to every query: no mask, so
    the row maximum is finite and the scale folds into one multiply-add (as in Triton's tutorial).
    qk: the raw (BLOCK_M, BLOCK_N) q k^T, not yet scaled (SOFTCAP: softcapped here; BIAS: T5's
    relative bias of keys at key_pos for queries at query_pos added, ``add_relative_bias``)."""
    if BIAS:  # (never with SOFTCAP)
        s = add_relative_bias(qk * qk_scale_log2, bias_row, key_pos, query_pos, bias_center, bias_last, BIAS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    elif SOFTCAP:
        s = log2_scores(qk, qk_scale_log2, softcap_in, softcap_out, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)
        p = tl.math.exp2(qk * qk_scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = attention_dropout_keep(seed, first_row, key_lane, dropout_threshold, BLOCK_M, BLOCK_N, DROPOUT)
        # kept weights are scaled by 1 / P(keep) once, at the end; the zero is a run-time value
        # (``runtime_zero``) so that the select stays in fp32, ahead of the 16-bit conversion
        p = tl.where(keep, p, runtime_zero(qk_scale_log2))
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    if v_tail is not None:
        acc_tail = acc_tail * alpha[:, None] + tl.dot(p.to(v.dtype), v_tail, input_precision=DOT_PRECISION)
    return acc, acc_tail, m_new, l_i


@triton.jit(do_not_specialize=["seed"])
def _prefix_attention_fwd_kernel(
    Q, K, V, PREFIX_K, PREFIX_V, PREFIX_INDEX, PREFIX_LENGTHS, KEY_PADDING_MASK, KEY_BOUNDS, CU_SEQLENS_Q,
    CU_SEQLENS_K, SINKS, BIAS_TABLE, BIAS_BUCKETS, OUT, LSE, K_DESC, V_DESC, PK_DESC, PV_DESC,
    K_EDGE_DESC, V_EDGE_DESC, PK_EDGE_DESC, PV_EDGE_DESC, K_TAIL_DESC, V_TAIL_DESC, PK_TAIL_DESC, PV_TAIL_DESC,
    K_EDGE_TAIL_DESC, V_EDGE_TAIL_DESC, PK_EDGE_TAIL_DESC, PV_EDGE_TAIL_DESC,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om,
    num_q_heads, q_len, k_len, prefix_len, head_dim, entry_step, stat_rows,
    qk_scale_log2, dropout_threshold, dropout_scale, seed,
    prefix_dropout_threshold, prefix_dropout_scale, prefix_seed, softcap_in, softcap_out, window,
    bias_row_len, bias_center, bias_last,
    GROUP: tl.constexpr,
    VARLEN: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BIAS: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    PREFIX_DROPOUT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    PTX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EDGE_N: tl.constexpr,
    PREFIX_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_D_TAIL: tl.constexpr,
    EVEN_TAIL: tl.constexpr,
    HALF_EDGE_TMA: tl.constexpr,
):
    """OUT (B, Hq, Sq, D) and LSE (B, Hq, Sq): one program per (query block, batch, query head).
    HALF_EDGE_TMA: the real keys' masked tiles may load through TMA when narrower than the full ones
    (``launch.half_width_edge_tma``: not with triton 3.6's ptxas above D=64).
    EVEN_D: head_dim >= BLOCK_D (no head-dim mask on the full tiles' first BLOCK_D channels).
    BLOCK_D_TAIL (``launch.split_head_dim``): 0, or the width of the head dim's tail part, channels
    BLOCK_D.. (D = 80 / 96 as 64 + 16 / 32 instead of padded to 128): every Q / K / V / O tile then
    comes as two, the first BLOCK_D channels and the tail (its *_TAIL_DESC descriptors view the
    tensors from channel BLOCK_D on); EVEN_TAIL: head_dim == BLOCK_D + BLOCK_D_TAIL. TMA: the full key tiles (those
    with every key in range, the hot loops) load through the tensor descriptors K_DESC, V_DESC
    (4-D views of K, V, ``launch.tma_descriptor``) and PK_DESC, PV_DESC (of the prefix, as
    (entries, Hkv, P, D)); edge tiles too where every key they mask is past the end of K / V or of
    the prefix entry, or hidden by the causal mask or window (no padding mask, not packed:
    ``load_edge_rows``), and a non-contiguous padding mask's tiles without DROPOUT (they read every
    key before Sk either way); else masked pointer loads, which read no key past the last attended
    one or the packed sequence's end (a masked key inside the loaded range is read and weighted 0,
    as in SDPA with a mask: its K / V must be finite). EDGE_N: the key width of the masked tiles,
    BLOCK_N or half of it (``launch.forward_edge_block``: half where whole masked tiles ran out of
    registers); their TMA loads go through K_EDGE_DESC, V_EDGE_DESC, PK_EDGE_DESC, PV_EDGE_DESC, the
    same views with EDGE_N-row boxes (None and unused when EDGE_N == BLOCK_N). PREFIX_N: the key
    width of the prefix's full tiles, EDGE_N under PREFIX_DROPOUT (which drops each loaded K / V
    tile in registers), else BLOCK_N.
    PTX: compiled for an NVIDIA GPU. With DROPOUT or BIAS (not VARLEN) the epilogue computes the
    program's coordinates anew (``program_coordinates(..., FRESH_PID=PTX)``: from a fresh read of
    the program id and divisors where PTX) instead of holding them across the key loops, where they
    spilled (D=64: 16 bytes with dropout + causal + padding + GQA, 48 with relative bias); in the
    sets without either it lengthened the loops by 0.3% and is not used there.

    Example b's prefix: entry ``example_prefix(...)`` of PREFIX_K / PREFIX_V (a bank read through
    PREFIX_INDEX, a per-example prefix, or a shared one with batch stride 0), its first
    PREFIX_LENGTHS[entry] keys (HAS_LENGTHS), with P-Tuning v2's prefix dropout applied to each
    loaded tile (PREFIX_DROPOUT). SOFTCAP: Gemma 2's logit softcapping (``log2_scores``);
    HAS_SINKS: SINKS (Hq,) per-head sink logits in every row's normaliser (LSE includes them).
    WINDOW (with CAUSAL): a sliding window of ``window`` positions, the prefix at positions 0..P-1 in
    front of the real keys (PEFT's cache): query i (position P + Sk - Sq + i) sees key position t
    iff its position - t < window.
    BIAS: T5's relative position bias, BIAS_TABLE (Hq, 2L - 1) float32 (bias_row_len = 2L - 1): the
    bias of each relative position key position - query position + L - 1 (positions as for WINDOW),
    gathered per tile (``add_relative_bias``).

    VARLEN (packed sequences): "batch" b is sequence b, whose queries are rows CU_SEQLENS_Q[b]..
    CU_SEQLENS_Q[b + 1] of Q (total_q, Hq, D) (batch strides 0, row stride Hq * D) and keys rows
    CU_SEQLENS_K[b].. of K / V; q_len / k_len come in as the max lengths (the grid's extent) and are
    replaced by the sequence's own; LSE is (Hq, total_q) (stat_rows = total_q). Programs past their
    sequence's length return at once."""
    # 1-D grid: query blocks fastest, then query heads, then batch (programs of one head adjacent).
    b, h, start_m, offs_m = program_coordinates(q_len, num_q_heads, BLOCK_M)
    kv_h = h // GROUP
    # this program's rows of LSE: stat_base + offs_m
    q_start, q_len, k_start, k_len, stat_base = query_rows(CU_SEQLENS_Q, CU_SEQLENS_K, b, h, num_q_heads, q_len,
                                                           k_len, stat_rows, VARLEN)
    if VARLEN:
        if start_m >= q_len:  # past this packed sequence's queries
            return

    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, EDGE_N)
    if EDGE_N == BLOCK_N:  # the masked tiles as wide as the full ones: one set of descriptors
        K_EDGE_DESC, V_EDGE_DESC, PK_EDGE_DESC, PV_EDGE_DESC = K_DESC, V_DESC, PK_DESC, PV_DESC
    PK_PREFIX_DESC, PV_PREFIX_DESC = PK_DESC, PV_DESC
    if PREFIX_N != BLOCK_N:  # the prefix's full tiles at the masked tiles' width
        PK_PREFIX_DESC, PV_PREFIX_DESC = PK_EDGE_DESC, PV_EDGE_DESC
    if EDGE_N == BLOCK_N:
        K_EDGE_TAIL_DESC, V_EDGE_TAIL_DESC = K_TAIL_DESC, V_TAIL_DESC
        PK_EDGE_TAIL_DESC, PV_EDGE_TAIL_DESC = PK_TAIL_DESC, PV_TAIL_DESC
    PK_PREFIX_TAIL_DESC, PV_PREFIX_TAIL_DESC = PK_TAIL_DESC, PV_TAIL_DESC
    if PREFIX_N != BLOCK_N:
        PK_PREFIX_TAIL_DESC, PV_PREFIX_TAIL_DESC = PK_EDGE_TAIL_DESC, PV_EDGE_TAIL_DESC
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < head_dim
    offs_t, t_valid = None, None  # the head dim's tail channels, if any
    if BLOCK_D_TAIL > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        t_valid = offs_t < head_dim

    q_base = Q + b * stride_qb + q_start * stride_qm + h * stride_qh
    q = load_tile(q_base, offs_m, stride_qm, offs_d, m_valid, d_valid, UPCAST)
    q_tail = load_tail_tile(q_base, offs_m, stride_qm, offs_t, m_valid, t_valid, UPCAST, BLOCK_D_TAIL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # (a loop-carried value cannot be None: without a tail, a 1 x 1 placeholder the loops never change)
    acc_tail = tl.zeros([1, 1], dtype=tl.float32)
    if BLOCK_D_TAIL > 0:
        acc_tail = tl.zeros([BLOCK_M, BLOCK_D_TAIL], dtype=tl.float32)
    first_row = (stat_base + start_m).to(tl.int64)  # dropout row id of the tile's first query
    real_lane = dropout_real_lane(prefix_len)  # the dropout lane of real key 0
    # Relative bias positions counted from real key 0: query i at Sk - Sq + i, prefix key n at n - P_b.
    query_pos = offs_m + (k_len - q_len)
    bias_row = BIAS_TABLE  # None without BIAS
    if BIAS:
        bias_row = BIAS_TABLE + h * bias_row_len

    # Loop 1: prefix keys, read from their own tensor (batch stride 0 when shared): full blocks
    # without masks, then the last partial block.
    if HAS_PREFIX:
        entry, example_prefix_len = example_prefix(PREFIX_INDEX, PREFIX_LENGTHS, b, entry_step, prefix_len,
                                                   HAS_INDEX, HAS_LENGTHS)
        pk_base = PREFIX_K + entry * stride_pkb + kv_h * stride_pkh
        pv_base = PREFIX_V + entry * stride_pvb + kv_h * stride_pvh
        num_kv_heads = num_q_heads // GROUP
        prefix_full, masked_from = prefix_tile_ranges(example_prefix_len, start_m, q_len, k_len, window, PREFIX_N,
                                                      WINDOW)
        for start_n in range(0, prefix_full, PREFIX_N):
            n = start_n + tl.arange(0, PREFIX_N)
            k = load_full_rows(PK_PREFIX_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_d, d_valid, EVEN_D,
                               UPCAST, TMA, PREFIX_N, BLOCK_D)
            v = load_full_rows(PV_PREFIX_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_d, d_valid, EVEN_D,
                               UPCAST, TMA, PREFIX_N, BLOCK_D)
            k_tail = load_full_tail_rows(PK_PREFIX_TAIL_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_t,
                                         t_valid, EVEN_TAIL, UPCAST, TMA, PREFIX_N, BLOCK_D_TAIL)
            v_tail = load_full_tail_rows(PV_PREFIX_TAIL_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_t,
                                         t_valid, EVEN_TAIL, UPCAST, TMA, PREFIX_N, BLOCK_D_TAIL)
            k, v = drop_prefix_kv(k, v, prefix_seed, b, kv_h, num_kv_heads, prefix_len, head_dim, n,
                                  prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT, PREFIX_N, BLOCK_D)
            if BLOCK_D_TAIL > 0:  # (a None tile cannot pass through a function that returns it)
                k_tail, v_tail = drop_prefix_kv(k_tail, v_tail, prefix_seed, b, kv_h,
                                                num_kv_heads, prefix_len, head_dim, n,
                                                prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT,
                                                PREFIX_N, BLOCK_D_TAIL, BLOCK_D)
            qk = dot_tail(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tail, k_tail, DOT_PRECISION)
            acc, acc_tail, m_i, l_i = _online_softmax_step_full(
                acc, acc_tail, m_i, l_i, qk, v, v_tail, qk_scale_log2, seed, first_row, start_n, dropout_threshold,
                softcap_in, softcap_out, DROPOUT, DOT_PRECISION, BLOCK_M, PREFIX_N, SOFTCAP,
                bias_row, n - example_prefix_len, query_pos, bias_center, bias_last, BIAS)
        # The masked tiles (EDGE_N keys wide): the last partial one, or with WINDOW those the
        # window's edge crosses.
        for start_n in range(masked_from, example_prefix_len, EDGE_N):
            n = start_n + offs_e
            n_valid = n < example_prefix_len
            k = load_edge_rows(PK_EDGE_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_d, n_valid, d_valid,
                               UPCAST, TMA, EDGE_N, BLOCK_D)
            v = load_edge_rows(PV_EDGE_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_d, n_valid, d_valid,
                               UPCAST, TMA, EDGE_N, BLOCK_D)
            k_tail = load_edge_tail_rows(PK_EDGE_TAIL_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_t,
                                         n_valid, t_valid, UPCAST, TMA, EDGE_N, BLOCK_D_TAIL)
            v_tail = load_edge_tail_rows(PV_EDGE_TAIL_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_t,
                                         n_valid, t_valid, UPCAST, TMA, EDGE_N, BLOCK_D_TAIL)
            k, v = drop_prefix_kv(k, v, prefix_seed, b, kv_h, num_kv_heads, prefix_len, head_dim, n,
                                  prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT, EDGE_N, BLOCK_D)
            if BLOCK_D_TAIL > 0:  # (a None tile cannot pass through a function that returns it)
                k_tail, v_tail = drop_prefix_kv(k_tail, v_tail, prefix_seed, b, kv_h,
                                                num_kv_heads, prefix_len, head_dim, n,
                                                prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT,
                                                EDGE_N, BLOCK_D_TAIL, BLOCK_D)
            qk = dot_tail(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tail, k_tail, DOT_PRECISION)
            s = log2_scores(qk, qk_scale_log2, softcap_in, softcap_out, SOFTCAP)
            s = add_relative_bias(s, bias_row, n - example_prefix_len, query_pos, bias_center, bias_last,
                                  BIAS)
            visible_2d = n_valid[None, :]
            if WINDOW:
                visible_2d = visible_2d & in_window(n, offs_m + (k_len - q_len) + example_prefix_len, window)
            s = tl.where(visible_2d, s, float("-inf"))
            acc, acc_tail, m_i, l_i = _online_softmax_step(
                acc, acc_tail, m_i, l_i, s, v, v_tail, seed, first_row, start_n, dropout_threshold, DROPOUT,
                DOT_PRECISION, BLOCK_M, EDGE_N)

    # Loop 2: real keys, up to the causal bound of this query block. When the attended keys are one
    # run [lo, hi) (no mask, or right / left padding: KEY_BOUNDS), the tiles that every query of this
    # block sees in full (inside the run, below the causal diagonal) have no mask arithmetic, the
    # edge tiles (EDGE_N keys wide) a bounds mask and no mask loads, and the tiles outside the run
    # are skipped. Any other mask: every tile (EDGE_N wide) loads its mask.
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, start_m + BLOCK_M + (k_len - q_len))
    k_base = K + b * stride_kb + k_start * stride_kn + kv_h * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + kv_h * stride_vh
    # (Both kinds of loop sit at the top level, their ranges empty when they do not apply: buffers of
    # loops in the two branches of an if would count as live together, and 128 x 128 tiles at D=128
    # would not fit shared memory.)
    lo_b, hi_b, contiguous = key_bounds(KEY_BOUNDS, b, k_len, HAS_KPM)
    full_end = hi_b
    if CAUSAL:
        full_end = tl.minimum(hi_b, start_m + (k_len - q_len) + 1)
    first_lo, full_lo = window_key_bounds(lo_b, start_m, q_len, k_len, window, BLOCK_M, BLOCK_N, WINDOW)
    full_hi = tl.maximum(tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N, full_lo)
    edge_hi = tl.minimum(hi, hi_b)
    if HAS_KPM:  # a mask that is not one run of keys: no tiles here, all in the general loop below
        full_hi = tl.where(contiguous, full_hi, full_lo)
        edge_hi = tl.where(contiguous, edge_hi, 0)
    kv_batch = descriptor_batch(b, VARLEN)
    # Edge tiles through TMA too where their masked keys are past the end of K / V (read as 0): no
    # padding mask, not packed (``load_edge_rows``).
    EDGE_TMA: tl.constexpr = TMA and not HAS_KPM and not VARLEN and (EDGE_N == BLOCK_N or HALF_EDGE_TMA)
    # The general mask's tiles (below) read every key before Sk anyway: through TMA as well, except
    # under attention dropout. (Their pointer loads made the forward spill with a padding mask:
    # 472 bytes at D=128, 0 with the general loop taken out, 284 through TMA; with dropout TMA
    # there spilled more, 324 -> 528 bytes at D=128, 26 local accesses per masked tile against 15.)
    GENERAL_TMA: tl.constexpr = TMA and not VARLEN and not DROPOUT
    for start_n in range(first_lo // EDGE_N * EDGE_N, tl.minimum(full_lo, edge_hi), EDGE_N):
        n = start_n + offs_e
        n_valid = n < hi_b
        k = load_edge_rows(K_EDGE_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, n_valid, d_valid,
                           UPCAST, EDGE_TMA, EDGE_N, BLOCK_D)
        v = load_edge_rows(V_EDGE_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, n_valid, d_valid,
                           UPCAST, EDGE_TMA, EDGE_N, BLOCK_D)
        k_tail = load_edge_tail_rows(K_EDGE_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_t,
                                     n_valid, t_valid, UPCAST, EDGE_TMA, EDGE_N, BLOCK_D_TAIL)
        v_tail = load_edge_tail_rows(V_EDGE_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_t,
                                     n_valid, t_valid, UPCAST, EDGE_TMA, EDGE_N, BLOCK_D_TAIL)
        visible_2d = bounded_keys_visible(n, lo_b, hi_b, offs_m, q_len, k_len, CAUSAL, window, WINDOW)
        qk = dot_tail(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tail, k_tail, DOT_PRECISION)
        s = log2_scores(qk, qk_scale_log2, softcap_in, softcap_out, SOFTCAP)
        s = add_relative_bias(s, bias_row, n, query_pos, bias_center, bias_last, BIAS)
        s = tl.where(visible_2d, s, float("-inf"))
        acc, acc_tail, m_i, l_i = _online_softmax_step(
            acc, acc_tail, m_i, l_i, s, v, v_tail, seed, first_row, real_lane + start_n, dropout_threshold, DROPOUT,
            DOT_PRECISION, BLOCK_M, EDGE_N)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        n = start_n + offs_n
        k = load_full_rows(K_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, d_valid, EVEN_D,
                           UPCAST, TMA, BLOCK_N, BLOCK_D)
        v = load_full_rows(V_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, d_valid, EVEN_D,
                           UPCAST, TMA, BLOCK_N, BLOCK_D)
        k_tail = load_full_tail_rows(K_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_t,
                                     t_valid, EVEN_TAIL, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
        v_tail = load_full_tail_rows(V_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_t,
                                     t_valid, EVEN_TAIL, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
        qk = dot_tail(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tail, k_tail, DOT_PRECISION)
        acc, acc_tail, m_i, l_i = _online_softmax_step_full(
            acc, acc_tail, m_i, l_i, qk, v, v_tail, qk_scale_log2, seed, first_row, real_lane + start_n, dropout_threshold,
            softcap_in, softcap_out, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, SOFTCAP,
            bias_row, n, query_pos, bias_center, bias_last, BIAS)
    for start_n in range(full_hi, edge_hi, EDGE_N):
        n = start_n + offs_e
        n_valid = n < hi_b
        k = load_edge_rows(K_EDGE_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, n_valid, d_valid,
                           UPCAST, EDGE_TMA, EDGE_N, BLOCK_D)
        v = load_edge_rows(V_EDGE_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, n_valid, d_valid,
                           UPCAST, EDGE_TMA, EDGE_N, BLOCK_D)
        k_tail = load_edge_tail_rows(K_EDGE_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_t,
                                     n_valid, t_valid, UPCAST, EDGE_TMA, EDGE_N, BLOCK_D_TAIL)
        v_tail = load_edge_tail_rows(V_EDGE_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_t,
                                     n_valid, t_valid, UPCAST, EDGE_TMA, EDGE_N, BLOCK_D_TAIL)
        visible_2d = bounded_keys_visible(n, lo_b, hi_b, offs_m, q_len, k_len, CAUSAL, window, WINDOW)
        qk = dot_tail(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tail, k_tail, DOT_PRECISION)
        s = log2_scores(qk, qk_scale_log2, softcap_in, softcap_out, SOFTCAP)
        s = add_relative_bias(s, bias_row, n, query_pos, bias_center, bias_last, BIAS)
        s = tl.where(visible_2d, s, float("-inf"))
        acc, acc_tail, m_i, l_i = _online_softmax_step(
            acc, acc_tail, m_i, l_i, s, v, v_tail, seed, first_row, real_lane + start_n, dropout_threshold, DROPOUT,
            DOT_PRECISION, BLOCK_M, EDGE_N)
    if HAS_KPM:  # any other key padding mask: every tile loads its mask
        first_key, _ = window_key_bounds(0, start_m, q_len, k_len, window, BLOCK_M, BLOCK_N, WINDOW)
        general_lo = first_key // EDGE_N * EDGE_N
        for start_n in range(general_lo, tl.where(contiguous, general_lo, hi), EDGE_N):
            n = start_n + offs_e
            n_valid = n < k_len
            k = load_edge_rows(K_EDGE_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, n_valid,
                               d_valid, UPCAST, GENERAL_TMA, EDGE_N, BLOCK_D)
            v = load_edge_rows(V_EDGE_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, n_valid,
                               d_valid, UPCAST, GENERAL_TMA, EDGE_N, BLOCK_D)
            k_tail = load_edge_tail_rows(K_EDGE_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn,
                                         offs_t, n_valid, t_valid, UPCAST, GENERAL_TMA, EDGE_N, BLOCK_D_TAIL)
            v_tail = load_edge_tail_rows(V_EDGE_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn,
                                         offs_t, n_valid, t_valid, UPCAST, GENERAL_TMA, EDGE_N, BLOCK_D_TAIL)
            visible_2d = real_keys_visible(KEY_PADDING_MASK, b, stride_mb, stride_mn, n, n_valid, offs_m, q_len,
                                           k_len, HAS_KPM, CAUSAL, window, WINDOW)
            qk = dot_tail(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tail, k_tail, DOT_PRECISION)
            s = log2_scores(qk, qk_scale_log2, softcap_in, softcap_out, SOFTCAP)
            s = add_relative_bias(s, bias_row, n, query_pos, bias_center, bias_last, BIAS)
            s = tl.where(visible_2d, s, float("-inf"))
            acc, acc_tail, m_i, l_i = _online_softmax_step(
                acc, acc_tail, m_i, l_i, s, v, v_tail, seed, first_row, real_lane + start_n, dropout_threshold, DROPOUT,
                DOT_PRECISION, BLOCK_M, EDGE_N)

    if HAS_SINKS:  # the head's sink logit joins every row's normaliser (and attends to nothing)
        sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        m_sink = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_sink)  # 0 for a row that saw no key (m_i = -inf)
        l_i = l_i * alpha + tl.math.exp2(sink - m_sink)
        acc = acc * alpha[:, None]
        if BLOCK_D_TAIL > 0:
            acc_tail = acc_tail * alpha[:, None]
        m_i = m_sink
    has_key = l_i > 0.0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    if DROPOUT:
        inv_l = inv_l * dropout_scale
    out = acc * inv_l[:, None]
    if (DROPOUT or BIAS) and not VARLEN:  # the coordinates anew (PTX: from a fresh read of the program id)
        b, h, start_m, offs_m = program_coordinates(q_len, num_q_heads, BLOCK_M, PTX)
        m_valid = offs_m < q_len
        _, _, _, _, stat_base = query_rows(CU_SEQLENS_Q, CU_SEQLENS_K, b, h, num_q_heads, q_len, k_len, stat_rows,
                                           VARLEN)
    o_rows = OUT + b * stride_ob + q_start * stride_om + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(o_rows + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    if BLOCK_D_TAIL > 0:
        tl.store(o_rows + offs_t[None, :], (acc_tail * inv_l[:, None]).to(OUT.dtype.element_ty),
                 mask=m_valid[:, None] & t_valid[None, :])
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + stat_base + offs_m, lse, mask=m_valid)


@triton.jit
def _key_bounds_kernel(KEY_PADDING_MASK, BOUNDS, stride_mb, stride_mn, k_len, BLOCK: tl.constexpr):
    """BOUNDS (B, 3) int32 of a (B, Sk) int8 key padding mask, one program per example (see
    ``key_bounds_of``): first attended key, one past the last, and 1 when every key in between is
    attended (0, 0, 1 for a row with none)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    first = tl.full([BLOCK], 2147483647, tl.int32)
    last = tl.zeros([BLOCK], tl.int32)
    count = tl.zeros([BLOCK], tl.int32)
    for start in range(0, k_len, BLOCK):
        n = start + offs
        attend = tl.load(KEY_PADDING_MASK + b * stride_mb + n.to(tl.int64) * stride_mn, mask=n < k_len, other=0) != 0
        first = tl.minimum(first, tl.where(attend, n, 2147483647))
        last = tl.maximum(last, tl.where(attend, n + 1, 0))
        count += attend.to(tl.int32)
    count_all = tl.sum(count, 0)
    first_all = tl.where(count_all > 0, tl.min(first, 0), 0)
    last_all = tl.max(last, 0)
    tl.store(BOUNDS + b * 3, first_all)
    tl.store(BOUNDS + b * 3 + 1, last_all)
    tl.store(BOUNDS + b * 3 + 2, (count_all == last_all - first_all).to(tl.int32))


def key_bounds_of(key_padding_mask: Optional[Tensor], launcher: Launcher = launch_kernel) -> Optional[Tensor]:
    """(B, 3) int32 per example of a (B, Sk) bool key padding mask: first attended key, one past the
    last, and 1 when every key in between is attended (right or left padding, the usual case: the
    kernels then need no mask loads and skip the padded tiles), else 0; None without a mask. One
    kernel launch on the mask's device, no host sync (``launch.key_bounds_reference`` is the
    PyTorch twin that the tests compare it with)."""
    if key_padding_mask is None:
        return None
    batch, k_len = key_padding_mask.shape
    bounds = torch.empty(batch, 3, dtype=torch.int32, device=key_padding_mask.device)
    if batch:
        launcher(_key_bounds_kernel, (batch,))(mask_as_int8(key_padding_mask), bounds, *mask_strides(key_padding_mask),
                                               k_len, BLOCK=1024)
    return bounds


@triton.jit(do_not_specialize=["seed"])
def _dropout_keep_mask_kernel(
    OUT, q_len, head_rows, first_query, prefix_len, k_len, dropout_threshold, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Materialise the keep mask the attention kernels use into OUT (rows, P + Sk) int8 over the
    concatenated keys [prefix; real] (tests replay it through the reference): the q_len queries of
    each (example x head) bh, rows bh * head_rows + first_query + i, numbered as the attention
    kernels number them. One program per (query block, bh) x block of BLOCK_N dropout lanes.
    DROPOUT: ``launch.philox_mode`` of the device."""
    bh, _, start_m, offs_m = program_coordinates(q_len, 1, BLOCK_M)
    first_row = bh * head_rows + first_query
    lane0 = tl.program_id(1) * BLOCK_N
    keep = attention_dropout_keep(seed, first_row + start_m, lane0, dropout_threshold, BLOCK_M, BLOCK_N, DROPOUT)
    lanes = lane0 + tl.arange(0, BLOCK_N)
    real_lane = dropout_real_lane(prefix_len)
    key = tl.where(lanes < real_lane, lanes, lanes - real_lane + prefix_len)  # index in [prefix; real]
    valid = tl.where(lanes < real_lane, lanes < prefix_len, lanes - real_lane < k_len)
    mask = (offs_m[:, None] < q_len) & valid[None, :]
    rows = first_row + offs_m[:, None].to(tl.int64)
    tl.store(OUT + rows * (prefix_len + k_len) + key[None, :], keep.to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _prefix_dropout_keep_mask_kernel(
    OUT, batch, num_kv_heads, prefix_len, head_dim, dropout_threshold, seed,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Materialise the prefix-dropout keep mask the attention kernels use, OUT (2, B, Hkv, P, D)
    int8 (keys, values), for tests. One program per (which, example, kv head) x block of positions."""
    pid = tl.program_id(0)
    which = pid % 2
    b = (pid // 2) // num_kv_heads
    kv_h = (pid // 2) % num_kv_heads
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    keep = prefix_dropout_keep(seed, b.to(tl.int64), kv_h, which, num_kv_heads, prefix_len, head_dim, n,
                               dropout_threshold, BLOCK_N, BLOCK_D)
    base = ((which * batch + b) * num_kv_heads + kv_h).to(tl.int64) * prefix_len * head_dim
    mask = (n[:, None] < prefix_len) & (d[None, :] < head_dim)
    tl.store(OUT + base + n[:, None] * head_dim + d[None, :], keep.to(tl.int8), mask=mask)


def prefix_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float, seed: int,
    prefix_index: Optional[Tensor] = None, prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0, prefix_seed: int = 0, softcap: float = 0.0, sinks: Optional[Tensor] = None,
    window: int = 0, relative_bias_table: Optional[Tensor] = None, relative_bias_buckets: Optional[Tensor] = None,
    *, varlen: Optional[Varlen] = None, limits: Optional[DeviceLimits] = None, launcher: Launcher = launch_kernel,
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel. Inputs must have a unit last stride (checked by the caller).

    Arguments:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D); prefix_k, prefix_v: (Hkv, P, D) shared by the batch,
            (B, Hkv, P, D) per example, or a bank (A, Hkv, P, D) read through prefix_index (B,) int32
            (P may be 0); prefix_lengths: int32 (A,) / (B,) / (1,) or None; key_padding_mask: (B, Sk) bool or None.
        scale: the softmax scale; dropout_p, seed: attention dropout and its philox seed;
        prefix_dropout_p, prefix_seed: the prefix dropout and its philox seed.
        softcap: logit softcapping (0: off); sinks: (Hq,) float32 per-head sink logits or None;
        window: causal sliding window (0: off).
        relative_bias_table: (Hq, num_buckets) float32 contiguous and relative_bias_buckets (2L - 1,)
            int32 contiguous: T5's relative position bias, or None.
        varlen: packed sequences: q (total_q, Hq, D), k, v (total_k, Hkv, D), "batch" = sequences
            (key_padding_mask must be None); out is (total_q, Hq, D) and lse (1, Hq, total_q).
        limits: the device's limits (default: those of q's device); launcher: runs each kernel
            launch (default: launches it; benchmarks/aot_check.py records it instead).
    Returns:
        out (B, Hq, Sq, D) laid out like q, and lse (B, Hq, Sq) float32 (log2 domain).
    """
    if varlen is None:
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        stat_rows = q_len
        lse = torch.empty(batch, q_heads, q_len, device=q.device, dtype=torch.float32)
    else:
        batch, (stat_rows, q_heads, head_dim), kv_heads = varlen.num_sequences, q.shape, k.shape[1]
        q_len, k_len = varlen.max_seqlen_q, varlen.max_seqlen_k
        lse = torch.empty(1, q_heads, stat_rows, device=q.device, dtype=torch.float32)
    prefix_len = prefix_k.shape[-2]
    out = torch.empty_like(q)
    if out.numel() == 0 or batch == 0 or q_len == 0:
        lse.fill_(float("inf"))
        if sinks is not None:  # each row's normaliser is its sink alone
            lse.copy_((sinks.float() * LOG2_E).view(1, -1, 1).expand_as(lse))
        return out.zero_(), lse
    limits = device_limits(q.device) if limits is None else limits
    kpm = mask_as_int8(key_padding_mask)
    bounds = key_bounds_of(key_padding_mask, launcher)
    bias_table, bias_buckets, *bias_scalars = relative_bias_args(relative_bias_table, relative_bias_buckets)

    def descriptors(block_rows: int) -> Optional[tuple]:
        """TMA descriptors of K, V, PK, PV, then of their tails (None without one)."""
        return split_tma_descriptors((k, v), (prefix_k, prefix_v), block_rows, head_dim, varlen is not None, limits)

    def run(cfg):
        grid = (triton.cdiv(q_len, cfg["BLOCK_M"]) * batch * q_heads,)
        descs = descriptors(cfg["BLOCK_N"])
        edge_n = forward_edge_block(cfg["BLOCK_N"], head_dim, dropout=dropout_p > 0.0, padding=kpm is not None,
                                    varlen=varlen is not None, softcap=softcap > 0.0, bias=bias_table is not None,
                                    prefix_dropout=prefix_dropout_p > 0.0)
        edge_descs = descs
        if descs is not None and edge_n != cfg["BLOCK_N"]:
            edge_descs = descriptors(edge_n)
        full = descs or (None,) * 8
        edge = edge_descs if edge_descs is not None and edge_descs is not descs else (None,) * 8
        launcher(_prefix_attention_fwd_kernel, grid)(
            q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, kpm, bounds,
            None if varlen is None else varlen.cu_seqlens_q, None if varlen is None else varlen.cu_seqlens_k, sinks,
            bias_table, bias_buckets, out, lse, *full[:4], *edge[:4], *full[4:8], *edge[4:8],
            *qkv_strides(q, varlen),
            *qkv_strides(k, varlen),
            *qkv_strides(v, varlen),
            *batch_strides(prefix_k, 3),
            *batch_strides(prefix_v, 3),
            *mask_strides(key_padding_mask),
            *qkv_strides(out, varlen),
            q_heads, q_len, k_len, prefix_len, head_dim, entry_step(prefix_k, prefix_index), stat_rows,
            scale * LOG2_E, *dropout_threshold(dropout_p), seed,
            *dropout_threshold(prefix_dropout_p), prefix_seed, *softcap_args(scale, softcap), window, *bias_scalars,
            GROUP=q_heads // kv_heads,
            VARLEN=varlen is not None,
            SOFTCAP=softcap > 0.0,
            BIAS=bias_table is not None,
            WINDOW=window > 0,
            HAS_SINKS=sinks is not None,
            CAUSAL=causal,
            HAS_KPM=key_padding_mask is not None,
            HAS_PREFIX=prefix_len > 0,
            HAS_INDEX=prefix_index is not None,
            HAS_LENGTHS=prefix_lengths is not None,
            PREFIX_DROPOUT=prefix_dropout_p > 0.0,
            DROPOUT=dropout_mode(dropout_p, limits),
            UPCAST=upcast_in_interpreter(q.dtype, limits.interpreted),
            DOT_PRECISION=dot_precision(q.dtype, limits.hip),
            TMA=descs is not None and edge_descs is not None,
            PTX=philox_mode(limits) == DROPOUT_PTX,
            EDGE_N=edge_n,
            PREFIX_N=edge_n if prefix_dropout_p > 0.0 else cfg["BLOCK_N"],
            **head_dim_parts(head_dim),
            HALF_EDGE_TMA=half_width_edge_tma(head_dim),
            enable_fp_fusion=FP_FUSION,
            **cfg,
        )

    cfg = forward_config(head_dim, q.dtype, limits, dropout=dropout_p > 0.0, bias=bias_table is not None)
    if autotune_requested(limits) and launcher is launch_kernel:
        key = ("fwd", str(q.device), q.dtype, head_dim, q_heads // kv_heads, causal, kpm is None, prefix_len > 0,
               dropout_p > 0.0, prefix_index is None, prefix_lengths is None, prefix_dropout_p > 0.0,
               varlen is None, softcap > 0.0, sinks is None, window > 0, bias_table is None, shape_bucket(q_len),
               shape_bucket(prefix_len + k_len))
        configs = gpu_forward_configs(head_dim, q.dtype, limits.max_shared_memory, dropout_p > 0.0,
                                      bias_table is not None)
        cfg = tuned_config(key, configs, lambda c: triton.testing.do_bench(lambda: run(c), warmup=5, rep=20))
    run(cfg)
    return out, lse


def dropout_keep_mask(
    batch: int, q_heads: int, q_len: int, prefix_len: int, k_len: int, dropout_p: float, seed: int, device,
    *, cu_seqlens_q: Optional[Tensor] = None, limits: Optional[DeviceLimits] = None,
    launcher: Launcher = launch_kernel,
) -> Tensor:
    """The (B, Hq, Sq, P + Sk) bool keep mask that the kernels draw for ``seed`` (for tests/debugging).
    Its P(keep) is 1 - t / 65536 with t = ``dropout_threshold(dropout_p)[0]``. With packed sequences
    (``cu_seqlens_q`` (N + 1,), batch 1, q_len = total_q, k_len = the max key length) the mask of
    ``prefix_attention_varlen``: each sequence's queries are numbered from its own first row."""
    out = torch.empty(batch * q_heads, q_len, prefix_len + k_len, dtype=torch.int8, device=device)
    limits = device_limits(device) if limits is None else limits
    if out.numel():
        width = (prefix_len + 15) // 16 * 16 + (k_len + 15) // 16 * 16  # the dropout lanes of a row
        threshold = dropout_threshold(dropout_p)[0]
        if cu_seqlens_q is None:
            starts = [(0, q_len, batch * q_heads)]
        else:
            if batch != 1:
                raise ValueError(f"dropout_keep_mask: batch must be 1 with cu_seqlens_q, got {batch}")
            bounds = [int(x) for x in cu_seqlens_q.tolist()]
            if not bounds or bounds[0] != 0 or bounds[-1] != q_len:
                raise ValueError(f"dropout_keep_mask: cu_seqlens_q must run from 0 to q_len = {q_len} (the total "
                                 f"query rows), got {bounds}")
            starts = [(lo, hi - lo, q_heads) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        for first_query, rows, heads in starts:
            grid = (triton.cdiv(rows, 16) * heads, triton.cdiv(width, 16))
            launcher(_dropout_keep_mask_kernel, grid)(out, rows, q_len, first_query, prefix_len, k_len, threshold,
                                                      seed, BLOCK_M=16, BLOCK_N=16,
                                                      DROPOUT=philox_mode(limits))
    return out.view(batch, q_heads, q_len, prefix_len + k_len).bool()


def prefix_dropout_keep_mask(
    batch: int, kv_heads: int, prefix_len: int, head_dim: int, prefix_dropout_p: float, prefix_seed: int, device,
    *, launcher: Launcher = launch_kernel,
) -> Tensor:
    """The (2, B, Hkv, P, D) bool keep mask of the prefix dropout (keys, values) that the kernels
    draw for ``prefix_seed`` (for tests / debugging). P(keep) = 1 - t / 65536 as in ``dropout_keep_mask``."""
    out = torch.empty(2, batch, kv_heads, prefix_len, head_dim, dtype=torch.int8, device=device)
    if out.numel():
        grid = (2 * batch * kv_heads, triton.cdiv(prefix_len, 16))
        launcher(_prefix_dropout_keep_mask_kernel, grid)(
            out, batch, kv_heads, prefix_len, head_dim, dropout_threshold(prefix_dropout_p)[0], prefix_seed,
            BLOCK_N=16, BLOCK_D=block_d(head_dim))
    return out.bool()


# Every kernel of this module (benchmarks/aot_check.py compiles each of them).
KERNELS = (_prefix_attention_fwd_kernel, _key_bounds_kernel, _dropout_keep_mask_kernel, _prefix_dropout_keep_mask_kernel)

__all__ = ["prefix_attention_forward", "key_bounds_of", "dropout_keep_mask", "prefix_dropout_keep_mask", "KERNELS"]
