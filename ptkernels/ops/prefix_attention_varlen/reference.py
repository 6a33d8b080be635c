"""PyTorch reference for packed (varlen) prefix attention: the readable oracle (``backend="reference"``).

flash-attention's varlen layout: the N sequences of a batch are concatenated along the token axis,
q (total_q, Hq, D), k / v (total_k, Hkv, D), and ``cu_seqlens_q`` / ``cu_seqlens_k`` (N + 1,) hold
where each one starts. Sequence n is exactly ``prefix_attention`` of its own queries
q[cu_seqlens_q[n]:cu_seqlens_q[n + 1]] over its own keys plus the prefix, as if it were alone,
which is how this file computes it: one :func:`prefix_attention_reference` call per sequence.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..prefix_attention.reference import prefix_attention_reference


def sequence_prefix(
    n: int,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    prefix_index: Optional[Tensor],
    prefix_lengths: Optional[Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """What sequence n reads, as the batched op's arguments for a batch of one:
    (prefix_k (Hkv, P, D), prefix_v (Hkv, P, D), prefix_lengths (1,) or None)."""
    if prefix_k is None:
        return None, None, None
    entry = n
    if prefix_k.dim() == 4:
        entry = int(prefix_index[n]) if prefix_index is not None else n
        pk, pv = prefix_k[entry], prefix_v[entry]
    else:
        pk, pv = prefix_k, prefix_v
    lengths = None
    if prefix_lengths is not None:
        lengths = prefix_lengths[entry:entry + 1] if prefix_k.dim() == 4 else prefix_lengths[:1]
    return pk, pv, lengths


def sequence_bounds(cu_seqlens: Tensor) -> list[int]:
    """cu_seqlens (N + 1,) as a list of Python ints (one host read)."""
    return [int(x) for x in cu_seqlens.tolist()]


def prefix_attention_varlen_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_keep_masks: Optional[Sequence[Tensor]] = None,
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0,
    prefix_dropout_keep_mask: Optional[Tensor] = None,
    upcast: bool = True,
) -> Tensor:
    """Packed prefix attention, one sequence at a time.

    Arguments:
        q: (total_q, Hq, D)
        k, v: (total_k, Hkv, D), Hq % Hkv == 0
        prefix_k, prefix_v: (Hkv, P, D) shared by every sequence, (N, Hkv, P, D) per sequence, a bank
            (A, Hkv, P, D) read through prefix_index (N,), or None
        cu_seqlens_q, cu_seqlens_k: (N + 1,) integers, sequence n is rows cu[n]:cu[n + 1]
        causal: bottom-right aligned per sequence (query i of sequence n sees its key j iff
            j <= i + Lk_n - Lq_n); prefix keys are visible to every query
        scale: softmax scale, default D ** -0.5
        dropout_p: attention-probability dropout
        dropout_keep_masks: N bool tensors (Hq, Lq_n, P + Lk_n); when given they replace the draw
        prefix_index, prefix_lengths, prefix_dropout_p: as ``prefix_attention``, sequence n playing
            example n
        prefix_dropout_keep_mask: (2, N, Hkv, P, D) bool (keys, values); replaces the prefix draw
        upcast: compute in fp32 for fp16 / bf16 inputs (the oracle) or in their own dtype
    Returns:
        out: (total_q, Hq, D) in q's dtype.
    """
    bounds_q, bounds_k = sequence_bounds(cu_seqlens_q), sequence_bounds(cu_seqlens_k)
    outs = []
    for n in range(len(bounds_q) - 1):
        q_n = q[bounds_q[n]:bounds_q[n + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
        k_n = k[bounds_k[n]:bounds_k[n + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Lk, D)
        v_n = v[bounds_k[n]:bounds_k[n + 1]].transpose(0, 1).unsqueeze(0)
        pk, pv, lengths = sequence_prefix(n, prefix_k, prefix_v, prefix_index, prefix_lengths)
        out_n = prefix_attention_reference(
            q_n, k_n, v_n, pk, pv, causal=causal, scale=scale, dropout_p=dropout_p,
            dropout_keep_mask=None if dropout_keep_masks is None else dropout_keep_masks[n].unsqueeze(0),
            prefix_lengths=lengths, prefix_dropout_p=prefix_dropout_p,
            prefix_dropout_keep_mask=None if prefix_dropout_keep_mask is None else prefix_dropout_keep_mask[:, n:n + 1],
            upcast=upcast,
        )
        outs.append(out_n[0].transpose(0, 1))  # (Lq, Hq, D)
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    return torch.cat(outs, dim=0)
