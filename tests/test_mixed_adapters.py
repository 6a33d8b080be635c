"""Several prompt-learning adapters in one batch (``adapter_names``) and P-Tuning v2's prefix
dropout (``patch(prefix_dropout=)``) on a patched PEFT model.

The oracle is always the UNPATCHED PEFT model with ``set_adapter(name)``, run on each example alone
(the row as it is in the batch, padding included), in float64: outputs, HF's loss, the gradient of
every adapter parameter (a sum-reduction loss, so the mixed batch's gradient of an adapter is the sum
of its examples' gradients), and greedy generate() by full forwards. Nothing here is a number copied
from ptkernels.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import ptkernels.integrations.transformers as ptk_tf  # noqa: E402
import ptkernels  # noqa: E402
import tiny_models  # noqa: E402
from ptkernels.integrations import is_patched, patch, unpatch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

PREFIX_KINDS = ("prefix", "prefix_proj")
# adapters a0, a1, a2 with these numbers of virtual tokens; examples use them in this order
SIZES = (2, 3, 5)
NAMES = ["a1", "a0", "a2", "a1", "a0"]
SEQ = 7
BACKENDS = ["torch", "triton"]


def make_multi(arch: str, task: str, kinds, sizes=SIZES, dtype=torch.float64, seed: int = 0):
    """An unpatched PEFT model (oracle shim on) with adapters a0, a1, ... of the given kinds and sizes."""
    base = tiny_models.make_base(arch, task, seed=seed)
    model = None
    for i, (kind, size) in enumerate(zip(kinds, sizes)):
        torch.manual_seed(10 + i)
        config = tiny_models.make_peft_config(kind, task, num_virtual_tokens=size)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    if task == "SEQ_CLS":  # give each adapter's copy of the head its own weights, so picking the wrong one shows
        for i in range(len(kinds)):
            torch.manual_seed(20 + i)
            for p in _head_copies(model, f"a{i}"):
                torch.nn.init.normal_(p, std=0.5)
    model.set_adapter("a0")
    return tiny_models.with_peft_oracle_shim(model.to(dtype))


def _head_copies(model, name):
    return [p for n, p in model.named_parameters() if f"modules_to_save.{name}." in n]


def train_all_adapters(model):
    """PEFT trains only the active adapter; a mixed batch trains every adapter's encoder and head copy."""
    for n, p in model.named_parameters():
        if n.startswith("prompt_encoder.") or ".modules_to_save." in n:
            p.requires_grad_(True)


