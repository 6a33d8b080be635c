"""prompt_embedding / virtual_token_embedding: the Triton path (run in Triton's interpreter on CPU)
against the PyTorch reference, forward and backward, plus determinism, torch.library checks and
argument errors."""

from __future__ import annotations


import pytest
import torch

from ptkernels.ops.prompt_embedding import (
    prompt_embedding,
    prompt_embedding_reference,
    virtual_token_embedding,
    virtual_token_embedding_reference,
)

from conftest import DEVICE

VOCAB = 23
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _make(batch, seq, plen, emb, *, per_example, dtype=torch.float32, weight_grad=True, vocab=VOCAB, seed=0,
          virtual=False):
    g = torch.Generator().manual_seed(seed)
    high = vocab + plen if virtual else vocab
    ids = torch.randint(0, high, (batch, seq), generator=g).to(DEVICE)
    weight = torch.randn(vocab, emb, generator=g).to(DEVICE, dtype).requires_grad_(weight_grad)
    pshape = (batch, plen, emb) if per_example else (plen, emb)
    prompt = torch.randn(pshape, generator=g).to(DEVICE, dtype).requires_grad_(True)
    return ids, weight, prompt


def _grads(out, weight, prompt, grad_out):
    wanted = [prompt] + ([weight] if weight.requires_grad else [])
    grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)  # the reference skips an empty prompt
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, wanted)]
    return grads[0], (grads[1] if weight.requires_grad else None)


def _fp32_reference(fn, ids, weight, prompt, grad_out):
    w = weight.detach().float().requires_grad_(weight.requires_grad)
    p = prompt.detach().float().requires_grad_(True)
    out = fn(ids, w, p)
    return (out, *_grads(out, w, p, grad_out.float()))


def _check_against_reference(fn_triton, fn_ref, ids, weight, prompt):
    """Forward must be an exact copy; gradients fp32-close (fp32) or within the FlashAttention rule
    (kernel error <= 3 x error of PyTorch in the same precision, plus a rounding floor)."""
    out = fn_triton(ids, weight, prompt)
    ref_out = fn_ref(ids, weight, prompt)
    assert out.dtype == weight.dtype and out.shape == ref_out.shape
    assert torch.equal(out, ref_out)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    gp, gw = _grads(out, weight, prompt, grad_out)
    assert gp.shape == prompt.shape and gp.dtype == prompt.dtype
    if weight.requires_grad:
        assert gw.shape == weight.shape and gw.dtype == weight.dtype
    if weight.dtype == torch.float32:
        rp, rw = _grads(ref_out, weight, prompt, grad_out)
        torch.testing.assert_close(gp, rp, rtol=1e-5, atol=1e-5)
        if weight.requires_grad:
            torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
        return
    _, fp, fw = _fp32_reference(fn_ref, ids, weight, prompt, grad_out)
    lp, lw = _grads(ref_out, weight, prompt, grad_out)  # PyTorch in the same precision
    pairs = [(gp, lp, fp)] + ([(gw, lw, fw)] if weight.requires_grad else [])
    for mine, torch_low, exact in pairs:
        if exact.numel() == 0:
            assert mine.numel() == 0
            continue
        floor = LOW_PRECISION_FLOOR[weight.dtype] * max(1.0, exact.abs().max().item())
        err = (mine.float() - exact).abs().max().item()
        base = (torch_low.float() - exact).abs().max().item()
        assert err <= 3 * base + floor, f"error {err} vs PyTorch {base} (floor {floor})"


def _pe_triton(ids, w, p):
    return prompt_embedding(ids, w, p, backend="triton")


def _vt_triton(ids, w, p):
    return virtual_token_embedding(ids, w, p, backend="triton")


