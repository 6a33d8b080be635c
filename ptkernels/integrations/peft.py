"""``patch`` / ``unpatch``: run a PEFT prompt-learning model (or a plain HF model) through ptkernels.

What patching does (in place; ``unpatch`` undoes every step):

1. Registers the "ptkernels" attention function and 2D mask builder with transformers
   (:mod:`ptkernels.integrations.transformers`) and sets the base model's
   ``config._attn_implementation`` to "ptkernels" (and its sub-models' configs: T5's encoder and
   decoder stacks hold copies). Each attention module gets the chosen backend as an attribute;
   encoder-decoder models' attention modules also get their role (encoder / decoder self / cross)
   and, T5 family, their relative position bias. For a plain HF model that is all: attention runs
   through ``ptkernels.prefix_attention`` with no prefix.
2. For a PEFT ``PeftModel`` it replaces the instance's ``forward`` (and, for causal LMs,
   ``prepare_inputs_for_generation``, which PEFT's ``generate`` installs on the base model):

   * PREFIX_TUNING: PEFT's own prefix encoder is evaluated ONCE per forward on the un-expanded
     virtual-token indices (:func:`ptkernels.encoders.prefix_key_values`), giving one
     (2L, Hkv, P, D) tensor shared by the batch. It reaches every attention layer as the
     ``ptkernels_prefix`` forward keyword (picked by ``module.layer_idx``): no ``DynamicCache``,
     no ``torch.cat`` of K/V, no (B, P + S) mask, no ``repeat_kv``. The attention mask stays the
     (B, S) mask of the real tokens. Since the prefix is not a cache, gradient checkpointing works.
   * P_TUNING / PROMPT_TUNING: PEFT's prompt encoder (MLP, LSTM or plain embedding) is evaluated
     once per forward and the (B, P + S, E) input embeddings come from one fused
     ``prompt_embedding`` call (no ``repeat`` of the prompt, no ``torch.cat``).

Position ids. PEFT's prefix sits in the KV cache, so the model counts it as past and real tokens
get positions P, P + 1, ... (BERT/GPT-2/Llama: ``arange(S) + P``; RoBERTa: its padding-aware
positions shifted by P). ``patch(..., shift_positions=True)`` (the default) reproduces that exactly,
so a patched model computes what the PEFT model computes and adapters move between the two. With
``shift_positions=False`` real tokens start at position 0 as in the base model without adapter.
Trade-off: the default keeps PEFT equivalence but, for models with learned absolute positions
(BERT: ``max_position_embeddings`` = 512), limits inputs to ``max_position_embeddings - P`` tokens
and uses positions the base model saw less in pre-training; ``False`` gives the full length and the
pre-training positions, but the adapter then is not interchangeable with an unpatched PEFT model
(logits differ; retrain or fine-tune the adapter with the setting you will serve it with). Prompt
tuning / P-Tuning are unaffected (the virtual tokens are real input tokens there, as in PEFT).

Packed (padding-free) batches. A batch of one row holding N sequences, marked by ``position_ids``
that restart (``DataCollatorWithFlattening``, TRL's ``padding_free=True``) or by the flash-attention
keywords ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``max_length_q`` / ``max_length_k``), gives every
sequence what the unpatched PEFT model gives for it alone. Prefix tuning: each sequence attends to
the prefix (``prefix_attention_varlen``) and its real tokens get PEFT's positions P, P + 1, ... (or
0, 1, ... with ``shift_positions=False``), restarting per sequence. Prompt tuning / P-tuning: the P
virtual tokens go in front of every sequence (one ``virtual_token_embedding`` gather), so the row
becomes T + N * P tokens, laid out [P virtual, L_n real] per sequence, with labels -100 and
positions 0 .. P - 1 on the virtual tokens; the logits are (1, T + N * P, V). PEFT itself puts the
virtual tokens / prefix only in front of the row, which silently changes every later sequence.

Caches. With ``generate()`` the cache holds only the real tokens (the prefix comes from the
keyword each step): decoding steps have Sq = 1 and Sk = cache length, the attention's causal mask
is bottom-right aligned, and the position ids are the ones PEFT uses (generate's position ids +
P). The ``past_key_values`` a patched forward returns therefore lack the P prefix entries PEFT's
contain; feeding them back into the patched model works (positions are counted from the cache
length + P).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import types
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._backend import BACKENDS
from ..ops.prefix_attention_varlen.interface import check_cu_seqlens
from ..ops.prompt_embedding import prompt_embedding, virtual_token_embedding
from .capabilities import (
    ModelSupport,
    attention_modules,
    check_model,
    check_virtual_tokens,
    per_layer_kv_geometry,
    decoder_attention_pairs,
    seq2seq_relative_biases,
    seq2seq_roles,
    text_config,
)
from .encoders import prefix_key_values, prompt_embeddings
from .transformers import (
    ATTN_IMPLEMENTATION,
    BACKEND_ATTR,
    BIAS_ATTR,
    PREFIX_KWARG,
    ROLE_ATTR,
    LayerPrefix,
    check_every_layer_read_the_prefix,
    cu_seqlens_from_position_ids,
    register,
)

__all__ = ["patch", "unpatch", "is_patched"]

SUPPORTED_PEFT_TYPES = ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")
SUPPORTED_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")
SEQ2SEQ_PREFIX_MODES = ("peft", "per_layer")
_PEFT_CLASS_FOR_TASK = {
    "SEQ_2_SEQ_LM": "PeftModelForSeq2SeqLM",
    "SEQ_CLS": "PeftModelForSequenceClassification",
    "TOKEN_CLS": "PeftModelForTokenClassification",
    "CAUSAL_LM": "PeftModelForCausalLM",
    "FEATURE_EXTRACTION": "PeftModelForFeatureExtraction",
}
_STATE = "_ptkernels_state"


def _enum_value(x) -> Optional[str]:
    return None if x is None else getattr(x, "value", x)


def _is_peft_model(model) -> bool:
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    return isinstance(model, peft.PeftModel)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _kv_geometry(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the model's self-attention."""
    cfg = text_config(config)
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv_heads, head_dim


def _prefix_geometry(hf_model) -> tuple[int, int, int, Optional[list]]:
    """(num_layers, kv_heads, head_dim, shapes) of the prefix PEFT provisions: for a model whose layers
    differ in key geometry (Gemma 4) the widest layer's KV heads and head dim, with ``shapes`` the
    per-layer (source layer, kv_heads, head_dim) of ``per_layer_kv_geometry`` (else None)."""
    per_layer = per_layer_kv_geometry(hf_model)
    if per_layer is None:
        return (*_kv_geometry(hf_model.config), None)
    return len(per_layer), max(h for _, h, _ in per_layer), max(d for _, _, d in per_layer), per_layer


def _layer_shapes(model, hf_model, kv_heads: int, head_dim: int) -> Optional[list]:
    """``LayerPrefix(shapes=)`` for a model whose layers differ in key geometry, read once per patch:
    each layer's cut of the (kv_heads, head_dim) prefix, or None where the layer is wider (PEFT skips
    such layers)."""
    state = model.__dict__[_STATE]
    if "layer_shapes" not in state:
        per_layer = _prefix_geometry(hf_model)[3]
        state["layer_shapes"] = None if per_layer is None else [
            (source, h, d) if h <= kv_heads and d <= head_dim else None for source, h, d in per_layer]
    return state["layer_shapes"]


