"""prefix_attention's attention-maths features for newer architectures: Gemma 2's logit softcapping
(``softcap``), gpt-oss's attention sinks (``sinks``) and transformers' causal sliding window
(``window``, with the prefix at the positions before the real keys as in PEFT's cache), on every
backend, forward and backward, against an independent per-(batch, head) fp64 oracle written from the
models' own definitions.
"""

from __future__ import annotations

import pytest
import torch

import ptkernels
from ptkernels.ops.prefix_attention.reference import prefix_attention_reference
from ptkernels.testing import assert_matches_fp64, flash_attention_bound

from conftest import DEVICE


def naive_fp64(q, k, v, prefix_k, prefix_v, mask, causal, softcap=None, sinks=None, window=None):
    """Per (batch, query head): keys [prefix; real] concatenated by hand, scores * D^-0.5, then Gemma 2's
    ``tanh(s / c) * c``, the visibility mask, gpt-oss's softmax over [scores, sink] with the sink's
    probability dropped; fp64 throughout."""
    q, k, v = q.double(), k.double(), v.double()
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, q_len, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kvh = h // group
            pk = prefix_k[kvh].double() if prefix_k is not None else k.new_zeros(0, head_dim)
            pv = prefix_v[kvh].double() if prefix_v is not None else v.new_zeros(0, head_dim)
            keys, values = torch.cat([pk, k[b, kvh]]), torch.cat([pv, v[b, kvh]])
            plen = pk.shape[0]
            for i in range(q_len):
                scores = (keys @ q[b, h, i]) * head_dim**-0.5
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                visible = torch.ones(plen + k_len, dtype=torch.bool)
                for j in range(k_len):
                    ok = mask is None or bool(mask[b, j])
                    if causal:
                        ok = ok and j <= i + k_len - q_len
                    visible[plen + j] = ok
                if window is not None:  # positions: prefix 0..P-1, real keys P.., query P + Sk - Sq + i
                    query_pos = plen + k_len - q_len + i
                    for t in range(plen + k_len):
                        visible[t] = visible[t] and query_pos - t < window
                logits = scores[visible]
                if sinks is not None:
                    logits = torch.cat([logits, sinks[h].double().view(1)])
                if logits.numel() == 0:
                    continue
                probs = torch.softmax(logits, dim=0)
                if sinks is not None:
                    probs = probs[:-1]
                out[b, h, i] = probs @ values[visible]
    return out


CASES = [
    dict(softcap=1.5),
    dict(softcap=4.0, causal=True, padding=True),
    dict(sinks=True),
    dict(sinks=True, causal=True, padding=True, prefix=False),
    dict(softcap=2.0, sinks=True, causal=True, padding=True),
    dict(sinks=True, padding="all", prefix=False),  # no visible key: the sink takes all the weight, output 0
]


def case_id(case):
    return "-".join(f"{k}{'' if v is True else v}" for k, v in case.items())


