"""Autograd wiring of the Triton path, as torch.library custom ops.

``ptkernels::prefix_attention_fwd`` and ``ptkernels::prefix_attention_bwd`` are opaque to
torch.compile (fake implementations give it the output shapes), and ``register_autograd`` connects
them, so ``torch.compile(fullgraph=True)`` traces through ``prefix_attention`` without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import unit_last_stride
from .backward import prefix_attention_backward
from .forward import prefix_attention_forward
from .launch import Varlen


@torch.library.custom_op("ptkernels::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float, seed: int,
    prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor], prefix_dropout_p: float, prefix_seed: int,
    softcap: float, sinks: Optional[Tensor], window: int,
    relative_bias_table: Optional[Tensor], relative_bias_buckets: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D), prefix_k, prefix_v (Hkv, P, D), (B, Hkv, P, D) or a
    bank (A, Hkv, P, D) with prefix_index (B,) int32, prefix_lengths int32 (A,) / (B,) / (1,) or None,
    key_padding_mask (B, Sk) bool or None, all with a unit last stride; softcap (0: off), sinks (Hq,)
    float32 or None, window (0: off), relative_bias_table (Hq, num_buckets) float32 and
    relative_bias_buckets (2L - 1,) int32 (contiguous) or None -> out (B, Hq, Sq, D) and lse
    (B, Hq, Sq) float32 (log2 domain, for the backward)."""
    return prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed,
                                    prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed, softcap, sinks, window,
                                    relative_bias_table, relative_bias_buckets)


@prefix_attention_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed, prefix_index, prefix_lengths,
      prefix_dropout_p, prefix_seed, softcap, sinks, window, relative_bias_table, relative_bias_buckets):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ptkernels::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    causal: bool, scale: float, dropout_p: float, seed: int,
    prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor], prefix_dropout_p: float, prefix_seed: int,
    softcap: float, sinks: Optional[Tensor], window: int,
    relative_bias_table: Optional[Tensor], relative_bias_buckets: Optional[Tensor], relative_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_out, out (B, Hq, Sq, D), lse (B, Hq, Sq) and the forward's inputs -> dq, dk, dv, dprefix_k,
    dprefix_v, each shaped like its input, dsinks (Hq,) float32 ((0,) without sinks) and dtable
    (Hq, num_buckets) float32 ((0, 0) without a relative bias, or a frozen table: relative_bias_grad False)."""
    *grads, dsinks, dtable = prefix_attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, dropout_p, seed,
        prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed, softcap, sinks, window,
        relative_bias_table, relative_bias_buckets, relative_bias_grad,
    )
    return (*grads, q.new_zeros(0, dtype=torch.float32) if dsinks is None else dsinks,
            q.new_zeros(0, 0, dtype=torch.float32) if dtable is None else dtable)


@prefix_attention_bwd_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, dropout_p, seed,
      prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed, softcap, sinks, window, relative_bias_table,
      relative_bias_buckets, relative_bias_grad):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(prefix_k), torch.empty_like(prefix_v),
            q.new_empty(0 if sinks is None else sinks.shape[0], dtype=torch.float32),
            q.new_empty(relative_bias_table.shape if relative_bias_table is not None and relative_bias_grad else (0, 0),
                        dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed,
     prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed, softcap, sinks, window,
     relative_bias_table, relative_bias_buckets) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, prefix_index, prefix_lengths,
                          sinks, relative_bias_table, relative_bias_buckets)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
    ctx.prefix_dropout_p, ctx.prefix_seed, ctx.softcap, ctx.window = prefix_dropout_p, prefix_seed, softcap, window
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    (q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, prefix_index, prefix_lengths, sinks, table,
     buckets) = ctx.saved_tensors
    dq, dk, dv, dpk, dpv, dsinks, dtable = prefix_attention_bwd_op(
        unit_last_stride(grad_out), q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed, prefix_index, prefix_lengths, ctx.prefix_dropout_p,
        ctx.prefix_seed, ctx.softcap, sinks, ctx.window, table, buckets, bool(ctx.needs_input_grad[17]),
    )
    table_grad = dtable if table is not None and ctx.needs_input_grad[17] else None  # a frozen table: not computed
    return ((dq, dk, dv, dpk, dpv) + (None,) * 10 + (None if sinks is None else dsinks, None)
            + (table_grad, None))


prefix_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def draw_dropout_seed() -> int:
    """The Philox seed for one dropout call, drawn from torch's default (CPU) generator."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def prefix_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], *,
    key_padding_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float,
    prefix_index: Optional[Tensor] = None, prefix_lengths: Optional[Tensor] = None, prefix_dropout_p: float = 0.0,
    softcap: Optional[float] = None, sinks: Optional[Tensor] = None, window: Optional[int] = None,
    relative_bias_table: Optional[Tensor] = None, relative_bias_buckets: Optional[Tensor] = None,
) -> Tensor:
    """Triton path of ``prefix_attention`` (arguments already checked).

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D); prefix_k, prefix_v: (Hkv, P, D), (B, Hkv, P, D), a bank
    (A, Hkv, P, D) with prefix_index (B,), or None; prefix_lengths (A,) / (B,) / (1,) or None;
    key_padding_mask: (B, Sk) bool or None; relative_bias_table (num_buckets, Hq) (handed to the
    kernels as a (Hq, num_buckets) float32 copy, differentiably) and relative_bias_buckets (2L - 1,)
    or None. Returns out (B, Hq, Sq, D).
    """
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()
    prefix_k, prefix_v, bank, seed = _kernel_prefix_args(q, k, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                         prefix_dropout_p, dropout_p)
    out, _ = prefix_attention_fwd_op(
        unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), prefix_k, prefix_v,
        key_padding_mask, causal, scale, dropout_p, seed, *bank,
        0.0 if softcap is None else softcap, None if sinks is None else sinks.float().contiguous(),
        0 if window is None else int(window),
        None if relative_bias_table is None else relative_bias_table.float().t().contiguous(),
        as_int32(relative_bias_buckets),
    )
    return out


