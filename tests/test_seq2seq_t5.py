"""ptkernels.patch on T5-family encoder-decoder models (T5, mT5, UMT5) with PEFT SEQ_2_SEQ_LM prefix tuning.

T5 has no position embedding: every self-attention adds a bucketed relative position bias (one
table per stack reused by every layer in T5 / mT5, one per layer in UMT5; cross-attention none).
The patched attention hands ``prefix_attention`` the table and the buckets instead of the model's
dense bias, with PEFT's cache positions (the prefix at 0 .. P-1, the real tokens after it).

Default mode: the patched model against the SAME model unpatched (PEFT's own path, eager attention,
run on transformers 5.24 through the oracle shim): logits, loss, the gradient of every trainable
parameter (which ones stay zero included), and greedy generate() against greedy decoding by full
forwards of the unpatched model.

``seq2seq_prefix="per_layer"``: against an explicit eager reference written here: the unpatched base
model whose attention concatenates each decoder layer's own prefix entries in front of its
self-attention keys (the dense bias recomputed by the model's own ``compute_bias`` for the
concatenated keys, the prefix at PEFT's positions) and its cross-attention keys (zero bias, as T5
gives cross-attention), the masks extended with visible prefix columns.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface,
    GenerationConfig,
    LongT5Config,
    LongT5ForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
    UMT5Config,
    UMT5ForConditionalGeneration,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

import ptkernels  # noqa: E402
from ptkernels.integrations import patch, unpatch  # noqa: E402
from ptkernels.integrations.capabilities import seq2seq_relative_biases  # noqa: E402
from ptkernels.integrations.transformers import (  # noqa: E402
    BIAS_ATTR,
    NO_BIAS,
    ROLE_ATTR,
    ptkernels_attention_forward,
)
from ptkernels.testing import (  # noqa: E402
    greedy_seq2seq_by_full_forwards,
    with_peft_oracle_shim,
    without_peft_oracle_shim,
)
from test_seq2seq import (  # noqa: E402
    add_prefix_adapter,
    assert_close_float32,
    assert_generate_matches,
    assert_same,
    assert_triton_generate_matches_peft,
    forward_backward,
)
from test_seq2seq import make_batch as _make_batch  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_backend = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 100
P = 3  # virtual tokens
PAD, EOS = 0, 1
GEN_EOS = 50
HEADS, D_KV = 4, 8

_ARCHS = {
    "t5": (T5Config, T5ForConditionalGeneration),
    "mt5": (MT5Config, MT5ForConditionalGeneration),
    "umt5": (UMT5Config, UMT5ForConditionalGeneration),
}
# encoder / decoder layers: T5's adapter is provisioned for config.num_layers (the encoder's) entries,
# so 3 + 2 makes PEFT's placement (decoder layer l reads entries 4l mod 6, 4l + 1 mod 6) differ
# from the per-layer one and from "mod 2L"
_LAYERS = {"t5": (3, 2), "mt5": (2, 2), "umt5": (2, 2)}


def make_base(arch: str, *, dtype=torch.float64, seed: int = 0, d_kv: int = D_KV, attn: str = "eager"):
    """A tiny random T5-family model (eager attention: the oracle), its relative bias tables drawn
    large enough that a wrong relative position changes the logits visibly."""
    config_cls, model_cls = _ARCHS[arch]
    enc, dec = _LAYERS[arch]
    config = config_cls(
        vocab_size=VOCAB, d_model=HEADS * D_KV, d_kv=d_kv, d_ff=48, num_layers=enc, num_decoder_layers=dec,
        num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, attn_implementation=attn,
    )
    torch.manual_seed(seed)
    base = model_cls(config).to(dtype)
    # an output head of its own (a tied one makes a tiny random T5 copy its last input token, so greedy
    # decoding would repeat the start token)
    base.config.tie_word_embeddings = False
    base.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, HEADS * D_KV, dtype=dtype))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    base.generation_config = GenerationConfig(decoder_start_token_id=PAD, eos_token_id=GEN_EOS, pad_token_id=PAD)
    return base


def make_model(arch: str, *, projection: bool = False, dtype=torch.float64, seed: int = 0, d_kv: int = D_KV):
    """The base model with a fresh PEFT prefix-tuning adapter (unpatched, with the oracle shim)."""
    base = make_base(arch, dtype=dtype, seed=seed, d_kv=d_kv)
    extra = {} if d_kv == D_KV else dict(num_attention_heads=HEADS, token_dim=HEADS * d_kv)
    return add_prefix_adapter(base, projection=projection, dtype=dtype, seed=seed, **extra)


def make_batch(seed: int = 1):
    """test_seq2seq's batch with T5's pad id."""
    return _make_batch(seed, pad=PAD)


def _num_layers(model) -> int:
    return model.active_peft_config.num_layers


def _entries_with_grad(model) -> torch.Tensor:
    """(2N,) bool: which of the adapter's 2N prefix entries got a gradient."""
    grad = model.prompt_encoder["default"].embedding.weight.grad
    return (grad.view(P, 2 * _num_layers(model), -1) != 0).any(-1).any(0)


