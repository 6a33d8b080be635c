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

Encoder-decoder models: ``patch`` tags each attention module with its role (``ROLE_ATTR``) and, in
T5-family models, with its relative position bias (``BIAS_ATTR``, a :class:`RelativeBias`), which
goes to ``prefix_attention`` as a (num_buckets, H) table and (2L - 1,) buckets instead of the dense
bias the model hands over.

Packed (padding-free) batches: a batch of one row holding several sequences, given either as the
flash-attention keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
``max_length_k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``; the patched PEFT
forward always passes them for a packed batch) or as ``position_ids`` that restart (the collator's
default, TRL's ``padding_free=True``), go through ``ptkernels.prefix_attention_varlen``: every
sequence attends to its own tokens plus the whole prefix, as if it were alone. Transformers' own
flash-attention path detects packing the same two ways.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import Tensor

from ..ops.prefix_attention import prefix_attention
from ..ops.prefix_attention.reference import example_prefix_lengths, select_prefix
from ..ops.prefix_attention_varlen import prefix_attention_varlen
from ..ops.prefix_attention.torch_path import join_prefix

ATTN_IMPLEMENTATION = "ptkernels"
PREFIX_KWARG = "ptkernels_prefix"
BACKEND_ATTR = "_ptkernels_backend"
# Encoder-decoder models: ``patch`` tags each attention module with its role. "encoder": an encoder
# self-attention (never reads a prefix); "cross": a decoder cross-attention (queries from the
# decoder, keys from the encoder), which reads ``LayerPrefix.cross``. Untagged: a (decoder)
# self-attention, which reads ``LayerPrefix.stacked``.
ROLE_ATTR = "_ptkernels_role"
# T5-family models: ``patch`` tags each attention module with what its ``position_bias`` keyword is
# (see :class:`RelativeBias`): a RelativeBias (the module's own or its stack's bucketed table, passed
# to ``prefix_attention`` as ``relative_bias_table`` / ``relative_bias_buckets``; the dense bias the
# model hands over is ignored) or ``NO_BIAS`` (a cross-attention, whose position_bias is zeros).
# Untagged modules that receive a position_bias raise.
BIAS_ATTR = "_ptkernels_relative_bias"
NO_BIAS = "none"

__all__ = ["ATTN_IMPLEMENTATION", "PREFIX_KWARG", "LayerPrefix", "RelativeBias", "ptkernels_attention_forward",
           "register", "use_prefix", "cu_seqlens_from_position_ids"]

# flash-attention's varlen keyword arguments, as transformers names them (TransformersKwargs)
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class LayerPrefix:
    """Every layer's prefix K/V for one forward, handed to a patched model as ``ptkernels_prefix=``.

    Arguments:
        prefix: the per-layer prefix keys and values, either stacked (layer l's key is
            ``[..., 2l, :, :, :]``, its value ``[..., 2l + 1, :, :, :]``):

            * (2L, Hkv, P, D): shared by the whole batch;
            * (B, 2L, Hkv, P, D): one prefix per example;
            * (A, 2L, Hkv, P, D) with ``index``: a bank of A prefixes, example b reads entry index[b];

            or as a list / tuple of L ``(key, value)`` pairs, each (Hkv, P, D), (B, Hkv, P, D) or
            (A, Hkv, P, D) (P-Tuning v2's ``past_key_values`` tuples, (2, B, Hkv, P, D) per layer,
            unpack the same way); they are stacked once here.
        index: (B,) integer tensor or None; with it ``prefix`` is a bank.
        lengths: integer tensor or None: (A,) with a bank, (B,) per example, (1,) shared; entry a
            has only its first lengths[a] prefix keys (the rest are masked), so prefixes of
            different P share one bank (pad them to the longest).
        dropout_p: P-Tuning v2's dropout on the prefix keys and values (per example, KV head,
            position and channel; ``prefix_attention(prefix_dropout_p=)``); applied only while the
            attention module is in training mode, like ``nn.Dropout``.
        cross: encoder-decoder models only: the decoder cross-attentions' prefix, laid out like
            ``prefix`` (a tensor of the same shape); layer l's cross-attention reads entries 2l and
            2l + 1 in front of the encoder's keys. None (default): cross-attention gets no prefix.
            Encoder self-attention never gets one (modules tagged by ``patch``, see ``ROLE_ATTR``).
        shapes: models whose layers differ in key geometry (Gemma 4) only: per layer l, None (the
            layer gets no prefix: its keys are wider than the prefix) or ``(source, kv_heads,
            head_dim)``: layer l reads layer ``source``'s entries (a KV-sharing layer reads the layer
            whose keys it reuses), cut to their first kv_heads heads and head_dim channels, as PEFT
            cuts its prefix for such models. Hkv and D of ``prefix`` are then the widest layer's.

    Hkv is the model's number of key/value heads, D its head dim, L its number of layers.

    ``read``: the layer indices whose (self-)attention has read its prefix in this forward, and
    ("cross", l) for cross-attention (the patched
    model checks after each forward that every layer did, so a model whose layers do not forward
    ``**kwargs`` to their attention raises instead of silently running without the prefix).
    """

    __slots__ = ("stacked", "index", "lengths", "dropout_p", "read", "cross", "shapes")

    def __init__(self, prefix, *, index: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                 dropout_p: float = 0.0, cross: Optional[Tensor] = None, shapes: Optional[list] = None) -> None:
        if isinstance(prefix, (list, tuple)):
            prefix = _stack_layers(prefix)
        if not isinstance(prefix, Tensor):
            raise TypeError(f"prefix must be a tensor or a list of (key, value) pairs, got {type(prefix).__name__}")
        if not prefix.is_floating_point():
            raise TypeError(f"prefix must be a floating-point tensor, got dtype {prefix.dtype}")
        for name, t in (("index", index), ("lengths", lengths)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{name} must be an integer tensor or None, got {type(t).__name__}")
        if prefix.dim() not in (4, 5):
            raise ValueError(
                "prefix must be (2L, Hkv, P, D) shared, (B, 2L, Hkv, P, D) per example or (A, 2L, Hkv, P, D) "
                f"bank, got {tuple(prefix.shape)}"
            )
        if prefix.shape[-4] % 2:
            raise ValueError(f"prefix must hold a key and a value per layer (2L entries in dim -4), got {tuple(prefix.shape)}")
        if index is not None and prefix.dim() != 5:
            raise ValueError(f"index needs a bank prefix (A, 2L, Hkv, P, D), got {tuple(prefix.shape)}")
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
        self.stacked = prefix
        self.index = index
        self.lengths = lengths
        if cross is not None and (not isinstance(cross, Tensor) or cross.shape != prefix.shape):
            raise ValueError(f"cross must be a tensor of the prefix's shape {tuple(prefix.shape)}, got "
                             f"{tuple(cross.shape) if isinstance(cross, Tensor) else type(cross).__name__}")
        self.dropout_p = float(dropout_p)
        self.cross = cross
        if shapes is not None and len(shapes) != self.num_layers:
            raise ValueError(f"shapes must give one entry per layer ({self.num_layers}), got {len(shapes)}")
        for layer, shape in enumerate(shapes or ()):
            if shape is not None and (len(shape) != 3 or not 0 <= shape[0] < self.num_layers):
                raise ValueError(f"shapes[{layer}] must be None or (source layer in [0, {self.num_layers}), kv_heads, "
                                 f"head_dim), got {shape!r}")
        self.shapes = shapes
        self.read: set = set()

    def unread_layers(self) -> list:
        """The layers that have not read their prefix (self-attention: ints in ascending order, then
        ("cross", l) for cross-attention when there is a cross prefix)."""
        want = set(range(self.num_layers))
        if self.shapes is not None:
            want = {l for l in want if self.shapes[l] is not None}
        if self.cross is not None:
            want |= {("cross", l) for l in range(self.num_layers)}
        return sorted(want - self.read, key=lambda x: (isinstance(x, tuple), x if isinstance(x, int) else x[1]))

    @property
    def num_layers(self) -> int:
        return self.stacked.shape[-4] // 2

    def layer(self, layer_idx: int, *, cross: bool = False) -> Optional[tuple[Tensor, Tensor]]:
        """(prefix_k, prefix_v) of one layer's self-attention (or cross-attention with ``cross``):
        (Hkv, P, D) each, or (B | A, Hkv, P, D); None for a layer that gets no prefix (``shapes``)."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"the prefix has {self.num_layers} layers, attention asked for layer {layer_idx}")
        stacked = self.cross if cross else self.stacked
        source, kv_heads, head_dim = layer_idx, None, None
        if self.shapes is not None and not cross:
            if self.shapes[layer_idx] is None:
                return None
            source, kv_heads, head_dim = self.shapes[layer_idx]
        if stacked.dim() == 4:
            pair = stacked[2 * source], stacked[2 * source + 1]
        else:
            pair = stacked[:, 2 * source], stacked[:, 2 * source + 1]
        if kv_heads is not None:  # the layer's own geometry: PEFT's cut of the widest layer's prefix
            pair = tuple(t[..., :kv_heads, :, :head_dim] for t in pair)
        return pair

    def fresh(self) -> "LayerPrefix":
        """The same prefix with an empty ``read`` record (one per forward)."""
        return LayerPrefix(self.stacked, index=self.index, lengths=self.lengths, dropout_p=self.dropout_p,
                           cross=self.cross, shapes=self.shapes)


def _stack_layers(pairs) -> Tensor:
    """L (key, value) pairs, each (..., Hkv, P, D) -> (..., 2L, Hkv, P, D)."""
    flat = []
    for layer, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"prefix layer {layer} must be a (key, value) pair, got {len(pair)} tensors")
        key, value = pair[0], pair[1]
        if not isinstance(key, Tensor) or not isinstance(value, Tensor):
            raise TypeError(f"prefix layer {layer} must be a pair of tensors, got {type(key).__name__} and "
                            f"{type(value).__name__}")
        if key.shape != value.shape or key.dim() not in (3, 4):
            raise ValueError(
                f"prefix layer {layer}: key and value must both be (Hkv, P, D) or (B | A, Hkv, P, D), got "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        flat += [key, value]
    if not flat:
        raise ValueError("prefix is an empty list of layers")
    shapes = {tuple(t.shape) for t in flat}
    if len(shapes) != 1:
        raise ValueError(f"every layer's prefix key and value must have the same shape, got {sorted(shapes)}")
    return torch.stack(flat, dim=flat[0].dim() - 3)


class RelativeBias:
    """T5's relative position bias of one attention module, in the form ``prefix_attention`` takes it
    (``relative_bias_table`` / ``relative_bias_buckets``) instead of the dense (1, H, Sq, Sk)
    ``position_bias`` the model computes.

    Arguments:
        owner: the attention module holding the table (``owner.relative_attention_bias``, an
            ``nn.Embedding`` (num_buckets, H)) and the bucketing (``owner._relative_position_bucket``):
            for T5 / mT5 the stack's first self-attention, whose bias every layer of the stack reuses;
            for UMT5 the module itself (a table per layer).
        bidirectional: T5's ``not owner.is_decoder``: keys after the query get buckets of their own
            (encoder); a causal decoder puts them all in bucket 0.

    Positions are PEFT's cache convention (``prefix_attention``'s): the prefix keys at 0 .. P-1, real key
    j at P + j, query i at P + Sk - Sq + i, which is what T5's ``compute_bias`` gives when PEFT puts
    P prefix keys in the cache (past_seen_tokens = P). Between real tokens the prefix cancels out.
    """

    __slots__ = ("owner", "bidirectional", "num_buckets", "max_distance", "__weakref__")

    def __init__(self, owner: torch.nn.Module, *, bidirectional: bool) -> None:
        self.owner = owner
        self.bidirectional = bool(bidirectional)
        self.num_buckets = int(owner.relative_attention_num_buckets)
        self.max_distance = int(owner.relative_attention_max_distance)

    def table(self) -> Tensor:
        """(num_buckets, H): the owner's embedding weight itself (its gradient flows back to it)."""
        return self.owner.relative_attention_bias.weight

    def buckets(self, min_length: int, device) -> Tensor:
        """(2L - 1,) int32 on ``device``, L the smallest power of two >= max(min_length, 64): entry
        r + L - 1 is the bucket of relative position r = key position - query position, computed by
        the owner's own ``_relative_position_bucket`` on ``arange(-(L - 1), L)``. Cached per bucketing
        function, settings, L and device, so one tensor serves every layer and call (and the op's
        value check of it, a host read, runs once)."""
        length = max(64, 1 << max(0, int(min_length) - 1).bit_length())
        fn = getattr(type(self.owner), "_relative_position_bucket")
        device = torch.device(device)
        key = (fn, self.bidirectional, self.num_buckets, self.max_distance, length, device)
        cached = _BUCKETS.get(key)
        if cached is not None:
            return cached
        bucket = self.owner._relative_position_bucket
        # built as a normal tensor even inside inference_mode (the kernels may save it for backward)
        with torch.inference_mode(False), torch.no_grad():
            rel = torch.arange(-(length - 1), length, device=device)
            if "bidirectional" in inspect.signature(bucket).parameters:  # T5: a static method
                out = bucket(rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                             max_distance=self.max_distance)
            else:  # UMT5: reads the owner's own settings (is_decoder, num_buckets, max_distance)
                out = bucket(rel)
            out = out.to(torch.int32)
        if len(_BUCKETS) >= 32:
            _BUCKETS.pop(next(iter(_BUCKETS)))
        _BUCKETS[key] = out
        return out

    def __repr__(self) -> str:
        return (f"RelativeBias({type(self.owner).__name__}, bidirectional={self.bidirectional}, "
                f"num_buckets={self.num_buckets}, max_distance={self.max_distance})")


# (bucketing function, bidirectional, num_buckets, max_distance, L, device) -> (2L - 1,) int32 buckets
_BUCKETS: dict = {}

_UNSUPPORTED_KWARGS = ("position_bias",)


def _fallback_4d(query, key, value, prefix_k, prefix_v, mask, dropout, scaling, prefix_index=None,
                 prefix_lengths=None, prefix_dropout_p=0.0):
    """A 4D mask (user-supplied, or from a compileable cache) cannot go through the 2D-mask op:
    SDPA over the joined keys [prefix; real] (the fast path's join), the prefix visible up to each
    example's length (a bank entry read through prefix_index)."""
    if prefix_dropout_p:
        raise NotImplementedError("ptkernels attention: prefix dropout with a 4D attention mask is not supported")
    if prefix_k is not None:
        prefix_k, prefix_v = select_prefix(prefix_k, prefix_index), select_prefix(prefix_v, prefix_index)
        batch, prefix_len = query.shape[0], prefix_k.shape[-2]
        key, value = join_prefix(prefix_k, key), join_prefix(prefix_v, value)
        visible = torch.ones(batch, prefix_len, dtype=torch.bool, device=mask.device)
        lengths = example_prefix_lengths(batch, prefix_index, prefix_lengths)
        if lengths is not None:
            visible = torch.arange(prefix_len, device=mask.device) < lengths.to(mask.device)[:, None]
        visible = visible[:, None, None, :].expand(mask.shape[0], mask.shape[1], mask.shape[2], prefix_len)
        if mask.dtype != torch.bool:
            visible = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(
                ~visible, torch.finfo(mask.dtype).min)
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
    comes from the ``ptkernels_prefix`` kwarg (a :class:`LayerPrefix`: shared, per example, or a
    bank with per-example indices and per-entry lengths, passed on to ``prefix_attention``); it is
    always visible (up to its length) and never in the cache. Its dropout applies only while
    ``module.training``.

    Encoder-decoder models (modules tagged by ``patch``): an encoder self-attention reads no prefix,
    a cross-attention reads ``LayerPrefix.cross`` (if any), a decoder self-attention is causal. T5
    family: the dense ``position_bias`` keyword (1, H, Sq, Sk) the model computes is ignored and the
    module's :class:`RelativeBias` (``BIAS_ATTR``) goes to ``prefix_attention`` as the table and the
    buckets, with PEFT's cache positions for the prefix; a cross-attention (``NO_BIAS``) gets none.
    Untagged modules given a ``position_bias`` raise NotImplementedError, as do a relative bias with
    a 4D mask or with packed sequences.
    """
    bias_tag = getattr(module, BIAS_ATTR, None)  # T5 family: what its position_bias stands for
    if bias_tag is None:
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"ptkernels attention does not support {name!r} (model {type(module).__name__})")
    relative = bias_tag if isinstance(bias_tag, RelativeBias) else None

    softcap = kwargs.get("softcap")  # Gemma 2 / VaultGemma's attn_logit_softcapping
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))  # gpt-oss: per-head sink logits (Hq,)
    prefix: Optional[LayerPrefix] = kwargs.get(PREFIX_KWARG)
    if prefix is not None and not isinstance(prefix, LayerPrefix):
        raise TypeError(f"{PREFIX_KWARG} must be a ptkernels.LayerPrefix, got {type(prefix).__name__} (wrap the "
                        "per-layer prefix tensor: ptkernels.LayerPrefix(prefix))")
    if kwargs.get("output_attentions"):  # (never a silent difference: eager would return them)
        raise ValueError(f"ptkernels attention ({type(module).__name__}) does not compute attention weights "
                         "(output_attentions=True): pass output_attentions=False, or unpatch the model for them")
    backend = getattr(module, BACKEND_ATTR, "auto")
    prefix_k = prefix_v = None
    bank = dict(prefix_index=None, prefix_lengths=None, prefix_dropout_p=0.0)
    role = getattr(module, ROLE_ATTR, None)
    if role == "encoder" or (role == "cross" and prefix is not None and prefix.cross is None):
        prefix = None  # an encoder's self-attention, or a cross-attention without a cross prefix
    if prefix is not None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx, cannot pick its prefix")
        pair = prefix.layer(layer_idx, cross=role == "cross")
        prefix.read.add(("cross", layer_idx) if role == "cross" else layer_idx)
        prefix_k, prefix_v = pair if pair is not None else (None, None)
    if prefix_k is not None:
        if prefix_k.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
        bank = dict(
            prefix_index=None if prefix.index is None else prefix.index.to(query.device),
            prefix_lengths=None if prefix.lengths is None else prefix.lengths.to(query.device),
            prefix_dropout_p=prefix.dropout_p if module.training else 0.0,
        )

    q_len, k_len = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if role == "self":
        # an encoder-decoder model's decoder self-attention is causal (transformers builds its mask with
        # create_causal_mask) whatever the module says: UMT5 on transformers 5.17 leaves is_causal False
        # and relies on the 4D mask, which the 2D padding mask handed over here does not carry
        causal = True
    # A sliding window (Mistral, Gemma 2/3, gpt-oss, ... layers): transformers' causal window, the
    # prefix at the cache positions before the real keys, as in PEFT's cache, so it slides out.
    window = kwargs.get("sliding_window")
    total = k_len + (prefix_k.shape[-2] if prefix_k is not None else 0)
    if window is not None and total <= window:
        window = None  # everything is inside it: no mask arithmetic
    if window is not None and not causal:
        raise NotImplementedError(f"ptkernels attention: a sliding window in a non-causal attention "
                                  f"({type(module).__name__})")
    causal = causal and (q_len > 1 or window is not None)

    if (softcap is not None or sinks is not None or window is not None) and attention_mask is not None \
            and attention_mask.dim() == 4:
        raise NotImplementedError(f"ptkernels attention: logit softcapping / attention sinks / a sliding window "
                                  f"narrower than the keys with a 4D mask are not supported ({type(module).__name__})")
    if relative is not None and attention_mask is not None and attention_mask.dim() == 4:
        raise NotImplementedError(f"ptkernels attention: T5's relative position bias with a 4D attention mask is not "
                                  f"supported ({type(module).__name__}); pass a 2D (B, S) padding mask")
    if attention_mask is not None and attention_mask.dim() == 4:
        out = _fallback_4d(query, key, value, prefix_k, prefix_v, attention_mask, dropout, scaling, **bank)
        return out, None

    packed = _packed_sequences(module, query, key, attention_mask, kwargs)
    if packed is not None:  # one row, N sequences: each sees its own tokens and the whole prefix
        if relative is not None:
            raise NotImplementedError(f"ptkernels attention: T5's relative position bias with packed sequences is not "
                                      f"supported ({type(module).__name__})")
        if softcap is not None or sinks is not None or window is not None:
            raise NotImplementedError(f"ptkernels attention: logit softcapping / attention sinks / a sliding window "
                                      f"narrower than the keys with packed sequences are not supported "
                                      f"({type(module).__name__})")
        cu_q, cu_k, max_q, max_k = packed
        prefix_lengths = None
        if prefix_k is not None and prefix_k.dim() == 4:  # per example or a bank: the row's own entry
            entry = 0 if bank["prefix_index"] is None else int(bank["prefix_index"][0])
            prefix_k, prefix_v = prefix_k[entry], prefix_v[entry]
            if bank["prefix_lengths"] is not None:
                prefix_lengths = bank["prefix_lengths"][entry:entry + 1]
        elif bank["prefix_lengths"] is not None:
            prefix_lengths = bank["prefix_lengths"]
        causal = role == "self" or bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        out = prefix_attention_varlen(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), prefix_k, prefix_v,
            cu_q, cu_k, max_q, max_k, causal=causal, scale=scaling, dropout_p=float(dropout),
            prefix_lengths=None if prefix_k is None else prefix_lengths,
            prefix_dropout_p=bank["prefix_dropout_p"], backend=backend,
        )  # (T, Hq, D); each packed sequence draws its own prefix dropout, as if it were alone
        return out.unsqueeze(0), None

    key_padding_mask = None
    if attention_mask is not None:
        key_padding_mask = attention_mask[:, -k_len:]
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if key_padding_mask.device != query.device:
            key_padding_mask = key_padding_mask.to(query.device)

    relative_bias = {}
    if relative is not None:  # the table and the buckets instead of the dense (1, H, Sq, Sk) position_bias
        table = relative.table()
        relative_bias = dict(relative_bias_table=table if table.dtype == query.dtype else table.to(query.dtype),
                             relative_bias_buckets=relative.buckets(total, query.device))

    out = prefix_attention(
        query, key, value, prefix_k, prefix_v,
        key_padding_mask=key_padding_mask,
        causal=causal,
        scale=scaling,
        dropout_p=float(dropout),
        softcap=None if softcap is None else float(softcap),
        sinks=sinks,
        window=None if window is None else int(window),
        backend=backend,
        **bank,
        **relative_bias,
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


def check_every_layer_read_the_prefix(hf_model: torch.nn.Module, args, kwargs, output) -> None:
    """Forward hook (``with_kwargs=True``) of a model that receives ``ptkernels_prefix``: never a
    silent difference. If some layer did not read its prefix (its decoder layer does not forward
    ``**kwargs`` to the attention), raise."""
    prefix = kwargs.get(PREFIX_KWARG)
    if isinstance(prefix, LayerPrefix) and prefix.unread_layers():
        read = sorted(layer for layer in prefix.read if isinstance(layer, int))
        raise RuntimeError(
            f"ptkernels: the prefix did not reach the attention of layers {prefix.unread_layers()} of "
            f"{type(hf_model).__name__} (model_type {hf_model.config.model_type!r}; layers that read it: {read}). "
            "Either its layers do not forward **kwargs to their attention, so this model cannot be prefix-tuned "
            f"through ptkernels.patch, or the prefix does not fit the model: it has {prefix.num_layers} layers"
            f"{' and a cross prefix' if prefix.cross is not None else ''}, where every layer must be one the model "
            "runs (and a cross prefix needs cross-attention)"
        )


@contextlib.contextmanager
def use_prefix(model: torch.nn.Module, prefix, *, index: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
               dropout_p: float = 0.0):
    """Context manager: every forward of ``model`` (a Hugging Face model patched with
    ``ptkernels.patch``) inside the block attends to the given per-layer prefix, as if it were
    ``past_key_values`` of P tokens that every query sees, without a cache, a concatenation or a
    (B, P + S) mask. ``generate()`` works too (the prefix is not in the cache).

    Equivalent to passing ``ptkernels_prefix=ptkernels.LayerPrefix(prefix, index=..., lengths=...,
    dropout_p=...)`` to each ``model(...)`` call, which is the stateless form (use it inside your
    own ``forward``; gradient checkpointing keeps working with either).

    Arguments (shapes: L layers, Hkv key/value heads, P prefix tokens, D head dim, B batch, A bank):
        model: a transformers ``PreTrainedModel`` after ``ptkernels.patch(model)``.
        prefix: (2L, Hkv, P, D) shared by the batch; (B, 2L, Hkv, P, D) per example;
            (A, 2L, Hkv, P, D) a bank with ``index``; or a list of L (key, value) pairs of
            (Hkv, P, D) / (B, Hkv, P, D) / (A, Hkv, P, D). Layer l's key is entry 2l, its value 2l + 1.
            Gradients flow to it (a shared prefix or bank entry gets the sum over its examples).
        index: (B,) integer tensor: example b reads bank entry index[b].
        lengths: (A,) with a bank, (B,) per example, (1,) shared: only the first lengths[a] prefix
            keys of entry a are attended.
        dropout_p: dropout on the prefix keys and values, per example (P-Tuning v2's recipe),
            applied only while the model is in training mode.

    Positions: the prefix is not a cache, so the model numbers the real tokens from 0. To
    reproduce a model that fed its prefix as ``past_key_values`` (which counts it as P past
    tokens), pass ``position_ids`` shifted by P (see examples/ptuning_v2/).
    """
    if isinstance(prefix, LayerPrefix):
        given = [name for name, value in (("index", index), ("lengths", lengths)) if value is not None]
        given += ["dropout_p"] if dropout_p != 0.0 else []
        if given:
            raise ValueError(f"use_prefix: {', '.join(given)} given beside a LayerPrefix, which holds its own; pass them "
                             "to LayerPrefix instead")
        layer_prefix = prefix
    else:
        layer_prefix = LayerPrefix(prefix, index=index, lengths=lengths, dropout_p=dropout_p)
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"ptkernels.use_prefix needs a model patched with ptkernels.patch(model) (its attention implementation is "
            f"{getattr(config, '_attn_implementation', None)!r}, not {ATTN_IMPLEMENTATION!r})"
        )

    def add_prefix(module, args, kwargs):
        if kwargs.get(PREFIX_KWARG) is not None:
            raise ValueError(f"{PREFIX_KWARG} given both to the forward call and through ptkernels.use_prefix")
        kwargs[PREFIX_KWARG] = layer_prefix.fresh()
        return args, kwargs

    pre = model.register_forward_pre_hook(add_prefix, with_kwargs=True)
    post = model.register_forward_hook(check_every_layer_read_the_prefix, with_kwargs=True)
    try:
        yield model
    finally:
        pre.remove()
        post.remove()
