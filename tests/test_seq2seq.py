"""ptkernels.patch on encoder-decoder models (BART family) with PEFT SEQ_2_SEQ_LM prefix tuning
(the T5 family: tests/test_seq2seq_t5.py).

Default mode: the patched model is compared with the SAME model unpatched (PEFT 0.21.2's own code
path, run on transformers 5.24 through the oracle shim): logits, loss, the gradient of every
trainable parameter (including which ones stay zero, as in PEFT), and greedy generate() against
decoding by full forwards of the unpatched model.

``seq2seq_prefix="per_layer"``: compared with an explicit eager reference written here, the
unpatched base model whose attention concatenates each decoder layer's own prefix entries in front
of its self-attention keys and its cross-attention (encoder) keys, the mask extended with visible
prefix columns.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface,
    BartConfig,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    PegasusConfig,
    PegasusForConditionalGeneration,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402
from transformers.models.bart.modeling_bart import eager_attention_forward  # noqa: E402

from ptkernels.integrations import patch, unpatch  # noqa: E402
from ptkernels.testing import (  # noqa: E402
    greedy_seq2seq_by_full_forwards,
    with_peft_oracle_shim,
    without_peft_oracle_shim,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_backend = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 100
P = 3  # virtual tokens
LAYERS = 2
PAD, BOS, EOS = 1, 0, 2
GEN_EOS = 50

_ARCHS = {
    "bart": (BartConfig, BartForConditionalGeneration),
    "mbart": (MBartConfig, MBartForConditionalGeneration),
    "marian": (MarianConfig, MarianMTModel),
    "pegasus": (PegasusConfig, PegasusForConditionalGeneration),
}


def make_model(arch: str, *, projection: bool = False, dtype=torch.float64, seed: int = 0):
    """A tiny random encoder-decoder model with a fresh PEFT prefix-tuning adapter (unpatched, with
    the oracle shim so that PEFT's own path runs on transformers 5.24)."""
    config_cls, model_cls = _ARCHS[arch]
    config = config_cls(
        vocab_size=VOCAB, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.3,
    )
    torch.manual_seed(seed)
    base = model_cls(config).to(dtype)
    # generation stops at GEN_EOS (a random tiny model predicts its config EOS at once)
    base.generation_config = GenerationConfig(decoder_start_token_id=EOS, eos_token_id=GEN_EOS, pad_token_id=PAD,
                                              bos_token_id=BOS)
    return add_prefix_adapter(base, projection=projection, dtype=dtype, seed=seed)


def add_prefix_adapter(base, *, projection: bool, dtype, seed: int, **extra):
    """``base`` with a fresh PEFT SEQ_2_SEQ_LM prefix-tuning adapter (P virtual tokens, its parameters
    drawn large enough to matter), in ``dtype``, unpatched, with the oracle shim, in eval mode."""
    peft_config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24, **extra)
    model = get_peft_model(base, peft_config).to(dtype)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # PEFT's init is small; make the prefix matter
        for p in model.prompt_encoder.parameters():
            p.normal_(0.0, 0.5)
    return with_peft_oracle_shim(model).eval()