def _check_prefix_geometry(hf_model, peft_config, adapter_name: str) -> None:
    layers, kv_heads, head_dim, per_layer = _prefix_geometry(hf_model)
    got = (peft_config.num_layers, peft_config.num_attention_heads, peft_config.token_dim)
    want = (layers, kv_heads, kv_heads * head_dim)
    if per_layer is not None and got[0] == layers and got[2] % got[1] == 0:
        # layers that differ (Gemma 4): PEFT cuts any provisioned (heads, head dim) down to each layer
        # and skips the layers it cannot hold; it refuses a prefix no layer can hold, and so do we
        heads, dim = got[1], got[2] // got[1]
        if not any(h <= heads and d <= dim for _, h, d in per_layer):
            raise ValueError(f"the prefix-tuning adapter {adapter_name!r} was provisioned for (kv heads, head dim) = "
                             f"{(heads, dim)}, which no layer's keys fit (layers: {sorted(set(per_layer))})")
        return
    if got != want:
        raise ValueError(
            f"the prefix-tuning adapter {adapter_name!r} was provisioned for (num_layers, kv heads, token_dim) = "
            f"{got}, but the model's self-attention is {want}"
        )


def _check_peft_model(model) -> ModelSupport:
    peft_config = model.active_peft_config
    peft_type = _enum_value(peft_config.peft_type)
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(
            f"ptkernels.patch supports PEFT adapters of type {SUPPORTED_PEFT_TYPES}, the active adapter "
            f"{model.active_adapter!r} is {peft_type}"
        )
    task = _enum_value(peft_config.task_type)
    cls_names = {c.__name__ for c in type(model).__mro__}
    if task not in SUPPORTED_TASK_TYPES or _PEFT_CLASS_FOR_TASK[task] not in cls_names:
        raise ValueError(
            f"ptkernels.patch supports PEFT task types {SUPPORTED_TASK_TYPES}, got task_type {task} "
            f"({type(model).__name__})"
        )
    if task == "SEQ_2_SEQ_LM":
        return _check_seq2seq_peft_model(model, peft_type)
    if getattr(model.get_base_model().config, "is_encoder_decoder", False):
        # PEFT hands such a model's prefix / prompt to the whole encoder-decoder (e.g. BART / T5 for
        # sequence classification), which the patched decoder-only / encoder-only path does not reproduce
        raise ValueError(
            f"ptkernels.patch supports encoder-decoder models ({type(model.get_base_model()).__name__}) with "
            f"task_type SEQ_2_SEQ_LM only, got task_type {task}"
        )
    if (peft_config.num_transformer_submodules or 1) != 1:
        raise ValueError(
            f"ptkernels.patch supports decoder-only / encoder-only models (num_transformer_submodules=1), "
            f"got {peft_config.num_transformer_submodules}"
        )
    hf_model = model.get_base_model()
    support = check_model(hf_model, prefix_tuning=peft_type == "PREFIX_TUNING")
    if peft_type != "PREFIX_TUNING":
        check_virtual_tokens(hf_model)
    if peft_type == "PREFIX_TUNING":
        _check_prefix_geometry(hf_model, peft_config, model.active_adapter)
    return support


def _seq2seq_geometry(hf_model) -> tuple[int, int, int]:
    """(decoder layers, decoder self-attention heads, head dim) of an encoder-decoder model (BART
    layout: ``head_dim`` and ``k_proj``; T5 layout: ``key_value_proj_dim`` and ``k``)."""
    pairs = decoder_attention_pairs(hf_model.get_decoder())
    attn = pairs[0][0]
    head_dim = getattr(attn, "head_dim", None) or attn.key_value_proj_dim
    key_proj = getattr(attn, "k_proj", None) or attn.k
    return len(pairs), key_proj.out_features // head_dim, head_dim


def _check_seq2seq_peft_model(model, peft_type: str) -> ModelSupport:
    """SEQ_2_SEQ_LM: prefix tuning only (PEFT's prompt tuning / P-tuning put virtual tokens in the
    encoder and decoder inputs, which ``patch`` does not reproduce), on a model that
    :func:`~ptkernels.integrations.capabilities.check_seq2seq_model` accepts, with a prefix
    provisioned for at least the decoder's layers and its head geometry."""
    peft_config = model.active_peft_config
    if peft_type != "PREFIX_TUNING":
        raise ValueError(f"ptkernels.patch supports SEQ_2_SEQ_LM models with PREFIX_TUNING only, the active adapter "
                         f"{model.active_adapter!r} is {peft_type}")
    hf_model = model.get_base_model()
    support = check_model(hf_model, prefix_tuning=True)
    if (peft_config.num_transformer_submodules or 2) != 2:
        raise ValueError(f"ptkernels.patch: a SEQ_2_SEQ_LM prefix-tuning adapter has num_transformer_submodules=2 "
                         f"(PEFT's default), got {peft_config.num_transformer_submodules}")
    layers, heads, head_dim = _seq2seq_geometry(hf_model)
    got = (peft_config.num_attention_heads, peft_config.token_dim)
    if got != (heads, heads * head_dim) or peft_config.num_layers < layers:
        raise ValueError(
            f"the prefix-tuning adapter {model.active_adapter!r} was provisioned for num_layers "
            f"{peft_config.num_layers}, (heads, token_dim) = {got}, but the model's decoder has {layers} layers of "
            f"{(heads, heads * head_dim)} (where heads * head dim differs from the hidden size, as in T5 v1.1 / "
            f"mT5, give PrefixTuningConfig(num_attention_heads={heads}, token_dim={heads * head_dim}))"
        )
    return support


# --------------------------------------------------------------------------------------------
# Helpers used by the patched forward
# --------------------------------------------------------------------------------------------


