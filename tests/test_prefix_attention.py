"""prefix_attention: Triton kernels (interpreter on CPU) vs the PyTorch reference vs a naive fp64 oracle.

Every case checks the output and all five gradients (q, k, v, prefix_k, prefix_v).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ptkernels
from ptkernels._backend import resolve_backend
from ptkernels.ops.prefix_attention.reference import prefix_attention_reference
from ptkernels.testing import flash_attention_bound

from conftest import DEVICE, ON_GPU


# ----------------------------------------------------------------------------------------------
# An independent oracle: per (batch, head) loops, explicit concatenation, fp64.


def naive_attention_fp64(q, k, v, prefix_k, prefix_v, key_padding_mask=None, causal=False, scale=None, keep=None, dropout_p=0.0):
    q, k, v = q.double(), k.double(), v.double()
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, q_heads, q_len, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(batch):
        for h in range(q_heads):
            kvh = h // group
            if prefix_k is None:
                pk = k.new_zeros(0, head_dim)
                pv = v.new_zeros(0, head_dim)
            elif prefix_k.dim() == 3:
                pk, pv = prefix_k[kvh].double(), prefix_v[kvh].double()
            else:
                pk, pv = prefix_k[b, kvh].double(), prefix_v[b, kvh].double()
            keys = torch.cat([pk, k[b, kvh]])
            values = torch.cat([pv, v[b, kvh]])
            prefix_len = pk.shape[0]
            allowed = torch.zeros(q_len, prefix_len + k_len, dtype=torch.bool, device=q.device)
            for i in range(q_len):
                allowed[i, :prefix_len] = True
                for j in range(k_len):
                    ok = key_padding_mask is None or bool(key_padding_mask[b, j])
                    if causal:
                        ok = ok and j <= i + (k_len - q_len)
                    allowed[i, prefix_len + j] = ok
            scores = (q[b, h] @ keys.T) * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
            if keep is not None:
                probs = probs * keep[b, h].double() / (1.0 - dropout_p)
            out[b, h] = probs @ values
    return out


# ----------------------------------------------------------------------------------------------
# Case grid


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 17
    k_len: int = 17
    prefix_len: int = 5
    head_dim: int = 40
    causal: bool = False
    padding: str = "none"  # none | random | one | all
    prefix: str = "shared"  # shared | per_example | none (None tensors)
    scale: float | None = None

    def __str__(self):
        return (f"B{self.batch}-H{self.q_heads}/{self.kv_heads}-Sq{self.q_len}-Sk{self.k_len}-P{self.prefix_len}"
                f"-D{self.head_dim}{'-causal' if self.causal else ''}-pad_{self.padding}-{self.prefix}"
                f"{'' if self.scale is None else '-scale'}")


CASES = [
    Case(),
    Case(causal=True),
    Case(padding="random"),
    Case(padding="random", causal=True, q_len=9, k_len=23),
    Case(prefix="per_example", padding="random"),
    Case(prefix="per_example", causal=True, prefix_len=19),
    Case(prefix="none", padding="random"),
    Case(prefix_len=0, causal=True),
    Case(prefix_len=1, q_len=1, k_len=1),
    Case(q_len=1, k_len=33, causal=True, padding="random"),  # a decode step against a KV cache
    Case(padding="one", prefix_len=3),
    Case(padding="runs", batch=4, q_len=37, k_len=53, prefix_len=21),  # key bounds: edges inside tiles
    Case(padding="runs", batch=4, q_len=41, k_len=41, prefix_len=0, causal=True, q_heads=4, kv_heads=2),
    Case(padding="all", prefix_len=0, prefix="shared"),  # no visible key at all: zeros, not NaN
    Case(padding="all", prefix_len=2),  # only the prefix is visible
    Case(q_heads=4, kv_heads=1, causal=True),  # MQA
    Case(q_heads=3, kv_heads=3, head_dim=80, q_len=13, k_len=13),
    # 64 < D <= 96: the head dim as 64 + a tail (launch.split_head_dim): one valid tail channel with
    # no prefix, and a tail with no padding (D = 96) with a per-example prefix and padding
    Case(head_dim=65, prefix_len=0, causal=True, q_len=17, k_len=21),
    Case(head_dim=96, prefix="per_example", prefix_len=17, padding="random", q_len=18, k_len=18),
    Case(head_dim=16, prefix_len=40, q_len=5, k_len=7),  # prefix longer than the sequence
    Case(head_dim=8, q_len=6, k_len=6),  # head dim below tl.dot's 16: padded in registers
    Case(head_dim=24, batch=3, prefix_len=7, padding="random"),
    Case(head_dim=128, batch=1, q_heads=2, kv_heads=1, q_len=19, k_len=19, prefix_len=4, causal=True),
    Case(batch=1, q_heads=2, kv_heads=2, q_len=97, k_len=113, prefix_len=33, head_dim=32, causal=True, padding="random"),
    Case(scale=0.3, padding="random"),
    Case(batch=5, prefix_len=21, padding="random"),  # shared prefix reduced over 2 batch splits of 3 + 2
]


LOW_PRECISION_CASES = [
    Case(padding="random"),
    Case(causal=True, prefix="per_example", q_len=13, k_len=29),
    Case(q_heads=4, kv_heads=1, head_dim=80, prefix_len=9, q_len=11, k_len=11, padding="random"),
]


def make_inputs(case: Case, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q = rand(case.batch, case.q_heads, case.q_len, case.head_dim)
    k = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    v = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    if case.prefix == "none":
        prefix_k = prefix_v = None
    else:
        shape = (case.kv_heads, case.prefix_len, case.head_dim)
        if case.prefix == "per_example":
            shape = (case.batch,) + shape
        prefix_k, prefix_v = rand(*shape), rand(*shape)
    mask = None
    if case.padding == "random":
        mask = torch.rand(case.batch, case.k_len, generator=gen) > 0.35
        mask[:, -1] = True
        mask[0, :] = torch.arange(case.k_len) < max(1, case.k_len // 2)  # right padding, as a tokenizer does
    elif case.padding == "runs":  # one run of attended keys per example: right, left and both-sided padding
        keys = torch.arange(case.k_len)
        lo = torch.tensor([0, 5, 19, 0])[torch.arange(case.batch) % 4]
        hi = case.k_len - torch.tensor([7, 0, 3, 0])[torch.arange(case.batch) % 4]
        mask = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
    elif case.padding == "one":
        mask = torch.zeros(case.batch, case.k_len, dtype=torch.bool)
        mask[:, 0] = True
    elif case.padding == "all":
        mask = torch.zeros(case.batch, case.k_len, dtype=torch.bool)
    if mask is not None:
        mask = mask.to(device)
    return q, k, v, prefix_k, prefix_v, mask


def grads_of(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, wanted, grad_out)


def oracle_with_grads(q, k, v, pk, pv, mask, causal, scale, grad_out):
    """fp64 oracle output and its gradients, taken w.r.t. fp64 copies (so they stay fp64)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    out = naive_attention_fp64(*leaves, mask, causal, scale)
    return out, grads_of(out, leaves, grad_out.double())


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run(case: Case, backend: str, q, k, v, prefix_k, prefix_v, mask, **kwargs):
    return ptkernels.prefix_attention(
        q, k, v, prefix_k, prefix_v, key_padding_mask=mask, causal=case.causal, scale=case.scale,
        backend=backend, **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# fp32: Triton vs reference vs fp64 oracle, forward and all gradients


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_pytorch_backends_match_naive_fp64(case, backend):
    """The readable reference and the fast PyTorch path (SDPA) against the per-head fp64 loop."""
    q, k, v, pk, pv, mask = make_inputs(case, dtype=torch.float64, device="cpu")
    out = run(case, backend, q, k, v, pk, pv, mask)
    expected = naive_attention_fp64(q, k, v, pk, pv, mask, case.causal, case.scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    grad_out = torch.randn_like(out)
    inputs = [t for t in (q, k, v, pk, pv) if t is not None]
    # an empty prefix (P = 0) may be left out of the fast path's graph: its gradient is then empty
    got = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    want = grads_of(expected, inputs, grad_out)
    for t, g, w in zip(inputs, got, want):
        if g is None:
            assert t.numel() == 0
            continue
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_torch_path_low_precision_flash_attention_rule(case, dtype):
    """The fast path in fp16 / bf16 on CPU: error vs the fp64 oracle within 2x (forward) / 3x
    (gradients) of the plain same-precision PyTorch computation's."""
    _check_low_precision_rule(case, dtype, "torch")


def test_torch_path_masks_only_when_needed(monkeypatch):
    """No mask when nothing is padded (SDPA's fused path), a lower-right causal bias (no (B, ...)
    tensor) for causal without padding, a boolean mask only with padding; GQA without repeat_kv."""
    import types

    import torch.nn.functional as F
    from torch.nn.attention.bias import CausalBias

    from ptkernels.ops.prefix_attention import torch_path

    seen = []

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask, tuple(q.shape), tuple(k.shape), kw.get("is_causal", False), kw.get("enable_gqa")))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch_path, "F", types.SimpleNamespace(scaled_dot_product_attention=spy, pad=F.pad))
    case = Case(q_heads=4, kv_heads=2, q_len=7, k_len=11, prefix_len=3)
    q, k, v, pk, pv, _ = make_inputs(case, device="cpu")
    run(case, "torch", q, k, v, pk, pv, None)
    mask, q_shape, k_shape, _, gqa = seen[-1]
    assert mask is None and k_shape == (2, 2, 14, 40) and gqa  # P + Sk keys, Hkv heads: no repeat
    ptkernels.prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")
    assert isinstance(seen[-1][0], CausalBias)
    pad = torch.ones(2, 11, dtype=torch.bool)
    pad[1, 5:] = False
    ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=pad, backend="torch")
    assert seen[-1][0].dtype == torch.bool and seen[-1][0].shape == (2, 1, 1, 14)


