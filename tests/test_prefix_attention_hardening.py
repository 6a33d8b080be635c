"""prefix_attention beyond the happy path: torch.compile, autocast, inference mode, edge shapes,
non-finite inputs, and property-based comparison of the Triton kernels with the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptkernels
from ptkernels.ops.prefix_attention.reference import prefix_attention_reference

from conftest import DEVICE


def _inputs(batch=2, q_heads=4, kv_heads=2, q_len=9, k_len=11, prefix_len=5, dim=16, dtype=torch.float32, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        return t.requires_grad_(grad)

    q = rand(batch, q_heads, q_len, dim)
    k = rand(batch, kv_heads, k_len, dim)
    v = rand(batch, kv_heads, k_len, dim)
    pk = rand(kv_heads, prefix_len, dim)
    pv = rand(kv_heads, prefix_len, dim)
    mask = (torch.rand(batch, k_len, generator=gen) > 0.3).to(DEVICE)
    return q, k, v, pk, pv, mask


# ----------------------------------------------------------------------------------------------
# torch.compile: custom ops with fake implementations, no graph breaks


@pytest.mark.parametrize("backend,compiler", [("triton", "inductor"), ("torch", "aot_eager"), ("reference", "aot_eager")])
def test_compile_fullgraph_forward_backward(backend, compiler):
    torch._dynamo.reset()
    q, k, v, pk, pv, mask = _inputs()

    def attention(q, k, v, pk, pv, mask):
        return ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, backend=backend)

    compiled = torch.compile(attention, fullgraph=True, backend=compiler)
    out = compiled(q, k, v, pk, pv, mask)
    expected = attention(q, k, v, pk, pv, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, pk, pv), grad_out)
    want = torch.autograd.grad(expected, (q, k, v, pk, pv), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_autocast_bf16_with_fp32_prefix_parameters(backend):
    q, k, v, pk, pv, mask = _inputs(dtype=torch.float32)
    device_type = torch.device(DEVICE).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend=backend)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), (q, k, v, pk, pv))
    for g, t in zip(grads, (q, k, v, pk, pv)):
        assert g.dtype == torch.float32 == t.dtype  # fp32 parameters get fp32 gradients
    # Same as running the reference in bf16 by hand, within the low-precision rule.
    ref64 = prefix_attention_reference(*(t.detach().double() for t in (q, k, v, pk, pv)), key_padding_mask=mask)
    by_hand = prefix_attention_reference(*(t.detach().bfloat16() for t in (q, k, v, pk, pv)), key_padding_mask=mask, upcast=False)
    err = (out.double() - ref64).abs().max().item()
    assert err <= 2 * (by_hand.double() - ref64).abs().max().item() + 1e-3


def test_no_autocast_means_dtype_mismatch_is_an_error():
    q, k, v, pk, pv, mask = _inputs(grad=False)
    with pytest.raises(TypeError, match="prefix_k must have q's dtype"):
        ptkernels.prefix_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pk, pv, backend="torch")


# ----------------------------------------------------------------------------------------------
# Inference: nothing is kept for backward


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_saves_nothing(context):
    q, k, v, pk, pv, mask = _inputs()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context():
        out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend="triton")
    assert out.grad_fn is None and not out.requires_grad
    assert saved == []
    # And in training mode the hooks do see the saved tensors (so the check above can fail).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend="triton")
    assert len(saved) > 0


# ----------------------------------------------------------------------------------------------
# Edge shapes and non-finite values


EDGE_SHAPES = [
    dict(batch=0),
    dict(q_len=0),
    dict(k_len=0),
    dict(k_len=0, prefix_len=0),
    dict(prefix_len=64, q_len=3, k_len=3),  # prefix much longer than the sequence
]


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_edge_shapes_match_reference(shape):
    q, k, v, pk, pv, mask = _inputs(**shape)
    outs = {}
    for backend in ("triton", "torch", "reference"):
        out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v, pk, pv), torch.ones_like(out), allow_unused=True)
        outs[backend] = (out, grads)
    ref, ref_grads = outs["reference"]
    for backend in ("triton", "torch"):
        out, grads = outs[backend]
        assert out.shape == q.shape
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        for g, r, t in zip(grads, ref_grads, (q, k, v, pk, pv)):
            g = torch.zeros_like(t) if g is None else g
            r = torch.zeros_like(t) if r is None else r
            assert g.shape == t.shape
            torch.testing.assert_close(g, r, atol=5e-5, rtol=1e-4)


def test_very_long_prefix():
    q, k, v, pk, pv, mask = _inputs(batch=1, q_heads=2, kv_heads=1, q_len=4, k_len=4, prefix_len=1024)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend="triton")
    ref = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(out, (pk, pv), torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, (pk, pv), torch.ones_like(ref))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=5e-5, rtol=1e-4)


def test_nan_and_inf_propagate_like_pytorch():
    q, k, v, pk, pv, _ = _inputs(batch=1, q_heads=1, kv_heads=1, grad=False)
    q[0, 0, 1, 3] = float("nan")
    v[0, 0, 2, 0] = float("inf")
    out = ptkernels.prefix_attention(q, k, v, pk, pv, backend="triton")
    ref = ptkernels.prefix_attention(q, k, v, pk, pv, backend="torch")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.isnan(out[0, 0, 1]).all()  # the NaN query row is NaN, as in eager PyTorch
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], atol=2e-5, rtol=1e-4)


def test_different_devices_rejected():
    q, k, v, pk, pv, _ = _inputs(grad=False)
    with pytest.raises(ValueError, match="prefix_k must be on q's device"):
        ptkernels.prefix_attention(q, k, v, pk.to("meta"), pv.to("meta"), backend="torch")


# ----------------------------------------------------------------------------------------------
# Property-based: random small problems, Triton (interpreter on CPU) vs reference


@st.composite
def problems(draw):
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    k_len = draw(st.integers(1, 24))
    causal = draw(st.booleans())
    q_len = draw(st.integers(1, k_len if causal else 24))
    return dict(
        batch=draw(st.integers(1, 3)),
        q_heads=kv_heads * group,
        kv_heads=kv_heads,
        q_len=q_len,
        k_len=k_len,
        prefix_len=draw(st.integers(0, 20)),
        dim=draw(st.sampled_from([8, 16, 24, 40])),
        causal=causal,
        per_example=draw(st.booleans()),
        padding=draw(st.sampled_from(["none", "random", "all"])),
        layout=draw(st.sampled_from(["contiguous", "bshd", "sliced"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout(t, layout):
    """Same values, other strides: (B, S, H, D) memory, or a slice of a wider last-but-one buffer."""
    if layout == "bshd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        wide = torch.cat([t, torch.zeros_like(t)], dim=-1)
        return wide[..., : t.shape[-1]]
    return t


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_property_triton_matches_reference(p):
    gen = torch.Generator().manual_seed(p["seed"])
    b, hq, hkv, sq, sk, pl, d = p["batch"], p["q_heads"], p["kv_heads"], p["q_len"], p["k_len"], p["prefix_len"], p["dim"]
    leaves = [torch.randn(*s, generator=gen).to(DEVICE) for s in
              [(b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d)]]
    pshape = (b, hkv, pl, d) if p["per_example"] else (hkv, pl, d)
    leaves += [torch.randn(*pshape, generator=gen).to(DEVICE) for _ in range(2)]
    leaves = [t.requires_grad_() for t in leaves]
    q, k, v = (_layout(t, p["layout"]) for t in leaves[:3])
    pk, pv = leaves[3:]
    mask = None
    if p["padding"] == "random":
        mask = (torch.rand(b, sk, generator=gen) > 0.4).to(DEVICE)
    elif p["padding"] == "all":
        mask = torch.zeros(b, sk, dtype=torch.bool, device=DEVICE)
    kwargs = dict(key_padding_mask=mask, causal=p["causal"])
    ref = ptkernels.prefix_attention(q, k, v, pk, pv, backend="reference", **kwargs)
    grad_out = torch.randn(ref.shape, generator=gen).to(DEVICE)
    want = torch.autograd.grad(ref, leaves, grad_out)
    for backend in ("triton", "torch"):  # the kernels and the fast PyTorch path
        out = ptkernels.prefix_attention(q, k, v, pk, pv, backend=backend, **kwargs)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-4)
        got = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)  # P = 0 may leave the prefix unused
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.zeros_like(w) if g is None else g, w, atol=5e-5, rtol=1e-4)