def make_batch(seed: int = 1, pad: int = PAD):
    """Three source rows of 7 tokens (the second left-padded, the third right-padded with ``pad``),
    their mask and 5 target labels each (-100 past the third row's third)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, pad)
    labels = torch.randint(3, VOCAB, (3, 5), generator=g)
    labels[2, 3:] = -100
    return ids, mask, labels


def forward_backward(model, batch):
    ids, mask, labels = batch
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def assert_close_float32(got, want, *, loss: bool = True):
    """A float32 (Triton) forward_backward against its float32 oracle: logits 1e-4, loss 1e-5 (when
    ``loss``), each gradient 1e-4 absolute and relative."""
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    if loss:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    for name in got[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-4, rtol=1e-4, msg=name)


def assert_same(got, want, atol):
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, want
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=0, msg=name)
        # parameters PEFT never uses stay exactly zero in both
        assert torch.equal(grads[name] == 0, ref_grads[name] == 0), name


def _entries_with_grad(model) -> torch.Tensor:
    """(2L,) bool: which of the adapter's 2L prefix entries got a gradient (embedding rows read as
    (P, 2L, H * D), PEFT's layout of the prefix encoder's output)."""
    grad = model.prompt_encoder["default"].embedding.weight.grad
    return (grad.view(P, 2 * LAYERS, -1) != 0).any(-1).any(0)


# ------------------------------------------------------------------------------------------------
# default: exactly PEFT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["bart", "mbart", "marian", "pegasus"])
def test_default_equals_peft(arch, projection):
    model = make_model(arch, projection=projection)
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    assert_same(forward_backward(model, batch), want, atol=1e-10)


def test_default_trains_what_peft_trains():
    """PEFT reads entries (4l mod 2L, 4l + 1 mod 2L) in decoder layer l: with 2 layers, layer 1's
    entries never get a gradient; the patched model leaves them untouched too."""
    model = make_model("bart")
    forward_backward(model, make_batch())
    peft_used = _entries_with_grad(model)
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    forward_backward(model, make_batch())
    assert peft_used.tolist() == [True, True, False, False]
    assert _entries_with_grad(model).tolist() == peft_used.tolist()


def test_default_positions_follow_peft():
    """shift_positions=False (decoder positions from 0) is NOT what PEFT computes: the default's
    shift by P is what makes the two equal (this test fails if the shift were a no-op)."""
    model = make_model("bart")
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch", shift_positions=False)
    got = forward_backward(model, batch)
    assert (got[0] - want[0]).abs().max() > 1e-3


@triton_backend
def test_default_equals_peft_triton():
    model = make_model("bart", dtype=torch.float32)
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="triton")
    assert_close_float32(forward_backward(model, batch), want)


@pytest.mark.parametrize("mode", ["peft", "per_layer"])
def test_generate_equals_full_forwards(mode):
    """generate() (KV cache of real decoder tokens, prefix from the keyword each step) against
    greedy decoding by full forwards, each row alone: of the unpatched PEFT model (default), or of
    the patched model without a cache (per_layer, which PEFT cannot express)."""
    model = make_model("bart")
    ids, mask, _ = make_batch()
    new = 6
    if mode == "peft":
        want = greedy_seq2seq_by_full_forwards(model, ids, mask, max_new_tokens=new)
        without_peft_oracle_shim(model)
        patch(model, backend="torch")
    else:
        without_peft_oracle_shim(model)
        patch(model, backend="torch", seq2seq_prefix="per_layer")
        want = greedy_seq2seq_by_full_forwards(model, ids, mask, max_new_tokens=new)
    assert_generate_matches(model, ids, mask, want, new)


def assert_generate_matches(model, ids, mask, want, new: int) -> None:
    """Greedy ``model.generate`` of ``new`` tokens equals ``want`` (greedy full forwards, row by row),
    decodes something non-trivial, and stops early only when every row has produced GEN_EOS."""
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=1)
    assert got.shape[1] <= want.shape[1]
    assert len(set(got[:, 1:].flatten().tolist())) > 1  # a non-trivial decode
    assert torch.equal(got, want[:, : got.shape[1]]), (got, want)
    if got.shape[1] < want.shape[1]:  # generate stops when every row has ended
        assert all((row == GEN_EOS).any() for row in got[:, 1:])


def assert_triton_generate_matches_peft(model, ids, mask, new: int = 6) -> None:
    """``model`` (float32, unpatched) patched with the Triton kernels generates what the unpatched
    PEFT model's greedy full forwards give."""
    want = greedy_seq2seq_by_full_forwards(model, ids, mask, max_new_tokens=new)
    without_peft_oracle_shim(model)
    patch(model, backend="triton")
    assert_generate_matches(model, ids, mask, want, new)


def test_generate_equals_full_forwards_triton():
    """generate() with the Triton kernels (interpreter on CPU), float32, against the unpatched PEFT
    model's greedy full forwards in float32."""
    assert_triton_generate_matches_peft(make_model("bart", dtype=torch.float32), *make_batch()[:2])


