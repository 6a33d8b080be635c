"""The fast PyTorch path of packed prefix attention (``backend="torch"``): any device, any float dtype.

One ``prefix_attention_torch`` call (``scaled_dot_product_attention`` over [prefix; own keys]) per
sequence, on views of the packed tensors:

* q, k and v are cut with one ``torch.split`` each, whose backward is one concatenation (slicing
  them one sequence at a time would make autograd allocate a full-size gradient per sequence);
* no padding to the longest sequence and no mask: each call sees exactly its sequence's keys, and
  causal attention is SDPA's own bottom-right / top-left causal mode;
* a shared prefix (Hkv, P, D) is read by every call, and autograd sums its gradient over the
  sequences in sequence order (deterministic);
* dropout: each call draws its own keep masks from torch's default generator, sequence after
  sequence (prefix dropout first, then attention dropout), so the same seed gives the same output.

Padding the batch to (N, max_len, H, D) with a key padding mask would be one SDPA call instead of N,
but on CPU it costs the padded work and a masked (slower) SDPA kernel; the per-sequence loop was
faster on the packing benchmark's length mix (32..512 tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..prefix_attention.torch_path import prefix_attention_torch
from .reference import sequence_prefix


def prefix_attention_varlen_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    seqlens_q: list[int],
    seqlens_k: list[int],
    *,
    causal: bool,
    scale: float,
    dropout_p: float,
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0,
) -> Tensor:
    """Fast PyTorch packed prefix attention (arguments already checked by the interface).

    Arguments:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D)
        prefix_k, prefix_v: (Hkv, P, D), (N, Hkv, P, D) per sequence, (A, Hkv, P, D) a bank read
            by prefix_index (N,), or None
        seqlens_q, seqlens_k: the N sequence lengths as Python ints (cu_seqlens' differences)
        causal, scale, dropout_p, prefix_lengths, prefix_dropout_p: as ``prefix_attention_varlen``
    Returns:
        out: (total_q, Hq, D) in q's dtype.
    """
    q_parts = torch.split(q, seqlens_q, dim=0)
    k_parts = torch.split(k, seqlens_k, dim=0)
    v_parts = torch.split(v, seqlens_k, dim=0)
    outs = []
    for n, (q_n, k_n, v_n) in enumerate(zip(q_parts, k_parts, v_parts)):
        if q_n.shape[0] == 0:
            continue  # no query: contributes no row and no gradient
        pk, pv, lengths = sequence_prefix(n, prefix_k, prefix_v, prefix_index, prefix_lengths)
        out_n = prefix_attention_torch(
            q_n.transpose(0, 1).unsqueeze(0), k_n.transpose(0, 1).unsqueeze(0), v_n.transpose(0, 1).unsqueeze(0),
            pk, pv, key_padding_mask=None, causal=causal, scale=scale, dropout_p=dropout_p,
            prefix_lengths=lengths, prefix_dropout_p=prefix_dropout_p,
        )
        outs.append(out_n[0].transpose(0, 1))  # (Lq, Hq, D)
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[-1]) + 0.0 * q.sum()  # keeps the (empty) graph
    return torch.cat(outs, dim=0)
