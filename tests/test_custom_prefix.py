"""The public per-layer prefix API for models written without PEFT (``ptkernels.LayerPrefix``,
``ptkernels.use_prefix``) and the P-Tuning v2 example built on it.

The reference is always the unpatched Hugging Face model with eager attention and the prefix handed
over as a ``DynamicCache`` (the prefix concatenated to every layer's keys and values, a (B, P + S)
mask), as P-Tuning v2's own code does it, in float64; never numbers from ptkernels.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import pathlib

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig  # noqa: E402

import ptkernels  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ptuning_v2" / "roberta_prefix_token_classification.py"


def load_example():
    spec = importlib.util.spec_from_file_location("ptuning_v2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_of(layers_kv):
    """A DynamicCache holding layer l's (key, value), each (B, H, P, D)."""
    cache = DynamicCache()
    for layer, (k, v) in enumerate(layers_kv):
        cache.update(k, v, layer)
    return cache


def with_cache(model, layers_kv) -> dict:
    """The forward keyword that hands ``model`` a cache: ``cache`` on transformers 5.24,
    ``past_key_values`` before (a keyword the model does not know would be swallowed by **kwargs)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache_of(layers_kv)}


def reference_forward(example_model, eager_roberta, input_ids, attention_mask, labels):
    """P-Tuning v2's forward as the original writes it: B copies of the prefix as past_key_values,
    a (B, P + S) mask, RoBERTa counting the prefix as past (positions from the cache), eager attention."""
    batch = input_ids.shape[0]
    prefix = example_model.get_prompt()  # (2L, H, P, D)
    kv = [(prefix[2 * l].expand(batch, -1, -1, -1), prefix[2 * l + 1].expand(batch, -1, -1, -1))
          for l in range(example_model.n_layer)]
    full_mask = torch.cat([torch.ones(batch, example_model.pre_seq_len, dtype=attention_mask.dtype), attention_mask], 1)
    hidden = eager_roberta(input_ids, attention_mask=full_mask, **with_cache(eager_roberta, kv))[0]
    logits = example_model.classifier(example_model.dropout(hidden))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, example_model.num_labels),
                                             labels.masked_fill(attention_mask == 0, -100).reshape(-1))
    return loss, logits


def batch(seed=1, batch_size=3, seq=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch_size, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return ids.masked_fill(mask == 0, 1), mask, torch.randint(0, 5, (batch_size, seq), generator=g)


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_ptuning_v2_example_matches_explicit_concat_fp64(prefix_projection):
    example = load_example()
    torch.manual_seed(0)
    model = example.RobertaPrefixForTokenClassification(
        example.tiny_config(), pre_seq_len=4, prefix_projection=prefix_projection, prefix_hidden_size=24,
        backend="torch").double().eval()
    eager = copy.deepcopy(model.roberta)
    ptkernels.unpatch(eager)
    eager.config._attn_implementation = "eager"
    assert model.roberta.config._attn_implementation == "ptkernels"
    ids, mask, labels = batch()

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss, logits = fn()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), logits.detach(), grads

    got = run(lambda: (lambda o: (o.loss, o.logits))(model(ids, attention_mask=mask, labels=labels)))
    want = run(lambda: reference_forward(model, eager, ids, mask, labels))
    real = mask.bool()
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[1][real], want[1][real], atol=1e-12, rtol=1e-12)
    assert set(got[2]) == set(want[2]) and any(n.startswith("prefix_encoder.") for n in got[2])
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], atol=1e-12, rtol=1e-12, msg=lambda m: f"grad {n}: {m}")
    # the prefix matters (so the comparison can fail): RoBERTa without it differs
    plain = eager(ids, attention_mask=mask)[0]
    assert (model.classifier(plain)[real] - got[1][real]).abs().max() > 1e-3


def test_ptuning_v2_example_prefix_dropout_in_training():
    """Training mode drops prefix elements per example (reproducible with the seed); eval does not."""
    example = load_example()
    torch.manual_seed(0)
    model = example.RobertaPrefixForTokenClassification(
        example.tiny_config(hidden_dropout_prob=0.3), pre_seq_len=4, backend="torch").double()
    ids, mask, labels = batch()
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids, attention_mask=mask).logits
    model.train()
    model.dropout.p = 0.0  # keep the dropout before the head out, the prefix one in
    model_prefix_p = 0.3

    def train_logits(seed):
        torch.manual_seed(seed)
        prefix = ptkernels.LayerPrefix(model.get_prompt(), dropout_p=model_prefix_p)
        hidden = model.roberta(ids, attention_mask=mask, position_ids=model.position_ids(ids), ptkernels_prefix=prefix)[0]
        return model.classifier(hidden).detach()

    a, b, c = train_logits(0), train_logits(0), train_logits(1)
    real = mask.bool()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[real] - eval_logits[real]).abs().max() > 1e-4


def test_ptuning_v2_example_runs():
    """The example's own training loop (CI runs the example): a few steps, the loss goes down."""
    losses = load_example().main(["--steps", "8", "--backend", "torch", "--prefix-projection"])
    assert len(losses) == 8 and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------