# ------------------------------------------------------------------------------------------------
# default: exactly PEFT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["t5", "mt5", "umt5"])
def test_default_equals_peft(arch, projection):
    model = make_model(arch, projection=projection)
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    assert_same(forward_backward(model, batch), want, atol=1e-10)


def test_default_trains_what_peft_trains():
    """T5 provisions 2 * 3 entries (num_layers = the encoder's 3); the 2 decoder layers read entries
    (0, 1) and (4, 5), as PEFT's [E; E] grouping gives them; entries 2, 3 never get a gradient."""
    model = make_model("t5")
    forward_backward(model, make_batch())
    peft_used = _entries_with_grad(model)
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    forward_backward(model, make_batch())
    assert peft_used.tolist() == [True, True, False, False, True, True]
    assert _entries_with_grad(model).tolist() == peft_used.tolist()


def test_inner_dim_differs_from_d_model():
    """mT5 / T5 v1.1 shapes: heads * d_kv != d_model (PEFT's default token_dim is d_model, so the
    adapter is given token_dim = heads * d_kv): still PEFT's result; the default geometry is refused
    with a message naming the fix."""
    model = make_model("mt5", d_kv=16)
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    assert_same(forward_backward(model, batch), want, atol=1e-10)
    base = make_base("mt5", d_kv=16)
    wrong = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match=r"token_dim=64"):
        patch(wrong)


@pytest.mark.parametrize("arch", ["t5", "umt5"])
def test_plain_model_patched_equals_unpatched(arch):
    """A plain (no PEFT) model patched: every attention through ptkernels with the relative bias
    (encoder: bidirectional buckets, P = 0), every parameter trainable: logits and all gradients,
    the relative bias tables' included, equal the eager model's."""
    base = make_base(arch)
    ids, mask, labels = make_batch()

    def run():
        base.zero_grad(set_to_none=True)
        out = base(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}

    want_logits, want_grads = run()
    patch(base, backend="torch")
    got_logits, got_grads = run()
    unpatch(base)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-10, rtol=0)
    assert got_grads.keys() == want_grads.keys()
    tables = [n for n in want_grads if "relative_attention_bias" in n]
    assert len(tables) == (2 if arch == "t5" else sum(_LAYERS[arch]))
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-10, rtol=0, msg=name)
    for name in tables:
        assert want_grads[name].abs().max() > 0, name


@triton_backend
@pytest.mark.parametrize("arch", ["t5", "umt5"])
def test_default_equals_peft_triton(arch):
    model = make_model(arch, dtype=torch.float32)
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="triton")
    assert_close_float32(forward_backward(model, batch), want)


# ------------------------------------------------------------------------------------------------
# per_layer: the explicit eager reference
# ------------------------------------------------------------------------------------------------

_REF_IMPL = "ptkernels_test_t5_prefix_concat"
_REF: dict = {}  # attention module -> (prefix_k, prefix_v (H, P, D) each, bias owner or None)


