"""Hugging Face transformers integration: the "ptkernels" attention implementation.

``register()`` adds two entries to transformers' registries (idempotent):

* ``AttentionInterface.register("ptkernels", ptkernels_attention_forward)``: every attention
  module of a model whose ``config._attn_implementation == "ptkernels"`` calls
  :func:`ptkernels_attention_forward` with its projected q / k / v (k / v already concatenated
  with the KV cache when decoding), the mask built below, ``dropout`` and ``scaling``.
* ``AttentionMaskInterface.register("ptkernels", ptkernels_attention_mask)`` (transformers'
  ``flash_attention_mask``, made compile-safe): transformers then hands the attention function the
  2D (B, Sk) padding mask (or None when nothing is padded) instead of a dense 4D mask. Without a
  registered mask builder transformers silently passes ``mask=None``.

The prefix travels as a forward keyword argument, ``ptkernels_prefix`` (a :class:`LayerPrefix`),
which transformers forwards through ``**kwargs`` from ``model(...)`` down to the attention function;
the function picks the layer's (k, v) by ``module.layer_idx``. No global state, no Cache, no
``torch.cat`` of K/V, no 4D mask, no ``repeat_kv``: all of that is ``ptkernels.prefix_attention``'s
job. Because the prefix is not a cache, gradient checkpointing keeps working.

Packed (padding-free) batches: a batch of one row holding several sequences, given either as the
flash-attention keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
``max_length_k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``; the patched PEFT
forward always passes them for a packed batch) or as ``position_ids`` that restart (the collator's
default, TRL's ``padding_free=True``), go through ``ptkernels.prefix_attention_varlen``: every
sequence attends to its own tokens plus the whole prefix, as if it were alone. Transformers' own
flash-attention path detects packing the same two ways.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.prefix_attention import prefix_attention
from ..ops.prefix_attention_varlen import prefix_attention_varlen
from ..ops.prefix_attention.torch_path import join_prefix

ATTN_IMPLEMENTATION = "ptkernels"
PREFIX_KWARG = "ptkernels_prefix"
BACKEND_ATTR = "_ptkernels_backend"

__all__ = ["ATTN_IMPLEMENTATION", "PREFIX_KWARG", "LayerPrefix", "ptkernels_attention_forward", "register",
           "cu_seqlens_from_position_ids"]

# flash-attention's varlen keyword arguments, as transformers names them (TransformersKwargs)
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class LayerPrefix:
    """Every layer's prefix K/V for one forward, as one stacked tensor.

    ``stacked``: (2L, Hkv, P, D) shared by the batch (layer l's key is ``stacked[2l]``, its value
    ``stacked[2l + 1]``), or (B, 2L, Hkv, P, D) per example.

    ``read``: the layer indices whose attention has read its prefix in this forward (the patched
    model checks after each forward that every layer did, so a model whose layers do not forward
    ``**kwargs`` to their attention raises instead of silently running without the prefix).
    """

    __slots__ = ("stacked", "read")

    def __init__(self, stacked: Tensor) -> None:
        if stacked.dim() not in (4, 5):
            raise ValueError(f"stacked prefix must be (2L, Hkv, P, D) or (B, 2L, Hkv, P, D), got {tuple(stacked.shape)}")
        self.stacked = stacked
        self.read: set = set()

    def unread_layers(self) -> list[int]:
        """The layers that have not read their prefix (in ascending order)."""
        return sorted(set(range(self.num_layers)) - self.read)

    @property
    def num_layers(self) -> int:
        return self.stacked.shape[-4] // 2

    def layer(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        """(prefix_k, prefix_v) of one layer: (Hkv, P, D) each, or (B, Hkv, P, D) per example."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"the prefix has {self.num_layers} layers, attention asked for layer {layer_idx}")
        if self.stacked.dim() == 4:
            return self.stacked[2 * layer_idx], self.stacked[2 * layer_idx + 1]
        return self.stacked[:, 2 * layer_idx], self.stacked[:, 2 * layer_idx + 1]


