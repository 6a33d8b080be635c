"""The public ``prefix_attention_varlen`` function: argument checks, backend choice, dispatch.

Packed (padding-free) batches in flash-attention's varlen layout; see DESIGN.md, "Packed
(padding-free) sequences". Each packed sequence sees the prefix as if it were alone.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from ..._backend import resolve_backend
from ..prefix_attention.interface import (
    FLOAT_DTYPES,
    autocast_inputs,
    check_prefix_bank_args,
    check_prefix_tensors,
    check_heads,
    check_qkv,
    check_scale_and_dropout,
)
from .reference import prefix_attention_varlen_reference, sequence_bounds
from .torch_path import prefix_attention_varlen_torch


def check_cu_seqlens(name: str, cu: Tensor, total: int, total_name: str, device) -> list[int]:
    """The lengths of the N sequences that ``cu`` (N + 1,) describes, or a ValueError / TypeError
    naming ``name`` and what it got. Reads ``cu`` on the host (one device sync per call on CUDA)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor (int32 or int64), got {type(cu).__name__}")
    if cu.dtype == torch.bool or cu.is_floating_point() or cu.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] == 0:
        raise ValueError(f"{name} must be 1-D of length N + 1 >= 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    bounds = sequence_bounds(cu)
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {bounds[0]} ({name} = {bounds})")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for n, length in enumerate(lengths):
        if length < 0:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{n}] = {bounds[n]} > {name}[{n + 1}] = {bounds[n + 1]}"
            )
    if bounds[-1] != total:
        raise ValueError(
            f"{name} must end at {total_name} = {total}, got {name}[-1] = {bounds[-1]} ({name} = {bounds})"
        )
    return lengths


def _check_max_seqlen(name: str, value, lengths: list[int], cu_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}")
    longest = max(lengths, default=0)
    if value < longest or value < 0:
        raise ValueError(
            f"{name} must be at least the longest sequence in {cu_name}, {longest}, got {value}"
        )


def check_prefix_attention_varlen_args(
    q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
    dropout_p, prefix_index=None, prefix_lengths=None, prefix_dropout_p=0.0,
) -> tuple[list[int], list[int]]:
    """Raise ValueError/TypeError naming the argument for anything the op does not define; return
    the sequence lengths (seqlens_q, seqlens_k) as Python ints."""
    check_qkv(q, k, v, "(total_k, Hkv, D)")
    total_q, q_heads, head_dim = q.shape
    check_heads(q, k, head_axis=1)
    total_k, kv_heads = k.shape[0], k.shape[1]
    seqlens_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, "total_q (q.shape[0])", q.device)
    seqlens_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, "total_k (k.shape[0])", q.device)
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length N + 1, got {len(seqlens_q) + 1} "
            f"and {len(seqlens_k) + 1}"
        )
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, seqlens_q, "cu_seqlens_q")
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, seqlens_k, "cu_seqlens_k")
    num_seqs = len(seqlens_q)
    check_prefix_tensors(q, prefix_k, prefix_v, prefix_index, kv_heads, head_dim, num_seqs, "N",
                         f"k {tuple(k.shape)} and {num_seqs} sequences")
    check_prefix_bank_args(prefix_k, prefix_index, prefix_lengths, prefix_dropout_p, num_seqs, q.device, "N")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal:
        for n, (lq, lk) in enumerate(zip(seqlens_q, seqlens_k)):
            if lq > lk:
                raise ValueError(
                    f"causal attention is bottom-right aligned per sequence and needs each sequence's query length "
                    f"<= its key length, got sequence {n} with {lq} queries and {lk} keys"
                )
    check_scale_and_dropout(scale, dropout_p)
    return seqlens_q, seqlens_k


def prefix_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Prefix attention over packed sequences (flash-attention's varlen layout): each sequence
    attends to its own keys plus the prefix, as if it were alone.

    Arguments:
        q: (total_q, Hq, D) float16 / bfloat16 / float32 (float64 on "torch" / "reference"); any
            strides with a unit last stride.
        k, v: (total_k, Hkv, D), same dtype and device as q; Hq % Hkv == 0 (GQA / MQA).
        prefix_k, prefix_v: (Hkv, P, D) shared by every sequence, (N, Hkv, P, D) per sequence, a bank
            (A, Hkv, P, D) read through ``prefix_index``, or None; P may be 0. A shared prefix (a bank
            entry) gets its gradient summed over the sequences (that use it), in a fixed order.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 / int64, starting at 0, non-decreasing, ending at
            total_q / total_k: sequence n is q[cu_seqlens_q[n]:cu_seqlens_q[n + 1]] and
            k / v[cu_seqlens_k[n]:cu_seqlens_k[n + 1]]. A sequence may be empty.
        max_seqlen_q, max_seqlen_k: Python ints, upper bounds of the sequence lengths (flash-attention
            sizes its grid with them; a larger bound is allowed, a smaller one is a ValueError).
        causal: bottom-right aligned per sequence: query i of sequence n sees its key j iff
            j <= i + (Lk_n - Lq_n); prefix keys are visible to every query. Needs Lq_n <= Lk_n.
        scale: softmax scale, default D ** -0.5.
        dropout_p: attention-probability dropout (torch's default generator).
        prefix_index: (N,) integers: sequence n reads bank entry prefix_index[n].
        prefix_lengths: (A,) with a bank, (N,) with a per-sequence prefix, (1,) with a shared one:
            visible prefix keys per entry.
        prefix_dropout_p: P-Tuning v2's dropout on the prefix K / V elements, independently per
            sequence.
        backend: "auto" (Triton for CUDA tensors, the fast PyTorch path otherwise), "triton",
            "torch" or "reference", as ``prefix_attention``.
    Returns:
        out: (total_q, Hq, D) in q's dtype. A query that sees no key (P = 0 and an empty key
        sequence) gets zeros.
    """
    q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    seqlens_q, seqlens_k = check_prefix_attention_varlen_args(
        q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        dropout_p, prefix_index, prefix_lengths, prefix_dropout_p,
    )
    chosen = resolve_backend(backend, q.device)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dropout_p = float(dropout_p)
    bank = dict(prefix_index=prefix_index, prefix_lengths=prefix_lengths, prefix_dropout_p=float(prefix_dropout_p))
    if chosen == "torch":
        return prefix_attention_varlen_torch(
            q, k, v, prefix_k, prefix_v, seqlens_q, seqlens_k, causal=causal, scale=scale, dropout_p=dropout_p, **bank,
        )
    if chosen == "reference":
        return prefix_attention_varlen_reference(
            q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, dropout_p=dropout_p,
            **bank,
        )
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for backend='triton', got {q.dtype} (float64 runs with backend='torch')")
    # Imported here, not at the top: triton is needed only for backend="triton".
    from ..prefix_attention.function import prefix_attention_varlen_triton
    from ..prefix_attention.launch import TRITON_MAX_HEAD_DIM

    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {TRITON_MAX_HEAD_DIM}, got q {tuple(q.shape)}; use backend='torch'")
    return prefix_attention_varlen_triton(
        q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        causal=causal, scale=scale, dropout_p=dropout_p, **bank,
    )