def _is_sharded(param: Tensor) -> bool:
    """True for an FSDP2 parameter seen outside its module's call: a DTensor shard, not the full weight."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(param, dtensor.DTensor)


def _prompt_and_input_embeddings(model, input_ids: Tensor, prompt: Tensor) -> Tensor:
    """(B, P + S, E): the prompt, (P, E) shared or (B, P, E) per example, in front of the embedded
    input_ids (B, S).

    A plain ``nn.Embedding`` goes through one fused ``prompt_embedding`` call. The embedding module
    itself is called (as PEFT calls it) and the prompt concatenated in front when
    * it is not a plain ``nn.Embedding`` (Gemma's and BioGPT's scale their output), or
    * FSDP2 shards it in its own group (accelerate's auto-wrap does): outside the module's call its
      weight is a DTensor shard, and the module's hooks unshard it. (DeepSpeed ZeRO-3 gathers a
      partitioned weight read inside a forward by itself.)"""
    embedding = model.word_embeddings
    if type(embedding) is nn.Embedding and not _is_sharded(embedding.weight):
        weight = embedding.weight
        return prompt_embedding(input_ids, weight, prompt.to(weight.dtype), backend=model.__dict__[_STATE]["backend"])
    return _prepend_prompt(prompt, embedding(input_ids))


def _prepend_prompt(prompt: Tensor, embeds: Tensor) -> Tensor:
    """(B, P + S, E): the prompt, (P, E) shared or (B, P, E) per example, in front of input
    embeddings (B, S, E), unfused."""
    prompt = prompt.to(embeds.dtype)
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1)
    return torch.cat((prompt, embeds), dim=1)


# The KV cache's keyword: ``cache`` from transformers 5.24 on (``past_key_values`` stays a deprecated
# alias until 5.40), ``past_key_values`` before.
_CACHE_KWARGS = ("cache", "past_key_values")


def _cache_of(kwargs: dict):
    """The KV cache among a forward's / generate step's keyword arguments, under either name."""
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _past_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2])  # legacy tuple


def _prefix_position_ids(model, kwargs: dict, input_ids, inputs_embeds, attention_mask=None,
                         num_virtual=None, packed_cu: Optional[Tensor] = None) -> Optional[Tensor]:
    """The position ids of the real tokens under prefix tuning: PEFT's convention (the P prefix
    tokens count as past, so real tokens start at P) with ``shift_positions``, else the model's own.

    Explicit ``position_ids`` in ``kwargs`` are shifted by the offset; otherwise they are computed
    the way the base model would with P more tokens in its cache and P more ones in front of its
    attention mask (``ModelSupport.positions``: "arange" for BERT / GPT-2 / Llama and most models;
    "roberta", RoBERTa's padding-aware positions; "cumsum", the mask's cumulative sum as OPT
    count). None lets the model count (from its cache, which holds real tokens only).

    attention_mask: (B, past + S) mask of the real tokens, or None (all attended).
    num_virtual: P, an int (the active adapter's by default) or a (B, 1) tensor (adapters of
    different P in one batch: each example shifted by its own adapter's P, as PEFT shifts it).
    packed_cu: (N + 1,) sequence starts of a packed row, or None: positions restart per sequence."""
    state = model.__dict__[_STATE]
    if num_virtual is None:
        num_virtual = model.active_peft_config.num_virtual_tokens
    offset = num_virtual if state["shift_positions"] else 0
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"] + offset
    hf_model = model.get_base_model()
    if packed_cu is not None:  # a packed row without position ids: positions restart per sequence
        ref = input_ids if input_ids is not None else inputs_embeds
        start = offset
        if state["support"].positions == "roberta":
            start += hf_model.config.pad_token_id + 1
        return _positions_per_sequence(packed_cu, ref.shape[1]) + start
    if isinstance(offset, int) and offset == 0:
        return None
    past_len = _past_length(_cache_of(kwargs))
    ref = input_ids if input_ids is not None else inputs_embeds
    positions = state["support"].positions
    if positions == "roberta":
        if input_ids is None:
            return None  # RoBERTa ignores the past length for inputs_embeds
        pad = hf_model.config.pad_token_id
        mask = input_ids.ne(pad).int()
        return ((torch.cumsum(mask, dim=1).type_as(mask) + past_len + offset) * mask).long() + pad
    if positions == "cumsum":  # cumsum([1] * P + mask) * mask - 1, without the P prefix columns
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[0], past_len + ref.shape[1], dtype=torch.long, device=ref.device)
        mask = attention_mask.long()
        return ((torch.cumsum(mask, dim=1) + offset) * mask - 1)[:, -ref.shape[1]:]
    if isinstance(offset, Tensor):
        return torch.arange(ref.shape[1], device=ref.device) + (past_len + offset)
    return (torch.arange(ref.shape[1], device=ref.device) + (past_len + offset)).unsqueeze(0)


def _reentrant_checkpointing(hf_model: nn.Module) -> bool:
    """True when some layer is checkpointed with ``use_reentrant=True`` (torch's legacy mode)."""
    for m in hf_model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            keywords = getattr(fn, "keywords", None)
            if isinstance(keywords, dict) and keywords.get("use_reentrant", True):
                return True
    return False


# --------------------------------------------------------------------------------------------
# Which adapter each example uses (``adapter_names``) and its prefix / prompt
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Selection:
    """The adapters of one forward: ``names`` the distinct adapters (first appearance order),
    ``index`` (B,) int64 into ``names`` per example, or None when the whole batch uses names[0]
    (no ``adapter_names``, or all the same), and ``per_example`` the B names (None likewise)."""

    names: list
    configs: list
    index: Optional[Tensor]
    per_example: Optional[list]

    @property
    def peft_type(self) -> str:
        return _enum_value(self.configs[0].peft_type)

    @property
    def num_virtual(self) -> list:
        return [c.num_virtual_tokens for c in self.configs]

    def offsets(self, device) -> Union[int, Tensor]:
        """P per example: an int when every example's adapter has the same P, else (B, 1) int64."""
        sizes = self.num_virtual
        if self.index is None or len(set(sizes)) == 1:
            return sizes[0]
        return torch.tensor(sizes, device=device)[self.index.to(device)][:, None]


def _select_adapters(model, adapter_names, batch_size: int, device) -> _Selection:
    """The adapters the examples of this batch use: the active one without ``adapter_names``;
    else one name per example, checked (ValueError naming ``adapter_names``)."""
    if adapter_names is None:
        config = model.active_peft_config
        if _enum_value(config.peft_type) not in SUPPORTED_PEFT_TYPES:  # another adapter became active after patching
            raise ValueError(f"ptkernels: the active adapter is {_enum_value(config.peft_type)}, which the patched model "
                             "does not support")
        return _Selection([model.active_adapter], [config], None, None)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise ValueError(f"adapter_names must be a list of adapter names, one per example, got {type(adapter_names).__name__}")
    adapter_names = list(adapter_names)
    if len(adapter_names) != batch_size:
        if not adapter_names or batch_size % len(adapter_names):
            raise ValueError(f"adapter_names must have one name per example: got {len(adapter_names)} names for a batch "
                             f"of {batch_size}")
        # generate() with num_return_sequences / beams expands each row k times, consecutively
        adapter_names = [n for n in adapter_names for _ in range(batch_size // len(adapter_names))]
    names = list(dict.fromkeys(adapter_names))
    unknown = [n for n in names if not isinstance(n, str) or n not in model.peft_config]
    if unknown:
        raise ValueError(f"adapter_names contains {unknown}, which are not adapters of this model (loaded: "
                         f"{sorted(model.peft_config)})")
    configs = [model.peft_config[n] for n in names]
    task = model.__dict__[_STATE]["task"]
    kinds = set()
    for name, config in zip(names, configs):
        peft_type = _enum_value(config.peft_type)
        if peft_type not in SUPPORTED_PEFT_TYPES:
            raise ValueError(f"adapter_names: adapter {name!r} is {peft_type}; ptkernels mixes only prompt-learning "
                             f"adapters {SUPPORTED_PEFT_TYPES} in one batch")
        if _enum_value(config.task_type) != task:
            raise ValueError(f"adapter_names: adapter {name!r} has task_type {_enum_value(config.task_type)}, the patched "
                             f"model is {task}")
        if (config.num_transformer_submodules or 1) != 1:
            raise ValueError(f"adapter_names: adapter {name!r} has num_transformer_submodules="
                             f"{config.num_transformer_submodules}; only 1 is supported")
        if peft_type == "PREFIX_TUNING":
            _check_prefix_geometry(model.get_base_model(), config, name)
        kinds.add("prefix" if peft_type == "PREFIX_TUNING" else "prompt")
    if len(kinds) > 1:
        raise ValueError("adapter_names mixes prefix-tuning adapters with prompt-tuning / P-tuning adapters in one "
                         f"batch ({dict(zip(names, (_enum_value(c.peft_type) for c in configs)))}), which is not "
                         "supported: run them as separate batches")
    if kinds == {"prefix"} and not model.__dict__[_STATE].get("prefix_support_checked"):
        check_model(model.get_base_model(), prefix_tuning=True)  # patched with a prompt adapter active
        model.__dict__[_STATE]["prefix_support_checked"] = True
    if len(names) == 1:
        return _Selection(names, configs, None, None)
    # A normal tensor even inside inference_mode: on a GPU the op's range check of prefix_index is
    # then cached by version, once per forward, not once per layer
    with torch.inference_mode(False):
        index = torch.tensor([names.index(n) for n in adapter_names], dtype=torch.long, device=device)
    return _Selection(names, configs, index, adapter_names)


def _compute_prefix(model, selection: _Selection) -> LayerPrefix:
    """Every layer's prefix: (2L, Hkv, P, D) shared, or, with several adapters, a bank
    (A, 2L, Hkv, max P, D) (shorter prefixes zero-padded at the end, ``lengths`` (A,) masking the
    padding) read through ``index`` (B,). Each adapter's encoder runs once; P-Tuning v2's prefix
    dropout (``patch(prefix_dropout=)``) rides along and applies in training mode."""
    hf_model = model.get_base_model()
    config = selection.configs[0]
    layers, kv_heads = config.num_layers, config.num_attention_heads  # checked by _check_prefix_geometry
    head_dim = config.token_dim // kv_heads
    shapes = _layer_shapes(model, hf_model, kv_heads, head_dim)
    stacks = [
        prefix_key_values(
            model.prompt_encoder[name], config.num_virtual_tokens, layers, kv_heads, head_dim,
            inference_mode=bool(config.inference_mode), dtype=getattr(hf_model, "dtype", None),
        )
        for name, config in zip(selection.names, selection.configs)
    ]
    dropout_p = model.__dict__[_STATE]["prefix_dropout"]
    if selection.index is None:
        return LayerPrefix(stacks[0], dropout_p=dropout_p, shapes=shapes)
    sizes = selection.num_virtual
    longest = max(sizes)
    bank = torch.stack([F.pad(s, (0, 0, 0, longest - s.shape[-2])) for s in stacks])
    lengths = None
    if len(set(sizes)) > 1:
        with torch.inference_mode(False):  # (a normal tensor, as the index above)
            lengths = torch.tensor(sizes, device=bank.device)
    return LayerPrefix(bank, index=selection.index.to(bank.device), lengths=lengths, dropout_p=dropout_p,
                       shapes=shapes)


def _compute_prompt(model, selection: _Selection) -> tuple[Tensor, Optional[Tensor]]:
    """The virtual-token embeddings: ((P, E) shared, None), or, with several adapters,
    ((B, max P, E), (B, max P) bool): each example's prompt in the layout of :func:`_virtual_mask`
    (zeros in the unused slots of a shorter one) and that mask (None when every P is the same)."""
    prompts = [
        prompt_embeddings(model.prompt_encoder[name], config.num_virtual_tokens,
                          inference_mode=bool(config.inference_mode))
        for name, config in zip(selection.names, selection.configs)
    ]
    if selection.index is None:
        return prompts[0], None
    longest = max(selection.num_virtual)
    right = model.__dict__[_STATE]["causal"]
    bank = torch.stack([F.pad(p, (0, 0, longest - p.shape[0], 0) if right else (0, 0, 0, longest - p.shape[0]))
                        for p in prompts])
    return bank[selection.index.to(bank.device)], _virtual_mask(model, selection, bank.device)


def _virtual_mask(model, selection: _Selection, device) -> Optional[Tensor]:
    """(B, max P) bool, True on each example's own virtual tokens; None when the batch has one P.

    Layout of the max P virtual slots in front of the S real tokens (real tokens always in the
    last S positions): causal models (decoders) right-align each example's virtual tokens, next
    to its real tokens, as the causal LM loss predicts the first real token from the last virtual
    one and decoders pool the last token; bidirectional models (encoders) left-align them from
    position 0, which is the token BERT / RoBERTa pool, the unused slots between the virtual and
    the real tokens (attention there is order-free; positions are given explicitly)."""
    sizes = selection.num_virtual
    if selection.index is None or len(set(sizes)) == 1:
        return None
    longest = max(sizes)
    own = torch.tensor(sizes, device=device)[selection.index.to(device), None]
    slots = torch.arange(longest, device=device)
    if model.__dict__[_STATE]["causal"]:
        return slots >= longest - own
    return slots < own


def _virtual_positions(model, present: Tensor, seq_len: int) -> Optional[Tensor]:
    """(B, max P + S) position ids of the prompt-tuning layout with different P per example: each
    example's virtual tokens count from 0 and its real tokens from its own P, as PEFT numbers that
    example alone (unused slots repeat a neighbour's position). None where the model derives
    positions from the mask."""
    convention = model.__dict__[_STATE]["support"].positions
    if convention == "cumsum":
        return None
    ones = torch.ones(present.shape[0], seq_len, dtype=torch.long, device=present.device)
    positions = (torch.cat((present.long(), ones), dim=1).cumsum(dim=1) - 1).clamp(min=0)
    if convention == "roberta":
        positions = positions + model.get_base_model().config.pad_token_id + 1
    return positions


def _modules_to_save_wrappers(hf_model: nn.Module) -> list:
    other = sys.modules.get("peft.utils.other")
    wrapper = getattr(other, "ModulesToSaveWrapper", None)
    return [] if wrapper is None else [m for m in hf_model.modules() if isinstance(m, wrapper)]


@contextlib.contextmanager
def _per_example_heads(model, selection: _Selection):
    """PEFT keeps one copy of the classification head per adapter (``modules_to_save``): during
    the block, each wrapped module runs every adapter's copy on that adapter's examples (rows of
    dim 0) and puts the rows back in batch order. PEFT's own mixed-batch forward handles only
    Linear / Embedding / Conv heads (RoBERTa's head is a small module), hence this."""
    wrappers = [] if selection.index is None else _modules_to_save_wrappers(model.get_base_model())
    if not wrappers:
        yield
        return
    groups = [(name, (selection.index == a).nonzero().flatten()) for a, name in enumerate(selection.names)]
    order = torch.cat([rows for _, rows in groups])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)

    def mixed_forward(wrapper):
        def forward(x, *args, **kwargs):
            outs = []
            for name, rows in groups:
                module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
                outs.append(module(x[rows.to(x.device)], *args, **kwargs))
            return torch.cat(outs)[inverse.to(x.device)]
        return forward

    for w in wrappers:
        w.forward = mixed_forward(w)
    try:
        yield
    finally:
        for w in wrappers:
            w.__dict__.pop("forward", None)


def _batch_size(input_ids, inputs_embeds) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    return inputs_embeds.shape[0]


# --------------------------------------------------------------------------------------------
# Packed (padding-free) batches
# --------------------------------------------------------------------------------------------


def _packed_cu_seqlens(input_ids, inputs_embeds, attention_mask, kwargs: dict) -> Optional[Tensor]:
    """(N + 1,) sequence starts of a packed batch (one row, N sequences), or None for an ordinary batch.

    Explicit ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (equal: packed self-attention) mark packing;
    otherwise ``position_ids`` that restart in a single row without padding and without a cache."""
    ref = input_ids if input_ids is not None else inputs_embeds
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    unpadded = attention_mask is None or bool(attention_mask.all())
    if cu_q is not None or cu_k is not None:
        cu = cu_q if cu_q is not None else cu_k
        if cu_q is not None and cu_k is not None and not torch.equal(cu_q.cpu().long(), cu_k.cpu().long()):
            raise ValueError(
                f"ptkernels: packed sequences need cu_seq_lens_q == cu_seq_lens_k (self-attention over the same "
                f"tokens), got {cu_q.tolist()} and {cu_k.tolist()}"
            )
        if ref.shape[0] != 1:
            raise ValueError(f"ptkernels: packed sequences (cu_seq_lens_q / cu_seq_lens_k) need a batch of one row, "
                             f"got a batch of {ref.shape[0]}")
        if not unpadded:
            raise ValueError("ptkernels: packed sequences (cu_seq_lens_q / cu_seq_lens_k) with padding in "
                             "attention_mask are not supported; packed rows have no padding")
        check_cu_seqlens("cu_seq_lens_q", cu, ref.shape[1], "the packed row's length", cu.device)
        return cu.to(torch.int32)
    if ref.shape[0] != 1 or _cache_of(kwargs) is not None or not unpadded:
        return None
    return cu_seqlens_from_position_ids(kwargs.get("position_ids"))


def _varlen_kwargs(cu: Tensor) -> dict:
    """flash-attention's keywords for a packed row with sequence starts ``cu`` (N + 1,)."""
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


def _positions_per_sequence(cu: Tensor, total: int) -> Tensor:
    """(1, total): 0, 1, ... restarting at every sequence start of ``cu`` (N + 1,)."""
    cu = cu.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return (torch.arange(total, device=cu.device) - starts).unsqueeze(0)


def _packed_prompt_layout(cu: Tensor, num_virtual: int):
    """Where the tokens of a packed row go when P virtual tokens are put in front of every sequence.

    Returns (real_at (T,): new index of real token t, virtual_at (N * P,): new index of virtual token
    p of sequence n at n * P + p, new_cu (N + 1,) int32: the new sequence starts)."""
    cu = cu.long()
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1])
    num_seqs = lengths.numel()
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=cu.device), lengths, output_size=total)
    real_at = torch.arange(total, device=cu.device) + (seq_of_token + 1) * num_virtual
    new_cu = cu + torch.arange(num_seqs + 1, device=cu.device) * num_virtual
    virtual_at = (new_cu[:-1, None] + torch.arange(num_virtual, device=cu.device)).reshape(-1)
    return real_at, virtual_at, new_cu.to(torch.int32)