@pytest.mark.parametrize("case", [Case(padding="random", causal=True), Case(causal=True, q_len=9, k_len=23),
                                  Case(q_heads=4, kv_heads=1, prefix="per_example"), Case(prefix_len=0, padding="all"),
                                  Case(q_heads=6, kv_heads=3, prefix="none", padding="random")], ids=str)
def test_torch_path_cpu_dropout_matches_reference_given_its_keep_mask(case):
    """On CPU the fast path draws its own keep mask (16-bit lanes); replaying that mask through the
    reference gives the same output and gradients, and the drop rate is p."""
    from ptkernels.ops.prefix_attention.torch_path import dropout_keep_mask

    q, k, v, pk, pv, mask = make_inputs(case, dtype=torch.float64, device="cpu")
    p = 0.3
    torch.manual_seed(11)
    out = run(case, "torch", q, k, v, pk, pv, mask, dropout_p=p)
    total = case.k_len + (0 if pk is None else pk.shape[-2])
    torch.manual_seed(11)
    keep, keep_prob = dropout_keep_mask((case.batch, case.q_heads, case.q_len, total), p, torch.device("cpu"))
    assert abs(keep_prob - (1 - p)) < 1e-4
    ref = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=case.causal, scale=case.scale,
                                     dropout_p=1 - keep_prob, dropout_keep_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    inputs = [t for t in (q, k, v, pk, pv) if t is not None]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    for t, g, w in zip(inputs, got, torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(torch.zeros_like(t) if g is None else g, w, atol=1e-12, rtol=1e-10)
    big, big_prob = dropout_keep_mask((1000, 1000), p, torch.device("cpu"))
    assert abs(big.float().mean().item() - big_prob) < 3e-3


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference_fp32(case):
    q, k, v, pk, pv, mask = make_inputs(case)
    out = run(case, "triton", q, k, v, pk, pv, mask)
    ref = run(case, "reference", q, k, v, pk, pv, mask)
    grad_out = torch.randn_like(out)
    oracle, want64 = oracle_with_grads(q, k, v, pk, pv, mask, case.causal, case.scale, grad_out)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.double(), oracle, atol=2e-5, rtol=1e-4)

    inputs = (q, k, v, pk, pv)
    got = grads_of(out, inputs, grad_out)
    want = grads_of(ref, inputs, grad_out)
    names = [n for n, t in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), inputs) if t is not None]
    for name, g, w, w64 in zip(names, got, want, want64):
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(g.double(), w64, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name} vs fp64: {m}")