def make(case, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dtype).requires_grad_()

    B, Hq, Hkv, S, P, D = 2, 4, 2, 19, 5, 24
    q = rand(B, Hq, S, D, s=3.0)  # large scores, so the softcap bends them
    k, v = rand(B, Hkv, S, D), rand(B, Hkv, S, D)
    pk = pv = None
    if case.get("prefix", True):
        pk, pv = rand(Hkv, P, D), rand(Hkv, P, D)
    mask = None
    if case.get("padding") == "all":
        mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    elif case.get("padding"):
        mask = (torch.rand(B, S, generator=gen) > 0.3).to(device)
        mask[:, -1] = True
    sinks = (torch.randn(Hq, generator=gen) * 2).to(device).requires_grad_() if case.get("sinks") else None
    return q, k, v, pk, pv, mask, sinks


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_softcap_and_sinks_match_naive_fp64(case, backend):
    q, k, v, pk, pv, mask, sinks = make(case, device=DEVICE if backend == "triton" else "cpu")
    causal = case.get("causal", False)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=causal,
                                     softcap=case.get("softcap"), sinks=sinks, backend=backend)
    leaves = [t for t in (q, k, v, pk, pv, sinks) if t is not None]
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    named = dict(zip([n for n, t in zip("q k v pk pv sinks".split(), (q, k, v, pk, pv, sinks)) if t is not None],
                     leaves64))
    want = naive_fp64(named["q"], named["k"], named["v"], named.get("pk"), named.get("pv"),
                      None if mask is None else mask.cpu(), causal, case.get("softcap"), named.get("sinks"))
    assert_matches_fp64(out, leaves, want, leaves64, list(named), out_tol=2e-5, grad_tol=5e-5)
    if case.get("padding") == "all":
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_softcap_and_sinks_low_precision_flash_attention_rule(dtype):
    case = dict(softcap=2.0, sinks=True, causal=True, padding=True)
    q, k, v, pk, pv, mask, sinks = make(case, dtype=dtype)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, softcap=2.0, sinks=sinks,
                                     backend="triton")
    leaves = (q, k, v, pk, pv, sinks)
    oracle = prefix_attention_reference(*[t.detach().double().requires_grad_() for t in leaves[:5]],
                                        key_padding_mask=mask, causal=True, softcap=2.0,
                                        sinks=sinks.detach().double())
    same = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=True, softcap=2.0, sinks=sinks,
                                      upcast=False)
    err = (out.double() - oracle).abs().max().item()
    assert err <= flash_attention_bound((same.double() - oracle).abs().max().item(), is_grad=False, slack=1e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    got = torch.autograd.grad(out, leaves, grad_out)
    base = torch.autograd.grad(same, leaves, grad_out)
    q64, k64, v64, pk64, pv64, s64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(prefix_attention_reference(q64, k64, v64, pk64, pv64, key_padding_mask=mask, causal=True,
                                                          softcap=2.0, sinks=s64), (q64, k64, v64, pk64, pv64, s64),
                               grad_out.double())
    for name, g, b, w in zip("q k v pk pv sinks".split(), got, base, want):
        bound = flash_attention_bound((b.double() - w).abs().max().item(), is_grad=True, slack=1e-5)
        assert (g.double() - w).abs().max().item() <= bound, name


def test_softcap_and_sinks_change_the_output():
    """Guards against a path that silently ignores the arguments."""
    q, k, v, pk, pv, mask, sinks = make(dict(sinks=True), device="cpu")
    plain = ptkernels.prefix_attention(q, k, v, pk, pv, backend="torch")
    assert not torch.allclose(ptkernels.prefix_attention(q, k, v, pk, pv, softcap=1.0, backend="torch"), plain)
    assert not torch.allclose(ptkernels.prefix_attention(q, k, v, pk, pv, sinks=sinks, backend="torch"), plain)


BAD = [
    (dict(softcap=0.0), ValueError, "softcap must be a positive finite float"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive finite float"),
    (dict(softcap=True), ValueError, "softcap must be a positive finite float"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite float.*inf"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a positive finite float.*nan"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must be \(Hq,\) = \(4,\)"),
    (dict(sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks must be a floating tensor"),
    (dict(sinks=[0.0] * 4), TypeError, "sinks must be a"),
]


@pytest.mark.parametrize("override,exc,match", BAD, ids=[m for _, _, m in BAD])
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_bad_softcap_or_sinks_raise_naming_the_argument(override, exc, match, backend):
    q, k, v, pk, pv, _, _ = make({}, device="cpu")
    with pytest.raises(exc, match=match):
        ptkernels.prefix_attention(q, k, v, pk, pv, backend=backend, **override)


# ----------------------------------------------------------------------------------------------
# Sliding window


WINDOW_CASES = [  # (Sq, Sk, P, window, padding)
    (19, 19, 5, 7, False),
    (19, 19, 5, 7, True),
    (37, 37, 21, 20, False),  # the prefix slides out for the later queries; tiles partly in the window
    (5, 33, 9, 12, True),  # Sq < Sk (a continued prefill)
    (1, 30, 6, 8, False),  # a decode step
    (9, 9, 3, 1, False),  # a window of 1: each query sees itself only
    (17, 17, 0, 4, True),  # no prefix; padded rows may see no key: zeros
]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("sq,sk,p,window,padding", WINDOW_CASES, ids=[str(c) for c in WINDOW_CASES])
def test_sliding_window_matches_naive_fp64(sq, sk, p, window, padding, backend):
    device = DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    q, k, v = rand(2, 4, sq, 24), rand(2, 2, sk, 24), rand(2, 2, sk, 24)
    pk, pv = rand(2, p, 24), rand(2, p, 24)
    mask = None
    if padding:
        mask = torch.ones(2, sk, dtype=torch.bool)
        mask[0, :3] = False  # left padding
        mask[1, sk // 2] = False  # a hole
        mask = mask.to(device)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, window=window,
                                     backend=backend)
    leaves = (q, k, v, pk, pv)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    want = naive_fp64(*leaves64, None if mask is None else mask.cpu(), True, window=window)
    torch.testing.assert_close(out.detach().cpu().double(), want, atol=2e-5, rtol=2e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, leaves, grad_out.to(out.device), allow_unused=True)  # P = 0: no prefix graph
    wanted = torch.autograd.grad(want, leaves64, grad_out.double(), allow_unused=True)
    for name, g, w, x in zip("q k v pk pv".split(), got, wanted, leaves64):
        g = torch.zeros_like(x) if g is None else g.detach().cpu().double()
        torch.testing.assert_close(g, torch.zeros_like(x) if w is None else w, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sliding_window_with_a_bank_of_different_lengths(backend):
    """Each example's prefix length sets where its real keys and queries sit: the window follows it."""
    device = DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    q, k, v = rand(3, 4, 23, 16), rand(3, 2, 23, 16), rand(3, 2, 23, 16)
    bank_k, bank_v = rand(2, 2, 19, 16), rand(2, 2, 19, 16)
    index, lengths = torch.tensor([1, 0, 1], device=device), torch.tensor([19, 6], device=device)
    out = ptkernels.prefix_attention(q, k, v, bank_k, bank_v, causal=True, window=11, prefix_index=index,
                                     prefix_lengths=lengths, backend=backend)
    for b in range(3):
        entry, length = int(index[b]), int(lengths[index[b]])
        want = naive_fp64(q[b:b + 1].detach().cpu(), k[b:b + 1].detach().cpu(), v[b:b + 1].detach().cpu(),
                          bank_k[entry, :, :length].detach().cpu(), bank_v[entry, :, :length].detach().cpu(), None,
                          True, window=11)
        torch.testing.assert_close(out[b:b + 1].detach().cpu().double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window,causal,match", [(0, True, "window must be a positive int"),
                                                 (2.5, True, "window must be a positive int"),
                                                 (4, False, "window .* needs causal=True")])
def test_bad_window_raises(window, causal, match):
    q, k, v, pk, pv, _, _ = make({}, device="cpu")
    with pytest.raises(ValueError, match=match):
        ptkernels.prefix_attention(q, k, v, pk, pv, causal=causal, window=window, backend="torch")


@pytest.mark.parametrize("window", [None, 9])
def test_triton_softcap_sinks_window_with_dropout_match_reference_given_the_kernels_mask(window):
    """Attention dropout with the softcap, sinks, sliding window, causal, padding and GQA all at once:
    the Triton kernels (whose dK/dV kernel takes its (query x key) branch under dropout) equal the
    reference replaying the kernels' keep mask, forward and backward."""
    from ptkernels.ops.prefix_attention.forward import dropout_keep_mask
    from ptkernels.ops.prefix_attention.function import draw_dropout_seed
    from ptkernels.ops.prefix_attention.launch import dropout_threshold

    q, k, v, pk, pv, mask, sinks = make(dict(softcap=2.0, sinks=True, causal=True, padding=True), seed=3)
    p = 0.3
    kwargs = dict(key_padding_mask=mask, causal=True, softcap=2.0, sinks=sinks, window=window)
    torch.manual_seed(11)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, dropout_p=p, backend="triton", **kwargs)
    torch.manual_seed(11)
    seed = draw_dropout_seed()
    batch, q_heads, q_len, _ = q.shape
    keep = dropout_keep_mask(batch, q_heads, q_len, pk.shape[1], k.shape[2], p, seed, q.device)
    assert 0.5 < keep.float().mean().item() < 0.9
    ref = prefix_attention_reference(q, k, v, pk, pv, dropout_p=dropout_threshold(p)[0] / 65536,
                                     dropout_keep_mask=keep, **kwargs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    leaves = (q, k, v, pk, pv, sinks)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref, leaves, grad_out)
    for name, g, w in zip("q k v pk pv sinks".split(), got, want):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