def make_rows(task: str, batch: int = len(NAMES), seq: int = SEQ, left_pad: bool = False, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, tiny_models.VOCAB - 1, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, n in enumerate([seq, seq - 3, seq, 2, seq - 1][:batch]):
        if left_pad:
            mask[b, : seq - n] = 0
        else:
            mask[b, n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    if task == "SEQ_CLS":
        labels = torch.randint(0, tiny_models.NUM_LABELS, (batch,), generator=g)
    elif task == "CAUSAL_LM":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = None
    return ids, mask, labels


def _weights(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def real_outputs(out, b: int, row_mask: torch.Tensor, task: str, kind: str, num_virtual: int, seq: int):
    """Row b's outputs of its real tokens; for prompt tuning the virtual tokens are the first
    ``num_virtual`` positions of a single-adapter output or the (max P) slots of a mixed one."""
    if task == "SEQ_CLS":
        return out.logits[b]
    x = out.logits if task != "FEATURE_EXTRACTION" else out.last_hidden_state
    x = x[b]
    if kind not in PREFIX_KINDS:
        x = x[num_virtual:] if num_virtual is not None else x[-seq:]
    return x[row_mask.bool()]


def oracle(model, names, ids, mask, labels, task, kind):
    """Per example b: the unpatched model with adapter names[b] active, on row b alone."""
    rows = []
    for b, name in enumerate(names):
        model.set_adapter(name)
        model.zero_grad(set_to_none=True)
        kwargs = {} if labels is None else {"labels": labels[b:b + 1]}
        out = model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], **kwargs)
        real = real_outputs(out, 0, mask[b], task, kind, model.peft_config[name].num_virtual_tokens, ids.shape[1])
        (real * _weights(real.shape[-1])).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        rows.append((real.detach(), None if labels is None else out.loss.detach(), grads))
    model.set_adapter("a0")
    return rows


def mixed(model, names, ids, mask, labels, task, kind):
    model.zero_grad(set_to_none=True)
    kwargs = {} if labels is None else {"labels": labels}
    out = model(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    reals = [real_outputs(out, b, mask[b], task, kind, None, ids.shape[1]) for b in range(len(names))]
    sum(((r * _weights(r.shape[-1])).sum() for r in reals)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, reals, grads


def hf_batch_loss(rows, mask, task, kind):
    """What HF computes for the whole batch from each example's own loss: a token-weighted mean
    (causal LM: the shifted targets that are not -100) or the mean over examples (classification)."""
    losses = torch.stack([loss for _, loss, _ in rows])
    if task == "SEQ_CLS":
        return losses.mean()
    counts = mask.sum(dim=1).double() - (1 if kind in PREFIX_KINDS else 0)  # prompt tuning: last virtual -> first real
    return (losses * counts).sum() / counts.sum()


def check_against_oracle(model, names, ids, mask, labels, task, kind, backend, atol):
    rows = oracle(model, names, ids, mask, labels, task, kind)
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend=backend)
    train_all_adapters(model)
    out, reals, grads = mixed(model, names, ids, mask, labels, task, kind)
    if kind not in PREFIX_KINDS and task != "SEQ_CLS":
        hidden = out.logits if task != "FEATURE_EXTRACTION" else out.last_hidden_state
        assert hidden.shape[1] == max(model.peft_config[n].num_virtual_tokens for n in names) + ids.shape[1]
    for b, (want, _, _) in enumerate(rows):
        torch.testing.assert_close(reals[b].double(), want.double(), atol=atol, rtol=atol, msg=lambda m: f"row {b}: {m}")
    if labels is not None:
        # HF computes causal LM losses in float32 (ForCausalLMLoss upcasts the logits)
        loss_tol = max(atol, 1e-6)
        torch.testing.assert_close(out.loss.double(), hf_batch_loss(rows, mask, task, kind).double(), atol=loss_tol, rtol=loss_tol)
    expected = {}
    for _, _, g in rows:
        for n, t in g.items():
            expected[n] = expected.get(n, 0) + t
    assert set(grads) == set(expected), set(grads) ^ set(expected)
    owners = {n.split(".")[1] if n.startswith("prompt_encoder.") else n.split("modules_to_save.")[1].split(".")[0]
              for n in grads}
    assert owners == set(names)  # every adapter in the batch got a gradient, no other did
    for n in expected:
        torch.testing.assert_close(grads[n].double(), expected[n].double(), atol=atol, rtol=atol, msg=lambda m: f"grad {n}: {m}")


CASES = [
    ("bert", "SEQ_CLS", ("prefix", "prefix_proj", "prefix")),
    ("gpt2", "CAUSAL_LM", ("prefix_proj", "prefix", "prefix")),
    ("llama", "CAUSAL_LM", ("prefix", "prefix", "prefix_proj")),
    ("llama", "SEQ_CLS", ("prefix", "prefix_proj", "prefix")),
    ("bert", "SEQ_CLS", ("ptuning_lstm",) * 3),
    ("bert", "FEATURE_EXTRACTION", ("prompt",) * 3),
    ("gpt2", "CAUSAL_LM", ("prompt",) * 3),
    ("gpt2", "SEQ_CLS", ("ptuning_mlp",) * 3),
    ("llama", "CAUSAL_LM", ("ptuning_mlp",) * 3),
]


@pytest.mark.parametrize("arch,task,kinds", CASES)
def test_mixed_batch_matches_each_adapter_alone_fp64(arch, task, kinds):
    """Forward, HF's loss and every adapter's gradients of one batch that mixes 3 adapters of
    different P equal, per example, the unpatched PEFT model with that example's adapter active."""
    model = make_multi(arch, task, kinds).eval()
    ids, mask, labels = make_rows(task)
    check_against_oracle(model, NAMES, ids, mask, labels, task, kinds[0], "torch", atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch,task,kinds", [("llama", "CAUSAL_LM", ("prefix", "prefix_proj", "prefix")),
                                             ("bert", "SEQ_CLS", ("prefix", "prefix", "prefix_proj"))])
def test_mixed_batch_backends_fp32(arch, task, kinds, backend):
    """The same in float32 on each backend (Triton: its kernels, in the interpreter on CPU)."""
    model = make_multi(arch, task, kinds, dtype=torch.float32).eval()
    ids, mask, labels = make_rows(task)
    check_against_oracle(model, NAMES, ids, mask, labels, task, kinds[0], backend, atol=2e-4)


def test_mixed_batch_uses_a_bank_and_each_encoder_once(monkeypatch):
    """The prefixes reach attention as one bank (A, Hkv, max P, D) with per-example indices and
    per-entry lengths; each adapter's encoder runs once per forward, on one row."""
    model = make_multi("llama", "CAUSAL_LM", PREFIX_KINDS + ("prefix",)).eval()
    ids, mask, _ = make_rows("CAUSAL_LM")
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    calls, encoder_rows = [], []
    real = ptk_tf.prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, **kw):
        calls.append((tuple(prefix_k.shape), kw["prefix_index"].tolist(), kw["prefix_lengths"].tolist()))
        return real(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(ptk_tf, "prefix_attention", spy)
    for enc in model.prompt_encoder.values():
        enc.register_forward_hook(lambda m, args, out: encoder_rows.append(args[0].shape[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    assert encoder_rows == [1, 1, 1]
    kv_heads = model.get_base_model().config.num_key_value_heads
    # bank entries in order of first appearance in adapter_names: a1, a0, a2
    entries = list(dict.fromkeys(NAMES))
    lengths = [SIZES[int(n[1])] for n in entries]
    assert calls == [((3, kv_heads, max(SIZES), 8), [entries.index(n) for n in NAMES], lengths)] * 2


def test_without_adapter_names_the_active_adapter():
    """No adapter_names: the active adapter for the whole batch, as PEFT (and as before)."""
    model = make_multi("gpt2", "CAUSAL_LM", ("prefix", "prefix_proj", "prefix")).eval()
    ids, mask, _ = make_rows("CAUSAL_LM")
    model.set_adapter("a1")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        same = model(input_ids=ids, attention_mask=mask, adapter_names=["a1"] * len(ids)).logits
        other = model(input_ids=ids, attention_mask=mask, adapter_names=["a2"] * len(ids)).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(same, got, atol=1e-12, rtol=1e-12)
    assert (other[real] - got[real]).abs().max() > 1e-3


def _generate(model, ids, mask, **kwargs):
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              use_cache=True, **kwargs)


@pytest.mark.parametrize("arch,kinds", [("gpt2", ("prefix", "prefix_proj", "prefix")),
                                        ("llama", ("prefix_proj", "prefix", "prefix")),
                                        ("gpt2", ("prompt",) * 3),
                                        ("llama", ("ptuning_lstm",) * 3)])
def test_mixed_generate_matches_each_adapter_alone(arch, kinds):
    """generate(adapter_names=...) on a left-padded batch: row b equals greedy decoding by full
    forwards of the unpatched model with adapter names[b] active, on row b alone."""
    model = make_multi(arch, "CAUSAL_LM", kinds, seed=4)  # a seed where greedy decoding depends on the adapter
    ids, mask, _ = make_rows("CAUSAL_LM", left_pad=True)
    want = []
    for b, name in enumerate(NAMES):
        model.set_adapter(name)
        want.append(tiny_models.greedy_by_full_forwards(model, ids[b:b + 1], mask[b:b + 1])[0])
    model.set_adapter("a0")
    all_a0 = tiny_models.greedy_by_full_forwards(model, ids, mask)
    assert not torch.equal(all_a0, torch.stack(want))  # the oracle can fail: the adapters matter
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    got = _generate(model, ids, mask, adapter_names=NAMES)
    assert torch.equal(got, torch.stack(want)), f"{got}\n!=\n{torch.stack(want)}"
    assert torch.equal(_generate(model, ids, mask, adapter_names=["a0"] * len(NAMES)), all_a0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_under_inference_mode_equals_no_grad(backend):
    """Under torch.inference_mode the adapter index and the entries' lengths are made inside the
    forward; the op checks their values (prefix_index, prefix_lengths) like any others: forward and
    generate give what they give under no_grad (they failed with "Inference tensors do not track
    version counter")."""
    model = make_multi("llama", "CAUSAL_LM", ("prefix_proj", "prefix", "prefix"), seed=4)
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend=backend)
    model.eval()
    ids, mask, _ = make_rows("CAUSAL_LM", left_pad=True)
    if backend == "triton":
        model.float()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    want_tokens = _generate(model, ids, mask, adapter_names=NAMES)
    with torch.inference_mode():  # (_generate's no_grad inside it keeps inference mode)
        got = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        got_tokens = _generate(model, ids, mask, adapter_names=NAMES)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(got_tokens, want_tokens)


def test_use_prefix_on_a_prefix_tuning_peft_model_raises():
    """A patched PEFT prefix-tuning model supplies its adapter's prefix itself: a prefix given through
    use_prefix or as ptkernels_prefix would be replaced, so its forward refuses it (it ended in a
    misleading error naming the model's **kwargs)."""
    model = make_multi("llama", "CAUSAL_LM", ("prefix", "prefix", "prefix"))
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    ids, mask, _ = make_rows("CAUSAL_LM")
    prefix = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="use_prefix: the model has a PEFT prefix-tuning adapter"):
        with ptkernels.use_prefix(model, prefix):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="use_prefix: the model has a PEFT prefix-tuning adapter"):
        model(input_ids=ids, attention_mask=mask, ptkernels_prefix=ptkernels.LayerPrefix(prefix))


def test_mixed_generate_num_return_sequences():
    """generate() expands each row k times; adapter_names given per input row follows the expansion."""
    model = make_multi("llama", "CAUSAL_LM", ("prefix", "prefix_proj"), sizes=(2, 4))
    ids, mask, _ = make_rows("CAUSAL_LM", batch=2, left_pad=True)
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    names = ["a1", "a0"]
    with torch.no_grad():  # sampling from the top 1 token is greedy decoding, and allows 2 sequences per row
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=1,
                             num_return_sequences=2, pad_token_id=0, adapter_names=names)
    want = _generate(model, ids, mask, adapter_names=names)
    assert torch.equal(got, want.repeat_interleave(2, dim=0))


