"""The public ``prefix_attention`` function: argument checks, backend choice, dispatch."""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from ..._backend import resolve_backend
from ..utils import check_tensor
from .reference import prefix_attention_reference
from .relative_bias import alibi_as_relative_bias
from .torch_path import prefix_attention_torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p,
                                prefix_index=None, prefix_lengths=None, prefix_dropout_p=0.0, softcap=None,
                                sinks=None, window=None, relative_bias_table=None,
                                relative_bias_buckets=None, alibi_slopes=None) -> None:
    """Raise ValueError/TypeError naming the argument for anything the op does not define."""
    check_qkv(q, k, v, "(B, Hkv, Sk, D)")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k must have q's batch size {batch} in dim 0, got k {tuple(k.shape)}, q {tuple(q.shape)}")
    check_heads(q, k, head_axis=1)
    kv_heads, k_len = k.shape[1], k.shape[2]
    check_prefix_tensors(q, prefix_k, prefix_v, prefix_index, kv_heads, head_dim, batch, "B",
                         f"k {tuple(k.shape)}")
    check_prefix_bank_args(prefix_k, prefix_index, prefix_lengths, prefix_dropout_p, batch, q.device)
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
    check_scale_and_dropout(scale, dropout_p)
    check_softcap_and_sinks(softcap, sinks, q_heads, q.device)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("window (a sliding window) needs causal=True: transformers' sliding windows are causal")
    prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
    check_relative_bias(relative_bias_table, relative_bias_buckets, q_heads, prefix_len + k_len, q.device, softcap)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
            raise TypeError(f"alibi_slopes must be a (Hq,) float tensor or None, got "
                            f"{alibi_slopes.dtype if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__}")
        if tuple(alibi_slopes.shape) != (q_heads,):
            raise ValueError(f"alibi_slopes must be (Hq,) = ({q_heads},), one slope per query head, got "
                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
        if relative_bias_table is not None:
            raise ValueError("give either alibi_slopes or relative_bias_table / relative_bias_buckets, not both")
        if softcap is not None:
            raise NotImplementedError("prefix_attention: alibi_slopes together with softcap is not supported")


def check_relative_bias(table, buckets, q_heads: int, max_position: int, device, softcap) -> None:
    """relative_bias_table: a floating (num_buckets, Hq) tensor on q's device; relative_bias_buckets:
    a 1-D integer tensor of odd length 2L - 1 with L >= P + Sk (``max_position``) and values in
    [0, num_buckets). Both or neither; not with softcap (no model combines them)."""
    if (table is None) != (buckets is None):
        raise ValueError("relative_bias_table and relative_bias_buckets must be given together (T5's relative "
                         f"position bias), got {'only the table' if buckets is None else 'only the buckets'}")
    if table is None:
        return
    if not isinstance(table, Tensor):
        raise TypeError(f"relative_bias_table must be a (num_buckets, Hq) float tensor, got {type(table).__name__}")
    if not table.is_floating_point():
        raise TypeError(f"relative_bias_table must be a floating tensor, got dtype {table.dtype}")
    if table.dim() != 2 or table.shape[1] != q_heads or table.shape[0] == 0:
        raise ValueError(f"relative_bias_table must be (num_buckets, Hq) = (num_buckets, {q_heads}), one column per "
                         f"query head (T5's relative_attention_bias.weight), got {tuple(table.shape)}")
    if table.device != device:
        raise ValueError(f"relative_bias_table must be on q's device {device}, got {table.device}")
    if not isinstance(buckets, Tensor):
        raise TypeError(f"relative_bias_buckets must be an integer tensor, got {type(buckets).__name__}")
    if buckets.dtype == torch.bool or buckets.is_floating_point() or buckets.is_complex():
        raise TypeError(f"relative_bias_buckets must be an integer tensor (int32 or int64), got dtype {buckets.dtype}")
    if buckets.dim() != 1 or buckets.shape[0] % 2 == 0 or (buckets.shape[0] + 1) // 2 < max_position:
        raise ValueError(
            f"relative_bias_buckets must be 1-D of odd length 2L - 1 covering the relative positions "
            f"-(L - 1) .. L - 1 with L >= P + Sk = {max_position} (length >= {2 * max_position - 1}), got shape "
            f"{tuple(buckets.shape)}"
        )
    if buckets.device != device:
        raise ValueError(f"relative_bias_buckets must be on q's device {device}, got {buckets.device}")
    ok, lo, hi = _values_in_range(buckets, 0, table.shape[0] - 1)
    if not ok:
        raise ValueError(f"relative_bias_buckets must be in [0, num_buckets) = [0, {table.shape[0]}) for a table of "
                         f"{table.shape[0]} buckets, got values from {lo} to {hi}")
    if softcap is not None:
        raise NotImplementedError("prefix_attention: relative_bias_table together with softcap is not supported")


def check_scale_and_dropout(scale, dropout_p) -> None:
    """scale: a finite float or None; dropout_p: a float in [0, 1)."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def check_qkv(q, k, v, k_layout: str) -> None:
    """q, k, v: tensors of the rank ``k_layout`` names ("(B, Hkv, Sk, D)" batched, "(total_k, Hkv, D)"
    packed), q float16 / bfloat16 / float32 / float64, k and v of q's dtype and device and one shape."""
    rank = k_layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, (rank,))
    if q.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"q must be float16, bfloat16, float32 (or float64 for backend='torch' / 'reference'), got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {k_layout}, got k {tuple(k.shape)} and v {tuple(v.shape)}")