def test_fully_masked_rows_are_zero_with_zero_gradients():
    case = Case(padding="all", prefix_len=0, causal=False)
    q, k, v, pk, pv, mask = make_inputs(case)
    out = run(case, "triton", q, k, v, pk, pv, mask)
    assert torch.equal(out, torch.zeros_like(out))
    grads = grads_of(out, (q, k, v), torch.ones_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# Low precision: the FlashAttention rule




@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_triton_low_precision_flash_attention_rule(case, dtype):
    _check_low_precision_rule(case, dtype, "triton")


def _check_low_precision_rule(case, dtype, backend):
    q, k, v, pk, pv, mask = make_inputs(case, dtype=dtype, device=DEVICE if backend == "triton" else "cpu")
    inputs = (q, k, v, pk, pv)
    out = run(case, backend, q, k, v, pk, pv, mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    oracle, want = oracle_with_grads(q, k, v, pk, pv, mask, case.causal, case.scale, grad_out)
    assert out.dtype == dtype
    same_precision = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=case.causal, upcast=False)
    fwd_bound = flash_attention_bound(max_err(same_precision, oracle), is_grad=False, slack=1e-5)
    assert max_err(out, oracle) <= fwd_bound, (max_err(out, oracle), fwd_bound)

    got = grads_of(out, inputs, grad_out)
    baseline = grads_of(same_precision, inputs, grad_out)
    for name, g, b, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, baseline, want):
        assert g.dtype == dtype, name
        bound = flash_attention_bound(max_err(b, w), is_grad=True, slack=1e-5)
        assert max_err(g, w) <= bound, (name, max_err(g, w), bound)


# ----------------------------------------------------------------------------------------------
# Layouts: HF hands over (B, S, H, D) buffers viewed as (B, H, S, D)


def test_hf_strided_inputs_without_copies(monkeypatch):
    batch, seq, heads, kv_heads, dim, prefix_len = 2, 19, 4, 2, 40, 6
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE).requires_grad_()
    q_flat, k_flat, v_flat = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = q_flat.view(batch, seq, heads, dim).transpose(1, 2)
    k = k_flat.view(batch, seq, kv_heads, dim).transpose(1, 2)
    v = v_flat.view(batch, seq, kv_heads, dim).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    prefix = torch.randn(2, kv_heads, prefix_len, dim, generator=gen).to(DEVICE).requires_grad_()
    pk, pv = prefix[0], prefix[1]
    mask = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
    mask[1, 12:] = False

    copies = []
    original = torch.Tensor.contiguous

    def counting_contiguous(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", counting_contiguous)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, backend="triton")
    assert copies == [], f"hidden copies of {copies}"
    # The output is laid out like q: (B, S, H, D) in memory, so HF's transpose back is free.
    assert out.transpose(1, 2).is_contiguous()
    monkeypatch.setattr(torch.Tensor, "contiguous", original)

    ref = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    grad_out = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)  # strided upstream grad
    (g_qkv, g_prefix) = torch.autograd.grad(out, (qkv, prefix), grad_out)
    (r_qkv, r_prefix) = torch.autograd.grad(ref, (qkv, prefix), grad_out)
    torch.testing.assert_close(g_qkv, r_qkv, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(g_prefix, r_prefix, atol=5e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Dropout


_DROPOUT_CASE = Case(batch=2, q_heads=2, kv_heads=1, q_len=9, k_len=13, prefix_len=6, head_dim=16, padding="random")


def _dropout_inputs():
    return _DROPOUT_CASE, make_inputs(_DROPOUT_CASE)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_dropout_same_seed_same_output_different_seed_different_output(backend):
    case, (q, k, v, pk, pv, mask) = _dropout_inputs()
    torch.manual_seed(123)
    a = run(case, backend, q, k, v, pk, pv, mask, dropout_p=0.3)
    torch.manual_seed(123)
    b = run(case, backend, q, k, v, pk, pv, mask, dropout_p=0.3)
    c = run(case, backend, q, k, v, pk, pv, mask, dropout_p=0.3)
    no_dropout = run(case, backend, q, k, v, pk, pv, mask)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, no_dropout)


# The second case: GQA, causal, a full prefix block and a full query tile at D=72 (padded to 128).
# Above D=64 under dropout the prefix dK/dV kernel's example loop counts to examples_per_split and
# skips the examples past its split (EXAMPLE_GUARD): 3 examples in the interpreter's 2 splits leave
# the second split one example and one skipped iteration; a per-example prefix passes 1.
@pytest.mark.parametrize("case", [
    _DROPOUT_CASE,
    Case(batch=2, q_heads=4, kv_heads=2, q_len=21, k_len=27, prefix_len=21, head_dim=72, causal=True, padding="random"),
    Case(batch=3, q_heads=4, kv_heads=2, q_len=10, k_len=12, prefix_len=7, head_dim=72, causal=True, padding="random"),
    Case(batch=3, q_heads=2, kv_heads=1, q_len=10, k_len=12, prefix_len=7, head_dim=72, padding="random",
         prefix="per_example"),
], ids=str)
def test_dropout_matches_reference_given_the_kernels_keep_mask(case):
    from ptkernels.ops.prefix_attention.forward import dropout_keep_mask
    from ptkernels.ops.prefix_attention.function import draw_dropout_seed
    from ptkernels.ops.prefix_attention.launch import dropout_threshold

    q, k, v, pk, pv, mask = make_inputs(case)
    p = 0.25
    torch.manual_seed(7)
    out = run(case, "triton", q, k, v, pk, pv, mask, dropout_p=p)
    torch.manual_seed(7)
    seed = draw_dropout_seed()
    keep = dropout_keep_mask(case.batch, case.q_heads, case.q_len, case.prefix_len, case.k_len, p, seed, q.device)
    assert 0.6 < keep.float().mean().item() < 0.9  # about 1 - p kept
    kernel_p = dropout_threshold(p)[0] / 65536  # the kernels' p, quantised to 16 bits
    assert abs(kernel_p - p) <= 2**-17
    ref = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=case.causal, dropout_p=kernel_p,
                                     dropout_keep_mask=keep)
    oracle = naive_attention_fp64(q, k, v, pk, pv, mask, causal=case.causal, keep=keep, dropout_p=kernel_p)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.double(), oracle, atol=2e-5, rtol=1e-4)
    grad_out = torch.randn_like(out)
    inputs = (q, k, v, pk, pv)
    for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads_of(out, inputs, grad_out), grads_of(ref, inputs, grad_out)):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_dropout_mean_over_seeds_approaches_no_dropout(backend):
    case = Case(batch=1, q_heads=1, kv_heads=1, q_len=16, k_len=12, prefix_len=4, head_dim=16)
    q, k, v, pk, pv, mask = make_inputs(case)
    with torch.no_grad():
        exact = run(case, backend, q, k, v, pk, pv, mask)
        torch.manual_seed(0)
        n = 300
        mean = sum(run(case, backend, q, k, v, pk, pv, mask, dropout_p=0.2) for _ in range(n)) / n
        single = run(case, backend, q, k, v, pk, pv, mask, dropout_p=0.2)
    err_mean = (mean - exact).abs().mean().item()
    err_single = (single - exact).abs().mean().item()
    # The average of n independent draws shrinks the error by about sqrt(n) ~ 17.
    assert err_mean < err_single / 6, (err_mean, err_single)