def _spread(values: Tensor, real_at: Tensor, new_len: int, fill) -> Tensor:
    """(1, new_len, ...): ``values`` (1, T, ...) at the real positions, ``fill`` elsewhere."""
    out = values.new_full((1, new_len) + tuple(values.shape[2:]), fill)
    out[0, real_at] = values[0]
    return out


def _packed_prompt_embeddings(model, input_ids, inputs_embeds, prompt: Tensor, real_at, virtual_at, new_len: int):
    """(1, T + N * P, E): the prompt (P, E) in front of every packed sequence, the real tokens after.

    A plain ``nn.Embedding`` goes through one fused ``virtual_token_embedding`` gather of the table
    [weight; prompt] (ids >= V read the prompt); otherwise (inputs_embeds given, a scaled embedding,
    an FSDP2 shard) the embeddings and the prompt are gathered by one index."""
    num_virtual = prompt.shape[0]
    num_seqs = virtual_at.numel() // max(num_virtual, 1)
    embedding = model.word_embeddings
    if inputs_embeds is None and type(embedding) is nn.Embedding and not _is_sharded(embedding.weight):
        weight = embedding.weight
        ids = _spread(input_ids, real_at, new_len, 0)
        ids[0, virtual_at] = weight.shape[0] + torch.arange(num_virtual, device=ids.device).repeat(num_seqs)
        return virtual_token_embedding(ids, weight, prompt.to(weight.dtype), backend=model.__dict__[_STATE]["backend"])
    embeds = inputs_embeds if inputs_embeds is not None else embedding(input_ids)  # (1, T, E)
    total = embeds.shape[1]
    rows = torch.cat([embeds[0], prompt.to(embeds.dtype)])  # (T + P, E)
    index = torch.empty(new_len, dtype=torch.long, device=embeds.device)
    index[real_at] = torch.arange(total, device=embeds.device)
    index[virtual_at] = total + torch.arange(num_virtual, device=embeds.device).repeat(num_seqs)
    return rows[index].unsqueeze(0)



