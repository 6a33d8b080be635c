"""ptkernels.patch / unpatch on tiny HF models with PEFT prompt-learning adapters.

Every check compares the patched model with the SAME model unpatched (PEFT's own code path, with
transformers' sdpa attention), never with numbers copied from ptkernels: loss, logits of real
tokens and the gradient of every trainable parameter (eval and train mode), a few optimizer steps,
greedy generate() with a KV cache, save_pretrained / from_pretrained, unpatch, patch twice,
gradient checkpointing, and the patch-time errors. Backend "torch" runs the full matrix; backend
"triton" (Triton's interpreter on CPU, slow) a subset.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import (  # noqa: E402
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

import ptkernels.integrations.transformers as ptk_tf  # noqa: E402
import tiny_models  # noqa: E402
from ptkernels.integrations import is_patched, patch, unpatch  # noqa: E402

HAS_TRITON_BACKEND = importlib.util.find_spec("ptkernels.ops.prefix_attention.function") is not None
try:
    import triton  # noqa: F401
except Exception:  # pragma: no cover
    HAS_TRITON_BACKEND = False
triton_backend = pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="Triton backend of prefix_attention not available")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 through Triton on a GPU uses TF32 tensor-core dots; the interpreter computes in fp32
TRITON_ATOL = 1e-4 if DEVICE == "cpu" else 2e-2
VOCAB = 99
P = 4  # virtual tokens
ATOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, pad_token_id=0)


def make_config(arch: str):
    if arch == "bert":
        return BertConfig(**COMMON, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.1)
    if arch == "roberta":
        return RobertaConfig(**{**COMMON, "pad_token_id": 1}, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.1)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                          resid_pdrop=0.1, embd_pdrop=0.1, pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    if arch == "llama":
        return LlamaConfig(**COMMON, num_key_value_heads=2)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, num_key_value_heads=2)
    if arch == "qwen3":
        return Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**COMMON, num_key_value_heads=1, sliding_window=None)
    raise ValueError(arch)


AUTO = {
    "SEQ_CLS": AutoModelForSequenceClassification,
    "TOKEN_CLS": AutoModelForTokenClassification,
    "CAUSAL_LM": AutoModelForCausalLM,
    "FEATURE_EXTRACTION": AutoModel,
}


def make_base(arch: str, task: str, seed: int = 0):
    torch.manual_seed(seed)
    config = make_config(arch)
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        config.num_labels = 3
    return AUTO[task].from_config(config, attn_implementation="sdpa")


ADAPTERS = ("prefix", "prefix_proj", "ptuning_mlp", "ptuning_lstm", "prompt")


def make_peft_config(adapter: str, task: str):
    return tiny_models.make_peft_config(adapter, task, num_virtual_tokens=P)


def make_model(arch: str, task: str, adapter: str, seed: int = 0):
    base = make_base(arch, task, seed)
    torch.manual_seed(seed + 1)
    model = get_peft_model(base, make_peft_config(adapter, task))
    if task == "SEQ_CLS":
        model.config.problem_type = "single_label_classification"
    return tiny_models.with_peft_oracle_shim(model)


def make_batch(arch: str, task: str, batch: int = 3, seq: int = 7, left_pad: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pad_id = 1 if arch == "roberta" else 0
    ids = torch.randint(2, VOCAB - 1, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = [seq, seq - 2, 3][:batch]
    for b, n in enumerate(lengths):
        if left_pad:
            mask[b, : seq - n] = 0
        else:
            mask[b, n:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = None
    if task == "SEQ_CLS":
        labels = torch.randint(0, 3, (batch,), generator=g)
    elif task == "TOKEN_CLS":
        labels = torch.randint(0, 3, (batch, seq), generator=g).masked_fill(mask == 0, -100)
    elif task == "CAUSAL_LM":
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _feature_weights(hidden: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(hidden.shape[-1], generator=g).to(hidden.device)


def step(model, ids, mask, labels, task, adapter, *, seed=0, backward=True):
    """One forward (+ backward): returns (loss, per-real-token outputs, {param name: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same hidden-dropout draws in train mode
    kwargs = {} if labels is None else {"labels": labels}
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    prompt_like = adapter not in ("prefix", "prefix_proj")
    if task == "FEATURE_EXTRACTION":
        hidden = out.last_hidden_state
        if prompt_like:
            hidden = hidden[:, P:]
        real = hidden[mask.bool()]
        loss = (real * _feature_weights(real)).sum()
        outputs = real
    else:
        loss = out.loss
        logits = out.logits
        if task == "SEQ_CLS":
            outputs = logits
        else:
            if prompt_like:
                logits = logits[:, P:]
            outputs = logits[mask.bool()]
    if backward:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), outputs.detach(), grads


def assert_close_results(ref, got, atol=ATOL, what=""):
    (l0, o0, g0), (l1, o1, g1) = ref, got
    torch.testing.assert_close(l1, l0, atol=atol, rtol=1e-4, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(o1, o0, atol=atol, rtol=1e-4, msg=lambda m: f"{what} outputs: {m}")
    assert set(g1) == set(g0), f"{what}: trainable params with grads differ: {set(g0) ^ set(g1)}"
    assert g0, f"{what}: no trainable gradients"
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=atol, rtol=1e-4, msg=lambda m: f"{what} grad {name}: {m}")


class AttentionSpy:
    """Counts calls of ptkernels' attention and records how the prefix arrived."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ptk_tf.prefix_attention

        def spy(q, k, v, prefix_k, prefix_v, **kw):
            self.calls.append(dict(q=tuple(q.shape), k=tuple(k.shape),
                                   prefix=None if prefix_k is None else tuple(prefix_k.shape),
                                   mask=None if kw.get("key_padding_mask") is None else tuple(kw["key_padding_mask"].shape),
                                   causal=kw["causal"], backend=kw["backend"]))
            return real(q, k, v, prefix_k, prefix_v, **kw)

        monkeypatch.setattr(ptk_tf, "prefix_attention", spy)


# ------------------------------------------------------------------------------------------------
# The equivalence matrix: architecture x task x adapter, eval and train mode, backend torch
# ------------------------------------------------------------------------------------------------

ARCH_TASKS = [
    ("bert", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("bert", "FEATURE_EXTRACTION"),
    ("roberta", "SEQ_CLS"), ("roberta", "TOKEN_CLS"), ("roberta", "FEATURE_EXTRACTION"),
    ("gpt2", "CAUSAL_LM"), ("gpt2", "SEQ_CLS"), ("gpt2", "TOKEN_CLS"), ("gpt2", "FEATURE_EXTRACTION"),
    ("llama", "CAUSAL_LM"), ("llama", "SEQ_CLS"), ("llama", "TOKEN_CLS"), ("llama", "FEATURE_EXTRACTION"),
    ("qwen2", "CAUSAL_LM"), ("qwen2", "SEQ_CLS"),
    ("qwen3", "CAUSAL_LM"), ("mistral", "CAUSAL_LM"),
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("arch,task", ARCH_TASKS)
def test_matches_unpatched_peft(arch, task, adapter, backend, monkeypatch):
    model = make_model(arch, task, adapter)
    ids, mask, labels = make_batch(arch, task)
    if task == "TOKEN_CLS" and adapter not in ("prefix", "prefix_proj"):
        labels = None  # PEFT itself cannot compute this loss (labels are not extended by P)
        task_for_loss = "FEATURE_EXTRACTION_LOGITS"
    else:
        task_for_loss = task

    def run(mode):
        getattr(model, mode)()
        if task_for_loss == "FEATURE_EXTRACTION_LOGITS":
            return _token_logits_step(model, ids, mask, adapter)
        return step(model, ids, mask, labels, task, adapter)

    ref_eval, ref_train = run("eval"), run("train")
    tiny_models.without_peft_oracle_shim(model)  # the patched model runs without the oracle's help
    patch(model, backend=backend)
    spy = AttentionSpy(monkeypatch)
    got_eval, got_train = run("eval"), run("train")
    assert_close_results(ref_eval, got_eval, what=f"{arch}/{task}/{adapter} eval")
    assert_close_results(ref_train, got_train, what=f"{arch}/{task}/{adapter} train")

    # the attention really ran through ptkernels, with a batch-shared (Hkv, P, D) prefix and a 2D mask
    num_layers = model.get_base_model().config.num_hidden_layers
    assert len(spy.calls) == 2 * num_layers
    for call in spy.calls:
        assert call["backend"] == backend
        if adapter in ("prefix", "prefix_proj"):
            assert call["prefix"] is not None and len(call["prefix"]) == 3 and call["prefix"][1] == P
            assert call["k"][2] == ids.shape[1]  # real keys only: the prefix is not concatenated
        else:
            assert call["prefix"] is None and call["k"][2] == ids.shape[1] + P
        assert call["mask"] is None or len(call["mask"]) == 2

    unpatch(model)
    again = run("eval") if not tiny_models.peft_needs_oracle_shim(model) else \
        (tiny_models.with_peft_oracle_shim(model), run("eval"))[1]
    assert_close_results(ref_eval, again, atol=0, what="after unpatch")


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama", "qwen2"])
def test_patched_runs_where_unpatched_peft_cannot(arch):
    """transformers >= 5.24 renamed ``past_key_values`` to ``cache``; PEFT 0.21.2's signature check
    then refuses prefix tuning for sequence classification (BERT family) or crashes (decoders). The
    patched model does not go through that check. (Its equality with the oracle is
    test_matches_unpatched_peft, which removes the oracle's shim before patching.)"""
    model = tiny_models.without_peft_oracle_shim(make_model(arch, "SEQ_CLS", "prefix"))
    ids, mask, labels = make_batch(arch, "SEQ_CLS")
    if tiny_models.peft_needs_oracle_shim(model):
        with pytest.raises((ValueError, TypeError)):
            model(input_ids=ids, attention_mask=mask, labels=labels)
    patch(model, backend="torch")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().max() > 0


def _token_logits_step(model, ids, mask, adapter):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits[:, P:][mask.bool()]
    loss = (logits * _feature_weights(logits)).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), logits.detach(), grads


def test_prefix_matters():
    """Sanity: the adapter changes the output, so the comparisons above can fail."""
    model = make_model("llama", "CAUSAL_LM", "prefix").eval()
    ids, mask, labels = make_batch("llama", "CAUSAL_LM")
    with_prefix = step(model, ids, mask, labels, "CAUSAL_LM", "prefix", backward=False)
    with model.disable_adapter():
        without = step(model, ids, mask, labels, "CAUSAL_LM", "prefix", backward=False)
    assert (with_prefix[1] - without[1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_shift_positions_false_starts_real_tokens_at_zero(arch, task):
    model = make_model(arch, task, "prefix").eval()
    ids, mask, labels = make_batch(arch, task)
    shifted = step(model, ids, mask, labels, task, "prefix", backward=False)
    # oracle: PEFT adds P to explicit position ids, so arange(S) - P lands real tokens on 0..S-1
    positions = (torch.arange(ids.shape[1]) - P).unsqueeze(0).expand(ids.shape[0], -1)
    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions)
    patch(model, backend="torch", shift_positions=False)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.loss, ref.loss, atol=ATOL, rtol=1e-4)
    real = slice(None) if task == "SEQ_CLS" else mask.bool()
    torch.testing.assert_close(got.logits[real], ref.logits[real], atol=ATOL, rtol=1e-4)
    assert (got.logits[real].detach() - shifted[1]).abs().max() > 1e-4  # and it differs from PEFT's default


def test_shift_positions_false_gives_bert_its_full_length():
    model = make_model("bert", "SEQ_CLS", "prefix").eval()
    max_pos = model.get_base_model().config.max_position_embeddings
    ids = torch.randint(2, VOCAB - 1, (2, max_pos))
    mask = torch.ones_like(ids)
    with pytest.raises((IndexError, RuntimeError)):  # PEFT: positions P .. max_pos + P - 1 overflow the table
        model(input_ids=ids, attention_mask=mask)
    patch(model, backend="torch")
    with pytest.raises((IndexError, RuntimeError)):  # default = PEFT's convention, same limit
        model(input_ids=ids, attention_mask=mask)
    patch(model, backend="torch", shift_positions=False)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 3)