_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def _fallback_4d(query, key, value, prefix_k, prefix_v, mask, dropout, scaling):
    """A 4D mask (user-supplied, or from a compileable cache) cannot go through the 2D-mask op:
    SDPA over the joined keys [prefix; real] (the fast path's join), the prefix always visible."""
    if prefix_k is not None:
        key, value = join_prefix(prefix_k, key), join_prefix(prefix_v, value)
        visible = (mask.new_ones if mask.dtype == torch.bool else mask.new_zeros)(*mask.shape[:-1], prefix_k.shape[-2])
        mask = torch.cat([visible, mask], dim=-1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


def cu_seqlens_from_position_ids(position_ids: Optional[Tensor]) -> Optional[Tensor]:
    """(N + 1,) int32 sequence starts of a packed row whose ``position_ids`` (1, T) restart, or None
    when they do not (one sequence, or not a single row).

    A sequence starts wherever the position does not follow the previous one by 1 (as transformers'
    ``find_packed_sequence_indices``), so it works whatever the first position is (0, or P under
    prefix tuning's shifted positions). Reads the positions on the host (one device sync)."""
    if position_ids is None or position_ids.dim() > 2 or (position_ids.dim() == 2 and position_ids.shape[0] != 1):
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() < 2:
        return None
    starts = torch.nonzero(torch.diff(pos) != 1).flatten() + 1
    if starts.numel() == 0:
        return None
    edges = (pos.new_zeros(1), starts.to(pos.dtype), pos.new_full((1,), pos.numel()))
    return torch.cat(edges).to(torch.int32)


def _max_length(value, cu: Tensor) -> int:
    if value is None:
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return int(value)  # transformers' helpers give 0-d tensors, the collator Python ints


def _packed_sequences(module, query: Tensor, key: Tensor, attention_mask: Optional[Tensor], kwargs: dict):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) when this call is a packed row, else None.

    Explicit ``cu_seq_lens_q`` / ``cu_seq_lens_k`` win; otherwise ``position_ids`` that restart in a
    single row without padding and without a cache (Sq == Sk) mean packing."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
            return None
        cu_q = cu_seqlens_from_position_ids(kwargs.get("position_ids"))
        if cu_q is None:
            return None
        cu_k = cu_q
    else:
        if query.shape[0] != 1:
            raise ValueError(
                f"ptkernels attention ({type(module).__name__}): packed sequences (cu_seq_lens_q / cu_seq_lens_k) need a "
                f"batch of one row, got q {tuple(query.shape)} (B, Hq, T, D)"
            )
        if attention_mask is not None:
            raise ValueError(
                f"ptkernels attention ({type(module).__name__}): packed sequences (cu_seq_lens_q / cu_seq_lens_k) with a "
                "padding attention_mask are not supported; packed rows have no padding"
            )
        cu_q = cu_k if cu_q is None else cu_q
        cu_k = cu_q if cu_k is None else cu_k
    max_q = _max_length(kwargs.get("max_length_q"), cu_q)
    max_k = _max_length(kwargs.get("max_length_k"), cu_k)
    return cu_q, cu_k, max_q, max_k


def ptkernels_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: q (B, Hq, Sq, D), k / v (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None).

    ``attention_mask`` is the (B, Sk) padding mask from ``flash_attention_mask`` (True / 1 = attend)
    or None. Causality follows the module (``is_causal`` kwarg, else ``module.is_causal``) for
    Sq > 1, bottom-right aligned, which is what decoding with a KV cache needs. The layer's prefix
    comes from the ``ptkernels_prefix`` kwarg; it is always visible and never in the cache.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"ptkernels attention does not support {name!r} (model {type(module).__name__})")

    prefix: Optional[LayerPrefix] = kwargs.get(PREFIX_KWARG)
    backend = getattr(module, BACKEND_ATTR, "auto")
    prefix_k = prefix_v = None
    if prefix is not None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx, cannot pick its prefix")
        prefix_k, prefix_v = prefix.layer(layer_idx)
        prefix.read.add(layer_idx)
        if prefix_k.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)

    q_len, k_len = query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None:
        total = k_len + (prefix_k.shape[-2] if prefix_k is not None else 0)
        if total > sliding_window:
            raise NotImplementedError(
                f"ptkernels attention does not implement sliding-window attention: window {sliding_window} < "
                f"{total} keys (prefix + sequence) in {type(module).__name__}"
            )

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and q_len > 1

    if attention_mask is not None and attention_mask.dim() == 4:
        out = _fallback_4d(query, key, value, prefix_k, prefix_v, attention_mask, dropout, scaling)
        return out, None

    packed = _packed_sequences(module, query, key, attention_mask, kwargs)
    if packed is not None:  # one row, N sequences: each sees its own tokens and the whole prefix
        cu_q, cu_k, max_q, max_k = packed
        if prefix_k is not None and prefix_k.dim() == 4:  # per example: the row's own
            prefix_k, prefix_v = prefix_k[0], prefix_v[0]
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        out = prefix_attention_varlen(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), prefix_k, prefix_v,
            cu_q, cu_k, max_q, max_k, causal=causal, scale=scaling, dropout_p=float(dropout), backend=backend,
        )  # (T, Hq, D)
        return out.unsqueeze(0), None

    key_padding_mask = None
    if attention_mask is not None:
        key_padding_mask = attention_mask[:, -k_len:]
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if key_padding_mask.device != query.device:
            key_padding_mask = key_padding_mask.to(query.device)

    out = prefix_attention(
        query, key, value, prefix_k, prefix_v,
        key_padding_mask=key_padding_mask,
        causal=causal,
        scale=scaling,
        dropout_p=float(dropout),
        backend=backend,
    )
    return out.transpose(1, 2), None


def ptkernels_attention_mask(*args, **kwargs):
    """The mask builder registered for "ptkernels": the 2D (B, Sk) padding mask, or None.

    Eagerly this is transformers' ``flash_attention_mask`` (which returns None when nothing is
    padded, so the kernel skips the mask loads). Under torch.compile its ``attention_mask.all()``
    test would be a data-dependent branch (a graph break), so the sliced mask is returned as is:
    the kernel gives the same result for an all-True mask.
    """
    from transformers.masking_utils import flash_attention_mask

    if not torch.compiler.is_compiling():
        return flash_attention_mask(*args, **kwargs)
    import inspect

    bound = inspect.signature(flash_attention_mask).bind(*args, **kwargs)
    attention_mask = bound.arguments.get("attention_mask")
    if attention_mask is None:
        return None
    return attention_mask[:, -bound.arguments["kv_length"]:]


_registered = False


def register() -> None:
    """Register the "ptkernels" attention function and 2D mask builder with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ptkernels_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ptkernels_attention_mask)
    _registered = True