# LayerPrefix / use_prefix on any patched HF model: shared, per example, bank + index + lengths
# ------------------------------------------------------------------------------------------------


def llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64, pad_token_id=0)
    # sdpa: eager Llama attention takes its softmax in float32, not a float64 reference
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double().eval()


def eager_row(model, ids, mask, layers_kv, positions):
    """The unpatched model (sdpa over the concatenated keys) on one row with the prefix as a cache (k, v (1, Hkv, p, D) per layer)."""
    p = layers_kv[0][0].shape[2]
    full = torch.cat([torch.ones(1, p, dtype=mask.dtype), mask], 1)
    return model(ids, attention_mask=full, position_ids=positions, **with_cache(model, layers_kv)).logits[0]


FORMS = ["shared", "per_example", "bank", "pairs", "context"]


@pytest.mark.parametrize("form,backend", [(f, "torch") for f in FORMS] + [(f, "triton") for f in FORMS])
def test_layer_prefix_forms_match_explicit_cache(form, backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    ref_model = llama()
    model = ptkernels.patch(copy.deepcopy(ref_model), backend=backend).to(dtype)
    L, H, P, D = 2, 2, 5, 8
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 60, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    positions = torch.arange(6)[None].expand(3, -1)
    bank = torch.randn(2, 2 * L, H, P, D, generator=g, dtype=torch.float64)
    index = torch.tensor([1, 0, 1])
    lengths = torch.tensor([3, 5])
    # what each example b sees: its own (2L, H, p_b, D)
    if form == "shared":
        seen = [bank[0]] * 3
        prefix, kwargs = bank[0], {}
    elif form == "per_example":
        seen = [bank[index[b]] for b in range(3)]
        prefix, kwargs = bank[index], {}
    elif form in ("bank", "context"):
        seen = [bank[index[b], :, :, : lengths[index[b]]] for b in range(3)]
        prefix, kwargs = bank, {"index": index, "lengths": lengths}
    else:  # a list of (key, value) pairs per layer, per example (P-Tuning v2's past_key_values layout)
        seen = [bank[index[b]] for b in range(3)]
        prefix, kwargs = [(bank[index, 2 * l], bank[index, 2 * l + 1]) for l in range(L)], {}
    if form == "context":
        with ptkernels.use_prefix(model, _cast(prefix, dtype), **kwargs):
            got = model(ids, attention_mask=mask, position_ids=positions).logits
    else:
        got = model(ids, attention_mask=mask, position_ids=positions,
                    ptkernels_prefix=ptkernels.LayerPrefix(_cast(prefix, dtype), **kwargs)).logits
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for b in range(3):
        kv = [(seen[b][2 * l][None], seen[b][2 * l + 1][None]) for l in range(L)]
        want = eager_row(ref_model, ids[b:b + 1], mask[b:b + 1], kv, positions[b:b + 1])
        real = mask[b].bool()
        torch.testing.assert_close(got[b][real].double(), want[real], atol=tol, rtol=tol, msg=lambda m: f"row {b}: {m}")


def _cast(prefix, dtype):
    if isinstance(prefix, list):
        return [(k.to(dtype), v.to(dtype)) for k, v in prefix]
    return prefix.to(dtype)


def test_use_prefix_generate_and_errors():
    model = ptkernels.patch(llama(), backend="torch")
    ids = torch.randint(2, 60, (2, 5), generator=torch.Generator().manual_seed(4))
    prefix = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    with ptkernels.use_prefix(model, prefix):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)
    with pytest.raises(ValueError, match="patched"):
        with ptkernels.use_prefix(llama(), prefix):
            pass
    with pytest.raises(ValueError, match="both"):
        with ptkernels.use_prefix(model, prefix):
            model(ids, ptkernels_prefix=ptkernels.LayerPrefix(prefix))
    for bad, exc, match in [
        (torch.randn(3, 2, 3, 8), ValueError, "2L"),
        (torch.randn(2, 3, 8), ValueError, "prefix must be"),
        ([(torch.randn(2, 3, 8), torch.randn(2, 4, 8))], ValueError, "layer 0"),
        ("kv", TypeError, "prefix must be a tensor"),
    ]:
        with pytest.raises(exc, match=match):
            ptkernels.LayerPrefix(bad)
    with pytest.raises(ValueError, match="index needs a bank"):
        ptkernels.LayerPrefix(prefix, index=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="dropout_p"):
        ptkernels.LayerPrefix(prefix, dropout_p=1.0)
    with pytest.raises(ValueError, match="prefix_index"):  # the op names its argument
        model(ids, ptkernels_prefix=ptkernels.LayerPrefix(prefix[None].expand(2, -1, -1, -1, -1),
                                                            index=torch.tensor([0, 2])))
    # a prefix for fewer layers than the model has
    with pytest.raises(ValueError, match="layers"):
        model(ids, ptkernels_prefix=ptkernels.LayerPrefix(prefix[:2]))