# ------------------------------------------------------------------------------------------------
# What runs once per forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["prefix_proj", "ptuning_lstm"])
def test_encoder_runs_once_per_forward_on_one_row(adapter):
    model = make_model("gpt2", "CAUSAL_LM", adapter)
    ids, mask, labels = make_batch("gpt2", "CAUSAL_LM", batch=3)
    seen = []
    encoder = model.prompt_encoder["default"]
    encoder.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen[-1][0] == 3 if adapter == "prefix_proj" else 1  # PEFT: prefix encoder on B rows
    seen.clear()
    patch(model, backend="torch")
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert seen == [(1, P)]


def test_no_cache_concat_or_4d_mask(monkeypatch):
    """The prefix never enters a DynamicCache, and no 4D mask is built."""
    model = patch(make_model("llama", "CAUSAL_LM", "prefix"), backend="torch")
    ids, mask, labels = make_batch("llama", "CAUSAL_LM")
    import transformers.cache_utils as cu

    updates = []
    orig_update = cu.DynamicCache.update

    def spy_update(self, key_states, *a, **k):
        updates.append(key_states.shape[-2])
        return orig_update(self, key_states, *a, **k)

    monkeypatch.setattr(cu.DynamicCache, "update", spy_update)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
    assert updates and all(n == ids.shape[1] for n in updates)  # only real tokens are cached
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    spy = AttentionSpy(monkeypatch)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert all(c["mask"] == tuple(mask.shape) for c in spy.calls)


