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
  on CPU the zeroing is skipped when no row is dead (the usual right-padded batch);
* attention dropout: on CUDA through SDPA's ``dropout_p`` (its fused kernels); on CPU, where SDPA
  falls back to its unfused maths and one float Bernoulli draw per attention weight, by the same
  maths written out (GQA by grouping the queries, still no repeat_kv) with a keep mask drawn four
  16-bit lanes per 64-bit word from torch's default generator, as FlashAttention draws an integer
  threshold: P(keep) = 1 - t / 65536 with t = round(p * 65536), kept weights scaled by 1 / P(keep).
  Same ``torch.manual_seed``, same output.

The readable oracle is :mod:`.reference` (``backend="reference"``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from .reference import example_prefix_lengths, prefix_attention_reference, select_prefix, visible_keys_mask
from .relative_bias import relative_bias_dense


def join_prefix(prefix: Optional[Tensor], real: Tensor) -> Tensor:
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
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    window: Optional[int] = None,
    relative_bias_table: Optional[Tensor] = None,
    relative_bias_buckets: Optional[Tensor] = None,
) -> Tensor:
    """Fast PyTorch prefix attention (arguments already checked by the interface).

    Arguments:
        q: (B, Hq, Sq, D)
        k, v: (B, Hkv, Sk, D), Hq % Hkv == 0
        prefix_k, prefix_v: (Hkv, P, D) shared, (B, Hkv, P, D) per example, (A, Hkv, P, D) a bank
            read by prefix_index (B,), or None
        key_padding_mask: (B, Sk) bool, True = attend, or None
        causal: bottom-right aligned over the real keys (Sq <= Sk)
        scale: softmax scale
        dropout_p: attention-probability dropout
        prefix_lengths: (A,) / (B,) / (1,) visible prefix keys per bank entry / example / shared prefix
        prefix_dropout_p: dropout on the prefix K / V elements, per example: the keep mask
            (2, B, Hkv, P, D) (keys, values) is drawn first, as ``dropout_keep_mask`` draws it,
            then the attention dropout's.
        softcap, sinks: logit softcapping and per-head (Hq,) sink logits; SDPA has neither, so with
            either the maths is written out (as for CPU dropout: no repeat_kv, bool mask only).
        window: causal sliding window, the prefix at the positions before the real keys: a dense
            (B, 1, Sq, P + Sk) bool mask (the reference's ``visible_keys_mask``).
        relative_bias_table, relative_bias_buckets: T5's relative position bias ((num_buckets, Hq),
            (2L - 1,)): gathered into a dense (1 or B, Hq, Sq, P + Sk) bias, SDPA's float mask when the
            table needs no gradient (PEFT's frozen T5), else added to the written-out scores (SDPA's
            CPU kernels have no gradient for a float mask).
    Returns:
        out: (B, Hq, Sq, D) in q's dtype.
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
    total = prefix_len + k_len
    if total == 0:  # no keys at all: zeros (a sink takes all the weight), with the reference's graph
        return prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=causal, scale=scale, sinks=sinks,
                                          prefix_index=prefix_index, prefix_lengths=prefix_lengths)
    lengths = example_prefix_lengths(batch, prefix_index, prefix_lengths) if prefix_len else None
    prefix_k, prefix_v = select_prefix(prefix_k, prefix_index), select_prefix(prefix_v, prefix_index)
    if prefix_dropout_p > 0.0 and prefix_len:
        keep, keep_prob = dropout_keep_mask((2, batch) + tuple(prefix_k.shape[-3:]), prefix_dropout_p, q.device)
        prefix_k = prefix_k * keep[0].to(prefix_k.dtype) * (1.0 / keep_prob)  # (B, Hkv, P, D), broadcasting a shared one
        prefix_v = prefix_v * keep[1].to(prefix_v.dtype) * (1.0 / keep_prob)
    keys, values = join_prefix(prefix_k, k), join_prefix(prefix_v, v)
    gqa = q_heads != kv_heads
    # A relative bias whose table needs no gradient (PEFT freezes T5's) rides in SDPA's float mask;
    # a trainable one is written out (SDPA's CPU kernels give no gradient for a float mask).
    trainable_bias = relative_bias_table is not None and torch.is_grad_enabled() and relative_bias_table.requires_grad
    written_out = ((dropout_p > 0.0 and q.device.type == "cpu") or softcap is not None or sinks is not None
                   or trainable_bias)

    if (key_padding_mask is None and lengths is None and window is None and not written_out
            and relative_bias_table is None):
        if not causal:
            mask = None
        elif q_len == total:  # Sq = P + Sk: bottom-right is top-left
            return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p, is_causal=True,
                                                  scale=scale, enable_gqa=gqa)
        else:
            mask = causal_lower_right(q_len, total)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p,
                                              scale=scale, enable_gqa=gqa)

    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
    if causal:
        i = torch.arange(q_len, device=q.device)[:, None]
        j = torch.arange(k_len, device=q.device)[None, :]
        visible = j <= i + (k_len - q_len)  # (Sq, Sk)
        mask = visible if mask is None else mask & visible  # (B, 1, Sq, Sk) or (Sq, Sk)
    if window is not None:  # the window cuts every row differently: one dense (B, 1, Sq, P + Sk) mask
        prefix_visible = None
        if lengths is not None:
            prefix_visible = torch.arange(prefix_len, device=q.device) < lengths.to(q.device)[:, None]
        mask = visible_keys_mask(batch, q_len, prefix_len, k_len, key_padding_mask, causal, q.device, prefix_visible,
                                 window)
    elif lengths is not None:  # the prefix keys each example sees: (B, 1, 1, P)
        prefix_visible = (torch.arange(prefix_len, device=q.device) < lengths.to(q.device)[:, None])[:, None, None, :]
        if mask is None:
            mask = F.pad(prefix_visible, (0, k_len), value=True)  # (B, 1, 1, P + Sk)
        else:
            mask = mask if mask.dim() == 4 else mask[None, None]  # (B or 1, 1, Sq or 1, Sk)
            lead = torch.broadcast_shapes(prefix_visible.shape[:3], mask.shape[:3])
            mask = torch.cat([prefix_visible.expand(*lead, prefix_len), mask.expand(*lead, k_len)], dim=-1)
    elif mask is not None and prefix_len:
        mask = F.pad(mask, (prefix_len, 0), value=True)  # (..., P + Sk)
    dead = None
    if mask is not None and sinks is None and (prefix_len == 0 or lengths is not None or window is not None):
        # rows that see no key: open them for SDPA, zero them after (a sink keeps such rows finite)
        dead = ~mask.any(dim=-1, keepdim=True)  # (B, 1, 1 or Sq, 1)
        if q.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(dead.any()):
            dead = None  # the usual case (right padding): skip the zeroing's two full passes (no sync on CPU)
        else:
            mask = mask | dead
    bias = None  # (1 or B, Hq, Sq, P + Sk)
    if relative_bias_table is not None:
        bias = relative_bias_dense(relative_bias_table, relative_bias_buckets, batch, q_len, prefix_len, k_len, lengths)
    if written_out:
        out = _attention_written_out(q, keys, values, mask, scale, dropout_p, softcap, sinks, bias)
    else:
        attn_mask = mask
        if bias is not None:  # a frozen table: the dense bias as the float mask
            attn_mask = bias.to(q.dtype) if mask is None else torch.where(mask, bias.to(q.dtype), float("-inf"))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, dropout_p=dropout_p,
                                             scale=scale, enable_gqa=gqa)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out


def dropout_keep_mask(shape: tuple, dropout_p: float, device: torch.device) -> tuple[Tensor, float]:
    """(bool keep mask of ``shape``, P(keep)): four 16-bit lanes per 64-bit word drawn from torch's
    default generator, lane >= t - 32768 with t = round(p * 65536), so P(keep) = 1 - t / 65536."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    threshold = round(dropout_p * 65536)
    keep = words.view(torch.int16)[:n] >= threshold - 32768
    return keep.view(shape), 1.0 - threshold / 65536