# ------------------------------------------------------------------------------------------------ #
# prompt_embedding against the reference


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
@pytest.mark.parametrize("emb", [16, 40, 100])
@pytest.mark.parametrize("plen", [0, 1, 5])
@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 17), (3, 1), (3, 17)])
def test_prompt_embedding_fp32(batch, seq, plen, emb, per_example):
    for weight_grad in (True, False):
        ids, weight, prompt = _make(batch, seq, plen, emb, per_example=per_example, weight_grad=weight_grad,
                                    seed=batch * 1000 + seq * 100 + plen * 10 + emb)
        _check_against_reference(_pe_triton, prompt_embedding_reference, ids, weight, prompt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,seq,plen,emb,per_example", [(3, 17, 5, 40, False), (3, 17, 5, 100, True),
                                                           (1, 1, 1, 16, False), (3, 1, 0, 100, False)])
def test_prompt_embedding_low_precision(dtype, batch, seq, plen, emb, per_example):
    ids, weight, prompt = _make(batch, seq, plen, emb, per_example=per_example, dtype=dtype, vocab=5)
    _check_against_reference(_pe_triton, prompt_embedding_reference, ids, weight, prompt)


def test_prompt_embedding_by_hand():
    """Expected values built by hand: grad of a shared prompt row = sum over the batch; a word row
    gets one grad_out row per occurrence."""
    weight = torch.arange(12.0).reshape(4, 3).to(DEVICE).requires_grad_(True)
    prompt = torch.tensor([[-1.0, -2.0, -3.0]], device=DEVICE, requires_grad=True)
    ids = torch.tensor([[2, 2], [0, 3]], device=DEVICE)
    out = prompt_embedding(ids, weight, prompt, backend="triton")
    expected = torch.tensor([[[-1.0, -2, -3], [6, 7, 8], [6, 7, 8]], [[-1, -2, -3], [0, 1, 2], [9, 10, 11]]])
    assert torch.equal(out.cpu(), expected)
    grad_out = torch.arange(18.0).reshape(2, 3, 3).to(DEVICE)
    out.backward(grad_out)
    assert torch.equal(prompt.grad.cpu(), torch.tensor([[0.0 + 9, 1 + 10, 2 + 11]]))
    want_w = torch.tensor([[12.0, 13, 14], [0, 0, 0], [3 + 6, 4 + 7, 5 + 8], [15, 16, 17]])
    assert torch.equal(weight.grad.cpu(), want_w)


# ------------------------------------------------------------------------------------------------ #
# virtual_token_embedding against the reference


def _template(batch, vocab, plen, pattern, seed):
    """Token ids following ``pattern``: an int k >= 0 is prompt token k (id vocab + k), "x" a random word."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        rows.append([vocab + k if isinstance(k, int) else int(torch.randint(0, vocab, (1,), generator=g))
                     for k in pattern])
    return torch.tensor(rows, device=DEVICE)


TEMPLATES = {
    # P-Tuning "(3, x, 3, y, 3)": 9 prompt tokens in three runs around the words
    "ptuning_3x3y3": (9, [0, 1, 2, "x", "x", 3, 4, 5, "x", 6, 7, 8]),
    # prompt ids repeated and out of order, scattered between words
    "repeated": (5, [4, "x", 4, 0, "x", "x", 2, 4, 0, "x", 1, 3, 3, "x", 4, 2, "x"]),
    "prompt_only": (1, [0]),
    "words_only": (5, ["x", "x", "x"]),
}


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
@pytest.mark.parametrize("emb", [16, 40, 100])
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_virtual_token_embedding_templates(template, emb, per_example):
    plen, pattern = TEMPLATES[template]
    for batch, weight_grad in ((1, True), (3, False), (3, True)):
        _, weight, prompt = _make(batch, 1, plen, emb, per_example=per_example, weight_grad=weight_grad, vocab=7,
                                  seed=emb + batch)
        ids = _template(batch, 7, plen, pattern, seed=emb)
        _check_against_reference(_vt_triton, virtual_token_embedding_reference, ids, weight, prompt)


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
@pytest.mark.parametrize("batch,seq,plen,emb", [(1, 1, 1, 16), (3, 17, 5, 40), (3, 17, 0, 100), (1, 17, 5, 100)])
def test_virtual_token_embedding_random_ids(batch, seq, plen, emb, per_example):
    ids, weight, prompt = _make(batch, seq, plen, emb, per_example=per_example, virtual=True, vocab=11)
    _check_against_reference(_vt_triton, virtual_token_embedding_reference, ids, weight, prompt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_virtual_token_embedding_low_precision(dtype, per_example):
    plen, pattern = TEMPLATES["repeated"]
    _, weight, prompt = _make(3, 1, plen, 40, per_example=per_example, dtype=dtype, vocab=3)
    ids = _template(3, 3, plen, pattern, seed=3)
    _check_against_reference(_vt_triton, virtual_token_embedding_reference, ids, weight, prompt)


def test_virtual_token_embedding_by_hand():
    """grad_out = 1 everywhere: a prompt row's gradient counts how often its id occurs."""
    vocab, plen = 4, 3
    weight = torch.randn(vocab, 8, device=DEVICE)
    prompt = torch.randn(plen, 8, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[4, 0, 4, 6], [6, 6, 1, 4]], device=DEVICE)
    out = virtual_token_embedding(ids, weight, prompt, backend="triton")
    assert torch.equal(out[0, 0], prompt[0].detach()) and torch.equal(out[1, 2], weight[1])
    assert torch.equal(out[1, 1], prompt[2].detach())
    out.sum().backward()  # grad_out is an expanded (stride 0) tensor here
    counts = torch.tensor([3.0, 0.0, 3.0], device=DEVICE)
    assert torch.equal(prompt.grad, counts[:, None].expand(plen, 8))