# ------------------------------------------------------------------------------------------------
# Training: a few optimizer steps give the same loss curve
# ------------------------------------------------------------------------------------------------


def _train(model, ids, mask, labels, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for i in range(steps):
        torch.manual_seed(100 + i)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch,task,adapter", [
    ("bert", "SEQ_CLS", "prefix_proj"), ("llama", "CAUSAL_LM", "prefix"), ("gpt2", "CAUSAL_LM", "ptuning_mlp"),
])
def test_training_curve_matches(arch, task, adapter):
    model = make_model(arch, task, adapter)
    ids, mask, labels = make_batch(arch, task)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ref = _train(model, ids, mask, labels)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    patch(model, backend="torch")
    got = _train(model, ids, mask, labels)
    assert ref[0] != ref[-1]
    assert got == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# generate(): greedy, KV cache, left padding
# ------------------------------------------------------------------------------------------------


def _generate(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0, use_cache=True)


GENERATIVE_ARCHS = ["gpt2", "llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("arch", GENERATIVE_ARCHS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_generate_matches_greedy_full_forwards(arch, adapter, monkeypatch):
    """generate() is defined by the model that training optimises: with a KV cache, on a left-padded
    batch, each row equals greedy decoding by full forwards of the unpatched model on that row alone.
    (PEFT 0.21.2's own generate() loses the prefix on transformers >= 5.24, so it is not the oracle.)"""
    model = make_model(arch, "CAUSAL_LM", adapter, seed=3)
    ids, mask, _ = make_batch(arch, "CAUSAL_LM", left_pad=True)
    oracle = tiny_models.greedy_by_full_forwards(model, ids, mask)
    peft_generate = _generate(model, ids, mask)
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    spy = AttentionSpy(monkeypatch)
    got = _generate(model, ids, mask)
    assert torch.equal(got, oracle), f"{got}\n!=\n{oracle}"
    # prefill over the prompt, then single-token decoding steps against the cache
    layers = model.get_base_model().config.num_hidden_layers
    decode = [c for c in spy.calls if c["q"][2] == 1]
    assert len(decode) >= layers and not any(c["causal"] for c in decode)
    unpatch(model)
    tiny_models.with_peft_oracle_shim(model)
    assert torch.equal(_generate(model, ids, mask), peft_generate)  # PEFT's own generate() is back


def test_generate_oracle_sees_the_adapter():
    """The oracle can fail: without the adapter the greedy continuation differs."""
    model = make_model("llama", "CAUSAL_LM", "prefix", seed=3)
    ids, mask, _ = make_batch("llama", "CAUSAL_LM", left_pad=True)
    with_adapter = tiny_models.greedy_by_full_forwards(model, ids, mask)
    with model.disable_adapter():
        without = tiny_models.greedy_by_full_forwards(model, ids, mask)
    assert not torch.equal(with_adapter, without)


# ------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,task,adapter", [
    ("bert", "SEQ_CLS", "prefix_proj"), ("llama", "CAUSAL_LM", "ptuning_lstm"), ("gpt2", "CAUSAL_LM", "prefix"),
])
def test_save_pretrained_round_trip(arch, task, adapter, tmp_path):
    from safetensors.torch import load_file

    model = make_model(arch, task, adapter)
    ids, mask, labels = make_batch(arch, task)
    patch(model, backend="torch")
    _train(model, ids, mask, labels, steps=2)
    model.eval()
    patched_out = step(model, ids, mask, labels, task, adapter, backward=False)
    model.save_pretrained(tmp_path / "patched")
    unpatch(model)
    model.save_pretrained(tmp_path / "plain")
    a = load_file(str(tmp_path / "patched" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # PEFT loads the adapter unchanged (inference mode: the encoder output itself is stored)
    fresh = make_base(arch, task)
    if task == "SEQ_CLS":  # the classifier head is saved with the adapter; start from another one
        torch.nn.init.zeros_(fresh.classifier.dense.weight if arch == "roberta" else fresh.classifier.weight)
    loaded = tiny_models.with_peft_oracle_shim(PeftModel.from_pretrained(fresh, tmp_path / "patched").eval())
    peft_out = step(loaded, ids, mask, labels, task, adapter, backward=False)
    torch.testing.assert_close(peft_out[1], patched_out[1], atol=ATOL, rtol=1e-4)
    patch(loaded, backend="torch")
    torch.testing.assert_close(step(loaded, ids, mask, labels, task, adapter, backward=False)[1], patched_out[1],
                               atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# gradient checkpointing (PEFT's prefix tuning refuses / silently drops the prefix there)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,task,adapter", [
    ("llama", "CAUSAL_LM", "prefix_proj"), ("bert", "SEQ_CLS", "prefix"), ("gpt2", "CAUSAL_LM", "prefix"),
    ("gpt2", "CAUSAL_LM", "ptuning_lstm"),
])
def test_gradient_checkpointing(arch, task, adapter):
    model = make_model(arch, task, adapter)
    ids, mask, labels = make_batch(arch, task)
    model.train()
    ref = step(model, ids, mask, labels, task, adapter)  # unpatched PEFT, no checkpointing
    patch(model, backend="torch")
    model.gradient_checkpointing_enable()  # transformers' default: non-reentrant
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got = step(model, ids, mask, labels, task, adapter)
    assert_close_results(ref, got, what="checkpointed")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_backend)])