# ----------------------------------------------------------------------------------------------
# Determinism of the shared-prefix batch reduction


def test_backward_is_bitwise_deterministic():
    case = Case(batch=5, prefix_len=21, padding="random", causal=True)
    q, k, v, pk, pv, mask = make_inputs(case)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.device)
    first = grads_of(run(case, "triton", q, k, v, pk, pv, mask), (q, k, v, pk, pv), grad_out)
    second = grads_of(run(case, "triton", q, k, v, pk, pv, mask), (q, k, v, pk, pv), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Backend selection and bad input


def test_auto_backend_picks_reference_on_cpu_and_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    if ON_GPU:
        assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def _good():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 7, 8)
    v = torch.randn(2, 2, 7, 8)
    pk = torch.randn(2, 3, 8)
    pv = torch.randn(2, 3, 8)
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)


BAD_INPUTS = [
    ("q", dict(q=torch.randn(2, 4, 5)), ValueError, r"q must be 4-D.*\(2, 4, 5\)"),
    ("q", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q dtype", dict(q=torch.randint(0, 3, (2, 4, 5, 8))), TypeError, "q must be float16"),
    ("k dtype", dict(k=torch.randn(2, 2, 7, 8, dtype=torch.float64)), TypeError, "k must have q's dtype"),
    ("k/v shapes", dict(v=torch.randn(2, 2, 6, 8)), ValueError, r"k and v must have the same shape.*\(2, 2, 7, 8\).*\(2, 2, 6, 8\)"),
    ("batch", dict(k=torch.randn(3, 2, 7, 8), v=torch.randn(3, 2, 7, 8)), ValueError, "k must have q's batch size 2"),
    ("head dim", dict(k=torch.randn(2, 2, 7, 4), v=torch.randn(2, 2, 7, 4)), ValueError, "k must have q's head dim 8"),
    ("heads", dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)), ValueError, "multiple of k's.*q heads 4.*k heads 3"),
    ("prefix heads", dict(prefix_k=torch.randn(4, 3, 8), prefix_v=torch.randn(4, 3, 8)), ValueError, r"prefix_k must be \(Hkv, P, D\).*got \(4, 3, 8\)"),
    ("prefix batch", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)), ValueError, r"prefix_k must be.*got \(3, 2, 3, 8\)"),
    ("prefix rank", dict(prefix_k=torch.randn(3, 8), prefix_v=torch.randn(3, 8)), ValueError, "prefix_k must be 3-D or 4-D"),
    ("prefix pair", dict(prefix_v=torch.randn(2, 4, 8)), ValueError, "prefix_k and prefix_v must have the same shape"),
    ("prefix None", dict(prefix_v=None), ValueError, "prefix_k and prefix_v must both be tensors or both be None"),
    ("prefix dtype", dict(prefix_k=torch.randn(2, 3, 8).half(), prefix_v=torch.randn(2, 3, 8).half()), TypeError, "prefix_k must have q's dtype"),
    ("mask dtype", dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask must be a bool tensor"),
    ("mask shape", dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must be \(B, Sk\) = \(2, 7\), got \(2, 5\)"),
    ("mask 4d", dict(key_padding_mask=torch.ones(2, 1, 5, 7, dtype=torch.bool)), ValueError, "key_padding_mask must be"),
    ("causal Sq > Sk", dict(q=torch.randn(2, 4, 9, 8), causal=True), ValueError, "causal.*Sq <= Sk.*Sq=9.*Sk=7"),
    ("causal type", dict(causal="yes"), TypeError, "causal must be a bool"),
    ("dropout", dict(dropout_p=1.0), ValueError, "dropout_p must be a float in"),
    ("dropout neg", dict(dropout_p=-0.1), ValueError, "dropout_p must be a float in"),
    ("scale", dict(scale="big"), TypeError, "scale must be a float"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale must be a finite float.*nan"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale must be a finite float.*inf"),
    ("head dim 0", dict(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 7, 0), v=torch.randn(2, 2, 7, 0),
                        prefix_k=torch.randn(2, 3, 0), prefix_v=torch.randn(2, 3, 0)),
     ValueError, r"head dim \(its last dim\) must be at least 1.*\(2, 4, 5, 0\)"),
    ("no q heads", dict(q=torch.randn(2, 0, 5, 8)), ValueError, "at least one head each.*q heads 0"),
    ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("what,override,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_bad_input_raises_naming_the_argument(what, override, exc, match, backend):
    args = _good()
    override = dict(override)
    kwargs = dict(backend=backend)
    for key in ("key_padding_mask", "causal", "dropout_p", "scale", "backend"):
        if key in override:
            kwargs[key] = override.pop(key)
    args.update(override)
    with pytest.raises(exc, match=match):
        ptkernels.prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"], **kwargs)


def test_float64_is_reference_only():
    args = {n: t.double() for n, t in _good().items()}
    out = ptkernels.prefix_attention(*args.values(), backend="torch")
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        ptkernels.prefix_attention(*args.values(), backend="triton")


# ----------------------------------------------------------------------------------------------
# GPU only: realistic sizes, compiled kernels, and int64 offsets


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_realistic_shape(dtype, causal):
    case = Case(batch=8, q_heads=12, kv_heads=12, q_len=512, k_len=512, prefix_len=128, head_dim=64,
                causal=causal, padding="random")
    q, k, v, pk, pv, mask = make_inputs(case, dtype=dtype)
    inputs = (q, k, v, pk, pv)
    reference32 = prefix_attention_reference(*(t.detach().float() for t in inputs), key_padding_mask=mask, causal=causal)
    same = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=causal, upcast=False)
    out = run(case, "triton", q, k, v, pk, pv, mask)
    assert max_err(out, reference32) <= flash_attention_bound(max_err(same, reference32), is_grad=False, slack=1e-4)
    grad_out = torch.randn_like(out)
    got = grads_of(out, inputs, grad_out)
    base = grads_of(same, inputs, grad_out)
    leaf32 = [t.detach().float().requires_grad_() for t in inputs]
    ref32 = prefix_attention_reference(*leaf32, key_padding_mask=mask, causal=causal)
    want = torch.autograd.grad(ref32, leaf32, grad_out.float())
    for name, g, b, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, base, want):
        assert max_err(g, w) <= flash_attention_bound(max_err(b, w), is_grad=True, slack=1e-4), name


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # q/k/v with more than 2**31 elements: offsets must be computed in int64.
    batch, heads, seq, dim = 1, 2, (2**31 // (2 * 64)) + 64, 64
    q = torch.randn(batch, heads, 64, dim, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    assert k.numel() > 2**31
    pk = torch.randn(heads, 16, dim, device="cuda", dtype=torch.float16)
    pv = torch.randn_like(pk)
    # Only the last 128 keys are attended, so the reference can work on that slice.
    tail = seq - 128
    mask = torch.zeros(batch, seq, dtype=torch.bool, device="cuda")
    mask[:, tail:] = True
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, backend="triton")
    ref = prefix_attention_reference(q, k[:, :, tail:], v[:, :, tail:], pk, pv, causal=True)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_backward_deterministic_100x():
    case = Case(batch=16, q_heads=8, kv_heads=4, q_len=257, k_len=257, prefix_len=64, head_dim=64, causal=True, padding="random")
    q, k, v, pk, pv, mask = make_inputs(case, dtype=torch.bfloat16)
    grad_out = torch.randn_like(q)
    first = grads_of(run(case, "triton", q, k, v, pk, pv, mask), (q, k, v, pk, pv), grad_out)
    for _ in range(100):
        again = grads_of(run(case, "triton", q, k, v, pk, pv, mask), (q, k, v, pk, pv), grad_out)
        for a, b in zip(first, again):
            assert torch.equal(a, b)



# ----------------------------------------------------------------------------------------------
# GPU launch settings that the interpreter cannot exercise


def test_launch_grids_fit_cuda_limits_when_batch_times_heads_exceeds_65535():
    # CUDA caps grid y and z at 65535: B * H (or B, for a per-example prefix) must not sit there.
    from benchmarks.aot_check import Case as LaunchCase
    from benchmarks.aot_check import case_launches, check_grid

    for case in [
        LaunchCase(torch.float16, 64, batch=8192, kv_heads=4, group=4, q_len=64, k_len=64, dropout=True),
        LaunchCase(torch.float16, 64, batch=70000, kv_heads=1, q_len=16, k_len=16, prefix="per_example"),
        LaunchCase(torch.float16, 64, batch=70000, kv_heads=1, q_len=16, k_len=16, prefix="shared", causal=True),
    ]:
        launches = case_launches(case, allow_interpreted=True)
        assert len(launches) >= 4  # forward, dQ (with delta), dK/dV, prefix dK/dV
        problems = [err for launch in launches if (err := check_grid(launch)) is not None]
        assert problems == [], problems


def test_fp32_dots_keep_fp32_accuracy_unless_tf32_is_allowed():
    # On a GPU, tl.dot on fp32 defaults to TF32 (10-bit mantissa), which would break the fp32
    # tolerances above: fp32 gets tf32x3 (about fp32 accuracy) unless the user allowed TF32 the torch way.
    from ptkernels.ops.prefix_attention.launch import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == ("ieee" if torch.version.hip else "tf32x3")
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    for dtype in (torch.float16, torch.bfloat16):
        assert dot_precision(dtype) == "tf32"  # ignored by tl.dot for 16-bit operands


def test_gpu_block_configs_follow_the_device_shared_memory():
    # Shared memory per block: H100 227 KiB, A100 163 KiB, sm_86/sm_89 (A10G, L4, RTX 4090) 99 KiB.
    # tests/test_kernels_compile.py compiles the chosen configs and checks their real footprint.
    from ptkernels.ops.prefix_attention.launch import block_d, gpu_backward_config, gpu_forward_config

    h100, a100, ada = 232448, 166912, 101376
    # The fast configs stay on H100 for 16-bit inputs; dropout keeps 4 warps at D <= 64.
    assert gpu_forward_config(64, torch.float16, h100) == dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    assert gpu_forward_config(64, torch.float16, h100, dropout=True) == dict(
        BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    # D = 128: the tutorial's 128 x 128 tiles with 2 stages on H100 (160 KB), 128 x 64 on A100
    assert gpu_forward_config(128, torch.bfloat16, h100) == dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    assert gpu_forward_config(128, torch.bfloat16, a100) == dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    assert gpu_forward_config(128, torch.bfloat16, h100, dropout=True) == dict(
        BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    # Backward: 8 warps only on 128-row score tiles (dQ's queries; dK/dV's keys, or queries with dropout)
    assert gpu_backward_config(64, torch.bfloat16, h100) == dict(
        dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dkdv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2))
    assert gpu_backward_config(128, torch.float16, h100) == dict(
        dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        dkdv=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2))
    assert gpu_backward_config(128, torch.float16, h100, dropout=True)["dkdv"] == dict(
        BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=1)
    # dQ with T5's relative bias (its key loop sums dS per bucket) at D=128: 32 keys a tile, as 64 spilled
    assert gpu_backward_config(128, torch.bfloat16, h100, bias=True) == dict(
        dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        dkdv=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2))
    assert gpu_backward_config(64, torch.bfloat16, h100, bias=True) == gpu_backward_config(64, torch.bfloat16, h100)
    for max_shared in (h100, a100, ada):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in (8, 16, 40, 64, 80, 128, 256):
                bd, size = block_d(head_dim), dtype.itemsize
                for dropout in (False, True):
                    f = gpu_forward_config(head_dim, dtype, max_shared, dropout)
                    need = (f["BLOCK_M"] * bd + 2 * f["num_stages"] * f["BLOCK_N"] * bd) * size
                    assert need <= max_shared, (max_shared, dtype, head_dim, f)
                for dropout, bias in ((False, False), (True, False), (False, True)):  # operand tiles alone fit
                    config = gpu_backward_config(head_dim, dtype, max_shared, dropout, bias)
                    dq, dkdv = config["dq"], config["dkdv"]
                    need_dq = (2 * dq["BLOCK_M"] + 2 * dq["num_stages"] * dq["BLOCK_N"]) * bd * size
                    need_dkdv = (2 * dkdv["BLOCK_N"] + 2 * dkdv["num_stages"] * dkdv["BLOCK_M"]) * bd * size
                    assert max(need_dq, need_dkdv) <= max_shared, (max_shared, dtype, head_dim, dropout, config)
                    for kind in ("dq", "dkdv"):  # 8 warps only where the score tile has 128 rows
                        rows = config[kind]["BLOCK_N" if kind == "dkdv" and not dropout else "BLOCK_M"]
                        assert config[kind]["num_warps"] == 4 or rows >= 128 or dtype == torch.float32 or \
                            head_dim > 128, (max_shared, dtype, head_dim, dropout, config)