def test_save_and_load_each_adapter(tmp_path):
    """save_pretrained writes every adapter as PEFT does; loading them into a fresh model and
    patching it gives the same mixed batch."""
    model = make_multi("bert", "SEQ_CLS", ("prefix", "prefix_proj", "prefix")).eval()
    ids, mask, _ = make_rows("SEQ_CLS")
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    model.save_pretrained(tmp_path)
    unpatch(model)
    model.save_pretrained(tmp_path / "unpatched")
    for name in ("a0", "a1", "a2"):  # each adapter in its own folder, the same files as without patching
        a = (tmp_path / name / "adapter_model.safetensors").read_bytes()
        assert a == (tmp_path / "unpatched" / name / "adapter_model.safetensors").read_bytes()
    fresh = PeftModel.from_pretrained(tiny_models.make_base("bert", "SEQ_CLS").double(), str(tmp_path / "a0"),
                                      adapter_name="a0")
    for name in ("a1", "a2"):
        fresh.load_adapter(str(tmp_path / name), adapter_name=name)
    fresh = tiny_models.with_peft_oracle_shim(fresh.eval())
    oracle_rows = []
    with torch.no_grad():
        for b, name in enumerate(NAMES):
            fresh.set_adapter(name)
            oracle_rows.append(fresh(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0])
    tiny_models.without_peft_oracle_shim(fresh)
    patch(fresh, backend="torch")
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(got, torch.stack(oracle_rows), atol=1e-10, rtol=1e-10)
    # PEFT saves a projected prefix (prefix_projection) as its MLP's output, so the loaded adapter
    # skips the MLP: equal to the saved model up to rounding
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


