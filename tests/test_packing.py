"""Packed (padding-free) batches through a patched PEFT model: each packed sequence gets exactly what
the UNPATCHED PEFT model gives for that sequence alone (DESIGN.md, "Packed (padding-free) sequences").

float64, backend "torch", Llama- (GQA), Qwen2- (GQA, q/k/v biases) and GPT-2-shaped (learned
absolute positions) tiny models. A packed row is built by transformers' own
``DataCollatorWithFlattening`` (position ids restarting at 0, labels -100 at every sequence start;
with ``return_flash_attn_kwargs=True`` also ``cu_seq_lens_q/k`` and ``max_length_q/k``), or given as
``cu_seq_lens_*`` keywords alone (positions then restart per sequence). Compared per sequence:
logits (for prompt tuning / P-tuning the virtual tokens' too: each sequence is laid out [P virtual,
L real]), per-token losses, the model's loss (the token-weighted mean), and the gradient of every
trainable parameter.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

import ptkernels  # noqa: E402
import tiny_models  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 53
P = 3
LENGTHS = (5, 1, 8, 3)  # one token alone, odd lengths


def make_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                  max_position_embeddings=64, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=2)
    if arch == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=1)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    raise ValueError(arch)


def make_model(arch: str, adapter: str):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_config(arch), attn_implementation="sdpa").double()
    torch.manual_seed(1)
    model = get_peft_model(base, tiny_models.make_peft_config(adapter, "CAUSAL_LM", num_virtual_tokens=P)).double()
    # a trained-looking prompt encoder: PEFT initialises some parts to constants
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return tiny_models.with_peft_oracle_shim(model.eval())


def make_sequences(lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB - 1, (n,), generator=g) for n in lengths]


def sequence_labels(seq):
    """The collator's labels for one sequence: the ids, -100 on its first token (no prediction
    crosses a sequence boundary)."""
    labels = seq.clone()
    labels[0] = -100
    return labels


def token_losses(logits, labels):
    """Per-token next-token losses (L - 1,) of one sequence's logits (L, V) and labels (L,)."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")


def trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def per_sequence_oracle(model, seqs, num_virtual):
    """The unpatched PEFT model on each sequence alone: logits (per sequence, virtual tokens included
    for prompt tuning), per-token losses, the model's losses, and the gradients of sum(token losses)."""
    model.zero_grad(set_to_none=True)
    logits, losses, model_losses, counts = [], [], [], []
    for seq in seqs:
        labels = sequence_labels(seq)
        out = model(input_ids=seq[None], labels=labels[None])
        full_labels = torch.cat([labels.new_full((num_virtual,), -100), labels]) if num_virtual else labels
        tl = token_losses(out.logits[0], full_labels)
        tl.sum().backward()
        logits.append(out.logits[0].detach())
        losses.append(tl.detach())
        model_losses.append(out.loss.detach())
        counts.append(int((full_labels[1:] != -100).sum()))
    loss = sum(l * c for l, c in zip(model_losses, counts) if c) / sum(counts)  # a 1-token sequence has no loss (NaN)
    return logits, losses, loss, trainable_grads(model)


def packed_batch(seqs, style: str):
    """The packed row (1, T) as the model gets it, by style: "position_ids" (DataCollatorWithFlattening's
    default), "flash_kwargs" (return_flash_attn_kwargs=True: position ids and cu_seq_lens) or
    "cu_seq_lens" (the keywords alone, no position ids)."""
    features = [{"input_ids": s.tolist()} for s in seqs]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=style != "position_ids")
    batch = dict(collator(features, return_tensors="pt"))
    if style == "cu_seq_lens":
        del batch["position_ids"]
    return batch


ARCHS = ("llama", "qwen2", "gpt2")
ADAPTERS = ("prefix", "prompt", "ptuning_mlp")
STYLES = ("position_ids", "flash_kwargs", "cu_seq_lens")
CASES = [(a, ad, st) for a in ARCHS for ad in ADAPTERS for st in STYLES
         if st == "position_ids" or ad == "prefix" or a == "llama"]