def test_unpatch_restores_peft():
    model = make_model("bart")
    batch = make_batch()
    want = forward_backward(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    forward_backward(model, batch)
    unpatch(model)
    with_peft_oracle_shim(model)
    assert_same(forward_backward(model, batch), want, atol=0.0)


# ------------------------------------------------------------------------------------------------
# per_layer: every decoder layer its own self- and cross-attention prefix
# ------------------------------------------------------------------------------------------------

_REF_IMPL = "ptkernels_test_prefix_concat"
_REF_PREFIX: dict = {}  # attention module -> (prefix_k, prefix_v), each (H, P, D)


def _concat_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention over [prefix; keys], the prefix columns visible to every query."""
    if module in _REF_PREFIX:
        prefix_k, prefix_v = _REF_PREFIX[module]
        batch = query.shape[0]
        key = torch.cat([prefix_k.expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_v.expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:  # additive 4D mask: 0 = visible
            attention_mask = F.pad(attention_mask, (prefix_k.shape[-2], 0), value=0.0)
    return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_REF_IMPL, _concat_attention)
AttentionMaskInterface.register(_REF_IMPL, eager_mask)


def per_layer_reference(model, batch):
    """The unpatched base model, decoder layer l's self-attention and cross-attention both reading
    entries 2l (keys) and 2l + 1 (values) of the prefix encoder's output, decoder positions P, P + 1, ...
    (the prefix counted as past, as PEFT counts it); the encoder untouched."""
    base = model.get_base_model()
    encoder = model.prompt_encoder["default"]
    flat = encoder(torch.arange(P)[None])[0]  # (P, 2L * H * D)
    heads = base.config.decoder_attention_heads
    entries = flat.view(P, 2 * LAYERS, heads, -1).permute(1, 2, 0, 3)  # (2L, H, P, D)
    _REF_PREFIX.clear()
    for l, layer in enumerate(base.get_decoder().layers):
        _REF_PREFIX[layer.self_attn] = (entries[2 * l], entries[2 * l + 1])
        _REF_PREFIX[layer.encoder_attn] = (entries[2 * l], entries[2 * l + 1])
    shift = base.get_decoder().embed_positions.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, "position_ids": kwargs["position_ids"] + P}), with_kwargs=True)
    saved = base.config._attn_implementation
    base.config._attn_implementation = _REF_IMPL
    try:
        model.zero_grad(set_to_none=True)
        ids, mask, labels = batch
        out = base(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    finally:
        base.config._attn_implementation = saved
        shift.remove()
        _REF_PREFIX.clear()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("projection", [False, True])
def test_per_layer_equals_reference(projection):
    model = make_model("bart", projection=projection)
    batch = make_batch()
    want = per_layer_reference(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    assert_same(forward_backward(model, batch), want, atol=1e-10)


@triton_backend
def test_per_layer_equals_reference_triton():
    model = make_model("bart", dtype=torch.float32)
    batch = make_batch()
    want = per_layer_reference(model, batch)
    without_peft_oracle_shim(model)
    patch(model, backend="triton", seq2seq_prefix="per_layer")
    assert_close_float32(forward_backward(model, batch), want, loss=False)


def test_per_layer_trains_every_prefix_parameter():
    model = make_model("bart")
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    forward_backward(model, make_batch())
    assert _entries_with_grad(model).all()
    assert (model.prompt_encoder["default"].embedding.weight.grad != 0).all()


def test_per_layer_differs_from_peft():
    """The two modes are different models (the option is not ignored)."""
    model = make_model("bart")
    batch = make_batch()
    without_peft_oracle_shim(model)
    patch(model, backend="torch", seq2seq_prefix="per_layer")
    per_layer = forward_backward(model, batch)[0]
    patch(model, backend="torch", seq2seq_prefix="peft")
    assert (forward_backward(model, batch)[0] - per_layer).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bogus", None, 1, "PEFT"])
def test_bad_seq2seq_prefix(bad):
    model = without_peft_oracle_shim(make_model("bart"))
    with pytest.raises(ValueError, match="seq2seq_prefix"):
        patch(model, seq2seq_prefix=bad)


def test_seq2seq_prompt_tuning_refused():
    config_cls, model_cls = _ARCHS["bart"]
    base = model_cls(config_cls(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                decoder_ffn_dim=48))
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match="PREFIX_TUNING only"):
        patch(model)


@pytest.mark.parametrize("config", [PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
                                    PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)],
                         ids=["prefix", "prompt"])
def test_encoder_decoder_with_another_task_refused(config):
    """PEFT hands an encoder-decoder classifier's prefix / prompt to the whole model, which the
    decoder-only / encoder-only path does not reproduce (BART SEQ_CLS prefix tuning patched used to
    run and differ from PEFT by ~1e-4): refused, naming the task."""
    base = BartForSequenceClassification(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_labels=2))
    model = get_peft_model(base, config)
    with pytest.raises(ValueError, match="encoder-decoder models .*BartForSequenceClassification.* SEQ_2_SEQ_LM only, "
                                         "got task_type SEQ_CLS"):
        patch(model)


def test_plain_bart_patched_equals_unpatched():
    """A plain (no PEFT) BART model patched: attention through ptkernels with no prefix, no position shift."""
    base = make_model("bart").get_base_model()
    ids, mask, labels = make_batch()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, labels=labels).logits
        patch(base, backend="torch")
        got = base(input_ids=ids, attention_mask=mask, labels=labels).logits
        unpatch(base)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_gradient_checkpointing_equals_without():
    """Non-reentrant gradient checkpointing (transformers' default) on a patched seq2seq model: the same
    loss and gradients as without (the prefix is a keyword, not a cache, so checkpointing works)."""
    model = make_model("bart")
    patch(model, backend="torch")
    batch = make_batch()
    model.train()
    want = forward_backward(model, batch)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = forward_backward(model, batch)
    assert_same(got, want, atol=1e-12)


def test_prefix_dropout_applies_in_training_only():
    model = make_model("bart")
    patch(model, backend="torch", prefix_dropout=0.5)
    batch = make_batch()
    model.eval()
    plain = make_model("bart")
    patch(plain, backend="torch")
    assert_same(forward_backward(model, batch), forward_backward(plain, batch), atol=1e-12)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    a = forward_backward(model, batch)
    torch.manual_seed(0)
    b = forward_backward(model, batch)
    torch.manual_seed(1)
    c = forward_backward(model, batch)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