def test_autotune_keeps_the_fastest_config_measured_once_per_key():
    from ptkernels.ops.prefix_attention.launch import tuned_config

    calls = []
    times = {1: 2.0, 2: 1.0, 3: 1.0}

    def measure(config):
        calls.append(config["BLOCK_M"])
        return times[config["BLOCK_M"]]

    configs = [dict(BLOCK_M=1), dict(BLOCK_M=2), dict(BLOCK_M=3)]
    key = ("test_autotune", id(calls))
    assert tuned_config(key, configs, measure) == dict(BLOCK_M=2)  # the fastest; a tie keeps the earlier
    assert tuned_config(key, configs, measure) == dict(BLOCK_M=2)
    assert calls == [1, 2, 3]  # measured once per key


@pytest.mark.skipif(ON_GPU, reason="pins interpreter tiles (the compiled half tiles: test_kernels_compile.py)")
@pytest.mark.parametrize("case", ["padding_causal", "general_mask", "dropout_causal_padding", "window_softcap",
                                  "bank_prefix_dropout"])
def test_forward_half_width_masked_tiles_match_whole_ones(case, monkeypatch):
    """The forward's masked tiles can be half the full tiles' width (EDGE_N = BLOCK_N / 2,
    ``launch.forward_edge_block``; on a GPU at D=128 with a padding mask or dropout). Here on
    32-key tiles with 16-key masked tiles (the interpreter's own tiles are too narrow to split), at
    odd lengths with a partial prefix tile and GQA, through pointer loads and TMA descriptors: the
    output matches the reference and the whole-width run, and with dropout it keeps the same
    weights (the same bits: the half-width output equals the whole-width one up to summation order).
    Under P-Tuning v2's prefix dropout the prefix's full tiles take the half width too (PREFIX_N)."""
    from ptkernels.ops.prefix_attention import forward as fwd
    from ptkernels.ops.prefix_attention.launch import INTERPRETER_CONFIG, DeviceLimits, launch_kernel

    batch, q_heads, kv_heads, q_len, k_len, prefix_len, head_dim = 3, 4, 2, 37, 45, 21, 32
    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    q = rand(batch, q_heads, q_len, head_dim)
    k, v = rand(batch, kv_heads, k_len, head_dim), rand(batch, kv_heads, k_len, head_dim)
    pk, pv = rand(kv_heads, prefix_len, head_dim), rand(kv_heads, prefix_len, head_dim)
    mask = torch.ones(batch, k_len, dtype=torch.bool)
    mask[1, 29:] = False  # right padding, its edge in the first half of a 32-key tile
    mask[2, :19] = False  # left padding, its edge in the second half
    kwargs = dict(key_padding_mask=mask, causal=True)
    dropout_p, softcap, window = 0.0, 0.0, 0
    if case == "general_mask":
        mask[0, 3:40:3] = False  # not one run of keys: every tile loads its mask
        kwargs["causal"] = False
    elif case == "dropout_causal_padding":
        dropout_p = 0.3
    elif case == "window_softcap":
        kwargs, softcap, window = dict(key_padding_mask=None, causal=True), 20.0, 11
    prefix = {}
    if case == "bank_prefix_dropout":  # a bank of 3 entries of up to 40 keys: full prefix tiles too
        pk, pv = rand(3, kv_heads, 40, head_dim), rand(3, kv_heads, 40, head_dim)
        prefix = dict(prefix_index=torch.tensor([2, 0, 1], dtype=torch.int32),
                      prefix_lengths=torch.tensor([40, 7, 33], dtype=torch.int32), prefix_dropout_p=0.25,
                      prefix_seed=99)
    scale = head_dim ** -0.5
    monkeypatch.setattr(fwd, "forward_config", lambda *a, **kw: dict(INTERPRETER_CONFIG, BLOCK_M=16, BLOCK_N=32))
    edge_widths = []

    def recording_launcher(kernel, grid):
        def launch(*args, **kw):
            if "EDGE_N" in kw:
                edge_widths.append((kw["BLOCK_N"], kw["EDGE_N"], kw["PREFIX_N"]))
            return launch_kernel(kernel, grid)(*args, **kw)
        return launch

    def run(edge_n, tma):
        monkeypatch.setattr(fwd, "forward_edge_block", lambda block_n, *a, **kw: edge_n)
        limits = DeviceLimits(232448, None, True, tma=tma)
        return fwd.prefix_attention_forward(q, k, v, pk, pv, kwargs["key_padding_mask"], kwargs["causal"], scale,
                                            dropout_p, 1234, softcap=softcap, window=window, limits=limits,
                                            launcher=recording_launcher, **prefix)

    whole_out, whole_lse = run(32, tma=False)
    for tma in (False, True):
        out, lse = run(16, tma)
        assert edge_widths[-1] == (32, 16, 16 if prefix else 32)
        torch.testing.assert_close(out, whole_out, atol=1e-5, rtol=1e-5, msg=f"tma={tma}")
        torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5, msg=f"tma={tma}")
    assert edge_widths[0] == (32, 32, 32)
    if prefix:  # the prefix dropout dropped some prefix values: not the output without it
        prefix["prefix_dropout_p"] = 0.0
        assert not torch.allclose(out, run(16, tma=False)[0], atol=1e-3)
    elif dropout_p == 0.0:  # and both against the reference (with dropout: ``test_dropout_*``)
        ref = prefix_attention_reference(q, k, v, pk, pv, scale=scale, softcap=softcap or None,
                                         window=window or None, **kwargs)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    else:  # some weights were dropped: not the output without dropout
        dropout_p = 0.0
        assert not torch.allclose(out, run(16, tma=False)[0], atol=1e-3)