# --------------------------------------------------------------------------------------------
# The patched PeftModel.forward / prepare_inputs_for_generation
# --------------------------------------------------------------------------------------------


def _patched_forward(
    self,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    task_ids=None,
    adapter_names=None,
    **kwargs,
):
    state = self.__dict__[_STATE]
    task = state["task"]
    if task == "SEQ_2_SEQ_LM":
        return _seq2seq_forward(self, input_ids, attention_mask, inputs_embeds, labels, adapter_names,
                                dict(kwargs, output_attentions=output_attentions,
                                     output_hidden_states=output_hidden_states, return_dict=return_dict))
    batch_size = _batch_size(input_ids, inputs_embeds)
    ref = input_ids if input_ids is not None else inputs_embeds
    selection = _select_adapters(self, adapter_names, batch_size, ref.device)
    peft_type = selection.peft_type
    if task in ("SEQ_CLS", "TOKEN_CLS") and return_dict is None:
        return_dict = getattr(self.config, "return_dict", True) and not getattr(self.config, "torchscript", False)
    kwargs.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict)
    if labels is not None or task != "FEATURE_EXTRACTION":
        kwargs["labels"] = labels
    if task not in ("SEQ_CLS", "TOKEN_CLS") and kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None

    hf_model = self.get_base_model()
    packed_cu = _packed_cu_seqlens(input_ids, inputs_embeds, attention_mask, kwargs)
    if packed_cu is not None and task == "SEQ_CLS":
        raise NotImplementedError("ptkernels: packed sequences (one row, several sequences) are not supported for "
                                  "sequence classification (one label per row)")
    if peft_type == "PREFIX_TUNING":
        kwargs["position_ids"] = _prefix_position_ids(self, kwargs, input_ids, inputs_embeds, attention_mask,
                                                      selection.offsets(ref.device), packed_cu)
        if packed_cu is not None:
            kwargs.update(_varlen_kwargs(packed_cu))
        if self.training and torch.is_grad_enabled() and _reentrant_checkpointing(hf_model):
            # A reentrant checkpoint re-runs backward once per layer through the shared prefix
            # encoder graph, which autograd refuses; the non-reentrant one (transformers' default)
            # has no such problem. Refuse clearly rather than fail deep inside backward.
            raise ValueError(
                "ptkernels: prefix tuning with gradient checkpointing needs non-reentrant checkpointing: "
                "call gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                "(transformers' default)"
            )
        _refuse_a_given_prefix(kwargs)
        kwargs[PREFIX_KWARG] = _compute_prefix(self, selection)
        with _per_example_heads(self, selection):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   **kwargs)

    # P_TUNING / PROMPT_TUNING: the virtual tokens are input tokens in front of the real ones
    # (with several adapters of different P: right-aligned, the left slots masked)
    if packed_cu is not None:
        return _packed_prompt_forward(self, selection, packed_cu, input_ids, attention_mask, inputs_embeds, labels,
                                      kwargs)
    if kwargs.get("position_ids") is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
        kwargs["position_ids"] = None
    prompt, present = _compute_prompt(self, selection)
    num_virtual = prompt.shape[-2]
    if present is not None:
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, ref.shape[1], dtype=torch.long, device=ref.device)
        attention_mask = torch.cat((present.to(attention_mask.device, attention_mask.dtype), attention_mask), dim=1)
        kwargs["position_ids"] = _virtual_positions(self, present, ref.shape[1])
    elif attention_mask is not None:
        ones = torch.ones(batch_size, num_virtual, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat((ones, attention_mask), dim=1)
    if kwargs.get("token_type_ids") is not None:
        tt = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat((tt.new_zeros(batch_size, num_virtual), tt), dim=1).long()
    if task == "CAUSAL_LM" and labels is not None:
        kwargs["labels"] = torch.cat((labels.new_full((batch_size, num_virtual), -100), labels), dim=1)
    if inputs_embeds is None:
        inputs_embeds = _prompt_and_input_embeddings(self, input_ids, prompt)
    else:
        inputs_embeds = _prepend_prompt(prompt, inputs_embeds)
    with _per_example_heads(self, selection):
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def _packed_prompt_forward(self, selection, cu: Tensor, input_ids, attention_mask, inputs_embeds, labels,
                           kwargs: dict):
    """Prompt tuning / P-tuning on a packed row (1, T) of N sequences: the P virtual tokens in front of
    every sequence, so that each one sees what it sees alone under PEFT (row (1, T + N * P), each
    sequence [P virtual, L_n real], positions restarting per sequence, labels -100 on the virtual tokens).
    The row's adapter: the one ``selection`` picks for its single example."""
    entry = 0 if selection.index is None else int(selection.index[0])
    num_virtual = selection.num_virtual[entry]
    real_at, virtual_at, new_cu = _packed_prompt_layout(cu, num_virtual)
    new_len = int(new_cu[-1])
    new_mask = None if attention_mask is None else attention_mask.new_ones(1, new_len)  # checked: no padding
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = _spread(kwargs["token_type_ids"].long(), real_at, new_len, 0)
    if labels is not None:  # causal LM / token classification: one label per token, -100 on the virtual ones
        kwargs["labels"] = _spread(labels, real_at, new_len, -100)
    if kwargs.get("seq_idx") is not None:
        lengths = (new_cu[1:] - new_cu[:-1]).long()
        kwargs["seq_idx"] = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=new_cu.device), lengths, output_size=new_len
        ).to(kwargs["seq_idx"].dtype).unsqueeze(0)
    kwargs["position_ids"] = _positions_per_sequence(new_cu, new_len)
    kwargs.update(_varlen_kwargs(new_cu))
    prompt, _ = _compute_prompt(self, selection)
    if prompt.dim() == 3:  # (1, max P, E) with an index: the row's one adapter, right- or left-aligned
        prompt = prompt[0, -num_virtual:] if self.__dict__[_STATE]["causal"] else prompt[0, :num_virtual]
    embeds = _packed_prompt_embeddings(self, input_ids, inputs_embeds, prompt, real_at, virtual_at, new_len)
    return self.base_model(inputs_embeds=embeds, attention_mask=new_mask, **kwargs)


