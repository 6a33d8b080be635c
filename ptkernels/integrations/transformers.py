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
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.prefix_attention import prefix_attention
from ..ops.prefix_attention.torch_path import join_prefix

ATTN_IMPLEMENTATION = "ptkernels"
PREFIX_KWARG = "ptkernels_prefix"
BACKEND_ATTR = "_ptkernels_backend"

__all__ = ["ATTN_IMPLEMENTATION", "PREFIX_KWARG", "LayerPrefix", "ptkernels_attention_forward", "register"]


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
