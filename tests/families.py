"""Every model family the installed transformers can build as a tiny random model: what
``ptkernels.patch`` does with it (match PEFT exactly, or refuse with a reason). Not a test module;
``test_families.py`` runs it, and ``python tests/families.py`` prints the README's table.

``FAMILIES`` maps a model type to (kind, config overrides, expected outcome). The outcome is None
(patched equals the reference exactly in float64: prefix tuning with and without projection, and
P-tuning) or a regular expression that the refusal must match (an ``UnsupportedModelError`` at patch
time, or the "did not reach" ``RuntimeError`` at the first forward for models whose layers drop
``**kwargs``). A family whose transformers class is missing is skipped.

The reference is unpatched PEFT. Where unpatched PEFT fails on a family (``REFERENCE_CONCAT``),
it is transformers' own SDPA attention with the prefix keys and values concatenated explicitly in
front of the layer's keys and values (:func:`concat_prefix_logits`), with PEFT's positions.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, hidden_act="gelu", attention_dropout=0.0, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, embedding_size=32, rotary_dim=4)
P = 3

DEC, ENC = "decoder", "encoder"
KWARGS = "did not reach the attention"
FAMILIES: dict[str, tuple[str, dict, Optional[str]]] = {
    # decoders (CAUSAL_LM)
    "llama": (DEC, {}, None), "mistral": (DEC, {}, None), "mixtral": (DEC, {}, None), "qwen2": (DEC, {}, None),
    "qwen2_moe": (DEC, {}, None), "qwen3": (DEC, {}, None), "qwen3_moe": (DEC, {}, None), "gemma": (DEC, {}, None),
    "gemma3_text": (DEC, {}, None), "phi": (DEC, {}, None), "phi3": (DEC, {}, None), "phimoe": (DEC, {}, None),
    "glm": (DEC, {}, None), "glm4": (DEC, {}, None), "glm4_moe": (DEC, {}, None), "granite": (DEC, {}, None),
    "granitemoe": (DEC, {}, None), "olmo": (DEC, {}, None), "olmo2": (DEC, {}, None), "olmo3": (DEC, {}, None),
    "cohere": (DEC, {}, None), "cohere2": (DEC, {}, None), "starcoder2": (DEC, {}, None), "gpt_neox": (DEC, {}, None),
    "smollm3": (DEC, {}, None), "gpt2": (DEC, {}, None), "ministral": (DEC, {}, None), "exaone4": (DEC, {}, None),
    "seed_oss": (DEC, {}, None), "apertus": (DEC, {}, None), "hunyuan_v1_dense": (DEC, {}, None),
    "hunyuan_v1_moe": (DEC, {}, None), "ernie4_5": (DEC, {}, None), "arcee": (DEC, {}, None),
    "llama4_text": (DEC, {}, None), "helium": (DEC, {}, None), "bitnet": (DEC, {}, None),
    "exaone_moe": (DEC, {}, None), "persimmon": (DEC, {}, None), "opt": (DEC, {}, None), "biogpt": (DEC, {}, None),
    "gptj": (DEC, {}, None), "codegen": (DEC, {}, None),
    "gemma2": (DEC, {}, None), "vaultgemma": (DEC, {}, None),  # attention logit softcapping
    "gpt_oss": (DEC, {}, None),  # attention sinks
    "gemma4_text": (DEC, {}, None),
    "bloom": (DEC, {}, "does not call transformers' attention interface"),
    "falcon": (DEC, {}, None),  # (its outcome depends on the transformers release: VERSIONED_OUTCOMES)
    "deepseek_v3": (DEC, {}, "multi-head latent attention"),
    "glm4_moe_lite": (DEC, {}, "multi-head latent attention"),
    "qwen3_next": (DEC, {}, "found no self-attention module with a layer_idx"),
    "jamba": (DEC, {}, "found no self-attention module with a layer_idx"),
    "minimax": (DEC, {}, "does not call transformers' attention interface"),
    "stablelm": (DEC, {}, KWARGS),
    "nemotron": (DEC, {}, KWARGS),
    # encoders (SEQ_CLS)
    "bert": (ENC, {}, None), "roberta": (ENC, {}, None), "xlm-roberta": (ENC, {}, None), "electra": (ENC, {}, None),
    "ernie": (ENC, {}, None), "camembert": (ENC, {}, None), "data2vec-text": (ENC, {}, None),
    "roberta-prelayernorm": (ENC, {}, None),
    "megatron-bert": (ENC, {}, "does not call transformers' attention interface"),
    "roformer": (ENC, {}, "does not call transformers' attention interface"),
}


def _transformers_at_least(release: str) -> bool:
    """The installed transformers is ``release`` or newer (False when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("transformers")) >= Version(release)
    except PackageNotFoundError:
        return False


# Families whose outcome changed with a transformers release: (release, outcome before it, outcome
# from it). Falcon's attention calls the attention interface from transformers 5.25 on, but its
# decoder layer still calls the attention without **kwargs, so the prefix cannot reach it.
VERSIONED_OUTCOMES = {"falcon": ("5.25.0", "does not call transformers' attention interface", KWARGS)}
for _name, (_release, _before, _after) in VERSIONED_OUTCOMES.items():
    FAMILIES[_name] = FAMILIES[_name][:2] + ((_after if _transformers_at_least(_release) else _before),)