# --------------------------------------------------------------------------------------------
# Encoder-decoder models (SEQ_2_SEQ_LM prefix tuning)
# --------------------------------------------------------------------------------------------


def _seq2seq_prefix(model) -> LayerPrefix:
    """The decoder's prefix for one forward, from PEFT's prefix encoder (run once, un-expanded):
    its output E holds 2N entries (N = the adapter's ``num_layers``), entry 2l layer l's key and
    2l + 1 its value.

    * ``seq2seq_prefix="peft"`` (default), what PEFT 0.21.2 computes (measured on transformers
      5.24): ``get_prompt`` concatenates E with itself ([E; E], 4N entries), splits it into N groups
      of 4 (self key, self value, cross key, cross value) and hands them to an
      ``EncoderDecoderCache``, whose cross-attention part is then reset (recomputed from the
      encoder), so decoder layer l's self-attention reads E[4l mod 2N] and E[(4l + 1) mod 2N] and its
      cross-attention no prefix. The encoder gets none.
    * ``"per_layer"``: what the duplication intends (the same per-layer prefix for both decoder
      submodules) and P-Tuning v2 describes: layer l's self-attention and its cross-attention (in
      front of the encoder's keys, under the encoder's padding mask) both read E[2l], E[2l + 1],
      so every entry of E is trained.
    """
    state = model.__dict__[_STATE]
    config = model.active_peft_config
    hf_model = model.get_base_model()
    layers, heads, head_dim = _seq2seq_geometry(hf_model)
    full = prefix_key_values(
        model.prompt_encoder[model.active_adapter], config.num_virtual_tokens, config.num_layers, heads, head_dim,
        inference_mode=bool(config.inference_mode), dtype=getattr(hf_model, "dtype", None),
    )  # (2N, H, P, D)
    if state["seq2seq_prefix"] == "per_layer":
        own = full[: 2 * layers]
        return LayerPrefix(own, cross=own, dropout_p=state["prefix_dropout"])
    entries = [(4 * l + j) % (2 * config.num_layers) for l in range(layers) for j in (0, 1)]
    picked = full.index_select(0, torch.tensor(entries, device=full.device))
    return LayerPrefix(picked, dropout_p=state["prefix_dropout"])


def _refuse_a_given_prefix(kwargs: dict) -> None:
    """A prefix-tuning model's patched forward supplies its adapter's prefix as the ``ptkernels_prefix``
    keyword: one given by the caller (directly or through ``use_prefix``) would be replaced."""
    if kwargs.get(PREFIX_KWARG) is not None:
        raise ValueError(f"ptkernels: {PREFIX_KWARG} / use_prefix: the model has a PEFT prefix-tuning adapter, whose "
                         "patched forward supplies the prefix itself; use_prefix is for models without one")


def _seq2seq_forward(self, input_ids, attention_mask, inputs_embeds, labels, adapter_names, kwargs: dict):
    """The patched forward of a SEQ_2_SEQ_LM prefix-tuning model: the base model with the decoder's
    prefix as the ``ptkernels_prefix`` keyword (decoder positions shifted by P in a hook, see
    :func:`_shift_decoder_positions`)."""
    if adapter_names is not None and len(set(adapter_names)) > 1:
        raise NotImplementedError("ptkernels: several adapters in one batch (adapter_names) are not supported for "
                                  "SEQ_2_SEQ_LM models")
    if adapter_names is not None and adapter_names[0] != self.active_adapter:
        raise NotImplementedError("ptkernels: for SEQ_2_SEQ_LM models adapter_names must name the active adapter")
    kwargs.pop("task_ids", None)
    _refuse_a_given_prefix(kwargs)
    kwargs[PREFIX_KWARG] = _seq2seq_prefix(self)
    return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           labels=labels, **kwargs)


def _seq2seq_prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
    """Each generation step: the base model's inputs (its cache holds the real decoder tokens only)
    plus the decoder's prefix as a keyword."""
    model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
    _check_cache(_cache_of(model_kwargs))
    model_kwargs[PREFIX_KWARG] = _seq2seq_prefix(self)
    return model_kwargs


def _install_seq2seq_hooks(model, hf_model, state: dict) -> None:
    """Tag the attention modules with their role (encoder / decoder self / cross, read by the
    attention function) and, T5 family, with their relative position bias (``BIAS_ATTR``: the
    table and bucketing the attention function hands to ``prefix_attention`` in place of the dense
    ``position_bias``); BART family: shift the decoder's positions by P while a prefix is present.
    T5 needs no shift: its bias puts the prefix at PEFT's cache positions by itself."""
    roles = seq2seq_roles(hf_model)
    for module, role in roles.items():
        setattr(module, ROLE_ATTR, role)
    state["roles"] = list(roles)
    relative = state["support"].positions == "relative"
    biases = seq2seq_relative_biases(hf_model) if relative else {}
    for module, bias in biases.items():
        setattr(module, BIAS_ATTR, bias)
    state["biased"] = list(biases)
    if "seq2seq_hooks" in state:
        return
    if relative:
        state["seq2seq_hooks"] = []
        return
    decoder = hf_model.get_decoder()
    shift = {"by": 0}

    def note_prefix(module, args, kwargs):  # the decoder's pre-hook: is there a prefix in this call?
        has_prefix = isinstance(kwargs.get(PREFIX_KWARG), LayerPrefix)
        shifted = has_prefix and state["is_peft"] and state["shift_positions"]
        shift["by"] = model.active_peft_config.num_virtual_tokens if shifted else 0

    def shift_positions(module, args, kwargs):  # the decoder position embedding's pre-hook
        if shift["by"]:
            if kwargs.get("position_ids") is None:
                raise RuntimeError(f"ptkernels: {type(module).__name__} got no position_ids to shift by the prefix")
            kwargs["position_ids"] = kwargs["position_ids"] + shift["by"]
        return args, kwargs

    state["seq2seq_hooks"] = [
        decoder.register_forward_pre_hook(note_prefix, with_kwargs=True),
        decoder.embed_positions.register_forward_pre_hook(shift_positions, with_kwargs=True),
    ]


def _check_cache(cache) -> None:
    # A static (compileable) cache hands attention max_cache_len keys, partly unfilled, with a mask
    # the 2D path cannot express; refuse it rather than attend to empty slots.
    if getattr(cache, "is_compileable", False):
        raise NotImplementedError(
            f"ptkernels: generate() with a static / compileable KV cache ({type(cache).__name__}) is not supported; "
            "use the default dynamic cache"
        )


def _plain_prepare_inputs_for_generation(self, *args, **kwargs):
    model_kwargs = self.__dict__[_STATE]["orig_prepare"](*args, **kwargs)
    _check_cache(_cache_of(model_kwargs))
    return model_kwargs