def test_backward_kernels_take_their_own_block_configs():
    """dQ and dK/dV get different tiles (launch.backward_config): the launcher must size each grid,
    the prefix blocks and the TMA query boxes by the dK/dV kernels' own tiles. With dQ on 16 x 32
    tiles and dK/dV on 32 x 16 (and the reverse), every gradient matches the one-config run, through
    pointer loads and TMA descriptors alike (odd lengths, GQA, padding, causal, P = 21)."""
    from ptkernels.ops.prefix_attention.backward import prefix_attention_backward
    from ptkernels.ops.prefix_attention.forward import prefix_attention_forward
    from ptkernels.ops.prefix_attention.launch import INTERPRETER_CONFIG, DeviceLimits, device_limits

    batch, q_heads, kv_heads, q_len, k_len, prefix_len, head_dim = 3, 4, 2, 37, 45, 21, 32
    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, torch.float16)

    q, do = rand(batch, q_heads, q_len, head_dim), rand(batch, q_heads, q_len, head_dim)
    k, v = rand(batch, kv_heads, k_len, head_dim), rand(batch, kv_heads, k_len, head_dim)
    pk, pv = rand(kv_heads, prefix_len, head_dim), rand(kv_heads, prefix_len, head_dim)  # shared: split batch sums
    mask = torch.ones(batch, k_len, dtype=torch.bool, device=DEVICE)
    mask[1, 33:] = False
    mask[2, :4] = False
    args = (mask, True, head_dim ** -0.5, 0.0, 0)
    out, lse = prefix_attention_forward(q, k, v, pk, pv, *args)
    base = device_limits(q.device)

    def grads(config, tma):
        limits = dataclasses.replace(base, tma=tma) if ON_GPU else DeviceLimits(232448, None, True, tma=tma)
        return prefix_attention_backward(do, q, k, v, pk, pv, mask, out, lse, *args[1:], limits=limits,
                                         config=config)[:5]

    def tiles(block_m, block_n):
        return dict(INTERPRETER_CONFIG, BLOCK_M=block_m, BLOCK_N=block_n) if not ON_GPU else dict(
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)

    same = grads(dict(dq=tiles(16, 16), dkdv=tiles(16, 16)), tma=False)
    for dq_tiles, dkdv_tiles in (((16, 32), (32, 16)), ((32, 16), (16, 32))):
        config = dict(dq=tiles(*dq_tiles), dkdv=tiles(*dkdv_tiles))
        pointer = grads(config, tma=False)
        for name, want, got in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), same, pointer):
            torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=f"{name} {config}")
        if not ON_GPU or torch.cuda.get_device_capability()[0] >= 9:
            for name, want, got in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), pointer, grads(config, tma=True)):
                if ON_GPU:
                    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=f"{name} {config} (TMA)")
                else:  # the same loads through descriptors: the same bits
                    assert torch.equal(got, want), f"{name} {config} (TMA)"


