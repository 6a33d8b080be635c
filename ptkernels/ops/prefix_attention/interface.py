"""The public ``prefix_attention`` function: argument checks, backend choice, dispatch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._backend import resolve_backend
from ..utils import check_tensor
from .reference import prefix_attention_reference
from .torch_path import prefix_attention_torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p) -> None:
    """Raise ValueError/TypeError naming the argument for anything the op does not define."""
    check_tensor("q", q, (4,))
    check_tensor("k", k, (4,))
    check_tensor("v", v, (4,))
    if q.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"q must be float16, bfloat16, float32 (or float64 for backend='torch' / 'reference'), got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Sk, D), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"k must have q's batch size {batch} in dim 0, got k {tuple(k.shape)}, q {tuple(q.shape)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k must have q's head dim {head_dim} in dim 3, got k {tuple(k.shape)}, q {tuple(q.shape)}")
    kv_heads, k_len = k.shape[1], k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"q's head count must be a multiple of k's (GQA/MQA), got q heads {q_heads} (q {tuple(q.shape)}) "
            f"and k heads {kv_heads} (k {tuple(k.shape)})"
        )
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must both be tensors or both be None")
    if prefix_k is not None:
        check_tensor("prefix_k", prefix_k, (3, 4))
        check_tensor("prefix_v", prefix_v, (3, 4))
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_k and prefix_v must have the same shape, got prefix_k {tuple(prefix_k.shape)} "
                f"and prefix_v {tuple(prefix_v.shape)}"
            )
        want = (kv_heads, prefix_k.shape[-2], head_dim)
        if prefix_k.dim() == 4:
            want = (batch,) + want
        if tuple(prefix_k.shape) != want:
            raise ValueError(
                f"prefix_k must be (Hkv, P, D) = (B?, {kv_heads}, P, {head_dim}) to match k {tuple(k.shape)}, "
                f"got {tuple(prefix_k.shape)}"
            )
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = attend), got dtype {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(
                f"key_padding_mask must be (B, Sk) = ({batch}, {k_len}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and q_len > k_len:
        raise ValueError(
            f"causal attention is bottom-right aligned and needs Sq <= Sk, got Sq={q_len} (q {tuple(q.shape)}) "
            f"and Sk={k_len} (k {tuple(k.shape)})"
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def autocast_inputs(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Under torch.autocast, run in the autocast dtype, as scaled_dot_product_attention does.

    Typically q/k/v arrive in bf16 from autocast linears while the prefix parameters are fp32: they
    are cast here (a differentiable cast, so the fp32 parameters get fp32 gradients).
    """
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or not first.is_floating_point():
        return tensors
    device_type = first.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def prefix_attention(
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
    backend: str = "auto",
) -> Tensor:
    """Attention over [prefix keys; real keys], with the prefix read from its own tensor.

    Equivalent to ``softmax(q @ cat([prefix_k, k]).T * scale + mask) @ cat([prefix_v, v])`` without
    the concatenation, the batch expansion of a shared prefix, the GQA head repeat or a 4D mask.

    Arguments:
        q: (B, Hq, Sq, D) float16 / bfloat16 / float32. Any strides with a unit last stride.
        k, v: (B, Hkv, Sk, D), same dtype and device as q; Hq % Hkv == 0 (GQA / MQA).
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch, or (B, Hkv, P, D) per example; P may be
            0, and None means no prefix. A shared prefix gets its gradient summed over the batch.
        key_padding_mask: (B, Sk) bool, True = attend. Prefix keys are always attended.
        causal: bottom-right aligned over the real keys: query i sees real key j iff
            j <= i + (Sk - Sq); prefix keys are visible to every query. Needs Sq <= Sk.
        scale: softmax scale, default D ** -0.5.
        dropout_p: attention-probability dropout, drawn from torch's default generator (the same
            ``torch.manual_seed`` gives the same output), regenerated in backward, never stored.
        backend: "auto" (Triton for CUDA tensors, the fast PyTorch path otherwise), "triton",
            "torch" (the fast PyTorch path: scaled_dot_product_attention, any device, float64
            included) or "reference" (the readable oracle). "triton" on CPU tensors runs Triton's
            interpreter (TRITON_INTERPRET=1).
    Returns:
        out: (B, Hq, Sq, D) in q's dtype. A query that sees no key at all (P = 0, all masked) gets zeros.
    """
    q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p)
    chosen = resolve_backend(backend, q.device)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dropout_p = float(dropout_p)
    if chosen == "torch":
        return prefix_attention_torch(
            q, k, v, prefix_k, prefix_v,
            key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p,
        )
    if chosen == "reference":
        return prefix_attention_reference(
            q, k, v, prefix_k, prefix_v,
            key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p,
        )
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for backend='triton', got {q.dtype} (float64 runs with backend='torch')")
    # Imported here, not at the top: triton is needed only for backend="triton".
    from .function import prefix_attention_triton
    from .launch import TRITON_MAX_HEAD_DIM

    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {TRITON_MAX_HEAD_DIM}, got q {tuple(q.shape)}; use backend='torch'")
    return prefix_attention_triton(
        q, k, v, prefix_k, prefix_v,
        key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p,
    )