# ------------------------------------------------------------------------------------------------ #
# determinism, strides, edge sizes, torch.library


@pytest.mark.parametrize("op", ["prompt_embedding", "virtual_token_embedding"])
def test_backward_is_bitwise_deterministic(op):
    fn = _pe_triton if op == "prompt_embedding" else _vt_triton
    ids, weight, prompt = _make(3, 17, 5, 100, per_example=False, vocab=3, virtual=op != "prompt_embedding")
    out = fn(ids, weight, prompt)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 1e3
    runs = [_grads(fn(ids, weight, prompt), weight, prompt, grad_out) for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert runs[0][0].abs().sum() > 0 and runs[0][1].abs().sum() > 0


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (17, 3), generator=g).to(DEVICE).t()  # (3, 17), strides (1, 3)
    weight = torch.randn(VOCAB, 80, generator=g).to(DEVICE)[:, ::2].requires_grad_(True)  # (V, 40) stride 2
    prompt = torch.randn(40, 5, generator=g).to(DEVICE).t().requires_grad_(True)  # (5, 40) transposed
    for fn, ref in ((_pe_triton, prompt_embedding_reference), (_vt_triton, virtual_token_embedding_reference)):
        _check_against_reference(fn, ref, ids, weight, prompt)
        out = fn(ids, weight, prompt)
        gp, gw = _grads(out[:, ::2], weight, prompt, torch.ones_like(out[:, ::2]))  # strided grad_out
        rout = ref(ids, weight, prompt)
        rp, rw = _grads(rout[:, ::2], weight, prompt, torch.ones_like(rout[:, ::2]))
        torch.testing.assert_close(gp, rp)
        torch.testing.assert_close(gw, rw)