def test_autotune_is_opt_in_and_its_space_starts_with_the_heuristic(monkeypatch):
    from ptkernels.ops.prefix_attention.launch import (
        AUTOTUNE_ENV, DeviceLimits, autotune_requested, gpu_backward_config, gpu_backward_configs,
        gpu_forward_config, gpu_forward_configs)

    compiled = DeviceLimits(232448, 132, interpreted=False, hip=False)
    interpreted = DeviceLimits(232448, None, interpreted=True, hip=False)
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert not autotune_requested(compiled)
    monkeypatch.setenv(AUTOTUNE_ENV, "1")
    assert autotune_requested(compiled) and not autotune_requested(interpreted)
    for dtype in (torch.float16, torch.float32):
        for head_dim in (64, 128):
            space = gpu_forward_configs(head_dim, dtype, 232448)
            assert space[0] == gpu_forward_config(head_dim, dtype, 232448) and len(space) >= 2
            for dropout in (False, True):
                space = gpu_backward_configs(head_dim, dtype, 232448, dropout)
                assert space[0] == gpu_backward_config(head_dim, dtype, 232448, dropout)
                assert len(space) >= 2 and len({str(c) for c in space}) == len(space)  # no config timed twice


@pytest.mark.parametrize("k_len", [0, 1, 7, 1500, 2500])
def test_key_bounds_kernel_matches_its_pytorch_twin(k_len):
    """forward.key_bounds_of (one kernel launch) against launch.key_bounds_reference (PyTorch): right /
    left padding, holes, all-False and all-True rows, a strided mask, lengths past one 1024-key block."""
    from ptkernels.ops.prefix_attention.forward import key_bounds_of
    from ptkernels.ops.prefix_attention.launch import key_bounds_reference

    gen = torch.Generator().manual_seed(k_len)
    rows = [torch.ones(k_len, dtype=torch.bool), torch.zeros(k_len, dtype=torch.bool)]
    for _ in range(6):
        lo, hi = sorted(torch.randint(0, k_len + 1, (2,), generator=gen).tolist())
        run = torch.zeros(k_len, dtype=torch.bool)
        run[lo:hi] = True
        rows.append(run)
        holes = run.clone()
        if hi - lo > 2:
            holes[torch.randint(lo + 1, hi - 1, (1,), generator=gen)] = False
        rows.append(holes)
    rows.append(torch.rand(k_len, generator=gen) < 0.5)
    mask = torch.stack(rows).to(DEVICE)
    strided = torch.stack([mask, ~mask], 2)[..., 0]  # key stride 2
    for m in (mask, strided):
        got = key_bounds_of(m)
        want = key_bounds_reference(m)
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), want.cpu()), (got, want)
    # the obvious cases, written out
    if k_len == 7:
        m = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0, 0], [0] * 7],
                         dtype=torch.bool, device=DEVICE)
        assert key_bounds_of(m).cpu().tolist() == [[0, 3, 1], [2, 7, 1], [0, 3, 0], [0, 0, 1]]
    assert key_bounds_of(None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sum_splits_kernel_matches_its_pytorch_twin(dtype):
    """backward.sum_splits (one launch for K and V) against partial.sum(1).to(dtype): a shared
    prefix's or bank entry's gradient summed over its batch slices, odd sizes, more than one block."""
    from ptkernels.ops.prefix_attention.backward import sum_splits

    gen = torch.Generator().manual_seed(5)
    for entries, splits, shape in ((1, 3, (2, 21, 24)), (3, 2, (1, 7, 8)), (2, 5, (3, 130, 40))):
        pk = torch.randn(entries, splits, *shape, generator=gen).to(DEVICE)
        pv = torch.randn(entries, splits, *shape, generator=gen).to(DEVICE)
        got_k, got_v = sum_splits(pk, pv, dtype)
        assert got_k.shape == (entries,) + shape and got_k.dtype == dtype
        # fp32 sums in a different order may differ in the last bit; the cast to 16 bits hides that mostly
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got_k, pk.sum(1).to(dtype), **tol)
        torch.testing.assert_close(got_v, pv.sum(1).to(dtype), **tol)
        assert not torch.equal(got_k, got_v)
