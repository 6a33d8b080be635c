"""PyTorch reference for prefix attention: the CPU fallback (``backend="torch"``) and the test oracle.

It materialises exactly what the fused kernels avoid (the concatenated keys, the expanded prefix,
the repeated GQA heads and the dense visibility mask), which is what makes it easy to read.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .relative_bias import relative_bias_dense


def example_prefix_lengths(
    batch: int, prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor]
) -> Optional[Tensor]:
    """(B,) int64 number of prefix keys example b sees, or None (all P): a bank's lengths read
    through prefix_index, a per-example prefix's lengths as they are, a shared prefix's (1,) broadcast."""
    if prefix_lengths is None:
        return None
    if prefix_index is not None:
        return prefix_lengths.long()[prefix_index.long()]
    return prefix_lengths.long().expand(batch)


def select_prefix(prefix: Optional[Tensor], prefix_index: Optional[Tensor]) -> Optional[Tensor]:
    """A bank (A, Hkv, P, D) read by prefix_index (B,) as (B, Hkv, P, D); any other prefix as it is."""
    if prefix is None or prefix_index is None:
        return prefix
    return prefix[prefix_index.long()]


def visible_keys_mask(
    batch: int,
    q_len: int,
    prefix_len: int,
    k_len: int,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    device: torch.device,
    prefix_visible: Optional[Tensor] = None,
    window: Optional[int] = None,
) -> Tensor:
    """Which keys each query may see, over the concatenated keys [prefix; real].

    Returns a bool tensor of shape (B, 1, Sq, P + Sk): prefix key n is visible iff
    prefix_visible[b, n] ((B, P) bool; None: always); real key j is visible to query i iff
    key_padding_mask[b, j] (when given) and, when causal, j <= i + (Sk - Sq) (bottom-right aligned).
    window: a sliding window over positions, the prefix at 0..P_b-1 and real key j at P_b + j (P_b:
    the example's visible prefix length), query i at P_b + Sk - Sq + i: a key is visible only if the
    query's position minus its position is < window.
    """
    real = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        real = real & key_padding_mask[:, None, None, :].to(torch.bool)
    if causal:
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(k_len, device=device)[None, :]
        real = real & (j <= i + (k_len - q_len))
    prefix = torch.ones(batch, 1, q_len, prefix_len, dtype=torch.bool, device=device)
    if prefix_visible is not None:
        prefix = prefix & prefix_visible[:, None, None, :]
    if window is not None:
        i = torch.arange(q_len, device=device)[:, None]
        real = real & (i + (k_len - q_len) - torch.arange(k_len, device=device)[None, :] < window)
        own = prefix.sum(-1, keepdim=True)[:, :, :1] if prefix_visible is not None else prefix_len  # P_b
        query_pos = i + (k_len - q_len) + own  # (Sq, 1) or (B, 1, Sq, 1)
        prefix = prefix & (query_pos - torch.arange(prefix_len, device=device) < window)
    return torch.cat([prefix, real], dim=-1)


def prefix_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    *,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_keep_mask: Optional[Tensor] = None,
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0,
    prefix_dropout_keep_mask: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    window: Optional[int] = None,
    relative_bias_table: Optional[Tensor] = None,
    relative_bias_buckets: Optional[Tensor] = None,
    upcast: bool = True,
) -> Tensor:
    """softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v], computed the obvious way.

    Arguments:
        q: (B, Hq, Sq, D)
        k, v: (B, Hkv, Sk, D), Hq % Hkv == 0
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch, (B, Hkv, P, D) per example, a bank
            (A, Hkv, P, D) with prefix_index, or None (P = 0)
        key_padding_mask: (B, Sk) bool, True = attend; prefix keys are always attended
        causal: bottom-right aligned over the real keys (query i sees key j iff j <= i + Sk - Sq)
        scale: softmax scale, default D ** -0.5
        dropout_p: probability of dropping an attention weight (drawn from torch's default generator)
        dropout_keep_mask: (B, Hq, Sq, P + Sk) bool; when given it replaces the random draw
            (tests use it to replay the kernel's own dropout mask)
        prefix_index: (B,) integers: example b reads bank entry prefix_index[b]
        prefix_lengths: (A,) with a bank, (B,) per example, (1,) shared: entry a's prefix keys at
            positions >= prefix_lengths[a] are masked
        prefix_dropout_p: dropout on the prefix K / V elements themselves, per example (P-Tuning v2)
        prefix_dropout_keep_mask: (2, B, Hkv, P, D) bool (keys, values); when given it replaces the
            random draw of the prefix dropout
        softcap: attention logit softcapping (Gemma 2): scores -> softcap * tanh(scores / softcap),
            after the scale and before the mask
        sinks: (Hq,) per-head sink logits (gpt-oss): one more logit in each row's softmax, whose
            probability is dropped (it takes weight from the keys and attends to nothing)
        window: causal sliding window (transformers' sliding_window), the prefix counted as the
            positions before the real keys (PEFT's cache): see ``visible_keys_mask``
        relative_bias_table, relative_bias_buckets: T5's relative position bias, (num_buckets, Hq)
            and (2L - 1,) integers: ``table[buckets[r + L - 1], h]`` is added to every score of head
            h whose key position minus query position is r (positions as for ``window``), after the
            scale (see :mod:`.relative_bias`)
        upcast: compute in fp32 (True, the oracle) or in the inputs' dtype (the "PyTorch in the same
            precision" baseline of the FlashAttention error rule)
    Returns:
        out: (B, Hq, Sq, D) in q's dtype. A query with no visible key gets zeros.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    out_dtype = q.dtype
    compute_dtype = torch.float32 if (upcast and q.dtype in (torch.float16, torch.bfloat16)) else q.dtype
    if prefix_k is None:
        prefix_k = k.new_zeros(kv_heads, 0, head_dim)
        prefix_v = v.new_zeros(kv_heads, 0, v.shape[-1])
    lengths = example_prefix_lengths(batch, prefix_index, prefix_lengths)
    prefix_k, prefix_v = select_prefix(prefix_k, prefix_index), select_prefix(prefix_v, prefix_index)
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0).expand(batch, -1, -1, -1)
        prefix_v = prefix_v.unsqueeze(0).expand(batch, -1, -1, -1)
    prefix_len = prefix_k.shape[2]
    if prefix_dropout_keep_mask is not None:
        keep = prefix_dropout_keep_mask.to(prefix_k.dtype) / (1.0 - prefix_dropout_p)
        prefix_k, prefix_v = prefix_k * keep[0], prefix_v * keep[1]
    elif prefix_dropout_p > 0.0:
        prefix_k = torch.nn.functional.dropout(prefix_k, p=prefix_dropout_p, training=True)
        prefix_v = torch.nn.functional.dropout(prefix_v, p=prefix_dropout_p, training=True)
    prefix_visible = None
    if lengths is not None:
        prefix_visible = torch.arange(prefix_len, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    scale = head_dim**-0.5 if scale is None else scale

    keys = torch.cat([prefix_k, k], dim=2).to(compute_dtype)
    values = torch.cat([prefix_v, v], dim=2).to(compute_dtype)
    group = q_heads // kv_heads
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if relative_bias_table is not None:
        scores = scores + relative_bias_dense(relative_bias_table, relative_bias_buckets, batch, q_len, prefix_len,
                                              k_len, lengths).to(compute_dtype)
    visible = visible_keys_mask(batch, q_len, prefix_len, k_len, key_padding_mask, causal, q.device, prefix_visible,
                                window)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the sink logit as one more column, dropped after the softmax
        sink_column = sinks.to(compute_dtype).view(1, q_heads, 1, 1).expand(batch, q_heads, q_len, 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    if scores.shape[-1] == 0:  # no keys at all (P = Sk = 0): the output is zeros
        row_max = scores.new_zeros(scores.shape[:-1] + (1,))
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    if sinks is not None:
        probs = probs[..., :-1]

    if dropout_keep_mask is not None:
        probs = probs * dropout_keep_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, values).to(out_dtype)


def philox4x32(seed: int, counter: tuple[int, int, int, int], rounds: int = 7) -> tuple[int, int, int, int]:
    """Philox4x32 (Salmon et al., 2011) as ``tl.philox`` computes it for 32-bit counters: key
    (seed mod 2**32, seed >> 32 mod 2**32), ``rounds`` rounds (the kernels' ``common.PHILOX_ROUNDS``,
    7); four 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(rounds):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def attention_dropout_keep_reference(rows: int, prefix_len: int, k_len: int, dropout_p: float, seed: int,
                                     first_row: int = 0) -> Tensor:
    """The (rows, P + Sk) bool keep mask of the Triton kernels' attention dropout, computed one philox
    call at a time in Python, from the documented numbering (``common.attention_dropout_keep``):
    query row r has id first_row + r (rows count from a multiple of 16 in their sequence), key j of
    [prefix; real] has lane j (prefix) or round_up(P, 16) + j - P (real); (row i, lane n) is drawn by the
    call with counter (n // 16 * 4 + (n % 8) // 2, id(i - 8 * [i % 16 >= 8]) mod 2**32, its high
    word, 0), as 16-bit lane 4 * [i % 16 >= 8] + 2 * [n % 16 >= 8] + n % 2 (lane l: bits 16 (l % 2)..
    of word l // 2), and kept iff that lane >= round(p * 65536) (capped at 65535). Slow: small shapes."""
    threshold = min(round(dropout_p * 65536), 65535)
    real_lane = (prefix_len + 15) // 16 * 16
    keep = torch.zeros(rows, prefix_len + k_len, dtype=torch.bool)
    calls = {}
    for i in range(rows):
        high_row = (i % 16) >= 8
        row_id = first_row + i - (8 if high_row else 0)
        for j in range(prefix_len + k_len):
            n = j if j < prefix_len else real_lane + j - prefix_len
            counter = (n // 16 * 4 + (n % 8) // 2, row_id & 0xFFFFFFFF, (row_id >> 32) & 0xFFFFFFFF, 0)
            if counter not in calls:
                calls[counter] = philox4x32(seed, counter)
            lane = 4 * high_row + 2 * ((n % 16) >= 8) + n % 2
            word = calls[counter][lane // 2]
            keep[i, j] = ((word >> (16 * (lane % 2))) & 0xFFFF) >= threshold
    return keep