def test_empty_sequence_and_int32_ids():
    ids, weight, prompt = _make(2, 0, 3, 16, per_example=False)
    out = prompt_embedding(ids, weight, prompt, backend="triton")
    assert torch.equal(out, prompt.detach().expand(2, 3, 16))
    out.backward(torch.ones_like(out))
    assert torch.equal(prompt.grad, torch.full_like(prompt, 2.0))
    ids, weight, prompt = _make(3, 17, 5, 40, per_example=True)
    ids32 = ids.to(torch.int32)
    assert torch.equal(prompt_embedding(ids32, weight, prompt, backend="triton"),
                       prompt_embedding_reference(ids, weight, prompt))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_opcheck_and_compile_fullgraph():
    ids, weight, prompt = _make(2, 5, 3, 16, per_example=False)
    torch.library.opcheck(torch.ops.ptkernels.prompt_embedding_fwd.default, (ids, weight, prompt, False))
    vids = _template(2, VOCAB, 3, [0, "x", 2, 2], seed=0)
    torch.library.opcheck(torch.ops.ptkernels.prompt_embedding_fwd.default, (vids, weight, prompt, True))

    def loss(ids, vids, weight, prompt):
        a = prompt_embedding(ids, weight, prompt, backend="triton")
        b = virtual_token_embedding(vids, weight, prompt, backend="triton")
        return (a ** 2).sum() + (b ** 3).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(ids, vids, weight, prompt), [weight, prompt])
    w = weight.detach().requires_grad_(True)
    p = prompt.detach().requires_grad_(True)
    ref = (prompt_embedding_reference(ids, w, p) ** 2).sum() + (virtual_token_embedding_reference(vids, w, p) ** 3).sum()
    for a, b in zip(got, torch.autograd.grad(ref, [w, p])):
        torch.testing.assert_close(a, b)


def test_auto_backend_matches():
    ids, weight, prompt = _make(3, 17, 5, 40, per_example=True)
    assert torch.equal(prompt_embedding(ids, weight, prompt), prompt_embedding_reference(ids, weight, prompt))
    ids, weight, prompt = _make(3, 17, 5, 40, per_example=False, virtual=True)
    assert torch.equal(virtual_token_embedding(ids, weight, prompt),
                       virtual_token_embedding_reference(ids, weight, prompt))


# ------------------------------------------------------------------------------------------------ #
# argument errors


def _base():
    ids = torch.randint(0, VOCAB, (2, 4), device=DEVICE)
    return ids, torch.randn(VOCAB, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)


def _bad_cases():
    ids, w, p = _base()
    yield "ids_float", (ids.float(), w, p), TypeError, "{ids} must be an integer tensor"
    yield "ids_bool", (ids > 3, w, p), TypeError, "{ids} must be an integer tensor"
    yield "ids_not_tensor", (ids.tolist(), w, p), TypeError, "{ids} must be a torch.Tensor"
    yield "ids_1d", (ids[0], w, p), ValueError, r"{ids} must be 2-D \(B, S\), got shape \(4,\)"
    yield "ids_3d", (ids[None], w, p), ValueError, r"{ids} must be 2-D \(B, S\), got shape \(1, 2, 4\)"
    yield "weight_1d", (ids, w[0], p), ValueError, r"weight must be 2-D \(V, E\), got shape \(8,\)"
    yield "weight_int", (ids, w.long(), p.long()), TypeError, "weight must be float16, bfloat16 or float32"
    yield "weight_device", (ids, w.to("meta"), p.to("meta")), ValueError, "weight must be on {ids}'s device"
    yield "prompt_1d", (ids, w, p[0]), ValueError, r"prompt must be 2-D \(P, E\) or 3-D \(B, P, E\), got shape \(8,\)"
    yield "prompt_4d", (ids, w, p[None, None]), ValueError, "prompt must be 2-D"
    yield "prompt_emb", (ids, w, p[:, :5]), ValueError, r"prompt must have weight's embedding size E = 8.*\(3, 5\)"
    yield "prompt_batch", (ids, w, p.expand(3, 3, 8)), ValueError, r"per-example prompt.*B = 2.*\(3, 3, 8\)"
    yield "prompt_dtype", (ids, w, p.half()), TypeError, "prompt must have weight's dtype torch.float32, got torch.float16"
    yield "prompt_device", (ids, w, p.to("meta")), ValueError, "prompt must be on weight's device"
    yield "prompt_not_tensor", (ids, w, None), TypeError, "prompt must be a torch.Tensor, got NoneType"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("op", ["prompt_embedding", "virtual_token_embedding"])