def test_bad_adapter_names():
    model = make_multi("gpt2", "CAUSAL_LM", ("prefix", "prefix"), sizes=(2, 3))
    ids, mask, _ = make_rows("CAUSAL_LM", batch=3)
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend="torch")
    for bad, match in [(["a0", "a1"], "one name per example"), (["a0", "nope", "a1"], r"\['nope'\]"),
                       ("a0", "list of adapter names"), ([], "one name per example")]:
        with pytest.raises(ValueError, match="adapter_names") as err:
            model(input_ids=ids, attention_mask=mask, adapter_names=bad)
        assert err.match(match)
    # PEFT refuses to load adapters of another type next to prompt learning; were one there anyway,
    # it is named
    model.peft_config["lora"] = LoraConfig(task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="adapter_names: adapter 'lora' is LORA"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a0", "lora", "a1"])
    del model.peft_config["lora"]
    model.peft_config["cls"] = tiny_models.make_peft_config("prefix", "SEQ_CLS", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="adapter_names: adapter 'cls' has task_type SEQ_CLS"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a0", "cls", "a1"])
    prompt = tiny_models.make_peft_config("prompt", "CAUSAL_LM", num_virtual_tokens=2)
    model.peft_config["prompt"] = prompt
    with pytest.raises(ValueError, match="adapter_names mixes prefix-tuning adapters with prompt-tuning"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a0", "prompt", "a1"])
    with pytest.raises(ValueError, match="adapter_names"):
        _generate(model, ids, mask, adapter_names=["a0", "a1"])


# ------------------------------------------------------------------------------------------------
# patch(prefix_dropout=p): P-Tuning v2's dropout on the prefix keys and values
# ------------------------------------------------------------------------------------------------


def test_prefix_dropout_argument():
    model = tiny_models.make_model("llama", "CAUSAL_LM", "prefix")
    for bad in (1.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="prefix_dropout"):
            patch(model, prefix_dropout=bad)
    assert not is_patched(model)
    patch(model, prefix_dropout=0.25)
    assert model._ptkernels_state["prefix_dropout"] == 0.25
    patch(model)  # patching again updates it (back to the default 0)
    assert model._ptkernels_state["prefix_dropout"] == 0.0
    unpatch(model)
    assert not is_patched(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_dropout_in_training_only(backend, monkeypatch):
    """prefix_dropout reaches prefix_attention as prefix_dropout_p in training mode only: eval mode
    equals the unpatched model, training mode drops prefix elements (same seed, same output), and
    it still trains the encoder."""
    model = tiny_models.make_model("llama", "CAUSAL_LM", "prefix")
    ids, mask, labels = tiny_models.make_batch("CAUSAL_LM")
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    tiny_models.without_peft_oracle_shim(model)
    patch(model, backend=backend, prefix_dropout=0.3)
    seen = []
    real = ptk_tf.prefix_attention
    monkeypatch.setattr(ptk_tf, "prefix_attention",
                        lambda *a, **kw: (seen.append(kw["prefix_dropout_p"]), real(*a, **kw))[1])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-4, rtol=2e-4)
    assert seen == [0.0, 0.0]
    model.train()  # tiny_models: no hidden / attention dropout, so only the prefix dropout is random
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        runs.append((out.logits.detach(), model.prompt_encoder["default"].embedding.weight.grad.clone()))
    assert seen[2:] == [0.3, 0.3] * 2
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert (runs[0][0][mask.bool()] - want[mask.bool()]).abs().max() > 1e-3
    assert runs[0][1].abs().max() > 0