def _concat_attention(module, query, key, value, attention_mask, position_bias=None, **kwargs):
    """The model's own eager attention over [prefix; keys], the prefix columns visible to every
    query; a self-attention's dense bias recomputed by the model's ``compute_bias`` over the
    concatenated keys with the queries after them (PEFT's positions: prefix 0 .. P-1, real keys
    P .., queries last), a cross-attention's zero bias padded with zeros."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if module in _REF:
        prefix_k, prefix_v, owner = _REF[module]
        batch, prefix_len = query.shape[0], prefix_k.shape[-2]
        key = torch.cat([prefix_k.expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_v.expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:  # additive 4D mask: 0 = visible
            attention_mask = F.pad(attention_mask, (prefix_len, 0), value=0.0)
        q_len, k_len = query.shape[2], key.shape[2]
        if owner is None:
            assert not position_bias.any()  # T5 gives cross-attention no bias
            position_bias = F.pad(position_bias, (prefix_len, 0), value=0.0)
        else:
            position_bias = owner.compute_bias(q_len, k_len, device=query.device, past_seen_tokens=k_len - q_len)
    return eager(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)


AttentionInterface.register(_REF_IMPL, _concat_attention)
AttentionMaskInterface.register(_REF_IMPL, eager_mask)


def _configs(base) -> list:
    """Every config the model's attention modules read (T5's stacks hold copies of the model's)."""
    seen, configs = set(), []
    for m in base.modules():
        if isinstance(m, PreTrainedModel) and id(m.config) not in seen:
            seen.add(id(m.config))
            configs.append(m.config)
    return configs


