"""Which Hugging Face models ``ptkernels.patch`` can run: decided by capability, not by a list.

A model is supported when what the patched path relies on is there:

* **one self-attention module per layer that calls transformers' attention interface** (it looks
  up ``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``) and **forwards ``**kwargs``**
  into that call, so the per-layer prefix arrives as the ``ptkernels_prefix`` keyword. The
  decoder layers must forward ``**kwargs`` to their attention too; that is checked at every
  forward (:class:`~ptkernels.integrations.transformers.LayerPrefix` records which layers read
  the prefix, and a forward where one did not raises), because it cannot be read reliably from
  source;
* **positions computed one of the known ways** (see :class:`ModelSupport.positions`), so that
  prefix tuning's shifted positions are exactly PEFT's;
* **attention maths the kernels have** (logit softcapping and attention sinks included): no ALiBi,
  keys and values of one head size shared by every layer (one stacked prefix tensor), no latent
  (MLA) attention, no linear-attention / state-space layers.

Encoder-decoder models (:func:`check_seq2seq_model`): every decoder layer has a self-attention and
a cross-attention module that call the attention interface with ``**kwargs``, in one of two layouts:

* BART family (BART, mBART, Marian, Pegasus): ``decoder.layers[l].self_attn`` / ``.encoder_attn``,
  and the decoder's position embedding takes ``position_ids`` (so that PEFT's shift of the decoder
  positions by P can be reproduced);
* T5 family (T5, mT5, UMT5): ``block[l].layer[0].SelfAttention`` in both stacks and
  ``decoder.block[l].layer[1].EncDecAttention``, positions given by T5's bucketed relative position
  bias (no position embedding), which ptkernels' attention takes as the table and the buckets
  (:func:`seq2seq_relative_biases`): each self-attention has a table of its own (UMT5) or reuses the
  one of its stack's first layer (T5, mT5: the stack hands layer 0's bias to the other layers), and
  cross-attention has none; both stacks build their masks through transformers' mask functions.
  Anything else with a relative bias (LongT5's local / transient-global encoder attention,
  SwitchTransformers' hand-built encoder mask, a relative bias in another layout) is refused.

Anything else is refused at patch time with :class:`UnsupportedModelError` (a ``ValueError``)
naming the model type and the missing capability. The word embedding needs nothing: a plain
``nn.Embedding`` goes through the fused ``prompt_embedding`` gather, any other module (Gemma's or
BioGPT's scaled embedding) is called as the model calls it and the prompt is concatenated.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Optional

from torch import nn

__all__ = ["ModelSupport", "UnsupportedModelError", "check_model", "check_seq2seq_model", "seq2seq_roles",
           "per_layer_kv_geometry", "check_virtual_tokens",
           "seq2seq_relative_biases", "decoder_attention_pairs", "attention_modules", "text_config"]


class UnsupportedModelError(ValueError):
    """``patch`` cannot run this model exactly; the message names the model type and the reason."""


@dataclasses.dataclass(frozen=True)
class ModelSupport:
    """What ``patch`` found out about a model.

    positions: how the model derives positions when it is given no ``position_ids``, which is what
        PEFT's prefix shifts: "arange" (``arange(S)`` + past length: GPT-2, Llama and most decoders,
        BERT), "roberta" (RoBERTa's padding-aware ``create_position_ids_from_input_ids``), or
        "cumsum" (the attention mask's cumulative sum: OPT); for encoder-decoder models "arange" (the
        BART family's decoder position embedding) or "relative" (T5's relative position bias: no
        positions to shift, the bias places the prefix at PEFT's cache positions).
    """

    model_type: str
    positions: str


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_modules(hf_model: nn.Module) -> list[nn.Module]:
    """The self-attention modules that carry a ``layer_idx`` (one per layer in a supported model)."""
    mods = []
    for m in hf_model.modules():
        name = type(m).__name__
        if (name.endswith("Attention") and "Cross" not in name and hasattr(m, "layer_idx")
                and not getattr(m, "is_cross_attention", False)):
            mods.append(m)
    return mods


@functools.lru_cache(maxsize=None)
def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


# The attention call of transformers' generated modeling code:
#   attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)
#   attn_output, attn_weights = attention_interface(self, query_states, ..., **kwargs)
_INTERFACE_LOOKUP = re.compile(r"ALL_ATTENTION_FUNCTIONS|_attn_implementation")


def _interface_call_forwards_kwargs(source: str) -> bool:
    """True when some call of ``attention_interface(...)`` passes ``**kwargs`` (balanced parentheses)."""
    for match in re.finditer(r"attention_interface\(", source):
        depth, i = 1, match.end()
        while i < len(source) and depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        if "**kwargs" in source[match.end():i]:
            return True
    return False


def _refuse(model_type: str, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"ptkernels.patch does not support model_type {model_type!r}: {reason}")


def _if_block(source: str, condition: str) -> Optional[str]:
    """The body of the first ``if <condition>:`` in ``source`` (the lines indented below it)."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"if {condition}"):
            indent = len(line) - len(line.lstrip())
            body = []
            for follow in lines[i + 1:]:
                if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                    break
                body.append(follow)
            return "\n".join(body)
    return None


def _positions_convention(hf_model: nn.Module) -> str:
    """How the model fills in missing ``position_ids``: read from the first module (outermost
    first, embeddings tables excluded) whose forward has an ``if position_ids is None:`` branch,
    which is the one that runs."""
    for module in hf_model.modules():
        if isinstance(module, nn.Embedding):
            continue
        block = _if_block(_source(type(module).forward), "position_ids is None")
        if block is None:
            continue
        if "create_position_ids_from_input_ids" in block:
            return "roberta"
        if "cumsum" in block:
            return "cumsum"
        return "arange"
    return "arange"


def check_model(hf_model: nn.Module, *, prefix_tuning: bool) -> ModelSupport:
    """What ``patch`` needs from ``hf_model`` (a transformers ``PreTrainedModel``), or
    :class:`UnsupportedModelError` naming the model type and the first missing capability.

    ``prefix_tuning``: the prefix must reach every layer (prompt tuning / P-tuning only feed input
    embeddings, and a plain patched model only needs the attention interface)."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(
            f"ptkernels.patch expects a transformers PreTrainedModel or a PEFT PeftModel, got {type(hf_model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        return check_seq2seq_model(hf_model)
    if getattr(config, "add_cross_attention", False):
        raise _refuse(model_type, f"decoder-only models with cross-attention ({type(hf_model).__name__}) are not "
                                  "supported yet")
    cfg = text_config(config)

    mods = attention_modules(hf_model)
    layers = getattr(cfg, "num_hidden_layers", None)
    idx = sorted({getattr(m, "layer_idx", None) for m in mods} - {None})
    if not mods:
        raise _refuse(model_type, f"found no self-attention module with a layer_idx in {type(hf_model).__name__} "
                                  "(its attention does not go through transformers' attention interface, or its layers are not "
                                  "attention layers)")
    if layers is not None and idx == list(range(len(idx))) and len(idx) > layers:
        raise _refuse(model_type, f"found {len(idx)} attention layers (layer_idx 0 .. {len(idx) - 1}) but its config "
                                  f"counts {layers} (num_hidden_layers): a stack whose layer count lives elsewhere "
                                  "(e.g. an encoder-decoder's decoder used alone) is not supported")
    if layers is None or idx != list(range(layers)):
        raise _refuse(model_type, f"found self-attention (layer_idx {idx}) in only some of its {layers} layers: "
                                  "hybrid models with linear-attention or state-space layers are not supported")
    _check_attention_calls(model_type, mods)

    # attention maths the kernels do not have (yet)
    # (logit softcapping and attention sinks are: the attention function passes softcap / s_aux on)
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", None) == "alibi":
        raise _refuse(model_type, "ALiBi position biases are not implemented in ptkernels' attention")
    if getattr(cfg, "kv_lora_rank", None) is not None and getattr(cfg, "qk_rope_head_dim", None) is not None:
        raise _refuse(model_type, "multi-head latent attention (keys and values of different head sizes) is not "
                                  "supported")
    per_layer_kv_geometry(hf_model)  # per-layer head sizes (Gemma 4): refused here if they cannot be read

    positions = _positions_convention(hf_model)
    if prefix_tuning and "position_ids" not in inspect.signature(hf_model.forward).parameters:
        raise _refuse(model_type, f"{type(hf_model).__name__}.forward takes no position_ids, so prefix tuning's "
                                  "shifted positions cannot be given to it")
    return ModelSupport(model_type, positions)


def _check_attention_calls(model_type: str, mods) -> None:
    """Refuse unless every attention module calls transformers' attention interface and forwards
    **kwargs into it (the prefix travels as a keyword)."""
    for m in mods:
        source = _source(type(m).forward)
        if not _INTERFACE_LOOKUP.search(source) or "attention_interface" not in source:
            raise _refuse(model_type, f"{type(m).__name__} does not call transformers' attention interface "
                                      "(ALL_ATTENTION_FUNCTIONS)")
        params = inspect.signature(type(m).forward).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) or not _interface_call_forwards_kwargs(source):
            raise _refuse(model_type, f"{type(m).__name__} does not forward **kwargs to the attention function, "
                                      "so the prefix cannot reach it")


def per_layer_kv_geometry(hf_model: nn.Module) -> Optional[list]:
    """None when every self-attention layer has one key geometry; else, per layer l (Gemma 4: head
    size and KV heads differ between sliding and global layers, and the last layers may reuse an
    earlier layer's keys), ``(source, kv_heads, head_dim)``: the layer whose keys (and so whose prefix)
    it attends to (itself, or for a KV-sharing layer the last earlier "store" layer of its layer type,
    as transformers' Gemma 4 shares them), and that layer's KV heads and head size. Refuses a model
    whose layers differ in a way it cannot read."""
    mods = {m.layer_idx: m for m in attention_modules(hf_model)}
    model_type = hf_model.config.model_type

    def own(m):
        k_proj = getattr(m, "k_proj", None)
        head_dim = getattr(m, "head_dim", None)
        if k_proj is None or not head_dim or k_proj.out_features % head_dim:
            return None
        return k_proj.out_features // head_dim, head_dim

    geometry = {own(m) for m in mods.values() if not getattr(m, "is_kv_shared_layer", False)}
    shared = [l for l, m in mods.items() if getattr(m, "is_kv_shared_layer", False)]
    if len(geometry) == 1 and not shared:  # one geometry (also when it is not readable, e.g. BERT's names)
        return None
    if None in geometry:
        raise _refuse(model_type, "head size or key width differ between layers and some layer's key geometry "
                                  "(k_proj, head_dim) cannot be read")
    out = []
    for l in sorted(mods):
        source = l
        if getattr(mods[l], "is_kv_shared_layer", False):
            layer_type = getattr(mods[l], "layer_type", None)
            stores = [j for j in range(l) if getattr(mods[j], "store_full_length_kv", False)
                      and getattr(mods[j], "layer_type", None) == layer_type]
            if not stores:
                raise _refuse(model_type, f"layer {l} reuses another layer's keys, but no earlier layer of its type "
                                          f"{layer_type!r} stores them")
            source = stores[-1]
        out.append((source,) + own(mods[source]))
    return out


def check_virtual_tokens(hf_model: nn.Module) -> None:
    """Prompt tuning / P-tuning feed virtual tokens as input embeddings; refuse a model that needs the
    token ids behind its input embeddings (Gemma 3n / 4 compute per-layer inputs from input_ids and
    reverse inputs_embeds to find them, so virtual tokens raise there, with or without ptkernels)."""
    cfg = text_config(hf_model.config)
    if getattr(cfg, "hidden_size_per_layer_input", None):
        raise _refuse(cfg.model_type, "per-layer input embeddings are computed from the token ids, which virtual "
                                      "tokens do not have (prompt tuning / P-tuning)")


def decoder_attention_pairs(decoder: nn.Module) -> Optional[list]:
    """[(self-attention, cross-attention or None)] per decoder layer, in the BART layout
    (``decoder.layers[l].self_attn`` / ``.encoder_attn``) or the T5 layout
    (``decoder.block[l].layer[0].SelfAttention`` / ``.layer[1].EncDecAttention``); None when the
    decoder has neither ``.layers`` nor ``.block``."""
    layers = getattr(decoder, "layers", None)
    if layers is not None:
        return [(getattr(layer, "self_attn", None), getattr(layer, "encoder_attn", None)) for layer in layers]
    blocks = getattr(decoder, "block", None)
    if blocks is None:
        return None
    pairs = []
    for block in blocks:
        sub = list(getattr(block, "layer", ()))
        self_attn = getattr(sub[0], "SelfAttention", None) if sub else None
        cross = getattr(sub[1], "EncDecAttention", None) if len(sub) > 1 else None
        pairs.append((self_attn, cross))
    return pairs


def _is_t5_layout(hf_model: nn.Module) -> bool:
    return getattr(hf_model.get_decoder(), "block", None) is not None


def seq2seq_roles(hf_model: nn.Module) -> dict:
    """{attention module: "encoder" | "self" | "cross"} of an encoder-decoder model: the encoder's
    attention modules, and per decoder layer its self-attention and its cross-attention (whose keys
    come from the encoder), in either layout of :func:`decoder_attention_pairs`."""
    roles = {}
    for m in attention_modules(hf_model.get_encoder()):
        roles[m] = "encoder"
    for self_attn, cross in decoder_attention_pairs(hf_model.get_decoder()) or ():
        for m, role in ((self_attn, "self"), (cross, "cross")):
            if m is not None:
                roles[m] = role
    return roles


# The stack's forward hands the first layer's position bias to the next layers (T5Stack:
# ``position_bias = self_attention_position_bias``; older code: ``position_bias = layer_outputs[1]``).
_SHARES_BIAS = re.compile(r"^\s*position_bias\s*=\s*(?!None\b)\S", re.MULTILINE)
# An additive 4D mask built by hand in the stack (SwitchTransformers' encoder:
# ``mask[:, None, None, :]``, ``(1.0 - mask) * torch.finfo(dtype).min``).
_HAND_BUILT_MASK = re.compile(r"\[:,\s*None,\s*None,\s*:\]|finfo\(")


def seq2seq_relative_biases(hf_model: nn.Module) -> dict:
    """{attention module: RelativeBias | NO_BIAS} of a T5-family model (see
    :class:`~ptkernels.integrations.transformers.RelativeBias`): every self-attention of the encoder
    and the decoder gets its bias (its own table, or, when the stack passes layer 0's bias on to the
    other layers, layer 0's), every decoder cross-attention ``NO_BIAS`` (T5 hands it zeros).

    Raises :class:`UnsupportedModelError` where the layout is not T5's: a stack that builds its 4D
    attention mask by hand (SwitchTransformers' encoder) rather than through transformers' mask
    functions (which give ptkernels the 2D padding mask), an encoder or decoder block
    whose first sub-layer has no ``SelfAttention`` (LongT5's local / transient-global attention), a
    self-attention without a table of its own in a stack that does not share layer 0's, a
    cross-attention with a relative bias, or a table that is not an (num_buckets, heads) embedding."""
    from .transformers import NO_BIAS, RelativeBias

    model_type = hf_model.config.model_type
    biases = {}
    for name, stack in (("encoder", hf_model.get_encoder()), ("decoder", hf_model.get_decoder())):
        blocks = getattr(stack, "block", None)
        if not blocks:
            raise _refuse(model_type, f"the {name} {type(stack).__name__} has no .block of T5 blocks")
        source = _source(type(stack).forward)
        if "create_causal_mask" not in source and "create_bidirectional_mask" not in source \
                or _HAND_BUILT_MASK.search(source):
            raise _refuse(model_type, f"the {name} {type(stack).__name__} builds its 4D attention mask by hand, not "
                                      "through transformers' mask functions (create_causal_mask / "
                                      "create_bidirectional_mask), and ptkernels' attention takes a relative position "
                                      "bias only with the 2D padding mask those give it")
        shares = bool(_SHARES_BIAS.search(source))
        first = None
        for idx, block in enumerate(blocks):
            sub = list(getattr(block, "layer", ()))
            attn = getattr(sub[0], "SelfAttention", None) if sub else None
            if attn is None:
                kind = type(sub[0]).__name__ if sub else type(block).__name__
                raise _refuse(model_type, f"the {name}'s block {idx} attends with {kind}, not a T5 self-attention "
                                          "(SelfAttention): local / transient-global attention (LongT5) is not in "
                                          "ptkernels' attention")
            if idx == 0:
                first = attn
            if getattr(attn, "has_relative_attention_bias", False):
                owner = attn
            elif shares and getattr(first, "has_relative_attention_bias", False):
                owner = first
            else:
                raise _refuse(model_type, f"the {name}'s self-attention in block {idx} ({type(attn).__name__}) has no "
                                          "relative position bias table of its own and its stack does not pass on "
                                          "layer 0's, so its bias cannot be given to ptkernels' attention")
            table = getattr(getattr(owner, "relative_attention_bias", None), "weight", None)
            heads = getattr(attn, "n_heads", None)
            if (table is None or table.dim() != 2 or table.shape[1] != heads
                    or not callable(getattr(owner, "_relative_position_bucket", None))
                    or getattr(owner, "relative_attention_num_buckets", None) != table.shape[0]):
                raise _refuse(model_type, f"the {name}'s self-attention in block {idx} ({type(attn).__name__}) has no "
                                          "T5 relative bias table (relative_attention_bias, (num_buckets, heads)) and "
                                          "bucketing (_relative_position_bucket)")
            biases[attn] = RelativeBias(owner, bidirectional=not owner.is_decoder)
            cross = getattr(sub[1], "EncDecAttention", None) if name == "decoder" and len(sub) > 1 else None
            if cross is not None:
                if getattr(cross, "has_relative_attention_bias", False):
                    raise _refuse(model_type, f"the decoder's cross-attention in block {idx} has a relative position "
                                              "bias, which ptkernels does not place")
                biases[cross] = NO_BIAS
    return biases


def check_seq2seq_model(hf_model: nn.Module) -> ModelSupport:
    """What ``patch`` needs from an encoder-decoder model, or :class:`UnsupportedModelError`: a
    self-attention and a cross-attention per decoder layer (BART or T5 layout, see
    :func:`decoder_attention_pairs`), with layer_idx 0 .. L-1, calling the attention interface with
    ``**kwargs``; then either a decoder position embedding that takes ``position_ids`` (BART family:
    ``positions="arange"``) or T5's relative position bias in every self-attention
    (:func:`seq2seq_relative_biases`; ``positions="relative"``)."""
    config = hf_model.config
    model_type = config.model_type
    if not hasattr(hf_model, "get_encoder") or not hasattr(hf_model, "get_decoder"):
        raise _refuse(model_type, f"{type(hf_model).__name__} has no get_encoder() / get_decoder()")
    decoder = hf_model.get_decoder()
    pairs = decoder_attention_pairs(decoder)
    if pairs is None:
        raise _refuse(model_type, f"the decoder {type(decoder).__name__} has neither .layers (BART) nor .block (T5)")
    relative = getattr(config, "relative_attention_num_buckets", None) is not None
    if relative and not _is_t5_layout(hf_model):
        raise _refuse(model_type, "a relative position bias outside T5's block layout is not in ptkernels' attention")
    roles = seq2seq_roles(hf_model)
    for kind in ("self", "cross"):
        idx = [getattr(m, "layer_idx", None) for m, r in roles.items() if r == kind]
        if idx != list(range(len(pairs))):
            raise _refuse(model_type, f"found decoder {kind}-attention modules with layer_idx {idx}, expected one per "
                                      f"decoder layer (self_attn / encoder_attn, or T5's SelfAttention / "
                                      f"EncDecAttention, layer_idx 0 .. {len(pairs) - 1})")
    if relative:
        seq2seq_relative_biases(hf_model)  # raises where the bias is not T5's
        _check_attention_calls(model_type, list(roles))
        return ModelSupport(model_type, "relative")
    _check_attention_calls(model_type, list(roles))
    positions = getattr(decoder, "embed_positions", None)
    if positions is None or "position_ids" not in inspect.signature(type(positions).forward).parameters:
        raise _refuse(model_type, "the decoder's position embedding does not take position_ids, so PEFT's decoder "
                                  "positions (shifted by the prefix length) cannot be reproduced")
    return ModelSupport(model_type, "arange")