def test_gradient_checkpointing_replays_attention_dropout(backend):
    """With attention dropout on, the checkpointed recompute draws the same dropout mask."""
    torch.manual_seed(0)
    config = make_config("bert")
    config.attention_probs_dropout_prob = 0.1
    config.num_labels = 3
    model = get_peft_model(AutoModelForSequenceClassification.from_config(config), make_peft_config("prefix", "SEQ_CLS"))
    model = patch(model.to(DEVICE), backend=backend).train()
    ids, mask, labels = _to(DEVICE, *make_batch("bert", "SEQ_CLS", batch=2, seq=5))
    ref = step(model, ids, mask, labels, "SEQ_CLS", "prefix", seed=5)
    other_seed = step(model, ids, mask, labels, "SEQ_CLS", "prefix", seed=6)
    assert (ref[0] - other_seed[0]).abs() > 1e-6  # dropout is really on
    model.gradient_checkpointing_enable()
    assert_close_results(ref, step(model, ids, mask, labels, "SEQ_CLS", "prefix", seed=5), atol=TRITON_ATOL,
                         what=f"{backend} checkpointed dropout")


def test_reentrant_checkpointing_with_prefix_is_refused():
    model = patch(make_model("gpt2", "CAUSAL_LM", "prefix"), backend="torch").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask, labels = make_batch("gpt2", "CAUSAL_LM")
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()  # no backward, no problem
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_attention_dropout_uses_kernel_dropout(monkeypatch):
    """BERT's attention dropout (0.1 by default) reaches the op in train mode only."""
    torch.manual_seed(0)
    config = make_config("bert")
    config.attention_probs_dropout_prob = 0.1
    config.num_labels = 3
    model = get_peft_model(AutoModelForSequenceClassification.from_config(config), make_peft_config("prefix", "SEQ_CLS"))
    patch(model, backend="torch")
    ids, mask, labels = make_batch("bert", "SEQ_CLS")
    seen = []
    real = ptk_tf.prefix_attention
    monkeypatch.setattr(ptk_tf, "prefix_attention", lambda *a, **k: seen.append(k["dropout_p"]) or real(*a, **k))
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen == [0.1, 0.1, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# plain HF models, patch twice, unpatch, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,task", [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM")])
def test_plain_hf_model(arch, task, monkeypatch):
    model = make_base(arch, task).eval()
    ids, mask, labels = make_batch(arch, task)
    ref = step(model, ids, mask, labels, task, "prefix")
    ref_gen = _generate(model, make_batch(arch, task, left_pad=True)[0], make_batch(arch, task, left_pad=True)[1]) \
        if task == "CAUSAL_LM" else None
    assert patch(model, backend="torch") is model
    spy = AttentionSpy(monkeypatch)
    assert_close_results(ref, step(model, ids, mask, labels, task, "prefix"), what="plain")
    assert spy.calls and all(c["prefix"] is None for c in spy.calls)
    if ref_gen is not None:
        ids2, mask2, _ = make_batch(arch, task, left_pad=True)
        assert torch.equal(_generate(model, ids2, mask2), ref_gen)
    unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_attention_function_4d_mask_fallback():
    """A 4D mask (user-supplied or from a static cache) is computed the plain way, still exactly right."""
    torch.manual_seed(0)
    B, Hq, Hkv, S, D, L = 2, 4, 2, 6, 8, 3
    q = torch.randn(B, Hq, S, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    prefix = ptk_tf.LayerPrefix(torch.randn(2 * L, Hkv, P, D))
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :2] = False
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 1, True
    ref, _ = ptk_tf.ptkernels_attention_forward(module, q, k, v, pad, scaling=0.3, ptkernels_prefix=prefix)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask4d = (pad[:, None, None, :] & causal)  # (B, 1, S, S) bool, True = attend
    got, _ = ptk_tf.ptkernels_attention_forward(module, q, k, v, mask4d, scaling=0.3, ptkernels_prefix=prefix)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    additive = torch.zeros(B, 1, S, S).masked_fill(~mask4d, float("-inf"))
    got_add, _ = ptk_tf.ptkernels_attention_forward(module, q, k, v, additive, scaling=0.3, ptkernels_prefix=prefix)
    torch.testing.assert_close(got_add, ref, atol=1e-5, rtol=1e-5)
    assert got.shape == (B, S, Hq, D)


def test_patch_twice_and_unpatch_restores():
    model = make_model("gpt2", "CAUSAL_LM", "prefix").eval()
    ids, mask, labels = make_batch("gpt2", "CAUSAL_LM")
    ref = step(model, ids, mask, labels, "CAUSAL_LM", "prefix")
    before = dict(model.__dict__)
    assert patch(model, backend="torch") is model
    assert patch(model, backend="torch") is model
    assert is_patched(model)
    assert_close_results(ref, step(model, ids, mask, labels, "CAUSAL_LM", "prefix"), what="patched twice")
    assert unpatch(model) is model
    assert not is_patched(model)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in model.__dict__ and "prepare_inputs_for_generation" not in model.__dict__
    assert model.__dict__.keys() == before.keys()
    assert all(not hasattr(m, ptk_tf.BACKEND_ATTR) for m in model.modules())
    assert_close_results(ref, step(model, ids, mask, labels, "CAUSAL_LM", "prefix"), atol=0, what="unpatched")
    unpatch(model)  # harmless


def test_disable_adapter_on_patched_model():
    model = patch(make_model("llama", "CAUSAL_LM", "prefix"), backend="torch").eval()
    ids, mask, labels = make_batch("llama", "CAUSAL_LM")
    base = make_base("llama", "CAUSAL_LM").eval()
    with model.disable_adapter():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref = base(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=1e-4)
    assert is_patched(model) and "forward" in model.__dict__


def test_position_ids_option_documented():
    doc = patch.__doc__
    assert "shift_positions" in doc and "512" in doc


def test_unsupported_raise_at_patch_time():
    # adapter type
    lora = get_peft_model(make_base("llama", "CAUSAL_LM"), LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        patch(lora)
    assert not is_patched(lora)
    # architecture: attention outside transformers' interface (Bloom; Gemma 2's softcapping is supported now)
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type 'bloom': .*attention interface"):
        patch(bloom)
    with pytest.raises(ValueError, match="model_type 'bloom': .*attention interface"):
        patch(get_peft_model(bloom, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2)))
    # task type
    qa = get_peft_model(AutoModel.from_config(make_config("bert")), PrefixTuningConfig(task_type=TaskType.QUESTION_ANS, num_virtual_tokens=2)) \
        if hasattr(TaskType, "QUESTION_ANS") else None
    if qa is not None:
        with pytest.raises(ValueError, match="task type"):
            patch(qa)
    # a prefix provisioned for other head geometry
    # (PEFT re-derives the geometry from the model config, so make one for another model by hand)
    bad = get_peft_model(make_base("llama", "CAUSAL_LM"), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2))
    bad.peft_config["default"].num_attention_heads, bad.peft_config["default"].token_dim = 4, 32
    with pytest.raises(ValueError, match="provisioned"):
        patch(bad)
    # not a model
    with pytest.raises(TypeError):
        patch(object())
    with pytest.raises(ValueError, match="backend"):
        patch(make_base("bert", "SEQ_CLS"), backend="cuda")