@pytest.mark.parametrize("case", [c[0] for c in _bad_cases()])
def test_bad_arguments(case, op, backend):
    fn = prompt_embedding if op == "prompt_embedding" else virtual_token_embedding
    ids_name = "input_ids" if op == "prompt_embedding" else "token_ids"
    _, args, exc, pattern = next(c for c in _bad_cases() if c[0] == case)
    with pytest.raises(exc, match=pattern.format(ids=ids_name)):
        fn(*args, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_ids_out_of_range(backend):
    ids, w, p = _base()  # V = VOCAB, P = 3
    for bad in (-1, VOCAB):
        x = ids.clone()
        x[1, 2] = bad
        with pytest.raises(ValueError, match=rf"input_ids must hold word ids in \[0, V\) = \[0, {VOCAB}\), got ids from"):
            prompt_embedding(x, w, p, backend=backend)
    x = ids.clone()
    x[0, 0] = VOCAB + 2  # a valid prompt id for virtual_token_embedding, not for prompt_embedding
    assert torch.equal(virtual_token_embedding(x, w, p, backend=backend)[0, 0], p[2])
    for bad, got in ((-3, "from -3 to"), (VOCAB + 3, f"to {VOCAB + 3} ")):
        x[1, 3] = bad
        with pytest.raises(ValueError, match=rf"token_ids must hold ids in \[0, V \+ P\) = \[0, {VOCAB + 3}\), got ids .*{got}"):
            virtual_token_embedding(x, w, p, backend=backend)


def test_bad_backend_and_triton_float64():
    ids, w, p = _base()
    with pytest.raises(ValueError, match="backend must be one of"):
        prompt_embedding(ids, w, p, backend="cuda")
    with pytest.raises(TypeError, match="weight must be float16, bfloat16 or float32 for backend='triton'"):
        virtual_token_embedding(ids, w.double(), p.double(), backend="triton")
    # float64 is fine on the reference path
    assert prompt_embedding(ids, w.double(), p.double(), backend="torch").dtype == torch.float64


# ------------------------------------------------------------------------------------------------ #
# the fast PyTorch path (backend="torch") against the readable reference (backend="reference")


@pytest.mark.parametrize("virtual", [False, True], ids=["prompt_embedding", "virtual_token_embedding"])
@pytest.mark.parametrize("batch,seq,plen,emb,per_example,weight_grad", [
    (3, 17, 5, 40, False, True), (2, 1, 1, 8, True, True), (4, 13, 0, 24, False, True),
    (1, 9, 7, 33, True, False), (3, 0, 4, 16, False, True), (5, 31, 9, 64, False, False),
])
def test_torch_path_matches_reference(batch, seq, plen, emb, per_example, weight_grad, virtual):
    fn = virtual_token_embedding if virtual else prompt_embedding
    ids, weight, prompt = _make(batch, seq, plen, emb, per_example=per_example, weight_grad=weight_grad,
                                virtual=virtual, dtype=torch.float64)
    ids, weight, prompt = ids.cpu(), weight.detach().cpu().requires_grad_(weight_grad), prompt.detach().cpu().requires_grad_()
    if virtual:  # make sure both tables are read
        ids[..., ::3] = VOCAB + plen - 1 if plen else 0
    got = fn(ids, weight, prompt, backend="torch")
    want = fn(ids, weight, prompt, backend="reference")
    assert torch.equal(got, want)
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(2), dtype=got.dtype)
    for g, w in zip(_grads(got, weight, prompt, grad_out), _grads(want, weight, prompt, grad_out)):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_torch_path_virtual_tokens_compile_fullgraph():
    ids, weight, prompt = _make(2, 11, 4, 16, per_example=False, virtual=True)
    ids, weight, prompt = ids.cpu(), weight.detach().cpu().requires_grad_(), prompt.detach().cpu().requires_grad_()
    compiled = torch.compile(lambda i, w, p: virtual_token_embedding(i, w, p, backend="torch"), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(ids, weight, prompt), virtual_token_embedding(ids, weight, prompt, backend="torch"))