def _kernel_prefix_args(q, k, prefix_k, prefix_v, prefix_index, prefix_lengths, prefix_dropout_p, dropout_p):
    """The prefix as the kernels take it, shared by the batched and the packed launches:
    (prefix_k, prefix_v) with a unit last stride ((Hkv, 0, D) for no prefix), the bank arguments
    (prefix_index int32, prefix_lengths int32, prefix_dropout_p, prefix_seed) (off when P = 0),
    and the attention dropout's seed. The prefix dropout's seed is drawn first, then the attention
    dropout's (as the fast PyTorch path draws its masks)."""
    if prefix_k is None:
        empty = q.new_zeros(k.shape[1], 0, q.shape[-1])  # k: (B, Hkv, Sk, D) or packed (total_k, Hkv, D)
        prefix_k, prefix_v = empty, empty.clone()
    if prefix_k.shape[-2] == 0:
        prefix_index = prefix_lengths = None
        prefix_dropout_p = 0.0
    prefix_seed = draw_dropout_seed() if prefix_dropout_p > 0.0 else 0
    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    bank = (as_int32(prefix_index), as_int32(prefix_lengths), prefix_dropout_p, prefix_seed)
    return unit_last_stride(prefix_k), unit_last_stride(prefix_v), bank, seed


def as_int32(t: Optional[Tensor]) -> Optional[Tensor]:
    """An index / length vector as the contiguous int32 tensor the kernels read (None stays None)."""
    return None if t is None else t.to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# Packed (varlen) sequences: the same kernels on a sequence-aware grid


@torch.library.custom_op("ptkernels::prefix_attention_varlen_fwd", mutates_args=())
def prefix_attention_varlen_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, scale: float, dropout_p: float, seed: int,
    prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor], prefix_dropout_p: float, prefix_seed: int,
) -> tuple[Tensor, Tensor]:
    """q (total_q, Hq, D), k, v (total_k, Hkv, D), cu_seqlens_q / _k int32 (N + 1,), prefix as in
    ``prefix_attention_fwd`` with N sequences for B -> out (total_q, Hq, D) and lse (1, Hq, total_q)."""
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return prefix_attention_forward(q, k, v, prefix_k, prefix_v, None, causal, scale, dropout_p, seed,
                                    prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed, varlen=varlen)


@prefix_attention_varlen_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      dropout_p, seed, prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed):
    return torch.empty_like(q), q.new_empty((1, q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("ptkernels::prefix_attention_varlen_bwd", mutates_args=())
def prefix_attention_varlen_bwd_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, out: Tensor, lse: Tensor,
    causal: bool, scale: float, dropout_p: float, seed: int,
    prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor], prefix_dropout_p: float, prefix_seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_out, out (total_q, Hq, D), lse (1, Hq, total_q) and the forward's inputs -> dq, dk, dv,
    dprefix_k, dprefix_v, each shaped like its input."""
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return prefix_attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, None, out, lse, causal, scale, dropout_p, seed,
        prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed, varlen=varlen,
    )[:5]


@prefix_attention_varlen_bwd_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse,
      causal, scale, dropout_p, seed, prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(prefix_k), torch.empty_like(prefix_v))


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
     seed, prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, out, lse, prefix_index,
                          prefix_lengths)
    ctx.args = (max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed, prefix_dropout_p, prefix_seed)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, cu_q, cu_k, out, lse, prefix_index, prefix_lengths = ctx.saved_tensors
    max_q, max_k, causal, scale, dropout_p, seed, prefix_dropout_p, prefix_seed = ctx.args
    dq, dk, dv, dpk, dpv = prefix_attention_varlen_bwd_op(
        unit_last_stride(grad_out), q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, out, lse,
        causal, scale, dropout_p, seed, prefix_index, prefix_lengths, prefix_dropout_p, prefix_seed,
    )
    return (dq, dk, dv, dpk, dpv) + (None,) * 12


prefix_attention_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def prefix_attention_varlen_triton(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
    causal: bool, scale: float, dropout_p: float, prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None, prefix_dropout_p: float = 0.0,
) -> Tensor:
    """Triton path of ``prefix_attention_varlen`` (arguments already checked): one launch over a
    sequence-aware grid (max_seqlen_q / BLOCK_M blocks x N sequences x heads; blocks past a
    sequence's length return at once), no padding to the max length.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_q / _k: (N + 1,) int32 or int64;
    prefix_k, prefix_v: (Hkv, P, D) shared, (N, Hkv, P, D) per sequence, a bank (A, Hkv, P, D) with
    prefix_index (N,), or None; prefix_lengths (A,) / (N,) / (1,) or None. Returns (total_q, Hq, D).
    """
    prefix_k, prefix_v, bank, seed = _kernel_prefix_args(q, k, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                         prefix_dropout_p, dropout_p)
    out, _ = prefix_attention_varlen_fwd_op(
        unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), prefix_k, prefix_v,
        as_int32(cu_seqlens_q), as_int32(cu_seqlens_k), int(max_seqlen_q), int(max_seqlen_k),
        causal, scale, dropout_p, seed, *bank,
    )
    return out