def test_layer_prefix_and_use_prefix_bad_arguments_name_them():
    """Arguments that were silently ignored, cast or dropped, or that failed deep inside (an
    AttributeError at the first forward), raise TypeError / ValueError naming them."""
    model = ptkernels.patch(llama(), backend="torch")
    ids = torch.randint(2, 60, (2, 5), generator=torch.Generator().manual_seed(4))
    prefix = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    bank = prefix[None].expand(3, -1, -1, -1, -1)
    for kwargs, exc, match in [
        (dict(prefix=bank, index=[0, 1]), TypeError, "index must be an integer tensor or None, got list"),
        (dict(prefix=prefix, lengths=2), TypeError, "lengths must be an integer tensor or None, got int"),
        (dict(prefix=prefix.long()), TypeError, "prefix must be a floating-point tensor, got dtype torch.int64"),
        (dict(prefix=prefix.to(torch.complex128)), TypeError, "floating-point tensor, got dtype torch.complex128"),
        (dict(prefix=[(1, 2), (3, 4)]), TypeError, "prefix layer 0 must be a pair of tensors, got int"),
        (dict(prefix=prefix, shapes=[(5, 2, 8), None]), ValueError, r"shapes\[0\] must be None or \(source layer"),
    ]:
        with pytest.raises(exc, match=match):
            ptkernels.LayerPrefix(kwargs.pop("prefix"), **kwargs)
    with pytest.raises(TypeError, match="ptkernels_prefix must be a ptkernels.LayerPrefix, got Tensor"):
        model(ids, ptkernels_prefix=prefix)
    for kwargs in (dict(dropout_p=0.5), dict(lengths=torch.tensor([2])), dict(index=torch.tensor([0, 0]))):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} given beside a LayerPrefix"):
            with ptkernels.use_prefix(model, ptkernels.LayerPrefix(prefix), **kwargs):
                pass


def test_output_attentions_on_a_patched_model_raises():
    """The kernels compute no attention weights: output_attentions=True raises rather than return none
    (the eager model the user may have chosen for them returns one tensor per layer)."""
    eager = llama()
    eager.config._attn_implementation = "eager"
    ids = torch.randint(2, 60, (2, 5), generator=torch.Generator().manual_seed(4))
    assert len(eager(ids, output_attentions=True).attentions) == 2  # the difference the error prevents
    model = ptkernels.patch(eager, backend="torch")
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(ids, output_attentions=True)
    assert model(ids).logits.shape == (2, 5, 61)


def test_unread_prefix_error_says_what_the_prefix_has():
    """A prefix with more layers than the model runs (or a cross prefix on a decoder-only model) is
    caught after the forward; the error gives the prefix's layers and the layers that read it, not
    only the model's **kwargs."""
    model = ptkernels.patch(llama(), backend="torch")
    ids = torch.randint(2, 60, (2, 5), generator=torch.Generator().manual_seed(4))
    prefix = torch.randn(6, 2, 3, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layers \[2\].*layers that read it: \[0, 1\].*it has 3 layers"):
        model(ids, ptkernels_prefix=ptkernels.LayerPrefix(prefix))
    with pytest.raises(RuntimeError, match="it has 2 layers and a cross prefix"):
        model(ids, ptkernels_prefix=ptkernels.LayerPrefix(prefix[:4], cross=prefix[:4]))
