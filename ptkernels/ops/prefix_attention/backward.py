"""Triton backward kernels for prefix attention, and their launcher.

Three kernels after a small preprocessing step (delta = rowsum(grad_out * out)):
- dQ: one program per (query block, batch, query head), looping over prefix then real key blocks.
- dK/dV of the real keys: one program per (key block, batch, kv head), looping over the GQA group
  and the query blocks that can see the key block (causal lower bound).
- dK/dV of the prefix: one program per (prefix block, kv head, batch split). A shared prefix loops
  over its slice of the batch in a fixed order, so the batch reduction needs no atomics; with more
  than one split, the fp32 partials (splits, Hkv, P, D) are summed in a fixed order afterwards.
  (Under P-Tuning v2's prefix dropout each example's share is added into those partials with
  atomic adds that no two threads ever issue to one element: the same order every run.)
  The result is deterministic: the same inputs give the same bits.
All probabilities are recomputed from the saved log-sum-exp; dropout is regenerated from the seed.
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
    DROPOUT_PTX_KEYS,
    accumulate_bucket_grad,
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
    loop_variant_zero,
    opaque,
    opaque_pointer,
    prefix_dropout_keep,
    unpack_keep_bits,
    relative_bias,
    relative_bucket,
    tanh,
    program_coordinates,
    query_rows,
    real_keys_visible,
    runtime_zero,
    sequence_extent,
)
from .forward import key_bounds_of
from .launch import (
    FP_FUSION,
    LOG2_E,
    DeviceLimits,
    Varlen,
    Launcher,
    autotune_requested,
    backward_config,
    block_d,
    device_limits,
    dot_precision,
    dropout_mode,
    keyed_dropout_mode,
    philox_mode,
    philox_round_keys,
    ROUND_KEY_ARGS,
    dropout_threshold,
    entry_step,
    softcap_args,
    gpu_backward_configs,
    launch_kernel,
    relative_bias_args,
    mask_as_int8,
    mask_strides,
    qkv_strides,
    shape_bucket,
    head_dim_parts,
    split_tma_descriptors,
    bank_splits,
    shared_prefix_splits,
    tuned_config,
    upcast_in_interpreter,
)


@triton.jit
def _tile_probs_and_grad(
    q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, s_visible, seed, first_row, key_lane, dropout_threshold,
    qk_scale_log2, dropout_scale,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, softcap_in, softcap_out, SOFTCAP: tl.constexpr,
    bias_row, key_pos, query_pos, bias_center, bias_last, BIAS: tl.constexpr,
):
    """(p_kept, ds) of one (BLOCK_M queries x BLOCK_N keys) tile, in the (query x key) orientation of
    the forward: the recomputed weights with the dropped ones zeroed (kept ones not yet scaled by
    1 / P(keep)), and dS = dL/d(scores) (with SOFTCAP including the 1 - tanh^2 of the softcap; with
    BIAS, which never comes with SOFTCAP, dS is also the bias's gradient). MASKED=False: every key is
    visible (s_visible is ignored). BIAS: T5's relative bias of keys at key_pos (BLOCK_N,) for queries
    at query_pos (BLOCK_M,). DROPOUT: the keep mask drawn where the scores live (attention_dropout_keep).
    q_tail, do_tail (BLOCK_M, BLOCK_D_TAIL), k_tail, v_tail (BLOCK_N, BLOCK_D_TAIL): the head dim's tail
    parts (``launch.split_head_dim``), or None."""
    qk = dot_tail(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tail, k_tail, DOT_PRECISION)
    if SOFTCAP:
        t = tanh(qk * softcap_in)
        s = softcap_out * t
    else:
        s = qk * qk_scale_log2
    if BIAS:
        s = s + relative_bias(bias_row, key_pos[None, :] - query_pos[:, None], bias_center, bias_last)
    if MASKED:
        p = tl.where(s_visible, tl.math.exp2(s - lse[:, None]), 0.0)
    else:
        p = tl.math.exp2(s - lse[:, None])
    dp = dot_tail(tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION), do_tail, v_tail, DOT_PRECISION)
    if DROPOUT:
        keep = attention_dropout_keep(seed, first_row, key_lane, dropout_threshold, BLOCK_M, BLOCK_N, DROPOUT)
        p_kept = tl.where(keep, p, runtime_zero(qk_scale_log2))  # (see the forward's _online_softmax_step_full)
        ds = p * tl.where(keep, dp * dropout_scale - delta[:, None], -delta[:, None])
    else:
        p_kept = p
        ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p_kept, ds


@triton.jit
def _dq_tile(
    dq, dq_tail, q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, s_visible, seed, first_row, key_lane,
    dropout_threshold, qk_scale_log2,
    dropout_scale, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, softcap_in, softcap_out, SOFTCAP: tl.constexpr,
    dbias, bias_row, BIAS_BUCKETS, key_pos, query_pos, bias_center, bias_last, BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, NB_BLOCK: tl.constexpr,
):
    """(dq, dq_tail, dbias) plus one key tile's contributions (dq before the final multiplication by the
    softmax scale; dq_tail: the head dim's tail part, with k_tail not None), from
    ``_tile_probs_and_grad``'s dS; with BIAS_GRAD dS summed per bucket joins dbias (NB_BLOCK,)."""
    _, ds = _tile_probs_and_grad(
        q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, s_visible, seed, first_row, key_lane,
        dropout_threshold, qk_scale_log2,
        dropout_scale, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, MASKED, softcap_in, softcap_out, SOFTCAP,
        bias_row, key_pos, query_pos, bias_center, bias_last, BIAS)
    if BIAS_GRAD:  # the bias adds to the scores after the scale: its gradient is dS itself
        rel = key_pos[None, :] - query_pos[:, None]
        dbias = accumulate_bucket_grad(dbias, ds, relative_bucket(BIAS_BUCKETS, rel, bias_center, bias_last), NB_BLOCK)
    if k_tail is not None:
        dq_tail += tl.dot(ds.to(k.dtype), k_tail, input_precision=DOT_PRECISION)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION), dq_tail, dbias


