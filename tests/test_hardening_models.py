"""Production hardening at the model level (issue 6): a patched PEFT model under autocast, under
torch.compile, in inference mode, run twice (determinism), and the errors of ``patch`` on models
and inputs it does not support.

Every numerical check compares the patched model with the same PEFT model unpatched (PEFT's own
path with transformers' sdpa attention) or with itself run another way (eager vs compiled, grad vs
no-grad, run 1 vs run 2); nothing is compared with numbers taken from ptkernels.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tiny_models import (
    MAX_POSITIONS,
    P,
    VOCAB,
    greedy_by_full_forwards,
    make_base,
    make_batch,
    make_model,
    real_outputs,
    trainable_grads,
    trainable_params,
)

import ptkernels.integrations.transformers as ptk_tf
from ptkernels.testing import flash_attention_bound
from ptkernels import patch, unpatch
from ptkernels.integrations import is_patched

from conftest import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore")
# fp32 through Triton on a GPU uses TF32 tensor-core dots; the interpreter computes in fp32
TRITON_ATOL = 1e-5 if DEVICE == "cpu" else 2e-2


def _device(backend: str) -> str:
    """backend "triton" runs on the GPU when there is one (in the interpreter on CPU otherwise)."""
    return DEVICE if backend == "triton" else "cpu"


def _on(device, model, batch):
    return model.to(device), [t.to(device) for t in batch]


class AttentionSpy:
    """Records the prefix, backend and output dtype of every call of ptkernels' attention op."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ptk_tf.prefix_attention

        def spy(q, k, v, prefix_k, prefix_v, **kw):
            out = real(q, k, v, prefix_k, prefix_v, **kw)
            self.calls.append(dict(out_dtype=out.dtype, prefix_dtype=None if prefix_k is None else prefix_k.dtype,
                                   backend=kw["backend"]))
            return out

        monkeypatch.setattr(ptk_tf, "prefix_attention", spy)