def _patched_generate(self, *args, adapter_names=None, **kwargs):
    """PEFT's ``generate`` with ``adapter_names`` (one per row) handed to every generation step."""
    state = self.__dict__[_STATE]
    original = state["orig_generate"] or types.MethodType(type(self).generate, self)
    state["generate_adapter_names"] = adapter_names
    try:
        return original(*args, **kwargs)
    finally:
        state["generate_adapter_names"] = None


def _patched_prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
    state = self.__dict__[_STATE]
    model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
    step_ref = model_kwargs.get("input_ids") if model_kwargs.get("input_ids") is not None else model_kwargs.get("inputs_embeds")
    selection = _select_adapters(self, state.get("generate_adapter_names"), step_ref.shape[0], step_ref.device)
    peft_type = selection.peft_type
    cache = _cache_of(model_kwargs)
    _check_cache(cache)
    past_len = _past_length(cache)
    if model_kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        model_kwargs["token_type_ids"] = None

    if peft_type == "PREFIX_TUNING":
        # the cache holds real tokens only; the prefix comes with every step as a keyword
        model_kwargs["position_ids"] = _prefix_position_ids(
            self, model_kwargs, model_kwargs.get("input_ids"), model_kwargs.get("inputs_embeds"),
            model_kwargs.get("attention_mask"), selection.offsets(step_ref.device),
        )
        model_kwargs[PREFIX_KWARG] = _compute_prefix(self, selection)
        return model_kwargs

    # prompt tuning / P-tuning: the virtual tokens are in the cache like any input token (as in PEFT)
    prompt = _compute_prompt(self, selection)[0] if past_len == 0 else None
    present = _virtual_mask(self, selection, step_ref.device)
    num_virtual = max(selection.num_virtual)
    input_ids = model_kwargs.get("input_ids")
    if cache is not None and input_ids is not None and past_len >= input_ids.shape[1]:
        model_kwargs["input_ids"] = input_ids = input_ids[:, -1:]
    attention_mask = model_kwargs.get("attention_mask")
    if isinstance(attention_mask, dict):
        if len(attention_mask) != 1:
            raise ValueError(f"Expected a single attention mask, got {len(attention_mask)}")
        attention_mask = next(iter(attention_mask.values()))
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError("ptkernels: prompt tuning generate() with a 4D attention mask (static cache)")
        if present is not None:
            virtual = present.to(attention_mask.device, attention_mask.dtype)
        else:
            virtual = torch.ones(attention_mask.shape[0], num_virtual, dtype=attention_mask.dtype,
                                 device=attention_mask.device)
        model_kwargs["attention_mask"] = torch.cat((virtual, attention_mask), dim=1)
    elif present is not None:
        raise ValueError("ptkernels: generate() with adapters of different num_virtual_tokens needs an attention_mask")
    model_kwargs.pop("cache_position", None)
    if past_len == 0:
        embeds = model_kwargs.get("inputs_embeds")
        if embeds is not None:  # generate(inputs_embeds=...): prefill with the given embeddings
            model_kwargs["inputs_embeds"] = _prepend_prompt(prompt, embeds)
        else:
            model_kwargs["inputs_embeds"] = _prompt_and_input_embeddings(self, input_ids, prompt)
        model_kwargs["input_ids"] = None
    # Positions as if each row were alone: the virtual tokens at 0 .. P-1, the real tokens after them,
    # padding skipped (so left padding changes nothing). PEFT drops position ids here and the model
    # counts from the cache instead, which shifts left-padded rows by their padding.
    step_inputs = model_kwargs["input_ids"] if model_kwargs.get("input_ids") is not None else model_kwargs["inputs_embeds"]
    extended_mask = model_kwargs.get("attention_mask")
    model_kwargs["position_ids"] = (
        None if extended_mask is None else _positions_from_mask(extended_mask, step_inputs.shape[1])
    )
    return model_kwargs


def _positions_from_mask(attention_mask: Tensor, num_new: int) -> Tensor:
    """(B, num_new) position ids of the last ``num_new`` tokens of a (B, T) padding mask: each row
    counts its attended tokens from 0 (padded slots get 1, as transformers' generate does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -num_new:]


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------


_PATCHED_METHODS = ("forward", "prepare_inputs_for_generation", "generate")


def _submodel_configs(hf_model: nn.Module) -> list:
    """The configs of the sub-models of ``hf_model`` other than its own config (distinct objects):
    T5's encoder and decoder stacks hold deep copies of the model's config, which their attention
    modules read ``_attn_implementation`` from, so patching sets it there too (as transformers'
    ``set_attn_implementation`` does). BART-family stacks share the model's config: nothing to do."""
    from transformers import PreTrainedModel

    seen, configs = {id(hf_model.config)}, []
    for module in hf_model.modules():
        if isinstance(module, PreTrainedModel) and id(module.config) not in seen:
            seen.add(id(module.config))
            configs.append(module.config)
    return configs


def _set_backend(hf_model: nn.Module, backend: Optional[str]) -> None:
    for m in attention_modules(hf_model):
        if backend is None:
            if BACKEND_ATTR in m.__dict__:
                delattr(m, BACKEND_ATTR)
        else:
            setattr(m, BACKEND_ATTR, backend)