def test_sliding_window_is_refused_not_wrong():
    config = make_config("mistral")
    config.sliding_window = 4
    model = get_peft_model(AutoModelForCausalLM.from_config(config), make_peft_config("prefix", "CAUSAL_LM"))
    patch(model, backend="torch")
    ids, mask, labels = make_batch("mistral", "CAUSAL_LM")
    # windows narrower than prefix + sequence run with PEFT's semantics since 57fd7af (tested against
    # PEFT elsewhere); on a packed row (positions that restart) they are still refused
    row = ids[:1]
    half = row.shape[1] // 2
    position_ids = torch.cat([torch.arange(half), torch.arange(row.shape[1] - half)])[None]
    with pytest.raises(NotImplementedError, match="sliding"):
        model(input_ids=row, position_ids=position_ids, labels=row)


@pytest.mark.parametrize("peft_wrapped", [False, True])
def test_static_cache_is_refused_not_wrong(peft_wrapped):
    model = make_model("llama", "CAUSAL_LM", "prefix") if peft_wrapped else make_base("llama", "CAUSAL_LM")
    patch(model.eval(), backend="torch")
    ids, mask, _ = make_batch("llama", "CAUSAL_LM", left_pad=True)
    with pytest.raises(NotImplementedError, match="static"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    unpatch(model)
    assert "prepare_inputs_for_generation" not in model.__dict__


def test_import_ptkernels_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, ptkernels, ptkernels.integrations; print('transformers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# ------------------------------------------------------------------------------------------------
# backend "triton" (Triton interpreter on CPU): a subset
# ------------------------------------------------------------------------------------------------


@triton_backend
@pytest.mark.parametrize("arch,task,adapter", [
    ("bert", "SEQ_CLS", "prefix_proj"), ("llama", "CAUSAL_LM", "prefix"), ("gpt2", "CAUSAL_LM", "prompt"),
    ("roberta", "TOKEN_CLS", "prefix"), ("mistral", "CAUSAL_LM", "prefix_proj"), ("qwen3", "CAUSAL_LM", "ptuning_lstm"),
    ("qwen2", "SEQ_CLS", "ptuning_mlp"), ("gpt2", "FEATURE_EXTRACTION", "prefix"),
])
def test_triton_backend_matches_unpatched(arch, task, adapter, monkeypatch):
    model = make_model(arch, task, adapter).to(DEVICE)
    ids, mask, labels = _to(DEVICE, *make_batch(arch, task, batch=2, seq=5))
    model.train()
    ref = step(model, ids, mask, labels, task, adapter)
    model.eval()
    ref_eval = step(model, ids, mask, labels, task, adapter, backward=False)
    patch(model, backend="triton")
    spy = AttentionSpy(monkeypatch)
    got_eval = step(model, ids, mask, labels, task, adapter, backward=False)
    model.train()
    got = step(model, ids, mask, labels, task, adapter)
    assert_close_results(ref, got, atol=TRITON_ATOL, what=f"triton {arch}/{task}/{adapter}")
    torch.testing.assert_close(got_eval[1], ref_eval[1], atol=TRITON_ATOL, rtol=1e-4)
    assert spy.calls and all(c["backend"] == "triton" for c in spy.calls)


@triton_backend
def test_triton_backend_generate_prompt_tuning():
    model = make_model("gpt2", "CAUSAL_LM", "prompt", seed=3).to(DEVICE)
    ids, mask, _ = _to(DEVICE, *make_batch("gpt2", "CAUSAL_LM", batch=2, seq=5, left_pad=True))
    ref = tiny_models.greedy_by_full_forwards(model, ids, mask)
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="triton")
    assert torch.equal(_generate(model, ids, mask), ref)


@triton_backend
def test_triton_backend_generate_and_checkpointing():
    model = make_model("llama", "CAUSAL_LM", "prefix_proj", seed=3).to(DEVICE)
    ids, mask, labels = _to(DEVICE, *make_batch("llama", "CAUSAL_LM", batch=2, seq=5, left_pad=True))
    ref = tiny_models.greedy_by_full_forwards(model, ids, mask)
    model.train()
    ref_grads = step(model, ids, mask, labels, "CAUSAL_LM", "prefix_proj")
    patch(model, backend="triton")
    assert torch.equal(_generate(model, ids, mask), ref)
    model.train()
    model.gradient_checkpointing_enable()
    assert_close_results(ref_grads, step(model, ids, mask, labels, "CAUSAL_LM", "prefix_proj"), atol=TRITON_ATOL,
                         what="triton ckpt")