@pytest.mark.parametrize("arch,adapter,style", CASES, ids=["-".join(c) for c in CASES])
def test_packed_batch_equals_each_sequence_alone(arch, adapter, style):
    model = make_model(arch, adapter)
    seqs = make_sequences()
    num_virtual = 0 if adapter.startswith("prefix") else P
    want_logits, want_losses, want_loss, want_grads = per_sequence_oracle(model, seqs, num_virtual)

    tiny_models.without_peft_oracle_shim(model)
    ptkernels.patch(model, backend="torch")
    model.zero_grad(set_to_none=True)
    batch = packed_batch(seqs, style)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    out = model(**batch)
    logits = out.logits[0]
    assert logits.shape[0] == sum(LENGTHS) + len(seqs) * num_virtual  # (1, T + N * P, V)

    start, total = 0, 0
    for n, seq in enumerate(seqs):
        width = num_virtual + len(seq)
        got = logits[start:start + width]
        torch.testing.assert_close(got, want_logits[n], atol=1e-12, rtol=0, msg=lambda m: f"sequence {n}: {m}")
        labels = sequence_labels(seq)
        full_labels = torch.cat([labels.new_full((num_virtual,), -100), labels]) if num_virtual else labels
        tl = token_losses(got, full_labels)
        torch.testing.assert_close(tl, want_losses[n], atol=1e-12, rtol=0)
        total = total + tl.sum()
        start += width
    # transformers computes the loss in float32 (ForCausalLMLoss upcasts the logits with .float())
    torch.testing.assert_close(out.loss, want_loss, atol=0, rtol=2e-6)

    total.backward()
    grads = trainable_grads(model)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-11, rtol=0, msg=lambda m: f"{name}: {m}")


def test_unpatched_peft_is_not_per_sequence():
    """Why this matters: PEFT's own path puts the prefix in front of the row only, so every packed
    sequence but the first sees a different context (the check above would fail for it)."""
    model = make_model("llama", "prefix")
    seqs = make_sequences()
    want = per_sequence_oracle(model, seqs, 0)[0]
    got = model(**packed_batch(seqs, "position_ids")).logits[0]
    assert not torch.allclose(got[len(seqs[0]):], torch.cat(want[1:]), atol=1e-6)


def test_patched_plain_model_packed_by_position_ids():
    """A plain (non-PEFT) patched model: packing detected in the attention from the position ids."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama"), attn_implementation="sdpa").double().eval()
    seqs = make_sequences()
    want = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
    ptkernels.patch(model, backend="torch")
    batch = packed_batch(seqs, "position_ids")
    got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_packed_prefix_tuning_triton_backend():
    model = make_model("llama", "prefix").float()
    seqs = make_sequences((4, 1, 6))
    want = [model(input_ids=s[None]).logits[0] for s in seqs]
    tiny_models.without_peft_oracle_shim(model)
    ptkernels.patch(model, backend="triton")
    got = model(**packed_batch(seqs, "position_ids")).logits[0]
    torch.testing.assert_close(got, torch.cat(want), atol=1e-4, rtol=0)


def test_packing_errors_are_clear():
    model = make_model("llama", "prefix")
    tiny_models.without_peft_oracle_shim(model)
    ptkernels.patch(model, backend="torch")
    ids = torch.randint(2, VOCAB - 1, (1, 9))
    with pytest.raises(ValueError, match="cu_seq_lens_q must end at the packed row's length = 9, got"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seq_lens_q must be non-decreasing"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 5, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="need a batch of one row, got a batch of 2"):
        model(input_ids=ids.repeat(2, 1), cu_seq_lens_q=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seq_lens_q == cu_seq_lens_k"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 4, 9]), cu_seq_lens_k=torch.tensor([0, 5, 9]))
    with pytest.raises(ValueError, match="padding in attention_mask"):
        mask = torch.ones(1, 9, dtype=torch.long)
        mask[0, -1] = 0
        model(input_ids=ids, attention_mask=mask, cu_seq_lens_q=torch.tensor([0, 4, 9]))