def check_heads(q, k, head_axis: int) -> None:
    """q has a head dim (the last dim) of at least 1 and k the same; k's head count (dim ``head_axis``)
    divides q's (GQA / MQA), both at least 1."""
    head_dim, last = q.shape[-1], k.dim() - 1
    if head_dim == 0:
        raise ValueError(f"q's head dim (its last dim) must be at least 1, got q {tuple(q.shape)}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k must have q's head dim {head_dim} in dim {last}, got k {tuple(k.shape)}, q {tuple(q.shape)}")
    q_heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    if q_heads == 0 or kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"q and k must have at least one head each and q's head count a multiple of k's (GQA/MQA), got q "
            f"heads {q_heads} (q {tuple(q.shape)}) "
            f"and k heads {kv_heads} (k {tuple(k.shape)})"
        )


def check_softcap_and_sinks(softcap, sinks, q_heads: int, device) -> None:
    """softcap: a positive finite float or None; sinks: a floating (Hq,) tensor on q's device or None."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap < math.inf):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(f"sinks must be a (Hq,) float tensor or None, got {type(sinks).__name__}")
        if not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating tensor, got dtype {sinks.dtype}")
        if tuple(sinks.shape) != (q_heads,):
            raise ValueError(f"sinks must be (Hq,) = ({q_heads},), one logit per query head, got {tuple(sinks.shape)}")
        if sinks.device != device:
            raise ValueError(f"sinks must be on q's device {device}, got {sinks.device}")


def check_prefix_tensors(q, prefix_k, prefix_v, prefix_index, kv_heads: int, head_dim: int, batch: int,
                         batch_name: str, matches: str) -> None:
    """Shape / dtype / device checks of prefix_k and prefix_v against the attention they extend:
    (Hkv, P, D) shared, (batch, Hkv, P, D) per example (``batch_name``: "B" or "N" sequences), or a
    bank (A, Hkv, P, D) with prefix_index. ``matches`` names what Hkv and D come from, for the message."""
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
            # a bank (A, Hkv, P, D) with prefix_index, else per example (B, Hkv, P, D)
            want = (prefix_k.shape[0] if prefix_index is not None else batch,) + want
        if tuple(prefix_k.shape) != want:
            raise ValueError(
                f"prefix_k must be (Hkv, P, D) = ({kv_heads}, P, {head_dim}) shared, ({batch_name}, Hkv, P, D) = "
                f"({batch}, {kv_heads}, P, {head_dim}) per {'sequence' if batch_name == 'N' else 'example'}, or "
                f"(A, Hkv, P, D) = (A, {kv_heads}, P, {head_dim}) bank entries read through prefix_index, to match "
                f"{matches}, got {tuple(prefix_k.shape)}"
            )
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _check_integer_vector(name: str, t, length: int, length_desc: str, device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor or None, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be 1-D of length {length_desc} = {length}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


# Index / length tensors on a GPU whose values were checked: id -> (weak reference, tensor version,
# bounds). The Hugging Face integration hands the same tensor to every layer, so the host sync of the
# value check is paid once per forward, not once per layer. (Not a WeakKeyDictionary: its lookups
# compare tensors with ==.) A few entries suffice; the oldest are dropped.
_checked_values: dict = {}


def _values_in_range(t: Tensor, lo: int, hi: int) -> tuple[bool, int, int]:
    """(all of t in [lo, hi], min, max), from the cache when t (at this version) was checked before.

    Cached only where the check costs a device sync (t off the CPU) and t has a version counter
    (not an inference tensor, made under ``torch.inference_mode``): on the CPU every call checks, so
    a write that bypasses the version counter (``.data``, ``.numpy()``) cannot go unseen there; on a
    GPU such a write after a call is not checked again (write in place, or make a new tensor)."""
    cacheable = t.device.type != "cpu" and not t.is_inference()
    if cacheable:
        seen = _checked_values.get(id(t))
        if seen is not None and seen[0]() is t and seen[1:] == (t._version, lo, hi):
            return True, lo, hi
    low, high = (int(t.min()), int(t.max())) if t.numel() else (lo, hi)
    ok = lo <= low and high <= hi
    if ok and cacheable and not torch.compiler.is_compiling():
        if len(_checked_values) >= 64:
            _checked_values.pop(next(iter(_checked_values)))
        _checked_values[id(t)] = (weakref.ref(t), t._version, lo, hi)
    return ok, low, high


def check_prefix_bank_args(prefix_k, prefix_index, prefix_lengths, prefix_dropout_p, batch: int, device,
                           batch_name: str = "B") -> None:
    """Checks of the prefix-bank arguments (DESIGN.md, "Prefix banks"); prefix_k already checked.

    Value checks (indices in [0, A), lengths in [0, P]) read the tensors on the host: one device
    sync per call on CUDA."""
    if isinstance(prefix_dropout_p, bool) or not isinstance(prefix_dropout_p, (int, float)) \
            or not 0.0 <= prefix_dropout_p < 1.0:
        raise ValueError(f"prefix_dropout_p must be a float in [0, 1), got {prefix_dropout_p!r}")
    if prefix_k is None:
        for name, t in (("prefix_index", prefix_index), ("prefix_lengths", prefix_lengths)):
            if t is not None:
                raise ValueError(f"{name} needs a prefix, but prefix_k and prefix_v are None")
        return
    if prefix_index is not None:
        if prefix_k.dim() != 4:
            raise ValueError(
                f"prefix_index needs a bank prefix_k (A, Hkv, P, D); got a shared prefix of shape "
                f"{tuple(prefix_k.shape)}"
            )
        _check_integer_vector("prefix_index", prefix_index, batch, batch_name, device)
        entries = prefix_k.shape[0]
        ok, lo, hi = _values_in_range(prefix_index, 0, entries - 1)
        if not ok:
            raise ValueError(
                f"prefix_index must be in [0, A) = [0, {entries}) for a bank of {entries} entries, got values "
                f"from {lo} to {hi}"
            )
    if prefix_lengths is not None:
        if prefix_index is not None:
            want, desc = prefix_k.shape[0], "A (bank entries)"
        elif prefix_k.dim() == 4:
            want, desc = batch, f"{batch_name} (one per {'sequence' if batch_name == 'N' else 'example'})"
        else:
            want, desc = 1, "1 (a shared prefix)"
        _check_integer_vector("prefix_lengths", prefix_lengths, want, desc, device)
        prefix_len = prefix_k.shape[-2]
        ok, lo, hi = _values_in_range(prefix_lengths, 0, prefix_len)
        if not ok:
            raise ValueError(
                f"prefix_lengths must be in [0, P] = [0, {prefix_len}], got values from {lo} to {hi}"
            )


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
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    prefix_dropout_p: float = 0.0,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    window: Optional[int] = None,
    relative_bias_table: Optional[Tensor] = None,
    relative_bias_buckets: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention over [prefix keys; real keys], with the prefix read from its own tensor.

    Equivalent to ``softmax(q @ cat([prefix_k, k]).T * scale + mask) @ cat([prefix_v, v])`` without
    the concatenation, the batch expansion of a shared prefix, the GQA head repeat or a 4D mask.

    Arguments:
        q: (B, Hq, Sq, D) float16 / bfloat16 / float32. Any strides with a unit last stride.
        k, v: (B, Hkv, Sk, D), same dtype and device as q; Hq % Hkv == 0 (GQA / MQA).
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch, (B, Hkv, P, D) per example, or a bank
            (A, Hkv, P, D) read through ``prefix_index``; P may be 0, and None means no prefix. A
            shared prefix (a bank entry) gets its gradient summed over the batch (the examples that
            use it), in a fixed order.
        key_padding_mask: (B, Sk) bool, True = attend. Prefix keys are always attended.
        causal: bottom-right aligned over the real keys: query i sees real key j iff
            j <= i + (Sk - Sq); prefix keys are visible to every query. Needs Sq <= Sk.
        scale: softmax scale, default D ** -0.5.
        dropout_p: attention-probability dropout, drawn from torch's default generator (the same
            ``torch.manual_seed`` gives the same output), regenerated in backward, never stored.
        prefix_index: (B,) int32/int64 or None: example b reads bank entry prefix_index[b].
        prefix_lengths: (A,) with a bank, (B,) with a per-example prefix, (1,) with a shared one,
            int32/int64, or None: entry a has only its first prefix_lengths[a] prefix keys (the
            rest are masked), so adapters with different P share one bank.
        prefix_dropout_p: P-Tuning v2's dropout on the prefix keys and values themselves: every
            element of example b's prefix K and V is kept with probability 1 - p and scaled by
            1 / (1 - p), independently per example, KV head, position and channel, identically for
            every query and query head reading it. Drawn from torch's default generator,
            regenerated in backward; the Triton path never materialises B copies.
        softcap: attention logit softcapping (Gemma 2): scores -> softcap * tanh(scores / softcap)
            after the scale, before the mask. None: off.
        sinks: (Hq,) float tensor or None: per-head sink logits (gpt-oss), one more logit in every
            row's softmax whose probability is dropped; differentiable.
        window: a causal sliding window (transformers' ``sliding_window``; needs causal=True), with
            the prefix at the positions before the real keys as in PEFT's cache: query i of example b
            (position P_b + Sk - Sq + i, P_b its prefix length) sees prefix key n iff its position - n <
            window and real key j iff i + Sk - Sq - j < window (so the prefix slides out of long windows).
        relative_bias_table: (num_buckets, Hq) float tensor or None: T5's relative position bias
            (``relative_attention_bias.weight``), differentiable; needs relative_bias_buckets.
        relative_bias_buckets: (2L - 1,) int32/int64, L >= P + Sk: the bucket of each relative position
            r = key position - query position at index r + L - 1 (``relative_position_buckets``
            builds T5's). Positions as for ``window`` (prefix 0..P_b-1, real key j at P_b + j, query
            i at P_b + Sk - Sq + i, PEFT's cache convention). Score (h, i, key) gets
            ``table[buckets[r + L - 1], h]`` added after the scale; the kernels gather it per tile,
            never as a dense (B, Hq, Sq, P + Sk) tensor.
        alibi_slopes: (Hq,) float tensor or None: ALiBi (BLOOM, Falcon, MPT): score (h, i, key) gets
            ``alibi_slopes[h] * (key position - query position)`` added (index positions as above).
            BLOOM's slope times the key's position among the attended keys differs from it by a
            per-row constant, which the softmax cancels, when no row is left-padded (left padding
            shifts BLOOM's real keys against its prefix). Runs as a relative bias with the identity
            bucket map.
        backend: "auto" (Triton for CUDA tensors, the fast PyTorch path otherwise), "triton",
            "torch" (the fast PyTorch path: scaled_dot_product_attention, any device, float64
            included) or "reference" (the readable oracle). "triton" on CPU tensors runs Triton's
            interpreter (TRITON_INTERPRET=1).
    Returns:
        out: (B, Hq, Sq, D) in q's dtype. A query that sees no key at all (P = 0, all masked) gets zeros.
    """
    q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p,
                                prefix_index, prefix_lengths, prefix_dropout_p, softcap, sinks, window,
                                relative_bias_table, relative_bias_buckets, alibi_slopes)
    if alibi_slopes is not None:
        prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
        max_position = max(prefix_len + k.shape[2], 1)
        relative_bias_table, relative_bias_buckets = alibi_as_relative_bias(alibi_slopes, max_position)
    chosen = resolve_backend(backend, q.device)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dropout_p = float(dropout_p)
    bank = dict(prefix_index=prefix_index, prefix_lengths=prefix_lengths, prefix_dropout_p=float(prefix_dropout_p),
                softcap=None if softcap is None else float(softcap), sinks=sinks, window=window,
                relative_bias_table=relative_bias_table, relative_bias_buckets=relative_bias_buckets)
    if chosen == "torch":
        return prefix_attention_torch(
            q, k, v, prefix_k, prefix_v,
            key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p, **bank,
        )
    if chosen == "reference":
        return prefix_attention_reference(
            q, k, v, prefix_k, prefix_v,
            key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p, **bank,
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
        key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p, **bank,
    )