def _attention_written_out(q: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor], scale: float,
                           dropout_p: float, softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
                           bias: Optional[Tensor] = None) -> Tensor:
    """softmax(q keys^T * scale, softcapped, plus bias, masked, with sink logits) with dropout, @ values,
    written out (CPU dropout, or what SDPA lacks: softcap, sinks, a differentiable bias).

    q: (B, Hq, Sq, D); keys, values: (B, Hkv, T, D); mask: bool, (B, 1, 1, T), (Sq, T) or
    (B, 1, Sq, T), or None; bias: (1 or B, Hq, Sq, T) or None. The G = Hq / Hkv query heads that share a KV head are stacked into one
    (G * Sq) row block, so keys and values are not repeated. The keep mask is drawn over
    (B, Hq, Sq, T) in that order, which is the memory order of the (B, Hkv, G * Sq, T) scores.

    Every step is out of place or in place on a non-view (an in-place mask on a view would make
    autograd copy the full scores in backward), and the dropout + values product saves only the bool
    mask (``_DroppedMatmul``)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    stacked = (q * scale).reshape(batch, kv_heads, group * q_len, head_dim)  # scale the (.., D) side, not scores
    scores = torch.matmul(stacked, keys.transpose(-1, -2))  # (B, Hkv, G * Sq, T), a fresh tensor
    if softcap is not None:
        scores = torch.tanh(scores * (1.0 / softcap)) * softcap  # fresh too (tanh saves its own output)
    if bias is not None:  # query head j * G + g is row block g of KV head j: a view of the (.., Hq, Sq, T) bias
        scores = scores + bias.to(scores.dtype).reshape(bias.shape[0], kv_heads, group * q_len, total)
    if mask is not None:
        if group > 1 and mask.shape[-2] > 1:  # per-query rows: the same rows for each of the G heads
            mask = mask.repeat(*([1] * (mask.dim() - 2)), group, 1)  # (..., G * Sq, T)
        # In place and outside autograd: matmul's backward does not need its output, and the gradient
        # of a masked score is already exactly 0 (its probability is 0), so recording the fill would
        # only cost backward a full copy of the scores.
        with torch.no_grad():
            scores.masked_fill_(~mask, float("-inf"))
    if sinks is not None:  # row g * Sq + i of KV head j is query head j * G + g: its sink as one more column
        sink_column = sinks.to(scores.dtype).view(1, kv_heads, group, 1, 1).expand(batch, kv_heads, group, q_len, 1)
        scores = torch.cat([scores, sink_column.reshape(batch, kv_heads, group * q_len, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :total]
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p == 0.0:
        return torch.matmul(probs, values).view(batch, q_heads, q_len, head_dim)
    keep, keep_prob = dropout_keep_mask((batch, kv_heads, group * q_len, total), dropout_p, q.device)
    out = _DroppedMatmul.apply(probs, keep.logical_not_(), values)  # (B, Hkv, G * Sq, D)
    return (out * (1.0 / keep_prob)).view(batch, q_heads, q_len, head_dim)  # 1 / P(keep) on the (.., D) side


class _DroppedMatmul(torch.autograd.Function):
    """probs.masked_fill(drop, 0) @ values that saves the bool drop mask, not the dropped weights.

    probs: (..., M, T) (the softmax output, which softmax's backward saves anyway), drop: (..., M, T)
    bool, values: (..., T, D). Backward recomputes the dropped weights for the values' gradient and
    zeroes the dropped entries of the probabilities' gradient in place: no float mask, no copy of
    the weights kept for backward, so a step's peak memory stays below PEFT's."""

    @staticmethod
    def forward(ctx, probs: Tensor, drop: Tensor, values: Tensor) -> Tensor:
        ctx.save_for_backward(probs, drop, values)
        return torch.matmul(probs.masked_fill(drop, 0.0), values)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        probs, drop, values = ctx.saved_tensors
        grad_probs = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_probs = torch.matmul(grad_out, values.transpose(-1, -2)).masked_fill_(drop, 0.0)
        if ctx.needs_input_grad[2]:
            grad_values = torch.matmul(probs.masked_fill(drop, 0.0).transpose(-1, -2), grad_out)
        return grad_probs, None, grad_values