class per_layer_reference:
    """Context manager: inside it, the unpatched base model of ``model`` runs the per_layer
    reference (decoder layer l's self- and cross-attention reading entries 2l, 2l + 1 of the prefix
    encoder's output; the encoder untouched)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        base = self.model.get_base_model()
        flat = self.model.prompt_encoder["default"](torch.arange(P)[None])[0]  # (P, 2N * H * D)
        entries = flat.view(P, 2 * _num_layers(self.model), HEADS, -1).permute(1, 2, 0, 3)  # (2N, H, P, D)
        _REF.clear()
        decoder = base.get_decoder()
        for l, block in enumerate(decoder.block):
            attn = block.layer[0].SelfAttention
            owner = attn if attn.has_relative_attention_bias else decoder.block[0].layer[0].SelfAttention
            _REF[attn] = (entries[2 * l], entries[2 * l + 1], owner)
            _REF[block.layer[1].EncDecAttention] = (entries[2 * l], entries[2 * l + 1], None)
        self.saved = [(c, c._attn_implementation) for c in _configs(base)]
        for config, _ in self.saved:
            config._attn_implementation = _REF_IMPL
        return base

    def __exit__(self, *exc):
        for config, impl in self.saved:
            config._attn_implementation = impl
        _REF.clear()


def per_layer_forward_backward(model, batch):
    ids, mask, labels = batch
    model.zero_grad(set_to_none=True)
    with per_layer_reference(model) as base:
        out = base(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


class _ReferenceDecoder:
    """What ``greedy_seq2seq_by_full_forwards`` calls: full forwards of the per_layer reference."""

    def __init__(self, model):
        self.model = model

    def get_base_model(self):
        return self.model.get_base_model()

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, **kwargs):
        with per_layer_reference(self.model) as base:
            return base(**kwargs)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["t5", "umt5"])
def test_per_layer_equals_reference(arch, projection):
    model = make_model(arch, projection=projection)
    batch = make_batch()
    want = per_layer_forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    assert_same(forward_backward(model, batch), want, atol=1e-10)


def test_per_layer_trains_the_decoder_layers_entries():
    """per_layer reads entries 0 .. 2L - 1 (the decoder's 2 layers), all of them in both attentions;
    the adapter's entries for the encoder's third layer stay unused."""
    model = make_model("t5")
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    forward_backward(model, make_batch())
    assert _entries_with_grad(model).tolist() == [True, True, True, True, False, False]


def test_per_layer_differs_from_peft():
    model = make_model("t5")
    batch = make_batch()
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    per_layer = forward_backward(model, batch)[0]
    patch(model, backend="torch", seq2seq_prefix="peft")
    assert (forward_backward(model, batch)[0] - per_layer).abs().max() > 1e-3


@triton_backend
def test_per_layer_equals_reference_triton():
    model = make_model("t5", dtype=torch.float32)
    batch = make_batch()
    want = per_layer_forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="triton", seq2seq_prefix="per_layer")
    assert_close_float32(forward_backward(model, batch), want, loss=False)


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,mode", [("t5", "peft"), ("umt5", "peft"), ("t5", "per_layer")])
def test_generate_equals_full_forwards(arch, mode):
    """generate() (a KV cache of the real decoder tokens, the prefix from the keyword each step, the
    bias's query positions counted from the cache) against greedy decoding by full forwards, each
    row alone: of the unpatched PEFT model (default) or of the per_layer eager reference."""
    model = make_model(arch)
    ids, mask, _ = make_batch()
    new = 6
    if mode == "peft":
        want = greedy_seq2seq_by_full_forwards(model, ids, mask, max_new_tokens=new)
    else:
        want = greedy_seq2seq_by_full_forwards(_ReferenceDecoder(model), ids, mask, max_new_tokens=new)
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix=mode)
    assert_generate_matches(model, ids, mask, want, new)


def test_generate_equals_full_forwards_triton():
    """The same with the Triton kernels (interpreter on CPU) in float32, against the unpatched PEFT
    model's greedy full forwards in float32: decoding steps of one query over the cached keys, with
    the relative bias's query position counted past the prefix and the cache."""
    assert_triton_generate_matches_peft(make_model("t5", dtype=torch.float32), *make_batch()[:2])


# ------------------------------------------------------------------------------------------------
# training features, unpatch
# ------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_equals_without():
    model = make_model("t5")
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    batch = make_batch()
    model.train()
    want = forward_backward(model, batch)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.get_base_model().decoder.block[1].gradient_checkpointing
    got = forward_backward(model, batch)
    assert_same(got, want, atol=1e-12)


def test_unpatch_restores_peft():
    """unpatch gives back PEFT's own path exactly, including the attention implementation of T5's
    encoder and decoder stacks (their configs are copies of the model's) and the module tags."""
    model = make_model("t5")
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    base = model.get_base_model()
    assert {c._attn_implementation for c in _configs(base)} == {"ptkernels"}
    forward_backward(model, batch)
    unpatch(model)
    assert {c._attn_implementation for c in _configs(base)} == {"eager"}
    assert not any(BIAS_ATTR in m.__dict__ or ROLE_ATTR in m.__dict__ for m in base.modules())
    with_peft_oracle_shim(model)
    assert_same(forward_backward(model, batch), want, atol=0.0)


# ------------------------------------------------------------------------------------------------
# the bias tags and the attention function's refusals
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["t5", "umt5"])
def test_bias_tags(arch):
    """Each self-attention reads its stack's first table (T5) or its own (UMT5), with the stack's
    direction; cross-attention none. The buckets are the module's own bucketing of
    arange(-(L - 1), L), equal to ptkernels.relative_position_buckets, built once per L."""
    base = make_base(arch)
    biases = seq2seq_relative_biases(base)
    for name, stack in (("encoder", base.get_encoder()), ("decoder", base.get_decoder())):
        for block in stack.block:
            attn = block.layer[0].SelfAttention
            owner = attn if arch == "umt5" else stack.block[0].layer[0].SelfAttention
            assert biases[attn].owner is owner and biases[attn].bidirectional == (name == "encoder")
            if name == "decoder":
                assert biases[block.layer[1].EncDecAttention] == NO_BIAS
    assert len(biases) == sum(_LAYERS[arch]) + _LAYERS[arch][1]
    for bias in (biases[base.get_encoder().block[1].layer[0].SelfAttention],
                 biases[base.get_decoder().block[1].layer[0].SelfAttention]):
        buckets = bias.buckets(70, "cpu")
        assert buckets.dtype == torch.int32 and buckets.shape == (2 * 128 - 1,)  # L = 128 >= 70
        assert bias.buckets(100, "cpu") is buckets  # cached
        want = ptkernels.relative_position_buckets(128, num_buckets=8, max_distance=16,
                                                   bidirectional=bias.bidirectional)
        assert torch.equal(buckets, want)
        assert bias.buckets(5, "cpu").shape == (2 * 64 - 1,)
    assert biases[base.get_encoder().block[0].layer[0].SelfAttention].table() is \
        base.get_encoder().block[0].layer[0].SelfAttention.relative_attention_bias.weight


def _attention_call(base, module, **kwargs):
    q = torch.randn(1, HEADS, 4, D_KV, dtype=torch.float64)
    return ptkernels_attention_forward(module, q, q, q, kwargs.pop("mask", None), scaling=1.0,
                                       position_bias=torch.zeros(1, HEADS, 4, 4, dtype=torch.float64), **kwargs)


def test_relative_bias_with_4d_mask_or_packed_rows_raises():
    base = make_base("t5")
    patch(base, backend="torch")
    attn = base.get_encoder().block[1].layer[0].SelfAttention
    out, _ = _attention_call(base, attn)  # the tagged module runs (its dense bias ignored)
    assert out.shape == (1, 4, HEADS, D_KV)
    with pytest.raises(NotImplementedError, match="relative position bias with a 4D attention mask"):
        _attention_call(base, attn, mask=torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="relative position bias with packed sequences"):
        _attention_call(base, attn, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2, max_length_k=2)
    unpatch(base)
    with pytest.raises(NotImplementedError, match="position_bias"):  # untagged: refused as before
        _attention_call(base, attn)


# ------------------------------------------------------------------------------------------------
# refusals at patch time
# ------------------------------------------------------------------------------------------------


def _longt5():
    config = LongT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                          encoder_attention_type="local", local_radius=2, decoder_start_token_id=PAD,
                          pad_token_id=PAD)
    return LongT5ForConditionalGeneration(config)


