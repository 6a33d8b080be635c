"""The fast PyTorch path of prefix attention (``backend="torch"``): any device, any float dtype.

One ``torch.nn.functional.scaled_dot_product_attention`` call over the keys [prefix; real], so
PyTorch picks its best kernel for the device (flash / memory-efficient on CUDA, the fused flash
kernel on CPU):

* the prefix is joined to K and V once per call; a shared (Hkv, P, D) prefix is broadcast into the
  join (an expand view, no batch copy of its own), and autograd sums its gradient over the batch;
* GQA / MQA through SDPA's ``enable_gqa``, no ``repeat_kv``;
* no mask at all when nothing is padded and the attention is not causal; a lower-right causal bias
  (``torch.nn.attention.bias.causal_lower_right``) when causal without padding: with the prefix in
  front, "query i sees real key j iff j <= i + Sk - Sq, and every prefix key" is exactly
  bottom-right causal attention over the P + Sk joined keys; a boolean (B, 1, 1 or Sq, P + Sk) mask
  only when padding needs one;
* a query with no visible key (P = 0 and its keys all masked) returns zeros: its mask row is opened
  so SDPA computes finite numbers, and its output is zeroed (no NaN in the output or the gradients);
* attention dropout through SDPA's ``dropout_p`` (torch's default generator).

The readable oracle is :mod:`.reference` (``backend="reference"``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from .reference import prefix_attention_reference


def _join(prefix: Optional[Tensor], real: Tensor) -> Tensor:
    """(B, Hkv, P + Sk, D): [prefix; real] along the key axis (a shared prefix broadcast to B)."""
    if prefix is None or prefix.shape[-2] == 0:
        return real
    if prefix.dim() == 3:
        prefix = prefix.unsqueeze(0).expand(real.shape[0], -1, -1, -1)
    return torch.cat([prefix, real], dim=2)


def prefix_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    *,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Fast PyTorch prefix attention (arguments already checked by the interface).

    Arguments:
        q: (B, Hq, Sq, D)
        k, v: (B, Hkv, Sk, D), Hq % Hkv == 0
        prefix_k, prefix_v: (Hkv, P, D) shared, (B, Hkv, P, D) per example, or None
        key_padding_mask: (B, Sk) bool, True = attend, or None
        causal: bottom-right aligned over the real keys (Sq <= Sk)
        scale: softmax scale
        dropout_p: attention-probability dropout
    Returns:
        out: (B, Hq, Sq, D) in q's dtype.
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
    total = prefix_len + k_len
    if total == 0:  # no keys at all: zeros, with the reference's (empty) graph
        return prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=causal, scale=scale)
    keys, values = _join(prefix_k, k), _join(prefix_v, v)
    gqa = q_heads != kv_heads

    if key_padding_mask is None:
        if not causal:
            mask = None
        elif q_len == total:  # Sq = P + Sk: bottom-right is top-left
            return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p, is_causal=True,
                                                  scale=scale, enable_gqa=gqa)
        else:
            mask = causal_lower_right(q_len, total)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p,
                                              scale=scale, enable_gqa=gqa)

    real = key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
    if causal:
        i = torch.arange(q_len, device=q.device)[:, None]
        j = torch.arange(k_len, device=q.device)[None, :]
        real = real & (j <= i + (k_len - q_len))  # (B, 1, Sq, Sk)
    mask = F.pad(real, (prefix_len, 0), value=True) if prefix_len else real  # (B, 1, 1 or Sq, P + Sk)
    dead = None
    if prefix_len == 0:  # rows that see no key: open them for SDPA, zero them after
        dead = ~mask.any(dim=-1, keepdim=True)  # (B, 1, 1 or Sq, 1)
        mask = mask | dead
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p,
                                         scale=scale, enable_gqa=gqa)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out