@triton.jit(do_not_specialize=["seed"])
def _prefix_attention_bwd_dq_kernel(
    Q, K, V, PREFIX_K, PREFIX_V, PREFIX_INDEX, PREFIX_LENGTHS, KEY_PADDING_MASK, KEY_BOUNDS, CU_SEQLENS_Q, CU_SEQLENS_K,
    BIAS_TABLE, BIAS_BUCKETS, OUT, GRAD_OUT, LSE, DELTA, DQ, DBIAS, K_DESC, V_DESC, PK_DESC, PV_DESC,
    K_TAIL_DESC, V_TAIL_DESC, PK_TAIL_DESC, PV_TAIL_DESC,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    num_q_heads, q_len, k_len, prefix_len, head_dim, entry_step, stat_rows,
    scale, qk_scale_log2, dropout_threshold, dropout_scale, seed,
    prefix_dropout_threshold, prefix_dropout_scale, prefix_seed, softcap_in, softcap_out, window,
    bias_row_len, bias_center, bias_last,
    GROUP: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
    BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, NB_BLOCK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr, PREFIX_DROPOUT: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_D_TAIL: tl.constexpr, EVEN_TAIL: tl.constexpr,
):
    """DQ (B, Hq, Sq, D): one program per (query block, batch, query head). EVEN_D, BLOCK_D_TAIL,
    EVEN_TAIL and the *_TAIL_DESC descriptors: the head dim's parts, as in the forward kernel.
    It also writes DELTA (B, Hq, Sq) float32 (like LSE), delta_i = sum_d dO[i, d] * OUT[i, d], of its
    rows, which it uses itself and the dK/dV kernels read after it (no separate pre-pass launch).
    Example b's prefix (bank entry, length, prefix dropout), BIAS, VARLEN and TMA (full key tiles
    through K_DESC, V_DESC, PK_DESC, PV_DESC) as in the forward kernel.
    BIAS_GRAD (the table requires grad): DBIAS (programs, NB_BLOCK) float32 gets this program's
    per-bucket sums of dS (row = program id), summed over programs in a fixed order afterwards."""
    # 1-D grid: query blocks fastest, then query heads, then batch.
    b, h, start_m, offs_m = program_coordinates(q_len, num_q_heads, BLOCK_M)
    kv_h = h // GROUP
    q_start, q_len, k_start, k_len, stat_base = query_rows(CU_SEQLENS_Q, CU_SEQLENS_K, b, h, num_q_heads, q_len,
                                                           k_len, stat_rows, VARLEN)
    if VARLEN:
        if start_m >= q_len:  # past this packed sequence's queries
            return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < head_dim
    rows = offs_m[:, None].to(tl.int64)
    qd_mask = m_valid[:, None] & d_valid[None, :]
    offs_t, t_valid = None, None  # the head dim's tail channels, if any
    if BLOCK_D_TAIL > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        t_valid = offs_t < head_dim

    q_base = Q + b * stride_qb + q_start * stride_qm + h * stride_qh
    do_base = GRAD_OUT + b * stride_dob + q_start * stride_dom + h * stride_doh
    o_base = OUT + b * stride_ob + q_start * stride_om + h * stride_oh
    q = load_tile(q_base, offs_m, stride_qm, offs_d, m_valid, d_valid, UPCAST)
    do = load_tile(do_base, offs_m, stride_dom, offs_d, m_valid, d_valid, UPCAST)
    o = load_tile(o_base, offs_m, stride_om, offs_d, m_valid, d_valid, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    q_tail = load_tail_tile(q_base, offs_m, stride_qm, offs_t, m_valid, t_valid, UPCAST, BLOCK_D_TAIL)
    do_tail = load_tail_tile(do_base, offs_m, stride_dom, offs_t, m_valid, t_valid, UPCAST, BLOCK_D_TAIL)
    dq_tail = tl.zeros([1, 1], dtype=tl.float32)  # (loop-carried: a placeholder without a tail)
    if BLOCK_D_TAIL > 0:
        o_tail = load_tile(o_base, offs_m, stride_om, offs_t, m_valid, t_valid, False)
        delta += tl.sum(o_tail.to(tl.float32) * do_tail.to(tl.float32), 1)
        dq_tail = tl.zeros([BLOCK_M, BLOCK_D_TAIL], dtype=tl.float32)
    row_stat = stat_base + offs_m
    tl.store(DELTA + row_stat, delta, mask=m_valid)
    lse = tl.load(LSE + row_stat, mask=m_valid, other=float("inf"))
    first_row = (stat_base + start_m).to(tl.int64)  # dropout row id of the tile's first query
    real_lane = dropout_real_lane(prefix_len)  # the dropout lane of real key 0
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([NB_BLOCK], dtype=tl.float32)
    query_pos = offs_m + (k_len - q_len)  # relative-bias positions from real key 0 (prefix key n: n - P_b)
    bias_row = BIAS_TABLE  # None without BIAS
    if BIAS:
        bias_row = BIAS_TABLE + h * bias_row_len

    # Prefix keys, then real keys, as in the forward: full tiles without mask arithmetic (every key
    # of the tile visible to every query of the block), then the masked boundary tiles.
    all_visible = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
    if HAS_PREFIX:
        entry, example_prefix_len = example_prefix(PREFIX_INDEX, PREFIX_LENGTHS, b, entry_step, prefix_len,
                                                   HAS_INDEX, HAS_LENGTHS)
        pk_base = PREFIX_K + entry * stride_pkb + kv_h * stride_pkh
        pv_base = PREFIX_V + entry * stride_pvb + kv_h * stride_pvh
        num_kv_heads = num_q_heads // GROUP
        prefix_full, masked_from = prefix_tile_ranges(example_prefix_len, start_m, q_len, k_len, window, BLOCK_N,
                                                      WINDOW)
        for start_n in range(0, prefix_full, BLOCK_N):
            n = start_n + offs_n
            k = load_full_rows(PK_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_d, d_valid, EVEN_D,
                               UPCAST, TMA, BLOCK_N, BLOCK_D)
            v = load_full_rows(PV_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_d, d_valid, EVEN_D,
                               UPCAST, TMA, BLOCK_N, BLOCK_D)
            k_tail = load_full_tail_rows(PK_TAIL_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_t, t_valid,
                                         EVEN_TAIL, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
            v_tail = load_full_tail_rows(PV_TAIL_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_t, t_valid,
                                         EVEN_TAIL, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
            k, v = drop_prefix_kv(k, v, prefix_seed, b, kv_h, num_kv_heads, prefix_len, head_dim, n,
                                  prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT, BLOCK_N, BLOCK_D)
            if BLOCK_D_TAIL > 0:  # (a None tile cannot pass through a function that returns it)
                k_tail, v_tail = drop_prefix_kv(k_tail, v_tail, prefix_seed, b, kv_h,
                                                num_kv_heads, prefix_len, head_dim, n,
                                                prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT,
                                                BLOCK_N, BLOCK_D_TAIL, BLOCK_D)
            dq, dq_tail, dbias = _dq_tile(
                dq, dq_tail, q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, all_visible, seed, first_row,
                start_n, dropout_threshold, qk_scale_log2, dropout_scale, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
                False, softcap_in, softcap_out, SOFTCAP, dbias, bias_row, BIAS_BUCKETS, n - example_prefix_len,
                query_pos, bias_center, bias_last, BIAS, BIAS_GRAD, NB_BLOCK)
        for start_n in range(masked_from, example_prefix_len, BLOCK_N):
            n = start_n + offs_n
            n_valid = n < example_prefix_len
            k = load_edge_rows(PK_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_d, n_valid, d_valid,
                               UPCAST, TMA, BLOCK_N, BLOCK_D)
            v = load_edge_rows(PV_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_d, n_valid, d_valid,
                               UPCAST, TMA, BLOCK_N, BLOCK_D)
            k_tail = load_edge_tail_rows(PK_TAIL_DESC, entry, kv_h, start_n, pk_base, n, stride_pkn, offs_t, n_valid,
                                         t_valid, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
            v_tail = load_edge_tail_rows(PV_TAIL_DESC, entry, kv_h, start_n, pv_base, n, stride_pvn, offs_t, n_valid,
                                         t_valid, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
            k, v = drop_prefix_kv(k, v, prefix_seed, b, kv_h, num_kv_heads, prefix_len, head_dim, n,
                                  prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT, BLOCK_N, BLOCK_D)
            if BLOCK_D_TAIL > 0:  # (a None tile cannot pass through a function that returns it)
                k_tail, v_tail = drop_prefix_kv(k_tail, v_tail, prefix_seed, b, kv_h,
                                                num_kv_heads, prefix_len, head_dim, n,
                                                prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT,
                                                BLOCK_N, BLOCK_D_TAIL, BLOCK_D)
            visible_2d = n_valid[None, :]
            if WINDOW:
                visible_2d = visible_2d & in_window(n, offs_m + (k_len - q_len) + example_prefix_len, window)
            dq, dq_tail, dbias = _dq_tile(
                dq, dq_tail, q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, visible_2d, seed, first_row,
                start_n, dropout_threshold, qk_scale_log2, dropout_scale, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
                True, softcap_in, softcap_out, SOFTCAP, dbias, bias_row, BIAS_BUCKETS, n - example_prefix_len,
                query_pos, bias_center, bias_last, BIAS, BIAS_GRAD, NB_BLOCK)

    # Real keys: as in the forward (full tiles of a contiguous run of attended keys without masks,
    # bounds-masked edge tiles, padded tiles skipped; mask loads only for other masks).
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, start_m + BLOCK_M + (k_len - q_len))
    k_base = K + b * stride_kb + k_start * stride_kn + kv_h * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + kv_h * stride_vh
    lo_b, hi_b, contiguous = key_bounds(KEY_BOUNDS, b, k_len, HAS_KPM)
    kv_batch = descriptor_batch(b, VARLEN)
    # As in the forward (``load_edge_rows``): the bounded edge tiles through TMA without a padding
    # mask, the general mask's tiles (which read every key before Sk anyway) with one.
    EDGE_TMA: tl.constexpr = TMA and not HAS_KPM and not VARLEN
    GENERAL_TMA: tl.constexpr = TMA and not VARLEN
    if contiguous:
        full_end = hi_b
        if CAUSAL:
            full_end = tl.minimum(hi_b, start_m + (k_len - q_len) + 1)
        first_lo, full_lo = window_key_bounds(lo_b, start_m, q_len, k_len, window, BLOCK_M, BLOCK_N, WINDOW)
        full_hi = tl.maximum(tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N, full_lo)
        edge_hi = tl.minimum(hi, hi_b)
        for start_n in range(first_lo // BLOCK_N * BLOCK_N, tl.minimum(full_lo, edge_hi), BLOCK_N):
            n = start_n + offs_n
            n_valid = n < hi_b
            k = load_edge_rows(K_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, n_valid,
                               d_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D)
            v = load_edge_rows(V_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, n_valid,
                               d_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D)
            k_tail = load_edge_tail_rows(K_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn,
                                         offs_t, n_valid, t_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D_TAIL)
            v_tail = load_edge_tail_rows(V_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn,
                                         offs_t, n_valid, t_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D_TAIL)
            visible_2d = bounded_keys_visible(n, lo_b, hi_b, offs_m, q_len, k_len, CAUSAL, window, WINDOW)
            dq, dq_tail, dbias = _dq_tile(
                dq, dq_tail, q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, visible_2d, seed, first_row,
                real_lane + start_n, dropout_threshold, qk_scale_log2, dropout_scale, DROPOUT, DOT_PRECISION,
                BLOCK_M, BLOCK_N, True, softcap_in, softcap_out, SOFTCAP, dbias, bias_row, BIAS_BUCKETS, n,
                query_pos, bias_center, bias_last, BIAS, BIAS_GRAD, NB_BLOCK)
        for start_n in range(full_lo, full_hi, BLOCK_N):
            n = start_n + offs_n
            k = load_full_rows(K_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, d_valid,
                               EVEN_D, UPCAST, TMA, BLOCK_N, BLOCK_D)
            v = load_full_rows(V_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, d_valid,
                               EVEN_D, UPCAST, TMA, BLOCK_N, BLOCK_D)
            k_tail = load_full_tail_rows(K_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn,
                                         offs_t, t_valid, EVEN_TAIL, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
            v_tail = load_full_tail_rows(V_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn,
                                         offs_t, t_valid, EVEN_TAIL, UPCAST, TMA, BLOCK_N, BLOCK_D_TAIL)
            dq, dq_tail, dbias = _dq_tile(
                dq, dq_tail, q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, all_visible, seed, first_row,
                real_lane + start_n, dropout_threshold, qk_scale_log2, dropout_scale, DROPOUT, DOT_PRECISION,
                BLOCK_M, BLOCK_N, False, softcap_in, softcap_out, SOFTCAP, dbias, bias_row, BIAS_BUCKETS, n,
                query_pos, bias_center, bias_last, BIAS, BIAS_GRAD, NB_BLOCK)
        for start_n in range(full_hi, edge_hi, BLOCK_N):
            n = start_n + offs_n
            n_valid = n < hi_b
            k = load_edge_rows(K_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, n_valid,
                               d_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D)
            v = load_edge_rows(V_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, n_valid,
                               d_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D)
            k_tail = load_edge_tail_rows(K_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn,
                                         offs_t, n_valid, t_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D_TAIL)
            v_tail = load_edge_tail_rows(V_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn,
                                         offs_t, n_valid, t_valid, UPCAST, EDGE_TMA, BLOCK_N, BLOCK_D_TAIL)
            visible_2d = bounded_keys_visible(n, lo_b, hi_b, offs_m, q_len, k_len, CAUSAL, window, WINDOW)
            dq, dq_tail, dbias = _dq_tile(
                dq, dq_tail, q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, visible_2d, seed, first_row,
                real_lane + start_n, dropout_threshold, qk_scale_log2, dropout_scale, DROPOUT, DOT_PRECISION,
                BLOCK_M, BLOCK_N, True, softcap_in, softcap_out, SOFTCAP, dbias, bias_row, BIAS_BUCKETS, n,
                query_pos, bias_center, bias_last, BIAS, BIAS_GRAD, NB_BLOCK)
    else:
        first_key, _ = window_key_bounds(0, start_m, q_len, k_len, window, BLOCK_M, BLOCK_N, WINDOW)
        for start_n in range(first_key // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            n = start_n + offs_n
            n_valid = n < k_len
            k = load_edge_rows(K_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn, offs_d, n_valid,
                               d_valid, UPCAST, GENERAL_TMA, BLOCK_N, BLOCK_D)
            v = load_edge_rows(V_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn, offs_d, n_valid,
                               d_valid, UPCAST, GENERAL_TMA, BLOCK_N, BLOCK_D)
            k_tail = load_edge_tail_rows(K_TAIL_DESC, kv_batch, kv_h, k_start + start_n, k_base, n, stride_kn,
                                         offs_t, n_valid, t_valid, UPCAST, GENERAL_TMA, BLOCK_N, BLOCK_D_TAIL)
            v_tail = load_edge_tail_rows(V_TAIL_DESC, kv_batch, kv_h, k_start + start_n, v_base, n, stride_vn,
                                         offs_t, n_valid, t_valid, UPCAST, GENERAL_TMA, BLOCK_N, BLOCK_D_TAIL)
            visible_2d = real_keys_visible(KEY_PADDING_MASK, b, stride_mb, stride_mn, n, n_valid, offs_m, q_len,
                                           k_len, HAS_KPM, CAUSAL, window, WINDOW)
            dq, dq_tail, dbias = _dq_tile(
                dq, dq_tail, q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, visible_2d, seed, first_row,
                real_lane + start_n, dropout_threshold, qk_scale_log2, dropout_scale, DROPOUT, DOT_PRECISION,
                BLOCK_M, BLOCK_N, True, softcap_in, softcap_out, SOFTCAP, dbias, bias_row, BIAS_BUCKETS, n,
                query_pos, bias_center, bias_last, BIAS, BIAS_GRAD, NB_BLOCK)

    dq_rows = DQ + b * stride_dqb + q_start * stride_dqm + h * stride_dqh + rows * stride_dqm
    tl.store(dq_rows + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)
    if BLOCK_D_TAIL > 0:
        tl.store(dq_rows + offs_t[None, :], (dq_tail * scale).to(DQ.dtype.element_ty),
                 mask=m_valid[:, None] & t_valid[None, :])
    if BIAS_GRAD:
        tl.store(DBIAS + tl.program_id(0).to(tl.int64) * NB_BLOCK + tl.arange(0, NB_BLOCK), dbias)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, q_base, do_base, stat_base, stride_qm, stride_dom,
    start_m, q_len, offs_d, d_valid, key_visible_t, key_lane, row_base,
    seed, dropout_threshold, dropout_scale, qk_scale_log2,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, softcap_in, softcap_out,
    SOFTCAP: tl.constexpr, key_pos, window_shift, window, WINDOW: tl.constexpr,
    bias_row, BIAS_BUCKETS, bias_center, bias_last, BIAS: tl.constexpr,
    Q_DESC, DO_DESC, desc_batch, desc_head, desc_row, TMA: tl.constexpr, EDGE_TMA: tl.constexpr,
    BLOCK_D: tl.constexpr, dk_tail, dv_tail, k_tail=None, v_tail=None, offs_t=None, t_valid=None, Q_TAIL_DESC=None,
    DO_TAIL_DESC=None, EVEN_TAIL: tl.constexpr = True, BLOCK_D_TAIL: tl.constexpr = 0,
):
    """(dk, dv, dk_tail, dv_tail) plus the dK/dV contribution of one query tile, in transposed
    (keys x queries) form (with DROPOUT in (queries x keys) form). With a head-dim tail (BLOCK_D_TAIL
    > 0, ``launch.split_head_dim``): k_tail, v_tail (BLOCK_N, BLOCK_D_TAIL) the keys' tail channels
    offs_t, dk_tail, dv_tail their gradients, Q and dO's tails loaded through Q_TAIL_DESC,
    DO_TAIL_DESC with TMA; without one, dk_tail and dv_tail are placeholders returned as they are.
    MASKED=False: the tile's queries are all < q_len and see every key of the block
    (key_visible_t is ignored, loads are unmasked; TMA: Q and dO through Q_DESC, DO_DESC at
    (desc_batch, desc_head, desc_row + start_m)); MASKED=True with EDGE_TMA: the same, queries past
    q_len read as 0 (``load_edge_rows``: not for packed sequences). Query i sits at position i + window_shift and the
    block's keys at key_pos (BLOCK_N,) (the sliding window's and the relative bias's positions)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASKED:
        if WINDOW:  # query i (position i + window_shift) sees key position key_pos iff the gap is < window
            key_visible_t = key_visible_t & ((offs_m[None, :] + window_shift) - key_pos[:, None] < window)
        m_valid = offs_m < q_len
        q = load_edge_rows(Q_DESC, desc_batch, desc_head, desc_row + start_m, Q + q_base, offs_m, stride_qm, offs_d,
                           m_valid, d_valid, UPCAST, EDGE_TMA, BLOCK_M, BLOCK_D)
        do = load_edge_rows(DO_DESC, desc_batch, desc_head, desc_row + start_m, GRAD_OUT + do_base, offs_m,
                            stride_dom, offs_d, m_valid, d_valid, UPCAST, EDGE_TMA, BLOCK_M, BLOCK_D)
        q_tail = load_edge_tail_rows(Q_TAIL_DESC, desc_batch, desc_head, desc_row + start_m, Q + q_base, offs_m,
                                     stride_qm, offs_t, m_valid, t_valid, UPCAST, EDGE_TMA, BLOCK_M, BLOCK_D_TAIL)
        do_tail = load_edge_tail_rows(DO_TAIL_DESC, desc_batch, desc_head, desc_row + start_m, GRAD_OUT + do_base,
                                      offs_m, stride_dom, offs_t, m_valid, t_valid, UPCAST, EDGE_TMA, BLOCK_M,
                                      BLOCK_D_TAIL)
        lse = tl.load(LSE + stat_base + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + stat_base + offs_m, mask=m_valid, other=0.0)
    else:
        q = load_full_rows(Q_DESC, desc_batch, desc_head, desc_row + start_m, Q + q_base, offs_m, stride_qm, offs_d,
                           d_valid, EVEN_D, UPCAST, TMA, BLOCK_M, BLOCK_D)
        do = load_full_rows(DO_DESC, desc_batch, desc_head, desc_row + start_m, GRAD_OUT + do_base, offs_m,
                            stride_dom, offs_d, d_valid, EVEN_D, UPCAST, TMA, BLOCK_M, BLOCK_D)
        q_tail = load_full_tail_rows(Q_TAIL_DESC, desc_batch, desc_head, desc_row + start_m, Q + q_base, offs_m,
                                     stride_qm, offs_t, t_valid, EVEN_TAIL, UPCAST, TMA, BLOCK_M, BLOCK_D_TAIL)
        do_tail = load_full_tail_rows(DO_TAIL_DESC, desc_batch, desc_head, desc_row + start_m, GRAD_OUT + do_base,
                                      offs_m, stride_dom, offs_t, t_valid, EVEN_TAIL, UPCAST, TMA, BLOCK_M,
                                      BLOCK_D_TAIL)
        lse = tl.load(LSE + stat_base + offs_m)
        delta = tl.load(DELTA + stat_base + offs_m)

    if DROPOUT:
        # (query x key) orientation, as in the forward and dQ kernels: the keep mask is drawn where
        # the scores live (no layout conversion); P and dS reach the dV / dK matmuls transposed,
        # through shared memory. dV's 1 / P(keep) is applied once, when the kernels store dV.
        p_kept, ds = _tile_probs_and_grad(
            q, do, lse, delta, k, v, q_tail, do_tail, k_tail, v_tail, tl.trans(key_visible_t), seed,
            (row_base + start_m).to(tl.int64), key_lane,
            dropout_threshold, qk_scale_log2, dropout_scale, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, MASKED,
            softcap_in, softcap_out, SOFTCAP, bias_row, key_pos, offs_m + window_shift, bias_center, bias_last, BIAS)
        dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if BLOCK_D_TAIL > 0:
            dv_tail += tl.dot(tl.trans(p_kept.to(do.dtype)), do_tail, input_precision=DOT_PRECISION)
            dk_tail += tl.dot(tl.trans(ds.to(q.dtype)), q_tail, input_precision=DOT_PRECISION)
    else:  # (key x query) orientation, as Triton's tutorial: no transposition through shared memory
        qk_t = dot_tail(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), k_tail, q_tail, DOT_PRECISION)
        if SOFTCAP:
            t_t = tanh(qk_t * softcap_in)
            s_t = softcap_out * t_t
        else:
            s_t = qk_t * qk_scale_log2
        if BIAS:
            s_t = s_t + relative_bias(bias_row, key_pos[:, None] - (offs_m[None, :] + window_shift), bias_center,
                                      bias_last)
        if MASKED:
            p_t = tl.where(key_visible_t, tl.math.exp2(s_t - lse[None, :]), 0.0)
        else:
            p_t = tl.math.exp2(s_t - lse[None, :])
        dp_t = dot_tail(tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION), v_tail, do_tail, DOT_PRECISION)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        if BLOCK_D_TAIL > 0:
            dv_tail += tl.dot(p_t.to(do.dtype), do_tail, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if BLOCK_D_TAIL > 0:
            dk_tail += tl.dot(ds_t.to(q.dtype), q_tail, input_precision=DOT_PRECISION)
    return dk, dv, dk_tail, dv_tail


@triton.jit
def _dkdv_query_ranges(KEY_BOUNDS, b, start_n, q_len, k_len, window, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                       WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full_start, full_stop, q_end) of the query tiles that see the key block at start_n of
    example b (q_len queries, k_len keys): tiles [lo, full_start) and [full_stop, q_end) with masks
    (above the causal diagonal of this key block, the last partial query tile, a key block that is
    partial or padded, or with WINDOW one that leaves the window), [full_start, full_stop) without
    any (every query sees every key of the block)."""
    lo = 0
    if CAUSAL:
        # query i sees key j iff i >= j - (Sk - Sq): skip the query blocks entirely above that.
        first_query = tl.maximum(start_n - (k_len - q_len), 0)
        lo = (first_query // BLOCK_M) * BLOCK_M
    full_start = lo
    if CAUSAL:
        last_key_query = tl.maximum(start_n + BLOCK_N - 1 - (k_len - q_len), 0)  # first query seeing all keys
        full_start = tl.minimum(tl.maximum(lo, tl.cdiv(last_key_query, BLOCK_M) * BLOCK_M),
                                tl.cdiv(q_len, BLOCK_M) * BLOCK_M)
    full_stop = (q_len // BLOCK_M) * BLOCK_M
    lo_b, hi_b, contiguous = key_bounds(KEY_BOUNDS, b, k_len, HAS_KPM)
    # every key of the block is padding: nothing to do (dK = dV = 0)
    skip = contiguous & ((start_n >= hi_b) | (start_n + BLOCK_N <= lo_b))
    lo = tl.where(skip, q_len, lo)
    full_start = tl.where(skip, q_len, full_start)
    # only a block of attended keys has unmasked query tiles
    key_full = contiguous & (start_n >= lo_b) & (start_n + BLOCK_N <= hi_b)
    full_stop = tl.where(key_full, tl.maximum(full_stop, full_start), full_start)
    q_end = q_len
    if WINDOW:  # queries past the window of the block's last key see none of it; full tiles need its first
        window_shift = k_len - q_len  # query i sits at key position i + Sk - Sq
        q_end = tl.minimum(q_len, start_n + BLOCK_N - 1 - window_shift + window)
        full_stop = tl.maximum(tl.minimum(full_stop, (start_n - window_shift + window) // BLOCK_M * BLOCK_M),
                               full_start)
    return lo, full_start, full_stop, q_end


@triton.jit(do_not_specialize=["seed", *ROUND_KEY_ARGS])
def _prefix_attention_bwd_dkdv_kernel(
    Q, K, V, KEY_PADDING_MASK, KEY_BOUNDS, CU_SEQLENS_Q, CU_SEQLENS_K, BIAS_TABLE, BIAS_BUCKETS, GRAD_OUT, LSE, DELTA,
    DK, DV, Q_DESC, DO_DESC, Q_TAIL_DESC, DO_TAIL_DESC,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    num_q_heads, num_kv_heads, q_len, k_len, prefix_len, head_dim, stat_rows,
    scale, qk_scale_log2, dropout_threshold, dropout_scale, seed,
    round_key_0, round_key_1, round_key_2, round_key_3, round_key_4, round_key_5, round_key_6,
    round_key_7, round_key_8, round_key_9, round_key_10, round_key_11, round_key_12, round_key_13,
    softcap_in, softcap_out, window, bias_row_len, bias_center, bias_last,
    GROUP: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
    BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PTX: tl.constexpr,
    BLOCK_D_TAIL: tl.constexpr, EVEN_TAIL: tl.constexpr,
):
    """DK, DV (B, Hkv, Sk, D) of the real keys: one program per (key block, batch, kv head).
    EVEN_D, BLOCK_D_TAIL, EVEN_TAIL: the head dim's parts as in the forward kernel (Q_TAIL_DESC,
    DO_TAIL_DESC: the tails' descriptors).
    VARLEN as in the forward kernel (b is a packed sequence; DK, DV are (total_k, Hkv, D)).
    TMA: full query tiles load Q and dO through Q_DESC, DO_DESC (``launch.tma_descriptor``).
    PTX: compiled for an NVIDIA GPU. With DROPOUT, VARLEN or BIAS the epilogue computes the program's
    coordinates anew (``program_coordinates(..., FRESH_PID=PTX)``: from a fresh read of the program
    id and divisors where PTX) instead of holding them across the query loops, which spilled them
    (56 -> 16 bytes at D=64 with dropout + causal + padding + GQA, 60 -> 0 at D=128, packed 224 -> 168
    and 96 -> 64, relative bias 8 -> 0; with a head-dim tail, D=96 causal + GQA 64 -> 24); elsewhere
    nothing spilled, and it lengthened the loops by up to 1%. round_key_0..13: the seed's Philox round
    keys (``launch.philox_round_keys``), read where
    DROPOUT is DROPOUT_PTX_KEYS (else unused): computed from the seed, they were held in registers,
    and with dropout + causal + padding + GQA at D=64 one pointer spilled (16 bytes)."""
    if DROPOUT == DROPOUT_PTX_KEYS:  # the helpers' seed: the round keys (common.philox_keyed)
        seed = (round_key_0, round_key_1, round_key_2, round_key_3, round_key_4, round_key_5, round_key_6,
                round_key_7, round_key_8, round_key_9, round_key_10, round_key_11, round_key_12, round_key_13)
    # 1-D grid: key blocks fastest, then kv heads, then batch.
    b, kv_h, start_n, offs_n = program_coordinates(k_len, num_kv_heads, BLOCK_N)
    q_len_max = q_len
    k_len_max = k_len  # (the grid's extent; VARLEN replaces k_len by the sequence's own)
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start, q_len = sequence_extent(CU_SEQLENS_Q, b)
        k_start, k_len = sequence_extent(CU_SEQLENS_K, b)
        if start_n >= k_len:
            return
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < k_len
    d_valid = offs_d < head_dim
    keys = offs_n[:, None].to(tl.int64)
    kd_mask = n_valid[:, None] & d_valid[None, :]
    k_base = K + b * stride_kb + k_start * stride_kn + kv_h * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + kv_h * stride_vh
    k = load_tile(k_base, offs_n, stride_kn, offs_d, n_valid, d_valid, UPCAST)
    v = load_tile(v_base, offs_n, stride_vn, offs_d, n_valid, d_valid, UPCAST)
    offs_t, t_valid = None, None  # the head dim's tail channels, if any
    dk_tail = tl.zeros([1, 1], dtype=tl.float32)  # (loop-carried: placeholders without a tail)
    dv_tail = tl.zeros([1, 1], dtype=tl.float32)
    if BLOCK_D_TAIL > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        t_valid = offs_t < head_dim
        dk_tail = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
        dv_tail = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
    k_tail = load_tail_tile(k_base, offs_n, stride_kn, offs_t, n_valid, t_valid, UPCAST, BLOCK_D_TAIL)
    v_tail = load_tail_tile(v_base, offs_n, stride_vn, offs_t, n_valid, t_valid, UPCAST, BLOCK_D_TAIL)
    visible = n_valid
    if HAS_KPM:
        attend = tl.load(KEY_PADDING_MASK + b * stride_mb + offs_n.to(tl.int64) * stride_mn, mask=n_valid, other=0)
        visible = visible & (attend != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_start, full_stop, q_end = _dkdv_query_ranges(KEY_BOUNDS, b, start_n, q_len, k_len, window, CAUSAL,
                                                          HAS_KPM, WINDOW, BLOCK_M, BLOCK_N)
    key_pos = offs_n
    real_lane = dropout_real_lane(prefix_len) + start_n
    desc_batch = descriptor_batch(b, VARLEN)
    # Masked query tiles through TMA too (``load_edge_rows``), but for packed sequences and under
    # attention dropout (there its (query x key) masked loops at D=64 compiled 18-20% longer).
    EDGE_TMA: tl.constexpr = TMA and not VARLEN and not DROPOUT
    for g in range(GROUP):
        h = kv_h * GROUP + g
        seq_q_len, seq_k_len = q_len, k_len
        g_lo, g_full_start, g_full_stop, g_q_end = lo, full_start, full_stop, q_end
        # The query tiles' ranges anew for each query head, from an example index (with GQA also a key
        # block) the compiler cannot see is b (start_n) (``loop_variant_zero``), not held across the heads'
        # query loops: packed sequences (with their lengths) spilled them (168 bytes at D=64, 64 at
        # D=128, reloaded for each head; now none, the masked loops 2-4% shorter, D=64's unmasked one
        # 325 -> 335 instructions); with GQA triton 3.6 spilled them (prefix + GQA 256 bytes at D=64,
        # 124 at D=128; now none, the loops 1-4% shorter), and triton 3.9's loops moved by -1% to +0.6%.
        if VARLEN:
            seq = b + loop_variant_zero(g, PTX)
            seq_q_len = sequence_extent(CU_SEQLENS_Q, seq)[1]
            seq_k_len = sequence_extent(CU_SEQLENS_K, seq)[1]
            g_lo, g_full_start, g_full_stop, g_q_end = _dkdv_query_ranges(
                KEY_BOUNDS, seq, start_n, seq_q_len, seq_k_len, window, CAUSAL, HAS_KPM, WINDOW, BLOCK_M, BLOCK_N)
        elif GROUP > 1:
            g_lo, g_full_start, g_full_stop, g_q_end = _dkdv_query_ranges(
                KEY_BOUNDS, b + loop_variant_zero(g, PTX), start_n + loop_variant_zero(g, PTX), q_len, k_len, window,
                CAUSAL, HAS_KPM, WINDOW, BLOCK_M, BLOCK_N)
        window_shift = seq_k_len - seq_q_len  # query i sits at key position i + Sk - Sq
        bias_row = BIAS_TABLE  # None without BIAS
        if BIAS:
            bias_row = BIAS_TABLE + h * bias_row_len
        q_base = b * stride_qb + q_start * stride_qm + h * stride_qh
        do_base = b * stride_dob + q_start * stride_dom + h * stride_doh
        if VARLEN:
            stat_base = h * stat_rows + q_start
        else:
            stat_base = (b * num_q_heads + h) * q_len_max
        for start_m in range(g_lo, g_full_start, BLOCK_M):
            visible_t = visible[:, None]
            if CAUSAL:
                offs_m = start_m + tl.arange(0, BLOCK_M)
                visible_t = visible_t & (offs_n[:, None] <= offs_m[None, :] + window_shift)
            dk, dv, dk_tail, dv_tail = _dkdv_tile(
                dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, q_base, do_base, stat_base, stride_qm, stride_dom,
                start_m, seq_q_len, offs_d, d_valid, visible_t, real_lane, stat_base, seed, dropout_threshold,
                dropout_scale, qk_scale_log2, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, True, EVEN_D,
                softcap_in, softcap_out, SOFTCAP,
                key_pos, window_shift, window, WINDOW, bias_row, BIAS_BUCKETS, bias_center, bias_last, BIAS,
                Q_DESC, DO_DESC, desc_batch, h, q_start, TMA, EDGE_TMA, BLOCK_D, dk_tail, dv_tail, k_tail, v_tail,
                offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL, BLOCK_D_TAIL)
        for start_m in range(g_full_start, g_full_stop, BLOCK_M):
            dk, dv, dk_tail, dv_tail = _dkdv_tile(
                dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, q_base, do_base, stat_base, stride_qm, stride_dom,
                start_m, seq_q_len, offs_d, d_valid, visible[:, None], real_lane, stat_base, seed,
                dropout_threshold, dropout_scale, qk_scale_log2, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N,
                False, EVEN_D, softcap_in, softcap_out, SOFTCAP,
                key_pos, window_shift, window, WINDOW, bias_row, BIAS_BUCKETS, bias_center, bias_last, BIAS,
                Q_DESC, DO_DESC, desc_batch, h, q_start, TMA, EDGE_TMA, BLOCK_D, dk_tail, dv_tail, k_tail, v_tail,
                offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL, BLOCK_D_TAIL)
        for start_m in range(g_full_stop, g_q_end, BLOCK_M):
            visible_t = visible[:, None]
            if CAUSAL:
                offs_m = start_m + tl.arange(0, BLOCK_M)
                visible_t = visible_t & (offs_n[:, None] <= offs_m[None, :] + window_shift)
            dk, dv, dk_tail, dv_tail = _dkdv_tile(
                dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, q_base, do_base, stat_base, stride_qm, stride_dom,
                start_m, seq_q_len, offs_d, d_valid, visible_t, real_lane, stat_base, seed, dropout_threshold,
                dropout_scale, qk_scale_log2, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, True, EVEN_D,
                softcap_in, softcap_out, SOFTCAP,
                key_pos, window_shift, window, WINDOW, bias_row, BIAS_BUCKETS, bias_center, bias_last, BIAS,
                Q_DESC, DO_DESC, desc_batch, h, q_start, TMA, EDGE_TMA, BLOCK_D, dk_tail, dv_tail, k_tail, v_tail,
                offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL, BLOCK_D_TAIL)
    if DROPOUT or VARLEN or BIAS or BLOCK_D_TAIL > 0:  # the coordinates anew (PTX: a fresh program id)
        b, kv_h, start_n, offs_n = program_coordinates(k_len_max, num_kv_heads, BLOCK_N, PTX)
        if VARLEN:
            k_start, k_len = sequence_extent(CU_SEQLENS_K, b)
        keys = offs_n[:, None].to(tl.int64)
        kd_mask = (offs_n < k_len)[:, None] & d_valid[None, :]
    dk_rows = DK + b * stride_dkb + k_start * stride_dkn + kv_h * stride_dkh + keys * stride_dkn
    dv_rows = DV + b * stride_dvb + k_start * stride_dvn + kv_h * stride_dvh + keys * stride_dvn
    tl.store(dk_rows + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    if DROPOUT:  # the attention dropout's 1 / P(keep) of every kept weight (see _dkdv_tile)
        dv = dv * dropout_scale
    tl.store(dv_rows + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kd_mask)
    if BLOCK_D_TAIL > 0:
        kt_mask = (offs_n < k_len)[:, None] & t_valid[None, :]
        tl.store(dk_rows + offs_t[None, :], (dk_tail * scale).to(DK.dtype.element_ty), mask=kt_mask)
        if DROPOUT:
            dv_tail = dv_tail * dropout_scale
        tl.store(dv_rows + offs_t[None, :], dv_tail.to(DV.dtype.element_ty), mask=kt_mask)


@triton.jit
def _prefix_example_dkdv(
    dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, b, kv_h, q_start, q_len, full_stop, stat_rows, num_q_heads, batch_q_len,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, offs_d, d_valid, visible_t, start_n,
    seed, dropout_threshold, dropout_scale, qk_scale_log2,
    GROUP: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    softcap_in, softcap_out, SOFTCAP: tl.constexpr, key_pos, window_shift, window, q_end, WINDOW: tl.constexpr,
    BIAS_TABLE, BIAS_BUCKETS, bias_row_len, bias_center, bias_last, BIAS: tl.constexpr,
    Q_DESC, DO_DESC, TMA: tl.constexpr, BLOCK_D: tl.constexpr,
    dk_tail, dv_tail, k_tail, v_tail, offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL: tl.constexpr,
    BLOCK_D_TAIL: tl.constexpr,
):
    """Example b's contribution to one prefix block's (dk, dv, dk_tail, dv_tail): its GROUP query
    heads, full query tiles [0, full_stop) unmasked, then the rest masked (q_len: the example's query
    count, q_start its first row under VARLEN; batch_q_len: the rows per (example, head) of LSE when
    not VARLEN; q_end: the end of the masked query tiles, q_len or, with WINDOW, where the block
    leaves the window). The head dim's tail (k_tail, ..., BLOCK_D_TAIL) as in ``_dkdv_tile``."""
    # Masked query tiles through TMA too (``load_edge_rows``); unlike the dK/dV kernel also under
    # dropout (its masked loops compiled 10-12% shorter with it) and for packed sequences, whose last
    # query tile then reads the next sequence's first rows, weighted 0 as rows past q_len are (their
    # LSE reads +inf): with pointer loads the packed set spilled 80 bytes at D=128, none this way, at
    # +0.3% / +2% instructions in its full / masked loops.
    EDGE_TMA: tl.constexpr = TMA
    for g in range(GROUP):
        h = kv_h * GROUP + g
        bias_row = BIAS_TABLE  # None without BIAS
        if BIAS:
            bias_row = BIAS_TABLE + h * bias_row_len
        if VARLEN:
            q_base = q_start * stride_qm + h * stride_qh
            do_base = q_start * stride_dom + h * stride_doh
            stat_base = h * stat_rows + q_start
        else:
            q_base = b * stride_qb + h * stride_qh
            do_base = b * stride_dob + h * stride_doh
            stat_base = (b * num_q_heads + h) * batch_q_len
        desc_batch = descriptor_batch(b, VARLEN)
        for start_m in range(0, full_stop, BLOCK_M):
            dk, dv, dk_tail, dv_tail = _dkdv_tile(
                dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, q_base, do_base, stat_base, stride_qm, stride_dom,
                start_m, q_len, offs_d, d_valid, visible_t, start_n, stat_base, seed, dropout_threshold,
                dropout_scale, qk_scale_log2, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, False, EVEN_D,
                softcap_in, softcap_out, SOFTCAP,
                key_pos, window_shift, window, WINDOW, bias_row, BIAS_BUCKETS, bias_center, bias_last, BIAS,
                Q_DESC, DO_DESC, desc_batch, h, q_start, TMA, EDGE_TMA, BLOCK_D, dk_tail, dv_tail, k_tail, v_tail,
                offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL, BLOCK_D_TAIL)
        for start_m in range(full_stop, q_end, BLOCK_M):
            dk, dv, dk_tail, dv_tail = _dkdv_tile(
                dk, dv, k, v, Q, GRAD_OUT, LSE, DELTA, q_base, do_base, stat_base, stride_qm, stride_dom,
                start_m, q_len, offs_d, d_valid, visible_t, start_n, stat_base, seed, dropout_threshold,
                dropout_scale, qk_scale_log2, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, True, EVEN_D,
                softcap_in, softcap_out, SOFTCAP,
                key_pos, window_shift, window, WINDOW, bias_row, BIAS_BUCKETS, bias_center, bias_last, BIAS,
                Q_DESC, DO_DESC, desc_batch, h, q_start, TMA, EDGE_TMA, BLOCK_D, dk_tail, dv_tail, k_tail, v_tail,
                offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL, BLOCK_D_TAIL)
    return dk, dv, dk_tail, dv_tail


@triton.jit
def _add_dropped_prefix_grad(DST, stride_row, grad, keep_words, grad_scale, offs_n, prefix_len, head_dim,
                             PTX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """One example's share of a dropped prefix block's gradient, added into its float32 running sum:
    DST[n, d] += grad[n, d] * grad_scale where the example kept element (n, d), for the rows
    n = offs_n (BLOCK_N,) below prefix_len and the channels d < head_dim of the tile's BLOCK_D.
    DST: the sum's row 0 (row n at DST + n * stride_row); grad (BLOCK_N, BLOCK_D) float32;
    keep_words: the keep mask packed (``consecutive_lanes_keep_bits``).

    Added with relaxed atomic adds (red.global.add.f32, 4 floats each) where a load and a store
    held the sum's tile in registers beside the example's dK and dV (the bank + prefix dropout
    kernel spilled 1,096 bytes at D=128). Deterministic all the same: this program alone adds to
    these rows, and each element is added to by the same thread in example order (the one layout,
    fixed when the kernel compiles): the same additions in the same order as the load and store (with
    a barrier between examples) made. The mask and the rows go through
    ``opaque``, so the compiler neither reuses the mask unpacked before the loops nor builds the
    pointer tiles ahead of them."""
    grad = tl.where(unpack_keep_bits(opaque(keep_words, PTX), BLOCK_N, BLOCK_D), grad * grad_scale, 0.0)
    cols = tl.arange(0, BLOCK_D)
    rows = opaque(offs_n, PTX)
    mask = (rows < prefix_len)[:, None]
    if not EVEN_D:
        mask = mask & (cols < head_dim)[None, :]
    tl.atomic_add(DST + rows[:, None] * stride_row + cols[None, :], grad, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["seed", "prefix_seed", *ROUND_KEY_ARGS])
def _prefix_attention_bwd_prefix_dkdv_kernel(
    Q, PREFIX_K, PREFIX_V, PREFIX_LENGTHS, EXAMPLE_ORDER, ENTRY_OFFSETS, CU_SEQLENS_Q, BIAS_TABLE, BIAS_BUCKETS,
    GRAD_OUT, LSE, DELTA, DPREFIX_K, DPREFIX_V, Q_DESC, DO_DESC, Q_TAIL_DESC, DO_TAIL_DESC,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_dob, stride_doh, stride_dom,
    stride_dpks, stride_dpkh, stride_dpkn,
    stride_dpvs, stride_dpvh, stride_dpvn,
    examples_per_entry, examples_per_split, splits, num_q_heads, num_kv_heads, q_len, k_len, prefix_len, head_dim,
    stat_rows, scale, qk_scale_log2, dropout_threshold, dropout_scale, seed,
    round_key_0, round_key_1, round_key_2, round_key_3, round_key_4, round_key_5, round_key_6,
    round_key_7, round_key_8, round_key_9, round_key_10, round_key_11, round_key_12, round_key_13,
    prefix_dropout_threshold, prefix_dropout_scale, prefix_seed, softcap_in, softcap_out, window,
    bias_row_len, bias_center, bias_last,
    GROUP: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, BIAS: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, PREFIX_DROPOUT: tl.constexpr, EXAMPLE_GUARD: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_D_TAIL: tl.constexpr, EVEN_TAIL: tl.constexpr,
):
    """DPREFIX_K, DPREFIX_V (A * splits, Hkv, P, D): one program per (prefix block, kv head, entry, split).
    EVEN_D, BLOCK_D_TAIL, EVEN_TAIL (Q_TAIL_DESC, DO_TAIL_DESC): the head dim's parts as in the
    forward kernel.

    Every prefix is a bank of A entries here, and each entry's gradient is the sum over the examples
    that read it, split s of entry a summing its share of them in a fixed order into its own slice
    ``a * splits + s`` (summed in a fixed order afterwards when splits > 1). Deterministic: no two
    programs add into one element, and the atomic adds of PREFIX_DROPOUT (``_add_dropped_prefix_grad``)
    come from one thread per element, in example order.
    - Bank (HAS_INDEX): entry a's examples are EXAMPLE_ORDER[ENTRY_OFFSETS[a]:ENTRY_OFFSETS[a + 1]]
      (prefix_index stably sorted).
    - Per-example prefix (B, Hkv, P, D): A = B, entry a is example a (examples_per_entry 1).
    - Shared prefix (Hkv, P, D), batch stride 0: A = 1, examples 0..B (examples_per_entry B).
    Split s takes examples [s * examples_per_split, (s + 1) * examples_per_split) of its entry's list.
    With PREFIX_DROPOUT each example's contribution is accumulated apart, multiplied by that
    example's keep mask times 1 / P(keep) (the gradient of the dropped tile w.r.t. the raw one) and
    added into DPREFIX_K / DPREFIX_V, which are then float32 and zeroed by the launcher.
    PTX: compiled for an NVIDIA GPU (``loop_variant_zero`` and ``program_coordinates(..., FRESH_PID=PTX)``
    may use inline PTX: with attention dropout the epilogue's coordinates are computed anew, not held
    across the loops); with PREFIX_DROPOUT
    or BIAS each example's prefix rows are offsets computed inside the example loop (its pointer and
    position tiles were hoisted out of it and spilled: 704 and 628 bytes at D=64, 4252 and 336 at D=128).
    VARLEN: example b is packed sequence b (its queries rows CU_SEQLENS_Q[b].. of Q, LSE (Hq, total_q)).
    TMA: full query tiles load Q and dO through Q_DESC, DO_DESC (``launch.tma_descriptor``).
    """
    if DROPOUT == DROPOUT_PTX_KEYS:  # the helpers' seed: the round keys (common.philox_keyed)
        seed = (round_key_0, round_key_1, round_key_2, round_key_3, round_key_4, round_key_5, round_key_6,
                round_key_7, round_key_8, round_key_9, round_key_10, round_key_11, round_key_12, round_key_13)
    # 1-D grid: prefix blocks fastest, then kv heads, then (entry, split).
    outer, kv_h, start_n, offs_n = program_coordinates(prefix_len, num_kv_heads, BLOCK_N)
    entry = outer // splits
    split = outer % splits
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    keys = offs_n[:, None].to(tl.int64)
    if HAS_INDEX:
        first = tl.load(ENTRY_OFFSETS + entry).to(tl.int64)
        last = tl.load(ENTRY_OFFSETS + entry + 1).to(tl.int64)
    else:
        first = entry * examples_per_entry
        last = first + examples_per_entry
    entry_prefix_len = prefix_len
    if HAS_LENGTHS:
        entry_prefix_len = tl.load(PREFIX_LENGTHS + entry)
    split_first = tl.minimum(first + split * examples_per_split, last)
    split_last = tl.minimum(split_first + examples_per_split, last)
    if start_n >= entry_prefix_len:  # a block past this entry's length: its gradient is 0
        split_last = split_first
    n_valid = offs_n < entry_prefix_len
    # A shared prefix has batch stride 0, so this reads the same (Hkv, P, D) rows for every entry.
    pk_base = PREFIX_K + entry * stride_pkb + kv_h * stride_pkh
    pv_base = PREFIX_V + entry * stride_pvb + kv_h * stride_pvh
    offs_t, t_valid = None, None  # the head dim's tail channels, if any
    dk_tail = tl.zeros([1, 1], dtype=tl.float32)  # (loop-carried: placeholders without a tail)
    dv_tail = tl.zeros([1, 1], dtype=tl.float32)
    if BLOCK_D_TAIL > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        t_valid = offs_t < head_dim
        if not PREFIX_DROPOUT:
            dk_tail = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
            dv_tail = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
    if not PREFIX_DROPOUT:  # (with it, each example loads the raw tiles anew: fewer live registers)
        k_raw = load_tile(pk_base, offs_n, stride_pkn, offs_d, n_valid, d_valid, UPCAST)
        v_raw = load_tile(pv_base, offs_n, stride_pvn, offs_d, n_valid, d_valid, UPCAST)
        k_raw_tail = load_tail_tile(pk_base, offs_n, stride_pkn, offs_t, n_valid, t_valid, UPCAST, BLOCK_D_TAIL)
        v_raw_tail = load_tail_tile(pv_base, offs_n, stride_pvn, offs_t, n_valid, t_valid, UPCAST, BLOCK_D_TAIL)
    visible_t = n_valid[:, None]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Full query tiles of a full prefix block without masks, then the last partial query tile.
    block_full = start_n + BLOCK_N <= entry_prefix_len
    full_stop = tl.where(block_full, (q_len // BLOCK_M) * BLOCK_M, 0)
    window_shift = entry_prefix_len + (k_len - q_len)  # query i at position P_b + Sk - Sq + i (not with VARLEN)
    dv_scale = 1.0
    if DROPOUT:  # the attention dropout's 1 / P(keep) of every kept weight (see _dkdv_tile)
        dv_scale = dropout_scale
    # The examples i in [split_first, split_last) of the entry's list. EXAMPLE_GUARD: the loop runs
    # examples_per_split times (a kernel argument, read from the constant bank) and skips the
    # iterations past split_last, so no 64-bit loop bound is held across the query loops (with
    # attention dropout at D=128 the shared prefix's set with causal + padding + GQA spilled it).
    loop_first = split_first
    loop_stop = split_last
    if EXAMPLE_GUARD:
        loop_first = 0
        loop_stop = examples_per_split
    for t in range(loop_first, loop_stop):
        i = t
        in_split = True  # (a constexpr without EXAMPLE_GUARD: no branch)
        if EXAMPLE_GUARD:
            i = split_first + t
            in_split = i < split_last
        if in_split:
            if HAS_INDEX:
                b = tl.load(EXAMPLE_ORDER + i).to(tl.int64)
            else:
                b = i
            q_start = 0
            example_q_len = q_len
            if VARLEN:  # the sequence's own query rows
                q_start, example_q_len = sequence_extent(CU_SEQLENS_Q, b)
                full_stop = tl.where(block_full, (example_q_len // BLOCK_M) * BLOCK_M, 0)
            q_end = example_q_len
            if WINDOW:  # prefix position n leaves the window of query i (position P + Sk - Sq + i) at
                # i >= n - ... + window
                full_stop = 0
                q_end = tl.minimum(example_q_len, start_n + BLOCK_N - 1 - window_shift + window)
            if PREFIX_DROPOUT:  # example b's own dropped tiles; its gradient times its keep mask / P(keep)
                # What the example needs is computed anew in each iteration where PTX, not held across
                # the loops of the example before it (the kernel spilled them, 96 bytes at D=128): the
                # program's coordinates from a fresh read of its id, the entry's length read again,
                # prefix_len through ``opaque`` (ptxas held its parameter's register) and, below, LSE
                # and DELTA through ``opaque_pointer`` (LLVM hoisted their per-thread row pointers).
                outer_i, kv_h_i, start_n_i, rows = program_coordinates(prefix_len, num_kv_heads, BLOCK_N, PTX)
                entry_i = outer_i // splits
                pk_base_i = PREFIX_K + entry_i * stride_pkb + kv_h_i * stride_pkh
                pv_base_i = PREFIX_V + entry_i * stride_pvb + kv_h_i * stride_pvh
                if HAS_LENGTHS:
                    entry_prefix_len = tl.load(PREFIX_LENGTHS + entry_i)
                rows_valid = rows < entry_prefix_len
                prefix_len_i = opaque(prefix_len, PTX)
                # The keep masks packed into int32 words (32 elements each): the epilogue needs them
                # again after the loops, and across the loops unpacked they spilled.
                keep_k_words = prefix_dropout_keep(prefix_seed, b, kv_h_i, 0, num_kv_heads, prefix_len_i, head_dim,
                                                   rows, prefix_dropout_threshold, BLOCK_N, BLOCK_D, PACKED=True)
                keep_v_words = prefix_dropout_keep(prefix_seed, b, kv_h_i, 1, num_kv_heads, prefix_len_i, head_dim,
                                                   rows, prefix_dropout_threshold, BLOCK_N, BLOCK_D, PACKED=True)
                k = load_tile(pk_base_i, rows, stride_pkn, offs_d, rows_valid, d_valid, UPCAST)
                k = tl.where(unpack_keep_bits(keep_k_words, BLOCK_N, BLOCK_D), k * prefix_dropout_scale,
                             0.0).to(k.dtype)
                v = load_tile(pv_base_i, rows, stride_pvn, offs_d, rows_valid, d_valid, UPCAST)
                v = tl.where(unpack_keep_bits(keep_v_words, BLOCK_N, BLOCK_D), v * prefix_dropout_scale,
                             0.0).to(v.dtype)
                k_tail = load_tail_tile(pk_base_i, rows, stride_pkn, offs_t, rows_valid, t_valid, UPCAST, BLOCK_D_TAIL)
                v_tail = load_tail_tile(pv_base_i, rows, stride_pvn, offs_t, rows_valid, t_valid, UPCAST, BLOCK_D_TAIL)
                if BLOCK_D_TAIL > 0:  # (a None tile cannot pass through a function that returns it)
                    k_tail, v_tail = drop_prefix_kv(k_tail, v_tail, prefix_seed, b, kv_h_i,
                                                    num_kv_heads, prefix_len_i, head_dim, rows,
                                                    prefix_dropout_threshold, prefix_dropout_scale, PREFIX_DROPOUT,
                                                    BLOCK_N, BLOCK_D_TAIL, BLOCK_D)
                dk_b_tail = tl.zeros([1, 1], dtype=tl.float32)
                dv_b_tail = tl.zeros([1, 1], dtype=tl.float32)
                if BLOCK_D_TAIL > 0:
                    dk_b_tail = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
                    dv_b_tail = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
                dk_b, dv_b, dk_b_tail, dv_b_tail = _prefix_example_dkdv(
                    tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32),
                    k, v, Q, GRAD_OUT, opaque_pointer(LSE, PTX), opaque_pointer(DELTA, PTX), b, kv_h_i, q_start,
                    example_q_len, full_stop, stat_rows, num_q_heads, q_len, stride_qb, stride_qh, stride_qm,
                    stride_dob, stride_doh, stride_dom, offs_d, d_valid,
                    rows_valid[:, None], start_n_i, seed, dropout_threshold, dropout_scale, qk_scale_log2,
                    GROUP, VARLEN, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, EVEN_D,
                    softcap_in, softcap_out, SOFTCAP, rows, window_shift, window, q_end, WINDOW,
                    BIAS_TABLE, BIAS_BUCKETS, bias_row_len, bias_center, bias_last, BIAS, Q_DESC, DO_DESC, TMA, BLOCK_D,
                    dk_b_tail, dv_b_tail, k_tail, v_tail, offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL,
                    BLOCK_D_TAIL)
                # The running sums live in DPREFIX_K / DPREFIX_V (float32, zeroed by the launcher), not in
                # registers: four fp32 tiles (the example's and the running dK, dV) beside the raw ones
                # spilled 4 KB at D=128. This program alone adds into these rows, one thread per element
                # in example order (``_add_dropped_prefix_grad``: no barrier needed between examples, as
                # the load and store that did this before needed one). The scales fold in here (dK's
                # softmax scale, dV's 1 / P(keep)).
                outer_e, kv_h_e, _, rows_e = program_coordinates(prefix_len, num_kv_heads, BLOCK_N, PTX)  # (anew)
                dpk_row0 = DPREFIX_K + outer_e * stride_dpks + kv_h_e * stride_dpkh  # this program's sums, row 0
                dpv_row0 = DPREFIX_V + outer_e * stride_dpvs + kv_h_e * stride_dpvh
                _add_dropped_prefix_grad(dpk_row0, stride_dpkn, dk_b, keep_k_words, prefix_dropout_scale * scale,
                                         rows_e, prefix_len, head_dim, PTX, BLOCK_N, BLOCK_D, EVEN_D)
                _add_dropped_prefix_grad(dpv_row0, stride_dpvn, dv_b, keep_v_words, prefix_dropout_scale * dv_scale,
                                         rows_e, prefix_len, head_dim, PTX, BLOCK_N, BLOCK_D, EVEN_D)
                if BLOCK_D_TAIL > 0:  # the tail's channels likewise, their keep lanes drawn anew here
                    keep_k_words = prefix_dropout_keep(prefix_seed, b, kv_h_e, 0, num_kv_heads, prefix_len, head_dim,
                                                       rows_e, prefix_dropout_threshold, BLOCK_N, BLOCK_D_TAIL, BLOCK_D,
                                                       PACKED=True)
                    _add_dropped_prefix_grad(dpk_row0 + BLOCK_D, stride_dpkn, dk_b_tail, keep_k_words,
                                             prefix_dropout_scale * scale, rows_e, prefix_len, head_dim - BLOCK_D, PTX,
                                             BLOCK_N, BLOCK_D_TAIL, EVEN_TAIL)
                    keep_v_words = prefix_dropout_keep(prefix_seed, b, kv_h_e, 1, num_kv_heads, prefix_len, head_dim,
                                                       rows_e, prefix_dropout_threshold, BLOCK_N, BLOCK_D_TAIL, BLOCK_D,
                                                       PACKED=True)
                    _add_dropped_prefix_grad(dpv_row0 + BLOCK_D, stride_dpvn, dv_b_tail, keep_v_words,
                                             prefix_dropout_scale * dv_scale, rows_e, prefix_len, head_dim - BLOCK_D,
                                             PTX, BLOCK_N, BLOCK_D_TAIL, EVEN_TAIL)
            else:
                key_pos = offs_n
                if BIAS:  # the keys' positions computed in the loop: the bias gathers' tiles are not held across it
                    key_pos = offs_n + loop_variant_zero(i, PTX)
                    visible_t = (key_pos < entry_prefix_len)[:, None]
                dk, dv, dk_tail, dv_tail = _prefix_example_dkdv(
                    dk, dv, k_raw, v_raw, Q, GRAD_OUT, LSE, DELTA, b, kv_h, q_start, example_q_len, full_stop,
                    stat_rows, num_q_heads, q_len, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                    stride_dom, offs_d, d_valid, visible_t, start_n, seed, dropout_threshold, dropout_scale,
                    qk_scale_log2,
                    GROUP, VARLEN, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, EVEN_D,
                    softcap_in, softcap_out, SOFTCAP, key_pos, window_shift, window, q_end, WINDOW,
                    BIAS_TABLE, BIAS_BUCKETS, bias_row_len, bias_center, bias_last, BIAS, Q_DESC, DO_DESC, TMA, BLOCK_D,
                    dk_tail, dv_tail, k_raw_tail, v_raw_tail, offs_t, t_valid, Q_TAIL_DESC, DO_TAIL_DESC, EVEN_TAIL,
                    BLOCK_D_TAIL)
    if not PREFIX_DROPOUT:
        # With attention dropout the coordinates anew, not held across the loops (64 -> 32, 148 -> 120,
        # 80 -> 32, 12 -> 0 bytes; packed sequences spilled more, 80 -> 100)
        if DROPOUT and not VARLEN:
            outer, kv_h, start_n, offs_n = program_coordinates(prefix_len, num_kv_heads, BLOCK_N, PTX)
            keys = offs_n[:, None].to(tl.int64)
        kd_mask = (offs_n < prefix_len)[:, None] & d_valid[None, :]  # every row of the entry: 0 past its length
        tl.store(DPREFIX_K + outer * stride_dpks + kv_h * stride_dpkh + keys * stride_dpkn + offs_d[None, :],
                 (dk * scale).to(DPREFIX_K.dtype.element_ty), mask=kd_mask)
        tl.store(DPREFIX_V + outer * stride_dpvs + kv_h * stride_dpvh + keys * stride_dpvn + offs_d[None, :],
                 (dv * dv_scale).to(DPREFIX_V.dtype.element_ty), mask=kd_mask)
        if BLOCK_D_TAIL > 0:
            kt_mask = (offs_n < prefix_len)[:, None] & t_valid[None, :]
            tl.store(DPREFIX_K + outer * stride_dpks + kv_h * stride_dpkh + keys * stride_dpkn + offs_t[None, :],
                     (dk_tail * scale).to(DPREFIX_K.dtype.element_ty), mask=kt_mask)
            tl.store(DPREFIX_V + outer * stride_dpvs + kv_h * stride_dpvh + keys * stride_dpvn + offs_t[None, :],
                     (dv_tail * dv_scale).to(DPREFIX_V.dtype.element_ty), mask=kt_mask)


@triton.jit
def _sum_splits_kernel(PARTIAL_K, PARTIAL_V, OUT_K, OUT_V, splits, entry_numel, BLOCK: tl.constexpr):
    """OUT_K[a] = sum over s = 0, 1, .. of PARTIAL_K[a, s] in that order (fp32), cast to OUT_K's dtype;
    likewise V. PARTIAL_*: (A, splits, Hkv, P, D) float32, OUT_*: (A, Hkv, P, D), both contiguous
    (entry_numel = Hkv * P * D). One program per (K or V, entry, block of BLOCK elements)."""
    blocks = tl.cdiv(entry_numel, BLOCK)
    pid = tl.program_id(0)
    which = pid % 2
    entry = (pid // 2) // blocks
    offs = ((pid // 2) % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < entry_numel
    src = entry.to(tl.int64) * splits * entry_numel + offs
    dst = entry.to(tl.int64) * entry_numel + offs
    total = tl.zeros([BLOCK], dtype=tl.float32)
    if which == 0:
        for split in range(splits):
            total += tl.load(PARTIAL_K + src + split * entry_numel, mask=mask, other=0.0)
        tl.store(OUT_K + dst, total.to(OUT_K.dtype.element_ty), mask=mask)
    else:
        for split in range(splits):
            total += tl.load(PARTIAL_V + src + split * entry_numel, mask=mask, other=0.0)
        tl.store(OUT_V + dst, total.to(OUT_V.dtype.element_ty), mask=mask)


def sum_splits(partial_k: Tensor, partial_v: Tensor, dtype: torch.dtype,
               launcher: Launcher = launch_kernel) -> tuple[Tensor, Tensor]:
    """(partial_k.sum(1), partial_v.sum(1)) in a fixed order, cast to ``dtype``, in one launch
    (PyTorch would take four: a sum and a cast each). partial_*: (A, splits, Hkv, P, D) float32
    contiguous; returns two (A, Hkv, P, D) tensors."""
    entries, splits = partial_k.shape[:2]
    out_k = torch.empty((entries,) + tuple(partial_k.shape[2:]), device=partial_k.device, dtype=dtype)
    out_v = torch.empty_like(out_k)
    entry_numel = out_k[0].numel() if entries else 0
    if entries and entry_numel:
        block = 1024
        launcher(_sum_splits_kernel, (2 * entries * triton.cdiv(entry_numel, block),))(
            partial_k, partial_v, out_k, out_v, splits, entry_numel, BLOCK=block)
    return out_k, out_v


def prefix_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    causal: bool, scale: float, dropout_p: float, seed: int,
    prefix_index: Optional[Tensor] = None, prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0, prefix_seed: int = 0, softcap: float = 0.0, sinks: Optional[Tensor] = None,
    window: int = 0, relative_bias_table: Optional[Tensor] = None, relative_bias_buckets: Optional[Tensor] = None,
    relative_bias_grad: bool = True,
    *, varlen: Optional[Varlen] = None, limits: Optional[DeviceLimits] = None, launcher: Launcher = launch_kernel,
    config: Optional[dict] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Launch the backward kernels. Inputs must have a unit last stride (grad_out is made so).

    Arguments:
        grad_out, out: (B, Hq, Sq, D); lse: (B, Hq, Sq) float32 (log2 domain), from the forward.
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D); prefix_k, prefix_v: (Hkv, P, D) shared by the
            batch, (B, Hkv, P, D) per example, or a bank (A, Hkv, P, D) read through prefix_index (B,)
            int32 (P may be 0); prefix_lengths: int32 (A,) / (B,) / (1,) or None;
            key_padding_mask: (B, Sk) bool or None.
        causal, scale, dropout_p, seed, prefix_dropout_p, prefix_seed, softcap, sinks, window,
            relative_bias_table (Hq, num_buckets) float32, relative_bias_buckets, varlen: as given to the forward;
            relative_bias_grad: compute the table's gradient (False: a frozen table, dtable is None)
            (varlen: q, grad_out, out (total_q, Hq, D), k, v (total_k, Hkv, D), lse (1, Hq, total_q)).
        limits: the device's limits (default: those of q's device); launcher: runs each kernel
            launch (default: launches it; benchmarks/aot_check.py records it instead); config: the
            block configs {"dq": ..., "dkdv": ...} (``launch.backward_config``; default: the
            heuristic's, or with PTKERNELS_AUTOTUNE=1 the fastest).
    Returns:
        dq (B, Hq, Sq, D), dk, dv (B, Hkv, Sk, D), dprefix_k, dprefix_v shaped like prefix_k (a
        shared prefix's or bank entry's gradient summed over its examples in a fixed order), and
        dsinks (Hq,) float32 (None without sinks): -sum over rows of P(sink) * delta, and
        dtable (Hq, num_buckets) float32 (None without a relative bias or without relative_bias_grad):
        dS summed per (head, bucket) in a fixed order.
    """
    if varlen is None:
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        stat_rows = q_len
    else:
        batch, (stat_rows, q_heads, head_dim), kv_heads = varlen.num_sequences, q.shape, k.shape[1]
        q_len, k_len = varlen.max_seqlen_q, varlen.max_seqlen_k
    prefix_len = prefix_k.shape[-2]
    per_example = prefix_k.dim() == 4
    group = q_heads // kv_heads
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    relative_bias_grad = relative_bias_grad and relative_bias_table is not None
    dtable = torch.zeros_like(relative_bias_table, dtype=torch.float32) if relative_bias_grad else None
    if q.numel() == 0 or batch == 0 or q_len == 0 or k.numel() == 0 and prefix_len == 0:
        dsinks = None if sinks is None else torch.zeros(q_heads, device=q.device, dtype=torch.float32)
        return (dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros_like(prefix_k), torch.zeros_like(prefix_v),
                dsinks, dtable)

    limits = device_limits(q.device) if limits is None else limits
    cfg = (backward_config(head_dim, q.dtype, limits, dropout_p > 0.0, relative_bias_table is not None)
           if config is None else config)
    if config is None and autotune_requested(limits) and launcher is launch_kernel:
        key = ("bwd", str(q.device), q.dtype, head_dim, group, causal, key_padding_mask is None, prefix_len > 0,
               per_example, dropout_p > 0.0, prefix_index is None, prefix_lengths is None, prefix_dropout_p > 0.0,
               varlen is None, softcap > 0.0, window > 0, relative_bias_table is None, shape_bucket(q_len),
               shape_bucket(prefix_len + k_len))

        def measure(c):
            return triton.testing.do_bench(lambda: prefix_attention_backward(
                grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, dropout_p, seed,
                prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed, softcap, sinks, window,
                relative_bias_table, relative_bias_buckets, relative_bias_grad, varlen=varlen, limits=limits,
                config=c), warmup=3, rep=20)

        cfg = tuned_config(key, gpu_backward_configs(head_dim, q.dtype, limits.max_shared_memory, dropout_p > 0.0,
                                                      relative_bias_table is not None), measure)
    bd = block_d(head_dim)
    # dQ's tiles (bm queries x bn keys) and dK/dV's (dkdv_bm queries x dkdv_bn keys): see launch.backward_config
    bm, bn = cfg["dq"]["BLOCK_M"], cfg["dq"]["BLOCK_N"]
    dkdv_bm, dkdv_bn = cfg["dkdv"]["BLOCK_M"], cfg["dkdv"]["BLOCK_N"]
    dq_options, dkdv_options = (dict(num_warps=cfg[kind]["num_warps"], num_stages=cfg[kind]["num_stages"],
                                     enable_fp_fusion=FP_FUSION) for kind in ("dq", "dkdv"))
    flags = dict(DROPOUT=dropout_mode(dropout_p, limits), UPCAST=upcast_in_interpreter(q.dtype, limits.interpreted),
                 DOT_PRECISION=dot_precision(q.dtype, limits.hip))
    prefix_flags = dict(HAS_INDEX=prefix_index is not None, HAS_LENGTHS=prefix_lengths is not None,
                        PREFIX_DROPOUT=prefix_dropout_p > 0.0)
    qk_scale_log2 = scale * LOG2_E
    threshold, dropout_scale = dropout_threshold(dropout_p)
    prefix_dropout_args = (*dropout_threshold(prefix_dropout_p), prefix_seed)
    softcap_flags = dict(SOFTCAP=softcap > 0.0, WINDOW=window > 0, BIAS=relative_bias_table is not None)
    bias_table, bias_buckets, *bias_scalars = relative_bias_args(relative_bias_table, relative_bias_buckets)
    num_buckets = 0 if relative_bias_table is None else relative_bias_table.shape[1]
    nb_block = triton.next_power_of_2(max(num_buckets, 1))
    q_blocks = triton.cdiv(q_len, bm) * batch * q_heads
    dbias = torch.empty(q_blocks, nb_block, device=q.device, dtype=torch.float32) if relative_bias_grad else None
    softcap_in, softcap_out = softcap_args(scale, softcap)
    kpm = mask_as_int8(key_padding_mask)
    bounds = key_bounds_of(key_padding_mask, launcher)

    cu_q = None if varlen is None else varlen.cu_seqlens_q
    cu_k = None if varlen is None else varlen.cu_seqlens_k

    # delta = rowsum(dO * O), laid out like lse: the dQ kernel writes it for its query rows (every
    # row has one dQ program), and the dK/dV kernels, launched after it, read it. 1-D grids
    # throughout: CUDA caps grid y/z at 65535, and B * H (or B) can exceed it.
    delta = torch.empty_like(lse)

    # The backward kernels tile the head dim as the forward does (64 + a 16 / 32 tail at 64 < D <= 96).
    head_dim_flags = head_dim_parts(head_dim)
    kv_descs = split_tma_descriptors((k, v), (prefix_k, prefix_v), bn, head_dim, varlen is not None, limits)
    launcher(_prefix_attention_bwd_dq_kernel, (q_blocks,))(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, kpm, bounds, cu_q, cu_k, bias_table, bias_buckets,
        out, grad_out, lse, delta, dq, dbias, *(kv_descs or (None,) * 8),
        *qkv_strides(q, varlen),
        *qkv_strides(k, varlen),
        *qkv_strides(v, varlen),
        *batch_strides(prefix_k, 3), *batch_strides(prefix_v, 3),
        *mask_strides(key_padding_mask),
        *qkv_strides(out, varlen),
        *qkv_strides(grad_out, varlen),
        *qkv_strides(dq, varlen),
        q_heads, q_len, k_len, prefix_len, head_dim, entry_step(prefix_k, prefix_index), stat_rows,
        scale, qk_scale_log2, threshold, dropout_scale, seed, *prefix_dropout_args, softcap_in, softcap_out, window,
        *bias_scalars,
        GROUP=group, VARLEN=varlen is not None, CAUSAL=causal, **softcap_flags, BIAS_GRAD=relative_bias_grad,
        NB_BLOCK=nb_block,
        HAS_KPM=key_padding_mask is not None,
        HAS_PREFIX=prefix_len > 0, **prefix_flags, TMA=kv_descs is not None,
        BLOCK_M=bm, BLOCK_N=bn, **head_dim_flags, **flags, **dq_options,
    )
    q_descs = split_tma_descriptors((q, grad_out), (), dkdv_bm, head_dim, varlen is not None, limits)

    # The dK/dV kernel reads the Philox round keys from its arguments (DROPOUT_PTX_KEYS where the
    # kernels are compiled for an NVIDIA GPU; the same bits): computed from the seed in the kernel, they
    # took registers, and at D=64 with dropout + causal + padding + GQA one pointer spilled (16 bytes,
    # 0 this way). Its loops: +1.6% unmasked with GQA (573 -> 582 with causal + padding), +3-4% the
    # masked ones there, 0 to +0.3% without GQA; at D=128 -2% to +1.5%.
    dkdv_flags = dict(flags, DROPOUT=keyed_dropout_mode(flags["DROPOUT"]))
    round_keys = philox_round_keys(seed)  # (both dK/dV kernels take them)
    if k_len > 0:
        launcher(_prefix_attention_bwd_dkdv_kernel, (triton.cdiv(k_len, dkdv_bn) * batch * kv_heads,))(
            q, k, v, kpm, bounds, cu_q, cu_k, bias_table, bias_buckets, grad_out, lse, delta, dk, dv,
            *(q_descs or (None,) * 4),
            *qkv_strides(q, varlen),
            *qkv_strides(k, varlen),
            *qkv_strides(v, varlen),
            *mask_strides(key_padding_mask),
            *qkv_strides(grad_out, varlen),
            *qkv_strides(dk, varlen),
            *qkv_strides(dv, varlen),
            q_heads, kv_heads, q_len, k_len, prefix_len, head_dim, stat_rows,
            scale, qk_scale_log2, threshold, dropout_scale, seed, *round_keys, softcap_in, softcap_out,
            window, *bias_scalars,
            GROUP=group, VARLEN=varlen is not None, CAUSAL=causal, **softcap_flags,
            HAS_KPM=key_padding_mask is not None, TMA=q_descs is not None,
            BLOCK_M=dkdv_bm, BLOCK_N=dkdv_bn, **head_dim_flags,
            PTX=philox_mode(limits) == DROPOUT_PTX, **dkdv_flags, **dkdv_options,
        )

    dsinks = None
    if sinks is not None:  # d sink_h = -sum over h's rows of P(sink) * delta (torch's fixed-order sum)
        p_sink = torch.exp2(sinks.float().view(1, -1, 1) * LOG2_E - lse)
        dsinks = -(p_sink * delta).sum((0, 2))
    if dbias is not None:  # (B * Hq * query blocks, NB_BLOCK) per-program partials: a fixed-order sum
        dtable = dbias.view(batch, q_heads, -1, nb_block).sum((0, 2))[:, :num_buckets]
    if prefix_len == 0:
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v), dsinks, dtable
    prefix_blocks = triton.cdiv(prefix_len, dkdv_bn)
    entries = prefix_k.shape[0] if per_example else 1
    example_order = entry_offsets = None
    if prefix_index is not None:  # the examples of each entry, in batch order (a stable sort): CSR
        sorted_index, order = torch.sort(prefix_index, stable=True)
        example_order = order.to(torch.int32)
        entry_offsets = torch.searchsorted(
            sorted_index, torch.arange(entries + 1, device=q.device, dtype=sorted_index.dtype)).to(torch.int32)
        examples_per_entry = 0  # unused: the offsets give each entry's examples
        splits = bank_splits(batch, entries, prefix_blocks, kv_heads, limits.multi_processor_count)
    elif per_example:
        examples_per_entry, splits = 1, 1
    else:
        examples_per_entry = batch
        splits = shared_prefix_splits(batch, prefix_blocks, kv_heads, limits.multi_processor_count)
    examples_per_split = triton.cdiv(batch, splits)
    splits = triton.cdiv(batch, examples_per_split)
    # With prefix dropout the kernel adds each example's share into the (zeroed) float32 partials.
    partial_dtype = prefix_k.dtype if splits == 1 and prefix_dropout_p == 0.0 else torch.float32
    shape = (entries, splits) + tuple(prefix_k.shape[-3:])
    alloc = torch.zeros if prefix_dropout_p > 0.0 else torch.empty
    dpk = alloc(shape, device=q.device, dtype=partial_dtype)
    dpv = alloc(shape, device=q.device, dtype=partial_dtype)
    # At D=128 the prefix dK/dV kernel reads the Philox round keys from its arguments too: computed in
    # the kernel they spilled (32-120 bytes); at D=64 nothing spilled, and the argument reads cost its
    # loops 1-1.7%, so it computes them from the seed there (the same bits). Above D=64 means the padded
    # head dim: D = 80 / 96, split as 64 + a tail, take them as arguments too.
    keyed_flags = dkdv_flags if bd > 64 else flags
    # With attention dropout above D=64 the example loop counts to examples_per_split and skips the
    # examples past its split (EXAMPLE_GUARD): at D=128 the shared prefix's set with causal + padding
    # + GQA spilled 16 -> 0 bytes, and the loops of the shared and the per-example prefix with dropout
    # shortened 698 -> 674 (the same within 0.6% at D=80 / 96; at D=64, or without attention dropout,
    # the guard cost up to 4% or saved nothing, so they keep the plain loop). A per-example prefix's
    # entry is one example: 1 there, which Triton specialises, so the loop compiles to one iteration.
    example_guard = bd > 64 and dropout_p > 0.0
    kernel_examples_per_split = 1 if example_guard and per_example and prefix_index is None else examples_per_split
    # One query (Triton compiles q_len == 1 as a constant): one query tile, nothing to pipeline, and with
    # T5's relative bias triton 3.6's software pipeliner fails on this kernel ("PassManager::run failed").
    prefix_dkdv_options = dict(dkdv_options, num_stages=1) if q_len == 1 else dkdv_options
    launcher(_prefix_attention_bwd_prefix_dkdv_kernel, (prefix_blocks * kv_heads * entries * splits,))(
        q, prefix_k, prefix_v, prefix_lengths, example_order, entry_offsets, cu_q, bias_table, bias_buckets, grad_out,
        lse, delta, dpk, dpv, *(q_descs or (None,) * 4),
        *qkv_strides(q, varlen),
        *batch_strides(prefix_k, 3), *batch_strides(prefix_v, 3),
        *qkv_strides(grad_out, varlen),
        dpk.stride(1), dpk.stride(2), dpk.stride(3),
        dpv.stride(1), dpv.stride(2), dpv.stride(3),
        examples_per_entry, kernel_examples_per_split, splits, q_heads, kv_heads, q_len, k_len, prefix_len,
        head_dim,
        stat_rows, scale, qk_scale_log2, threshold, dropout_scale, seed, *round_keys, *prefix_dropout_args,
        softcap_in, softcap_out, window, *bias_scalars,
        GROUP=group, VARLEN=varlen is not None, **softcap_flags, BLOCK_M=dkdv_bm, BLOCK_N=dkdv_bn,
        **head_dim_flags,
        **prefix_flags, **keyed_flags, TMA=q_descs is not None, EXAMPLE_GUARD=example_guard,
        PTX=philox_mode(limits) == DROPOUT_PTX, **prefix_dkdv_options,
    )
    # Fixed-order sum of the fp32 partials: deterministic.
    if splits == 1 and dpk.dtype == prefix_k.dtype:
        dpk, dpv = dpk[:, 0], dpv[:, 0]
    else:
        dpk, dpv = sum_splits(dpk, dpv, prefix_k.dtype, launcher)
    if not per_example:
        dpk, dpv = dpk[0], dpv[0]
    return dq, dk, dv, dpk, dpv, dsinks, dtable


# Every kernel of this module (benchmarks/aot_check.py compiles each of them).
KERNELS = (_prefix_attention_bwd_dq_kernel, _prefix_attention_bwd_dkdv_kernel,
           _prefix_attention_bwd_prefix_dkdv_kernel, _sum_splits_kernel)

__all__ = ["prefix_attention_backward", "KERNELS"]