def test_longt5_refused_with_reason():
    """LongT5's encoder attends locally (LongT5LocalAttention, its own maths): refused, plain and
    prefix-tuned, naming the model type and the reason; the model is left as it was."""
    base = _longt5()
    reason = r"model_type 'longt5'.*LongT5LayerLocalSelfAttention.*local / transient-global"
    with pytest.raises(ValueError, match=reason):
        patch(base)
    model = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match=reason):
        patch(model)
    assert not any(BIAS_ATTR in m.__dict__ or ROLE_ATTR in m.__dict__ for m in base.modules())
    assert base.config._attn_implementation != "ptkernels"


def test_switch_transformers_refused_with_reason():
    """SwitchTransformers has T5's blocks and bias, but its encoder builds an additive 4D mask by
    hand, which ptkernels' attention does not take with a relative bias: refused at patch time
    (not at the first padded forward)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, expert_capacity=8, num_layers=2,
                                      num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1,
                                      num_heads=4, num_experts=2, decoder_start_token_id=PAD, pad_token_id=PAD)
    base = SwitchTransformersForConditionalGeneration(config)
    model = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match=r"model_type 'switch_transformers'.*encoder SwitchTransformersStack builds "
                                         r"its 4D attention mask by hand"):
        patch(model)
    assert base.config._attn_implementation != "ptkernels"


def test_stack_without_shared_bias_refused(monkeypatch):
    """T5's later layers have no table of their own: they are given layer 0's only because the
    stack's forward hands layer 0's bias on (read from its source). A stack whose source does not
    (here T5Stack's with that line removed) is refused rather than run without the bias."""
    from ptkernels.integrations import capabilities

    base = make_base("t5")
    stack_forward = type(base.get_decoder()).forward
    original = capabilities._source
    assert capabilities._SHARES_BIAS.search(original(stack_forward))
    monkeypatch.setattr(capabilities, "_source", lambda obj: capabilities._SHARES_BIAS.sub(
        "", original(obj)) if obj is stack_forward else original(obj))
    with pytest.raises(ValueError, match=r"model_type 't5'.*block 1 .*does not pass on layer 0's"):
        patch(base)


def test_t5_prompt_tuning_refused():
    base = make_base("t5")
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match="PREFIX_TUNING only"):
        patch(model)
