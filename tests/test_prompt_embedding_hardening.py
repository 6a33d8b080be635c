"""prompt_embedding / virtual_token_embedding beyond the happy path (issue 6), for what
test_prompt_embedding.py does not cover yet: empty batch / empty sequence / empty prompt on both
backends with gradients, non-finite values in the tables, ids on another device, float ids of other
widths, and inference (no_grad / inference_mode) keeping nothing for backward.

Every result is compared with the PyTorch reference (``*_reference``) or with what the contract
says the output is made of (``cat([prompt, weight[ids]])``), computed here with plain torch.
"""

from __future__ import annotations

import pytest
import torch

from ptkernels import prompt_embedding, virtual_token_embedding
from ptkernels.ops.prompt_embedding import prompt_embedding_reference, virtual_token_embedding_reference

from conftest import DEVICE

VOCAB = 13
EMB = 8
OPS = {
    "prompt_embedding": (prompt_embedding, prompt_embedding_reference),
    "virtual_token_embedding": (virtual_token_embedding, virtual_token_embedding_reference),
}
BACKENDS = ["triton", "torch"]


def _make(op, batch, seq, plen, *, per_example=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    high = VOCAB + plen if op == "virtual_token_embedding" else VOCAB
    ids = torch.randint(0, max(high, 1), (batch, seq), generator=g).to(DEVICE)
    weight = torch.randn(VOCAB, EMB, generator=g).to(DEVICE).requires_grad_(True)
    prompt = torch.randn((batch, plen, EMB) if per_example else (plen, EMB), generator=g).to(DEVICE).requires_grad_(True)
    return ids, weight, prompt


def _expected_shape(op, batch, seq, plen):
    return (batch, plen + seq, EMB) if op == "prompt_embedding" else (batch, seq, EMB)


def _forward_backward(fn, ids, weight, prompt):
    out = fn(ids, weight, prompt)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device)
    grads = torch.autograd.grad(out, (weight, prompt), grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (weight, prompt))]
    return out, grads


# ------------------------------------------------------------------------------------------------
# empty batch / sequence / prompt


EMPTY = [(0, 5, 3), (2, 0, 3), (0, 0, 3), (2, 0, 0), (0, 4, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
@pytest.mark.parametrize("batch,seq,plen", EMPTY, ids=lambda x: str(x))
@pytest.mark.parametrize("op", list(OPS))
def test_empty_sizes_match_reference(op, batch, seq, plen, per_example, backend):
    fn, ref_fn = OPS[op]
    ids, weight, prompt = _make(op, batch, seq, plen, per_example=per_example)
    out, grads = _forward_backward(lambda *a: fn(*a, backend=backend), ids, weight, prompt)
    ref, ref_grads = _forward_backward(ref_fn, ids, weight, prompt)
    assert out.shape == ref.shape == _expected_shape(op, batch, seq, plen)
    assert out.dtype == weight.dtype and out.device == weight.device
    assert torch.equal(out, ref)
    for g, r, t in zip(grads, ref_grads, (weight, prompt)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
    if op == "prompt_embedding" and batch > 0 and plen > 0 and not per_example:
        # the shared prompt shows up in every row even when there are no real tokens
        assert torch.equal(out[:, :plen], prompt.detach().expand(batch, plen, EMB))


# ------------------------------------------------------------------------------------------------
# non-finite values are copied, not smeared


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_nan_and_inf_in_tables_propagate_exactly(op, backend):
    fn, _ = OPS[op]
    plen = 3
    ids, weight, prompt = _make(op, 3, 7, plen)
    with torch.no_grad():
        weight[5, 2] = float("nan")
        weight[6, 0] = float("inf")
        prompt[1, 4] = float("nan")
    ids[0, :3] = torch.tensor([5, 6, 1])
    ids[1, 1] = 5
    if op == "virtual_token_embedding":
        ids[2, 0] = VOCAB + 1  # reads prompt row 1
    out = fn(ids, weight, prompt, backend=backend)
    # what the contract says each row is: prompt rows, then word rows (or the virtual table)
    words = torch.nn.functional.embedding(ids.clamp(max=VOCAB - 1), weight.detach())
    if op == "prompt_embedding":
        want = torch.cat([prompt.detach().expand(3, plen, EMB), words], dim=1)
    else:
        table = torch.cat([weight.detach(), prompt.detach()])
        want = table[ids]
    torch.testing.assert_close(out, want, equal_nan=True, atol=0, rtol=0)
    # only the rows that read a NaN / inf are non-finite
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out).any()
    assert torch.equal(torch.isinf(out), torch.isinf(want)) and torch.isinf(out).any()
    assert torch.isfinite(out[~torch.isfinite(want).any(-1)]).all()
    # a NaN in the upstream gradient reaches only the rows that were read at that position
    grad_out = torch.ones_like(out)
    grad_out[0, -1, 0] = float("nan")
    gw, gp = torch.autograd.grad(out, (weight, prompt), grad_out)
    read_last = ids[0, -1].item()
    assert torch.isnan(gw).sum() + torch.isnan(gp).sum() == 1
    if read_last < VOCAB:
        assert torch.isnan(gw[read_last, 0])
    else:
        assert torch.isnan(gp[read_last - VOCAB, 0])


# ------------------------------------------------------------------------------------------------
# devices and dtypes of the ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_ids_on_another_device_rejected(op, backend):
    fn, _ = OPS[op]
    ids, weight, prompt = _make(op, 2, 4, 3)
    name = "input_ids" if op == "prompt_embedding" else "token_ids"
    with pytest.raises(ValueError, match=f"weight must be on {name}'s device meta, got {weight.device}"):
        fn(ids.to("meta"), weight, prompt, backend=backend)
    with pytest.raises(ValueError, match="prompt must be on weight's device"):
        fn(ids, weight, prompt.detach().to("meta").requires_grad_(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_non_integer_ids_rejected(op, dtype, backend):
    fn, _ = OPS[op]
    ids, weight, prompt = _make(op, 2, 4, 3)
    name = "input_ids" if op == "prompt_embedding" else "token_ids"
    with pytest.raises(TypeError, match=f"{name} must be an integer tensor.*dtype {dtype}"):
        fn(ids.to(dtype), weight, prompt, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_narrow_integer_ids_match_int64(op, backend):
    fn, ref_fn = OPS[op]
    ids, weight, prompt = _make(op, 2, 9, 3)
    want = ref_fn(ids, weight, prompt)
    for dtype in (torch.int16, torch.int32, torch.uint8):
        assert torch.equal(fn(ids.to(dtype), weight, prompt, backend=backend), want), dtype


# ------------------------------------------------------------------------------------------------
# inference keeps nothing for backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_inference_saves_nothing(op, backend):
    fn, ref_fn = OPS[op]
    ids, weight, prompt = _make(op, 2, 5, 3)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(ids, weight, prompt, backend=backend)
    assert saved  # in grad mode something is saved (the ids), so the checks below can fail
    for context in (torch.no_grad, torch.inference_mode):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context():
            out = fn(ids, weight, prompt, backend=backend)
        assert saved == [], f"{context.__name__}: saved {saved}"
        assert not out.requires_grad and out.grad_fn is None
        assert torch.equal(out, ref_fn(ids, weight, prompt).detach())