def _step(model, ids, mask, labels, task, adapter, *, autocast=False, seed=0):
    """One forward + backward: (loss, real-token outputs, {trainable param: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.float().backward()
    return out.loss.detach(), real_outputs(out, mask, task, adapter).detach(), trainable_grads(model)


# ------------------------------------------------------------------------------------------------
# 1. Mixed precision: autocast bf16 with fp32 prefix parameters
# ------------------------------------------------------------------------------------------------


def _assert_low_precision_rule(got, low, exact, is_grad, what):
    """FlashAttention rule: |patched_bf16 - fp32| <= 2x (3x for gradients) |unpatched_bf16 - fp32| + slack."""
    exact = exact.double()
    err = (got.double() - exact).abs().max().item()
    base = (low.double() - exact).abs().max().item()
    slack = 1e-3 * exact.abs().max().item() + 1e-7
    bound = flash_attention_bound(base, is_grad=is_grad, slack=slack)
    assert err <= bound, f"{what}: error {err:.3e} vs unpatched bf16 error {base:.3e} (slack {slack:.1e})"


AUTOCAST_CASES = [
    ("bert", "SEQ_CLS", "prefix_proj", "torch"),
    ("bert", "SEQ_CLS", "prefix_proj", "triton"),
    ("llama", "CAUSAL_LM", "prefix", "torch"),
    ("llama", "CAUSAL_LM", "prefix", "triton"),
    ("gpt2", "CAUSAL_LM", "ptuning_mlp", "triton"),  # P-Tuning: the fused prompt_embedding op under autocast
]


@pytest.mark.parametrize("arch,task,adapter,backend", AUTOCAST_CASES)
def test_autocast_bf16_matches_unpatched(arch, task, adapter, backend, monkeypatch):
    model, (ids, mask, labels) = _on(_device(backend), make_model(arch, task, adapter).train(),
                                     make_batch(task, batch=2, seq=6))
    assert all(p.dtype == torch.float32 for p in model.parameters())

    exact = _step(model, ids, mask, labels, task, adapter)  # fp32, unpatched
    low = _step(model, ids, mask, labels, task, adapter, autocast=True)  # bf16 autocast, unpatched
    patch(model, backend=backend)
    spy = AttentionSpy(monkeypatch)
    got = _step(model, ids, mask, labels, task, adapter, autocast=True)

    # autocast really ran the attention in bf16 (as sdpa does); prefix tuning: with a prefix on every call
    assert spy.calls and all(c["out_dtype"] == torch.bfloat16 and c["backend"] == backend for c in spy.calls)
    assert all((c["prefix_dtype"] is not None) == adapter.startswith("prefix") for c in spy.calls)
    assert got[1].dtype == low[1].dtype
    assert (low[1].double() - exact[1].double()).abs().max() > 0  # bf16 did change something

    what = f"{arch}/{adapter}/{backend}"
    _assert_low_precision_rule(got[0], low[0], exact[0], False, f"{what} loss")
    _assert_low_precision_rule(got[1], low[1], exact[1], False, f"{what} outputs")
    assert set(got[2]) == set(exact[2]) and any("prompt_encoder" in n for n in got[2])
    for name, grad in got[2].items():
        param = dict(model.named_parameters())[name]
        assert param.dtype == torch.float32 and grad.dtype == torch.float32, name
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
        _assert_low_precision_rule(grad, low[2][name], exact[2][name], True, f"{what} grad {name}")


# ------------------------------------------------------------------------------------------------
# 2. torch.compile(patched_model) trains like eager
# ------------------------------------------------------------------------------------------------


def _train(model, forward, ids, mask, labels, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, trainable_params(model)


def test_compiled_patched_model_trains_like_eager():
    arch, task, adapter = "gpt2", "CAUSAL_LM", "prefix_proj"
    ids, mask, labels = make_batch(task, batch=3, seq=7)

    unpatched = make_model(arch, task, adapter)
    ref_losses, ref_params = _train(unpatched, unpatched, ids, mask, labels)
    eager = patch(make_model(arch, task, adapter), backend="torch")
    eager_losses, eager_params = _train(eager, eager, ids, mask, labels)

    torch._dynamo.reset()
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    model = patch(make_model(arch, task, adapter), backend="torch")
    compiled = torch.compile(model, backend=recording_backend)
    losses, params = _train(model, compiled, ids, mask, labels)
    torch._dynamo.reset()

    # the attention was traced into a compiled graph, through ptkernels (not transformers' sdpa)
    traces = [n.meta.get("stack_trace") or "" for gm in graphs for n in gm.graph.nodes]
    assert any("prefix_attention" in t and "torch_path.py" in t for t in traces)
    sdpa_calls = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert all("torch_path.py" in (n.meta.get("stack_trace") or "") for n in sdpa_calls)  # not transformers' sdpa

    assert ref_losses[0] != ref_losses[-1]
    assert losses == pytest.approx(eager_losses, abs=1e-6, rel=1e-6)
    assert losses == pytest.approx(ref_losses, abs=1e-4)
    for name in ref_params:
        torch.testing.assert_close(params[name], eager_params[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(params[name], ref_params[name], atol=1e-4, rtol=1e-4)


def test_compile_fullgraph_patched_model_like_unpatched():
    arch, task, adapter = "llama", "CAUSAL_LM", "prefix"
    ids, mask, labels = make_batch(task, batch=2, seq=6)
    torch._dynamo.reset()
    unpatched = make_model(arch, task, adapter)
    # the unpatched PEFT model compiles without a graph break (so the patched one can be asked to)
    ref = torch.compile(unpatched, backend="aot_eager", fullgraph=True)(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    model = patch(make_model(arch, task, adapter), backend="torch")
    try:
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        torch._dynamo.reset()
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    want = trainable_grads(unpatched)
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, want[name], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# 3. Inference: no_grad / inference_mode give the eval-mode outputs and keep nothing for backward
# ------------------------------------------------------------------------------------------------


def _generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch,task,adapter", [("llama", "CAUSAL_LM", "prefix_proj"), ("bert", "SEQ_CLS", "prompt")])
def test_inference_matches_eval_and_saves_nothing(arch, task, adapter):
    # dropout is configured, eval mode must switch it off (the kernel's attention dropout included)
    model = make_model(arch, task, adapter, dropout=0.1, attn_dropout=0.1).eval()
    model, (ids, mask) = _on(DEVICE, model, make_batch(task, batch=2, seq=5)[:2])
    if task == "CAUSAL_LM":  # left padding, as for generation
        mask = mask.flip(1)
        ids = ids.flip(1)
    with torch.inference_mode():
        unpatched = real_outputs(model(input_ids=ids, attention_mask=mask), mask, task, adapter)
        # generate()'s oracle: greedy decoding by full forwards of the unpatched model, row by row
        unpatched_generated = greedy_by_full_forwards(model, ids, mask, max_new_tokens=4) if task == "CAUSAL_LM" else None
    patch(model, backend="triton")

    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    hooks = lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)  # noqa: E731
    with hooks():
        with_grad = real_outputs(model(input_ids=ids, attention_mask=mask), mask, task, adapter)
    assert with_grad.requires_grad and saved  # grad mode does save tensors, so the checks below can fail
    for context in (torch.no_grad, torch.inference_mode):
        saved.clear()
        with hooks(), context():
            out = real_outputs(model(input_ids=ids, attention_mask=mask), mask, task, adapter)
        assert saved == [], f"{context.__name__} saved {saved}"
        assert not out.requires_grad and out.grad_fn is None
        assert torch.equal(out, with_grad.detach()), context.__name__
    torch.testing.assert_close(with_grad.detach(), unpatched, atol=TRITON_ATOL, rtol=1e-5)
    if unpatched_generated is not None:  # greedy decoding with a KV cache, in inference mode
        with torch.inference_mode():
            assert torch.equal(_generate(model, ids, mask), unpatched_generated)


# ------------------------------------------------------------------------------------------------
# 1b. Low-precision weights: a bf16 base model (PEFT keeps the adapter in fp32)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,task,adapter,backend", [
    ("llama", "CAUSAL_LM", "prefix", "triton"),
    ("bert", "SEQ_CLS", "prefix_proj", "torch"),
    ("gpt2", "CAUSAL_LM", "ptuning_mlp", "torch"),
])
def test_bf16_base_model_matches_unpatched(arch, task, adapter, backend):
    from peft import get_peft_model

    from tiny_models import make_peft_config, with_peft_oracle_shim

    device = _device(backend)
    exact_model, (ids, mask, labels) = _on(device, make_model(arch, task, adapter), make_batch(task, batch=2, seq=6))
    exact = _step(exact_model, ids, mask, labels, task, adapter)
    torch.manual_seed(1)
    model = with_peft_oracle_shim(get_peft_model(make_base(arch, task).to(device, torch.bfloat16), make_peft_config(adapter, task)))
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in exact_model.state_dict().items()})  # same values
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "prompt_encoder" in n)
    low = _step(model, ids, mask, labels, task, adapter)  # unpatched, bf16 weights
    patch(model, backend=backend)
    got = _step(model, ids, mask, labels, task, adapter)

    assert got[1].dtype == low[1].dtype == torch.bfloat16
    what = f"bf16 {arch}/{adapter}/{backend}"
    _assert_low_precision_rule(got[0], low[0], exact[0], False, f"{what} loss")
    _assert_low_precision_rule(got[1], low[1], exact[1], False, f"{what} outputs")
    assert set(got[2]) == set(exact[2])
    params = dict(model.named_parameters())
    for name, grad in got[2].items():
        assert grad.dtype == params[name].dtype, name  # the fp32 adapter gets fp32 gradients
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
        _assert_low_precision_rule(grad, low[2][name], exact[2][name], True, f"{what} grad {name}")


# ------------------------------------------------------------------------------------------------
# 4. Determinism: same inputs (and same seed) -> bitwise-equal loss and gradients, Triton kernels
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,task,adapter,dropout", [
    ("llama", "CAUSAL_LM", "prefix_proj", 0.0),  # GQA, padding, causal; dropout off
    ("bert", "SEQ_CLS", "prefix", 0.1),  # attention + hidden dropout on, replayed from the same seed
])
def test_forward_backward_bitwise_deterministic(arch, task, adapter, dropout):
    model, (ids, mask, labels) = _on(DEVICE, make_model(arch, task, adapter, dropout=dropout, attn_dropout=dropout),
                                     make_batch(task, batch=2, seq=5))
    patch(model, backend="triton").train()
    first = _step(model, ids, mask, labels, task, adapter, seed=3)
    second = _step(model, ids, mask, labels, task, adapter, seed=3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[2].keys() == second[2].keys() and first[2]
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name
        assert first[2][name].abs().max() > 0, name
    if dropout:  # the dropout draws really depend on the seed (so equality above is not vacuous)
        other = _step(model, ids, mask, labels, task, adapter, seed=4)
        assert not torch.equal(other[1], first[1])


# ------------------------------------------------------------------------------------------------
# 5. Unsupported models and bad input at the model level
# ------------------------------------------------------------------------------------------------


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2))


def _longt5():
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    torch.manual_seed(0)
    return LongT5ForConditionalGeneration(LongT5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=16, num_layers=1,
                                                       num_heads=2, encoder_attention_type="transient-global"))


def _longt5_prefix():
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    return get_peft_model(_longt5(), PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=2))


def _t5_prompt():
    from peft import PromptTuningConfig, TaskType, get_peft_model

    return get_peft_model(_t5(), PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=2))


def _bert_with_cross_attention():
    from transformers import BertConfig, BertLMHeadModel

    return BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16, is_decoder=True, add_cross_attention=True))


def _bart_decoder():
    from transformers import BartConfig, BartForCausalLM

    torch.manual_seed(0)
    return BartForCausalLM(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=2,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                      decoder_ffn_dim=16))


UNSUPPORTED = {
    "plain_module": (lambda: nn.Linear(4, 4), TypeError, "PreTrainedModel or a PEFT PeftModel, got Linear"),
    "wrapped_hf_model": (lambda: nn.Sequential(make_base("bert", "SEQ_CLS")), TypeError, "got Sequential"),
    "longt5": (_longt5, ValueError, "model_type 'longt5'.*TransientGlobalSelfAttention"),
    "longt5_prefix_tuning": (_longt5_prefix, ValueError, "model_type 'longt5'.*local / transient-global"),
    "t5_prompt_tuning": (_t5_prompt, ValueError, "PREFIX_TUNING only"),
    "cross_attention": (_bert_with_cross_attention, ValueError, "cross-attention"),
    "bart_as_decoder": (_bart_decoder, ValueError, r"model_type 'bart'.*found 2 attention layers.*counts 1"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_patch_rejects_unsupported_models_and_leaves_them_alone(case):
    build, exc, pattern = UNSUPPORTED[case]
    model = build()
    config = getattr(model, "config", None)
    attn_before = getattr(config, "_attn_implementation", None)
    dict_before = set(model.__dict__)
    with pytest.raises(exc, match=pattern):
        patch(model, backend="torch")
    assert not is_patched(model)
    assert set(model.__dict__) == dict_before  # no forward / hooks installed
    assert getattr(config, "_attn_implementation", None) == attn_before
    assert unpatch(model) is model  # unpatching an unpatched model is a no-op


@pytest.mark.parametrize("adapter", ["prefix", "prompt"])
def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(adapter, monkeypatch):
    model = patch(make_model("gpt2", "CAUSAL_LM", adapter), backend="triton")  # may move to CUDA later: accepted
    ids, mask, labels = make_batch("CAUSAL_LM")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("adapter", ["prompt", "ptuning_mlp"])
def test_out_of_range_ids_raise_not_read_garbage(backend, adapter):
    model, (ids, mask) = _on(_device(backend), make_model("gpt2", "CAUSAL_LM", adapter), make_batch("CAUSAL_LM")[:2])
    ids[0, 1] = VOCAB
    if ids.device.type == "cpu":  # (on CUDA nn.Embedding would trip a device-side assert instead)
        with pytest.raises(IndexError):  # unpatched PEFT: nn.Embedding's error
            model(input_ids=ids, attention_mask=mask)
    patch(model, backend=backend)
    with pytest.raises(ValueError, match=rf"input_ids must hold word ids in \[0, V\) = \[0, {VOCAB}\)"):
        model(input_ids=ids, attention_mask=mask)


def test_input_length_limit_with_shifted_positions():
    """PEFT counts the prefix as past, so BERT takes at most max_position_embeddings - P tokens; the
    patched model (default shift_positions=True) has the same limit, and shift_positions=False lifts it."""
    model = make_model("bert", "SEQ_CLS", "prefix").eval()
    longest = torch.randint(2, VOCAB, (1, MAX_POSITIONS - P))
    too_long = torch.randint(2, VOCAB, (1, MAX_POSITIONS - P + 1))
    ref = model(input_ids=longest).logits
    with pytest.raises((RuntimeError, IndexError)):
        model(input_ids=too_long)
    patch(model, backend="torch")
    torch.testing.assert_close(model(input_ids=longest).logits, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        model(input_ids=too_long)
    patch(model, backend="torch", shift_positions=False)
    full = torch.randint(2, VOCAB, (1, MAX_POSITIONS))
    assert torch.isfinite(model(input_ids=full).logits).all()
