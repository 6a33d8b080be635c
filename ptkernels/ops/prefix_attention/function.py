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


@torch.library.custom_op("ptkernels::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D), prefix_k, prefix_v (Hkv, P, D) or (B, Hkv, P, D),
    key_padding_mask (B, Sk) bool or None, all with a unit last stride -> out (B, Hq, Sq, D) and
    lse (B, Hq, Sq) float32 (log2 domain, kept for the backward)."""
    return prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed)


@prefix_attention_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ptkernels::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    causal: bool, scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_out, out (B, Hq, Sq, D), lse (B, Hq, Sq) and the forward's inputs -> dq, dk, dv, dprefix_k,
    dprefix_v, each shaped like its input."""
    return prefix_attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, dropout_p, seed
    )


@prefix_attention_bwd_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, dropout_p, seed):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(prefix_k), torch.empty_like(prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = prefix_attention_bwd_op(
        unit_last_stride(grad_out), q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed,
    )
    return dq, dk, dv, dpk, dpv, None, None, None, None, None


prefix_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def draw_dropout_seed() -> int:
    """The Philox seed for one dropout call, drawn from torch's default (CPU) generator."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def prefix_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], *,
    key_padding_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float,
    prefix_index: Optional[Tensor] = None, prefix_lengths: Optional[Tensor] = None, prefix_dropout_p: float = 0.0,
) -> Tensor:
    """Triton path of ``prefix_attention`` (arguments already checked).

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D); prefix_k, prefix_v: (Hkv, P, D), (B, Hkv, P, D) or None;
    key_padding_mask: (B, Sk) bool or None. Returns out (B, Hq, Sq, D).
    """
    if prefix_index is not None or prefix_lengths is not None or prefix_dropout_p > 0.0:
        raise NotImplementedError("prefix banks / lengths / prefix dropout are not in the Triton kernels yet")
    if prefix_k is None:
        empty = q.new_zeros(k.shape[1], 0, q.shape[-1])
        prefix_k, prefix_v = empty, empty.clone()
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()
    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    out, _ = prefix_attention_fwd_op(
        unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
        unit_last_stride(prefix_k), unit_last_stride(prefix_v),
        key_padding_mask, causal, scale, dropout_p, seed,
    )
    return out


def prefix_attention_varlen_triton(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
    causal: bool, scale: float, dropout_p: float,
    prefix_index: Optional[Tensor] = None, prefix_lengths: Optional[Tensor] = None, prefix_dropout_p: float = 0.0,
) -> Tensor:
    """Triton path of ``prefix_attention_varlen`` (arguments already checked by its interface).

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D), q's dtype (fp16 / bf16 / fp32), any strides
    (the last not necessarily 1); prefix_k, prefix_v: (Hkv, P, D) shared, (N, Hkv, P, D) per
    sequence, (A, Hkv, P, D) a bank with prefix_index (N,), or None; cu_seqlens_q, cu_seqlens_k:
    (N + 1,) int32 or int64 on q's device, checked (start at 0, non-decreasing, end at
    total_q / total_k); max_seqlen_q, max_seqlen_k: Python ints >= every sequence's length;
    causal: bottom-right per sequence (Lq_n <= Lk_n checked); scale: a float; dropout_p,
    prefix_dropout_p in [0, 1); prefix_lengths as checked by the interface. Returns out
    (total_q, Hq, D) in q's dtype, differentiable w.r.t. q, k, v, prefix_k, prefix_v.
    """
    raise NotImplementedError("the Triton varlen kernels are not written yet; use backend='torch'")
