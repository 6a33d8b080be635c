"""Every family in ``families.FAMILIES`` that the installed transformers can build (issue 15): the
patched model equals the reference exactly in float64 (logits of the real tokens, the loss and the
gradient of every trainable parameter), or it is refused with the reason the table gives. A new
transformers release that breaks a family shows up here.

The reference is unpatched PEFT (through the signature shim on transformers >= 5.24 where PEFT
0.21 refuses sequence classification), or, where PEFT fails, the model's own eager attention over
explicitly concatenated prefix keys (validated against PEFT on families where both run).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import families  # noqa: E402
from families import ADAPTERS, FAMILIES, KWARGS, P, build_peft_model, concat_prefix_logits, make_batch  # noqa: E402

from ptkernels import patch  # noqa: E402
from ptkernels.integrations.capabilities import UnsupportedModelError  # noqa: E402
from ptkernels.testing import with_peft_oracle_shim, without_peft_oracle_shim  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _available(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


# Families whose eager attention (the oracle's) takes its softmax in float32 even on float64 inputs
# (``softmax(..., dtype=torch.float32)``): the oracle then runs it in float64, so that "equal in
# float64" compares the maths, not the oracle's float32 rounding.
FLOAT32_ATTENTION_SOFTMAX = {"gemma2", "vaultgemma"}


@contextlib.contextmanager
def _float64_attention_softmax(enabled: bool):
    if not enabled:
        yield
        return
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return original(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def _run(model, ids, mask, labels, task, adapter):
    """(real-token logits, loss, {name: grad}) of one forward + backward."""
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits = out.logits.detach()
    if task == "CAUSAL_LM":
        if adapter == "ptuning":
            logits = logits[:, P:]
        logits = logits[mask.bool()]
    return logits, out.loss.detach(), grads


def _assert_same(got, want, what):
    logits, loss, grads = got
    ref_logits, ref_loss, ref_grads = want
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10, msg=f"{what}: logits")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10, msg=f"{what}: loss")
    assert set(grads) == set(ref_grads), f"{what}: trainable parameters with a gradient differ"
    assert any(g.abs().sum() > 0 for g in grads.values()), f"{what}: all gradients are zero"
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-10, msg=f"{what}: grad {name}")


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family(model_type, adapter):
    if not _available(model_type):
        pytest.skip(f"transformers has no {model_type!r}")
    _, _, outcome = FAMILIES[model_type]
    if outcome == KWARGS and adapter == "ptuning":
        outcome = None  # P-tuning feeds input embeddings only: no kwargs need to reach the attention
    if adapter == "ptuning" and model_type in families.PTUNING_OUTCOME:
        outcome = families.PTUNING_OUTCOME[model_type]
    model, task = build_peft_model(model_type, adapter)
    ids, mask, labels = make_batch(task)

    if outcome is not None and outcome != KWARGS:
        with pytest.raises(UnsupportedModelError, match=f"model_type '{model_type}'.*{outcome}"):
            patch(model, backend="reference")
        return

    if model_type in families.REFERENCE_CONCAT and adapter != "ptuning":
        logits, loss = concat_prefix_logits(model, ids, mask, labels)
        loss.backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        model.zero_grad(set_to_none=True)
        want = (logits.detach()[mask.bool()] if task == "CAUSAL_LM" else logits.detach(), loss.detach(), want_grads)
    else:
        with_peft_oracle_shim(model)
        with _float64_attention_softmax(model_type in FLOAT32_ATTENTION_SOFTMAX):
            want = _run(model, ids, mask, labels, task, adapter)
        without_peft_oracle_shim(model)

    for backend in ("torch", "reference"):
        patch(model, backend=backend)
        if outcome == KWARGS:
            with pytest.raises(RuntimeError, match=f"{KWARGS}.*model_type '{model_type}'"):
                model(input_ids=ids, attention_mask=mask, labels=labels)
            return
        _assert_same(_run(model, ids, mask, labels, task, adapter), want, f"{model_type} {adapter} {backend}")


@pytest.mark.parametrize("adapter", ["prefix", "ptuning"])
@pytest.mark.parametrize("model_type", ["opt", "biogpt", "roberta", "llama"])
def test_left_padding(model_type, adapter):
    """Positions from the mask (OPT / BioGPT: cumulative sum; RoBERTa: padding-aware) are where left
    padding changes them: the patched model must count them as PEFT does."""
    model, task = build_peft_model(model_type, adapter)
    ids, mask, labels = make_batch(task, left_padding=True)
    with_peft_oracle_shim(model)
    want = _run(model, ids, mask, labels, task, adapter)
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    _assert_same(_run(model, ids, mask, labels, task, adapter), want, f"{model_type} {adapter} left padding")


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "opt", "stablelm"])
def test_decoder_for_sequence_classification(model_type):
    """Decoders used for sequence classification: equal to PEFT, or (layers that drop **kwargs)
    an error, never a silent difference."""
    model, task = build_peft_model(model_type, "prefix", task="SEQ_CLS")
    ids, mask, labels = make_batch(task)
    with_peft_oracle_shim(model)
    want = _run(model, ids, mask, labels, task, "prefix")
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    if FAMILIES[model_type][2] == KWARGS:
        with pytest.raises(RuntimeError, match=f"{KWARGS}.*model_type '{model_type}'"):
            model(input_ids=ids, attention_mask=mask, labels=labels)
        return
    _assert_same(_run(model, ids, mask, labels, task, "prefix"), want, f"{model_type} SEQ_CLS")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_concat_reference_equals_peft(model_type):
    """The reference used where PEFT fails is itself checked against PEFT where PEFT runs."""
    model, task = build_peft_model(model_type, "prefix_proj")
    ids, mask, labels = make_batch(task)
    want = _run(model, ids, mask, labels, task, "prefix_proj")
    logits, loss = concat_prefix_logits(model, ids, mask, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    _assert_same((logits.detach()[mask.bool()], loss.detach(), grads), want, f"{model_type} concat reference")


def test_readme_lists_the_families():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [row for row in families.markdown_table().splitlines()[2:] if row not in readme]
    assert not missing, "README's family table is stale; paste `python tests/families.py`:\n" + "\n".join(missing)


# Sliding windows narrower than prefix + sequence (transformers' causal window, the prefix at the cache
# positions before the real tokens, as in PEFT's cache: it slides out of the window).
SLIDING = {
    "mistral": dict(sliding_window=4),  # every layer
    "gemma2": dict(sliding_window=4),  # alternating layers, with logit softcapping
    "gpt_oss": dict(sliding_window=4),  # alternating layers, with attention sinks
    "qwen2": dict(sliding_window=4, use_sliding_window=True, max_window_layers=1),
}


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("model_type", sorted(SLIDING))
def test_sliding_window_narrower_than_prefix_plus_sequence(model_type, adapter, monkeypatch):
    kind, overrides, _ = FAMILIES[model_type]
    ids = mask = labels = None

    def oracle(window_overrides):
        nonlocal ids, mask, labels
        monkeypatch.setitem(FAMILIES, model_type, (kind, {**overrides, **window_overrides}, None))
        model, task = build_peft_model(model_type, adapter)
        ids, mask, labels = make_batch(task)
        with_peft_oracle_shim(model)
        with _float64_attention_softmax(model_type in FLOAT32_ATTENTION_SOFTMAX):
            want = _run(model, ids, mask, labels, task, adapter)
        without_peft_oracle_shim(model)
        return model, task, want

    _, _, unwindowed = oracle({})
    model, task, want = oracle(SLIDING[model_type])
    assert ids.shape[1] + P > SLIDING[model_type]["sliding_window"]
    # the window matters here: the oracle with it differs from the one without
    assert (want[0] - unwindowed[0]).abs().max() > 1e-6
    patch(model, backend="torch")
    _assert_same(_run(model, ids, mask, labels, task, adapter), want, f"{model_type} {adapter} sliding window")


@pytest.mark.parametrize("adapter", ["prefix", "ptuning"])
def test_sliding_window_generate_matches_greedy_full_forwards(adapter, monkeypatch):
    """generate() with a KV cache under a window of 4 tokens (the prefix slides out while decoding)
    equals greedy decoding by full forwards of the unpatched model, row by row, left padding included."""
    from ptkernels.testing import greedy_by_full_forwards

    kind, overrides, _ = FAMILIES["mistral"]
    monkeypatch.setitem(FAMILIES, "mistral", (kind, {**overrides, "sliding_window": 4}, None))
    model, task = build_peft_model("mistral", adapter)
    ids, mask, _ = make_batch(task, left_padding=True)
    with_peft_oracle_shim(model)
    want = greedy_by_full_forwards(model, ids, mask, max_new_tokens=6)
    without_peft_oracle_shim(model)
    patch(model, backend="torch")
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want), f"{got}\n!=\n{want}"


@pytest.mark.parametrize("adapter", ["prefix", "prefix_proj"])
def test_gemma4_kv_sharing_layers(adapter):
    """Gemma 4 with 4 layers whose last one reuses layer 1's keys (it reads that layer's prefix, as
    PEFT's cache hands it over; transformers slices its inputs before the sharing layers): equal to
    unpatched PEFT."""
    if not _available("gemma4_text"):
        pytest.skip("transformers has no 'gemma4_text'")
    import peft
    from transformers import AutoModelForCausalLM

    from ptkernels.integrations.capabilities import per_layer_kv_geometry

    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config = families.build_config("gemma4_text", dict(num_hidden_layers=4, num_kv_shared_layers=1,
                                                       layer_types=types))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float64)
    geometry = per_layer_kv_geometry(base)
    assert geometry is not None and geometry[3][0] == 1 and geometry[0][2] != geometry[1][2], geometry
    kwargs = dict(prefix_projection=True, encoder_hidden_size=16) if adapter == "prefix_proj" else {}
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kwargs))
    model = model.double().eval()
    ids, mask, labels = make_batch("CAUSAL_LM")
    want = _run(model, ids, mask, labels, "CAUSAL_LM", adapter)
    patch(model, backend="torch")
    _assert_same(_run(model, ids, mask, labels, "CAUSAL_LM", adapter), want, f"gemma4 kv sharing {adapter}")
    assert model.__dict__["_ptkernels_state"]["layer_shapes"] == [(0, 2, 8), (1, 2, 512), (2, 2, 8), (1, 2, 512)]


def test_layer_prefix_shapes_cut_skip_and_share():
    """LayerPrefix(shapes=): a layer reads its source's entries cut to its (kv heads, head dim); a
    layer with None gets no prefix and is not expected to read one."""
    from ptkernels import LayerPrefix

    stacked = torch.randn(6, 4, 3, 16)  # 3 layers, Hkv 4, P 3, D 16
    prefix = LayerPrefix(stacked, shapes=[(0, 2, 8), None, (0, 4, 16)])
    k0, v0 = prefix.layer(0)
    assert torch.equal(k0, stacked[0, :2, :, :8]) and torch.equal(v0, stacked[1, :2, :, :8])
    assert prefix.layer(1) is None
    k2, _ = prefix.layer(2)
    assert torch.equal(k2, stacked[0])  # layer 2 shares layer 0's keys
    assert prefix.unread_layers() == [0, 2]
    with pytest.raises(ValueError, match="one entry per layer"):
        LayerPrefix(stacked, shapes=[None])
