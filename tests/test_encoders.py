"""ptkernels.encoders: the prefix / prompt encoders evaluated once per forward, checked against PEFT.

Given PEFT's encoder weights, the batch-shared outputs must equal what PEFT's ``get_prompt`` hands
to the model for every batch row (prefix K/V layer by layer, head by head; prompt embeddings).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from ptkernels.integrations.encoders import (  # noqa: E402
    PrefixEncoder,
    PromptEncoder,
    prefix_key_values,
    prompt_embeddings,
    split_prefix_key_values,
)

pytestmark = pytest.mark.filterwarnings("ignore")
P = 5
B = 3


def _base(arch):
    torch.manual_seed(0)
    if arch == "bert":
        return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)), TaskType.FEATURE_EXTRACTION
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, n_positions=64)), TaskType.CAUSAL_LM
    if arch == "llama":  # GQA: PEFT provisions the prefix with num_key_value_heads
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=37, vocab_size=99)), TaskType.CAUSAL_LM
    raise ValueError(arch)


def _geometry(model):
    cfg = model.get_base_model().config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return cfg.num_hidden_layers, kv, cfg.hidden_size // heads


def _cache_layer(cache, layer):
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]  # older transformers


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_prefix_key_values_equal_peft_get_prompt(arch, projection):
    base, task = _base(arch)
    torch.manual_seed(1)
    model = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=projection,
                                                    encoder_hidden_size=24))
    layers, kv_heads, head_dim = _geometry(model)
    encoder = model.prompt_encoder["default"]
    calls = []
    encoder.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    stacked = prefix_key_values(encoder, P, layers, kv_heads, head_dim)
    assert calls == [(1, P)]  # one row, not B
    assert stacked.shape == (2 * layers, kv_heads, P, head_dim) and stacked.is_contiguous()
    with torch.no_grad():
        cache = model.get_prompt(batch_size=B)
    for layer in range(layers):
        keys, values = _cache_layer(cache, layer)
        assert keys.shape == (B, kv_heads, P, head_dim)
        for b in range(B):
            torch.testing.assert_close(stacked[2 * layer], keys[b], rtol=0, atol=1e-6)
            torch.testing.assert_close(stacked[2 * layer + 1], values[b], rtol=0, atol=1e-6)

    # the standalone module with PEFT's parameter names loads PEFT's state dict unchanged
    mine = PrefixEncoder(P, layers, kv_heads, head_dim, prefix_projection=projection, token_dim=kv_heads * head_dim,
                         encoder_hidden_size=24)
    mine.load_state_dict(encoder.state_dict(), strict=True)
    torch.testing.assert_close(mine(), stacked, rtol=0, atol=1e-6)
    k0, v0 = PrefixEncoder.layer(mine(), layers - 1)
    torch.testing.assert_close(k0, _cache_layer(cache, layers - 1)[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(v0, _cache_layer(cache, layers - 1)[1][0], rtol=0, atol=1e-6)


def test_prefix_gradient_is_the_batch_sum():
    """Shared prefix evaluated once: its gradient equals PEFT's B-row evaluation's for a batch-summed loss."""
    base, task = _base("llama")
    torch.manual_seed(1)
    model = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True))
    layers, kv_heads, head_dim = _geometry(model)
    encoder = model.prompt_encoder["default"]
    weights = torch.randn(B, 2 * layers, kv_heads, P, head_dim)
    stacked = prefix_key_values(encoder, P, layers, kv_heads, head_dim)
    (stacked.unsqueeze(0) * weights).sum().backward()
    mine = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    encoder.zero_grad()
    flat = encoder(torch.arange(P).unsqueeze(0).expand(B, -1))  # PEFT's way: B rows
    per_row = flat.view(B, P, 2 * layers, kv_heads, head_dim).permute(0, 2, 3, 1, 4)
    (per_row * weights).sum().backward()
    for n, p in encoder.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["MLP", "LSTM", "PROMPT"])
def test_prompt_embeddings_equal_peft_get_prompt(kind):
    base, task = _base("gpt2")
    torch.manual_seed(1)
    if kind == "PROMPT":
        config = PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    else:
        config = PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24,
                                     encoder_reparameterization_type=kind)
    model = get_peft_model(base, config)
    encoder = model.prompt_encoder["default"]
    prompt = prompt_embeddings(encoder, P)
    assert prompt.shape == (P, 32)
    with torch.no_grad():
        ref = model.get_prompt(batch_size=B)
    for b in range(B):
        torch.testing.assert_close(prompt, ref[b], rtol=0, atol=1e-6)

    mine = PromptEncoder(P, 32, encoder_type=None if kind == "PROMPT" else kind, encoder_hidden_size=24)
    mine.load_state_dict(encoder.state_dict(), strict=True)
    torch.testing.assert_close(mine(), prompt, rtol=0, atol=1e-6)


def test_inference_mode_reads_the_stored_prefix(tmp_path):
    base, task = _base("gpt2")
    torch.manual_seed(1)
    model = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True))
    layers, kv_heads, head_dim = _geometry(model)
    trained = prefix_key_values(model.prompt_encoder["default"], P, layers, kv_heads, head_dim).detach()
    model.save_pretrained(tmp_path)
    fresh, _ = _base("gpt2")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert loaded.active_peft_config.inference_mode
    got = prefix_key_values(loaded.prompt_encoder["default"], P, layers, kv_heads, head_dim, inference_mode=True)
    torch.testing.assert_close(got, trained, rtol=0, atol=1e-6)
    with torch.no_grad():
        cache = loaded.get_prompt(batch_size=2)
    torch.testing.assert_close(got[0], _cache_layer(cache, 0)[0][1], rtol=0, atol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="num_layers"):
        split_prefix_key_values(torch.zeros(P, 100), 2, 2, 8)
    with pytest.raises(ValueError, match="encoder_type"):
        PromptEncoder(P, 16, encoder_type="GRU")
    assert split_prefix_key_values(torch.zeros(1, P, 2 * 2 * 2 * 8), 2, 2, 8).shape == (4, 2, P, 8)
