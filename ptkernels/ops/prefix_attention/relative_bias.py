"""Relative position bias (T5's bucketed bias) for prefix attention: the bucket map and the dense
reference.

T5 adds ``table[bucket(key_position - query_position), h]`` to every attention score, where the
bucket of a relative position comes from T5's log-spaced bucketing and ``table`` is the
(num_buckets, H) ``relative_attention_bias`` embedding. ``prefix_attention`` takes the bias as two
small tensors instead of a dense (B, H, Sq, P + Sk) one:

* ``relative_bias_table``: (num_buckets, Hq), T5's embedding weight as it is (differentiable);
* ``relative_bias_buckets``: (2L - 1,) integers, the bucket of every relative position
  r in [-(L - 1), L - 1], stored at index r + L - 1 (``relative_position_buckets`` builds it with
  T5's formula; the Hugging Face integration builds it with the model's own bucketing function).

Positions follow PEFT's cache convention: example b's prefix keys sit at positions 0 .. P_b - 1,
its real key j at P_b + j and its query i at P_b + Sk - Sq + i (bottom-right, as in decoding), P_b
the example's prefix length. So L >= P + Sk is needed; for the real keys P_b cancels out.
The Triton launcher gathers the table through the map once per call into an (Hq, 2L - 1) bias per
relative position, which the kernels read per score tile; the buckets serve the table's gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def relative_position_buckets(max_position: int, *, num_buckets: int = 32, max_distance: int = 128,
                              bidirectional: bool = True, device=None) -> Tensor:
    """T5's bucket of every relative position r = key position - query position in
    [-(max_position - 1), max_position - 1]: an int32 (2 * max_position - 1,) tensor, entry
    r + max_position - 1 (the ``relative_bias_buckets`` of ``prefix_attention``).

    The formula of T5 (``T5Attention._relative_position_bucket``): with ``bidirectional`` half of
    the buckets for keys after the query; |r| < max_exact (half of a direction's buckets) exactly,
    larger distances log-spaced up to ``max_distance``; without it (a causal decoder) positive r
    share bucket 0.
    """
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position must be a positive int, got {max_position!r}")
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 2:
        raise ValueError(f"num_buckets must be an int >= 2, got {num_buckets!r}")
    rel = torch.arange(-(max_position - 1), max_position, device=device)
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).to(rel.dtype) * num_buckets
        distance = rel.abs()
    else:
        distance = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(rel.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return (buckets + torch.where(is_small, distance, large)).to(torch.int32)


def relative_positions(batch: int, q_len: int, prefix_len: int, k_len: int, lengths: Optional[Tensor],
                       device) -> Tensor:
    """key position - query position over the keys [prefix; real]: (1 or B, Sq, P + Sk) int64.

    Prefix key n at position n, real key j at P_b + j, query i at P_b + Sk - Sq + i (P_b: the
    example's prefix length, ``lengths[b]``, or P)."""
    own = torch.full((1, 1, 1), prefix_len, device=device, dtype=torch.long)
    if lengths is not None:
        own = lengths.to(device=device, dtype=torch.long).view(batch, 1, 1)
    c = torch.arange(prefix_len + k_len, device=device).view(1, 1, -1)
    key_pos = torch.where(c < prefix_len, c, c - prefix_len + own)
    query_pos = torch.arange(q_len, device=device).view(1, -1, 1) + (k_len - q_len) + own
    return key_pos - query_pos


def relative_bias_dense(table: Tensor, buckets: Tensor, batch: int, q_len: int, prefix_len: int, k_len: int,
                        lengths: Optional[Tensor] = None) -> Tensor:
    """The dense bias the kernels never build: (1 or B, Hq, Sq, P + Sk) in the table's dtype,
    bias[b, h, i, c] = table[buckets[rel + L - 1], h] with rel from :func:`relative_positions`.
    Differentiable w.r.t. ``table`` (an embedding gather)."""
    center = (buckets.shape[0] - 1) // 2
    rel = relative_positions(batch, q_len, prefix_len, k_len, lengths, table.device)
    index = buckets.to(table.device).long()[(rel + center).clamp(0, buckets.shape[0] - 1)]
    return table[index].permute(0, 3, 1, 2)  # (1 or B, Sq, T, Hq) -> (1 or B, Hq, Sq, T)


def alibi_as_relative_bias(slopes: Tensor, max_position: int) -> tuple[Tensor, Tensor]:
    """ALiBi (BLOOM, Falcon, MPT) as a relative bias: score (h, i, key) + slopes[h] * r with
    r = key position - query position, i.e. table (2L - 1, Hq) = r * slopes[h] for r in
    [-(L - 1), L - 1] (differentiable w.r.t. slopes) and the identity bucket map (2L - 1,) int32,
    L = max_position. BLOOM adds slopes[h] * (position of the key among the attended keys); the two
    differ by a constant per query row, which the softmax cancels, unless the row is left-padded."""
    rel = torch.arange(-(max_position - 1), max_position, device=slopes.device, dtype=slopes.dtype)
    buckets = torch.arange(2 * max_position - 1, device=slopes.device, dtype=torch.int32)
    return rel[:, None] * slopes[None, :], buckets


__all__ = ["relative_position_buckets", "relative_positions", "relative_bias_dense", "alibi_as_relative_bias"]