# P-tuning's outcome where it differs from prefix tuning's (a refusal reason).
PTUNING_OUTCOME = {"gemma4_text": "per-layer input embeddings are computed from the token ids"}
# Families where unpatched PEFT prefix tuning fails (so the concatenated-keys reference is used).
REFERENCE_CONCAT: set[str] = set()
ADAPTERS = ("prefix", "prefix_proj", "ptuning")


def build_config(model_type: str, overrides: dict):
    """A tiny config: the TINY values that the config class takes, then the overrides."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    allowed = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    kwargs = {k: v for k, v in TINY.items() if k in allowed}
    kwargs.update(overrides)
    return cls(**kwargs)


def build_peft_model(model_type: str, adapter: str, *, seed: int = 0, task: Optional[str] = None):
    """(PEFT model in float64, task) for one family and adapter ("prefix", "prefix_proj", "ptuning");
    task defaults to CAUSAL_LM for decoders and SEQ_CLS for encoders."""
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kind, overrides, _ = FAMILIES[model_type]
    config = build_config(model_type, overrides)
    task = task or ("CAUSAL_LM" if kind == DEC else "SEQ_CLS")
    if task == "SEQ_CLS":
        config.num_labels = 2
    auto = AutoModelForCausalLM if task == "CAUSAL_LM" else AutoModelForSequenceClassification
    torch.manual_seed(seed)
    try:
        base = auto.from_config(config, attn_implementation="sdpa", experts_implementation="eager",
                                dtype=torch.float64)
    except (TypeError, ValueError):
        base = auto.from_config(config, attn_implementation="eager", dtype=torch.float64)
    if adapter == "prefix":
        adapter_config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P)
    elif adapter == "prefix_proj":
        adapter_config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True,
                                                 encoder_hidden_size=16)
    elif adapter == "ptuning":
        adapter_config = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=16)
    else:
        raise ValueError(adapter)
    model = peft.get_peft_model(base, adapter_config).double()
    model.eval()  # dropout off (gradients still flow)
    return model, task


def make_batch(task: str, vocab: int = 97, *, left_padding: bool = False):
    """Two rows, the second padded (right, or left): ids (2, 7), mask (2, 7), labels."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    pad = slice(0, 2) if left_padding else slice(5, 7)
    mask[1, pad] = 0
    ids[1, pad] = 0
    labels = ids.masked_fill(mask == 0, -100) if task == "CAUSAL_LM" else torch.tensor([0, 1])
    return ids, mask, labels


def concat_prefix_logits(model, ids, mask, labels):
    """The reference where PEFT itself fails: the unpatched base model with transformers' own SDPA
    attention function and its 4D mask over [prefix; keys] concatenated explicitly in every layer,
    the prefix always visible, real tokens at PEFT's positions (P, P + 1, ...). The prefix comes
    from PEFT's prompt encoder. Returns (logits, loss). (Not the models' eager attention: most of
    those compute the softmax in float32, which would blur a float64 comparison to ~1e-8.)"""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ptkernels.integrations.capabilities import attention_modules, text_config

    base = model.get_base_model()
    cfg = text_config(base.config)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    encoder = model.prompt_encoder[model.active_adapter]
    tokens = torch.arange(P).unsqueeze(0)
    prefix = encoder(tokens).view(P, 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3)  # (2L, Hkv, P, D)
    for m in attention_modules(base):
        m._reference_prefix = (prefix[2 * m.layer_idx], prefix[2 * m.layer_idx + 1])

    def attention(module, query, key, value, attention_mask, **kwargs):
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        pk, pv = module._reference_prefix
        batch = query.shape[0]
        key = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:
            shape = (*attention_mask.shape[:-1], P)  # the prefix columns: visible to every query
            visible = (torch.ones(shape, dtype=torch.bool) if attention_mask.dtype == torch.bool
                       else torch.zeros(shape, dtype=attention_mask.dtype))
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("concat_reference", attention)
    AttentionMaskInterface.register("concat_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    before = base.config._attn_implementation
    base.config._attn_implementation = "concat_reference"
    try:
        positions = (torch.arange(ids.shape[1]) + P).unsqueeze(0)
        out = base(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions)
    finally:
        base.config._attn_implementation = before
        for m in attention_modules(base):
            del m._reference_prefix
    return out.logits, out.loss


def markdown_table() -> str:
    """The README's table: family, kind, outcome (from FAMILIES; ``test_families.py`` checks it)."""
    from transformers import CONFIG_MAPPING

    def describe(name: str, outcome: Optional[str]) -> str:
        if outcome is None:
            return "equal to unpatched PEFT in float64" + (" (PEFT fails: concatenated-keys reference)"
                                                           if name in REFERENCE_CONCAT else "")
        if outcome == KWARGS:
            return ("prefix tuning refused at the first forward: its layers do not forward **kwargs to the "
                    "attention; P-tuning equal to unpatched PEFT in float64")
        return f"refused at patch time: {outcome}"

    rows = ["| family | kind | prefix tuning (± projection), P-tuning |", "|---|---|---|"]
    for name, (kind, _, outcome) in sorted(FAMILIES.items()):
        if name not in CONFIG_MAPPING:
            continue
        text = describe(name, outcome)
        if name in VERSIONED_OUTCOMES:  # the same table whichever release is installed
            release, before, after = VERSIONED_OUTCOMES[name]
            text = f"transformers < {release}: {describe(name, before)}; from {release}: {describe(name, after)}"
        if name in PTUNING_OUTCOME:
            text = f"prefix tuning {text}; P-tuning refused at patch time: {PTUNING_OUTCOME[name]}"
        rows.append(f"| {name} | {kind} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