def patch(model, *, backend: str = "auto", shift_positions: bool = True, prefix_dropout: float = 0.0,
          seq2seq_prefix: str = "peft"):
    """Run ``model`` through ptkernels' fused kernels; in place, returns the same object.

    Arguments:
        model: a PEFT ``PeftModel`` whose active adapter is PREFIX_TUNING (with or without
            ``prefix_projection``), P_TUNING (MLP or LSTM encoder) or PROMPT_TUNING, for task types
            SEQ_CLS, TOKEN_CLS, CAUSAL_LM or FEATURE_EXTRACTION, or PREFIX_TUNING for SEQ_2_SEQ_LM on
            BART- and T5-family encoder-decoder models (see ``seq2seq_prefix``); or a plain
            transformers model (attention then runs through ``ptkernels.prefix_attention`` without
            a prefix; T5's relative position bias as the op's ``relative_bias_table`` /
            ``relative_bias_buckets``).
            Architectures: decided by capability (:mod:`ptkernels.integrations.capabilities`);
            a model without what the patched path needs raises ``UnsupportedModelError`` (a
            ValueError) here, at patch time, naming the model type and the reason.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch", for the attention
            and prompt-embedding ops.
        shift_positions: True (default): real tokens get positions P, P + 1, ... after P prefix
            tokens, as under PEFT, so outputs equal the unpatched PEFT model's and adapters are
            interchangeable with it. For models with learned absolute positions this limits the
            input to ``max_position_embeddings - P`` tokens (BERT: 512 - P). False: real tokens
            start at position 0 as in the base model (the full 512 for BERT, the positions seen
            in pre-training), but outputs then differ from the unpatched PEFT model, so train and
            serve the adapter with the same setting. Only prefix tuning is affected, and not on
            T5-family models, which have no absolute positions: their relative position bias always
            puts the prefix at PEFT's cache positions (0 .. P-1 before the real tokens).
        prefix_dropout: P-Tuning v2's recipe: in training mode, dropout with this probability on
            every layer's prefix keys and values, an independent mask per example (its reference
            implementation applies ``nn.Dropout`` to the batch-expanded ``past_key_values``), done
            inside ``prefix_attention`` without B copies of the prefix. Default 0: the patched model
            equals the unpatched PEFT model (PEFT has no such dropout). Prefix tuning only (prompt
            tuning / P-tuning have no prefix keys and values). ValueError outside [0, 1).
        seq2seq_prefix: SEQ_2_SEQ_LM prefix tuning (BART and T5 families) only. "peft" (default):
            the prefix goes exactly where PEFT 0.21.2 puts it: only into the decoder's
            self-attention, decoder layer l reading entries 4l mod 2N and 4l + 1 mod 2N of the
            prefix encoder's output (N = the adapter's num_layers: the decoder's layers for BART,
            T5's ``num_layers``, the encoder's), so part of the prefix is never used; the decoder's
            positions start at P (BART, with ``shift_positions``; T5: the relative bias's query
            positions are P + ..., as under PEFT). "per_layer": decoder layer l's self-attention
            and its cross-attention both read its own entries 2l and 2l + 1 (every decoder layer's
            entries trained); not interchangeable with PEFT. The encoder never gets a prefix.
            ValueError otherwise.

    Several adapters in one batch: with more than one prompt-learning adapter loaded
    (``load_adapter`` / ``add_adapter``), ``model(..., adapter_names=[name per example])`` and
    ``model.generate(..., adapter_names=[...])`` give each example what the unpatched PEFT model
    gives with that adapter active (PEFT itself supports ``adapter_names`` only for LoRA-like
    adapters). Prefix tuning: each adapter's encoder runs once, the prefixes form a bank read per
    example (different P allowed; positions shifted by each example's own P, as PEFT does).
    Prompt tuning / P-tuning: outputs are (B, max P + S, ...), each example's virtual tokens
    right-aligned before its real tokens (the left slots of a shorter prompt masked), the real
    tokens in the last S positions. Classification heads (PEFT's per-adapter ``modules_to_save``
    copies) are picked per example. Backward fills each adapter's parameters with the gradient of
    its own examples (of the loss HF computes for the whole batch); PEFT trains only the active
    adapter's parameters, so call ``model.set_requires_grad(names)`` (or set ``requires_grad``) to
    train several at once. Prefix-tuning and prompt-tuning adapters cannot share a batch.

    Patching again is harmless (it updates ``backend`` / ``shift_positions``); ``unpatch`` restores
    the original behaviour exactly. Parameters are untouched: PEFT's encoder parameters are the
    ones trained, and ``save_pretrained`` writes the same adapter files as without patching.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ptkernels.patch expects a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(prefix_dropout, bool) or not isinstance(prefix_dropout, (int, float)) or not 0.0 <= prefix_dropout < 1.0:
        raise ValueError(f"prefix_dropout must be a float in [0, 1), got {prefix_dropout!r}")
    if seq2seq_prefix not in SEQ2SEQ_PREFIX_MODES:
        raise ValueError(f"seq2seq_prefix must be one of {SEQ2SEQ_PREFIX_MODES}, got {seq2seq_prefix!r}")
    is_peft = _is_peft_model(model)
    if is_peft:
        support = _check_peft_model(model)
        hf_model = model.get_base_model()
    else:
        if type(model).__module__.startswith("peft."):
            raise ValueError(f"ptkernels.patch does not support {type(model).__name__}; pass the PeftModel")
        support = check_model(model, prefix_tuning=False)
        hf_model = model
    register()

    state = model.__dict__.get(_STATE)
    if state is None:
        state = {
            "attn_implementation": hf_model.config._attn_implementation,
            "sub_attn_implementations": [(c, c._attn_implementation) for c in _submodel_configs(hf_model)],
            "is_peft": is_peft,
        }
        if is_peft:
            state["task"] = _enum_value(model.active_peft_config.task_type)
        for name in _PATCHED_METHODS:
            state["had_" + name] = name in model.__dict__
            state["orig_" + name] = model.__dict__.get(name)
        if not is_peft and hasattr(model, "prepare_inputs_for_generation"):
            state["orig_prepare"] = model.prepare_inputs_for_generation
        model.__dict__[_STATE] = state
    state["backend"] = backend
    state["shift_positions"] = bool(shift_positions)
    state["prefix_dropout"] = float(prefix_dropout)
    state["seq2seq_prefix"] = seq2seq_prefix
    state["support"] = support
    state["causal"] = any(getattr(m, "is_causal", False) for m in attention_modules(hf_model))

    hf_model.config._attn_implementation = ATTN_IMPLEMENTATION
    for config, _ in state["sub_attn_implementations"]:
        config._attn_implementation = ATTN_IMPLEMENTATION
    _set_backend(hf_model, backend)
    if "kv_sharing_shims" not in state:
        state["kv_sharing_shims"] = _keep_2d_masks_in_kv_sharing(hf_model)
    if "prefix_check" not in state:  # also checks a ptkernels_prefix= handed to a plain model
        state["prefix_check"] = hf_model.register_forward_hook(check_every_layer_read_the_prefix, with_kwargs=True)
    if getattr(hf_model.config, "is_encoder_decoder", False):
        _install_seq2seq_hooks(model, hf_model, state)
    if is_peft:
        model.forward = types.MethodType(_patched_forward, model)
        if state["task"] == "SEQ_2_SEQ_LM":
            model.prepare_inputs_for_generation = types.MethodType(_seq2seq_prepare_inputs_for_generation, model)
        if state["task"] == "CAUSAL_LM":
            model.prepare_inputs_for_generation = types.MethodType(_patched_prepare_inputs_for_generation, model)
            model.generate = types.MethodType(_patched_generate, model)
    elif "orig_prepare" in state:
        model.prepare_inputs_for_generation = types.MethodType(_plain_prepare_inputs_for_generation, model)
    return model


def _keep_2d_masks_in_kv_sharing(hf_model) -> list:
    """Gemma 4 slices its inputs to the kept logits before its KV-sharing layers, masks included, as if
    every mask were 4D (B, 1, Sq, Sk); under "ptkernels" a mask is the 2D (B, Sk) key padding mask,
    whose keys are not sliced. Wrap each such model's ``_maybe_slice_kv_shared_inputs`` (on the
    instance, undone by ``unpatch``) so that 2D masks pass through unsliced. Returns the wrapped modules."""
    wrapped = []
    for module in hf_model.modules():
        original = getattr(module, "_maybe_slice_kv_shared_inputs", None)
        if original is None or "_maybe_slice_kv_shared_inputs" in module.__dict__:
            continue
        signature = inspect.signature(original)

        def keep_2d(*args, _original=original, _signature=signature, **kwargs):
            bound = _signature.bind(*args, **kwargs)
            masks = bound.arguments.get("causal_mask_mapping") or {}
            flat = {k: v for k, v in masks.items() if isinstance(v, Tensor) and v.dim() == 2}
            if flat:
                bound.arguments["causal_mask_mapping"] = {k: None if k in flat else v for k, v in masks.items()}
            *rest, sliced = _original(*bound.args, **bound.kwargs)
            return (*rest, {**sliced, **flat})

        module.__dict__["_maybe_slice_kv_shared_inputs"] = keep_2d
        wrapped.append(module)
    return wrapped


def unpatch(model):
    """Undo :func:`patch`: the original attention implementation, forward and generation hooks."""
    state = model.__dict__.get(_STATE) if isinstance(model, nn.Module) else None
    if state is None:
        return model
    hf_model = model.get_base_model() if state["is_peft"] else model
    hf_model.config._attn_implementation = state["attn_implementation"]
    for config, original in state.get("sub_attn_implementations", ()):
        config._attn_implementation = original
    _set_backend(hf_model, None)
    if "prefix_check" in state:
        state["prefix_check"].remove()
    for hook in state.get("seq2seq_hooks", ()):
        hook.remove()
    for module in state.get("roles", ()):
        module.__dict__.pop(ROLE_ATTR, None)
    for module in state.get("kv_sharing_shims", ()):
        module.__dict__.pop("_maybe_slice_kv_shared_inputs", None)
    for module in state.get("biased", ()):
        module.__dict__.pop(BIAS_ATTR, None)
    for name in _PATCHED_METHODS:
        if state["had_" + name]:
            model.__dict__[name] = state["orig_" + name]
        else:
            model.__dict__.pop(name, None)
    del model.__dict__[_STATE]
    return model


def is_patched(model) -> bool:
    return isinstance(model, nn.Module) and _STATE in model.__dict__
