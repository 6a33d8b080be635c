"""prefix_attention with T5's relative position bias (``relative_bias_table`` / ``relative_bias_buckets``):
the bucket map against transformers' own T5 bucketing, every backend forward and backward (the table's
gradient included) against an independent per-(batch, head, query) fp64 oracle built the way T5's
``compute_bias`` builds it when PEFT puts P prefix keys in the cache, awkward shapes, the low-precision
FlashAttention rule, determinism of the table gradient and the argument checks.
"""

from __future__ import annotations

import pytest
import torch

import ptkernels
from ptkernels.ops.prefix_attention.reference import prefix_attention_reference
from ptkernels.testing import assert_matches_fp64, flash_attention_bound

from conftest import DEVICE, ON_GPU

T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (6, 9)])
def test_buckets_equal_t5s(bidirectional, num_buckets, max_distance):
    for length in (1, 2, 9, 200):
        ours = ptkernels.relative_position_buckets(length, num_buckets=num_buckets, max_distance=max_distance,
                                                   bidirectional=bidirectional)
        rel = torch.arange(-(length - 1), length)
        t5 = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                   max_distance=max_distance)
        assert ours.dtype == torch.int32 and torch.equal(ours.long(), t5)


def t5_oracle(q, k, v, prefix_k, prefix_v, mask, causal, table, bidirectional, lengths=None, num_buckets=32,
              max_distance=128):
    """Per (batch, query head, query): keys [prefix; real] concatenated by hand; T5's compute_bias with
    PEFT's cache (past_seen_tokens = P_b: query i at P_b + Sk - Sq + i, key t of the concatenation at t,
    so real key j at P_b + j), bucketed by transformers' T5 function; no scale (T5); fp64."""
    q, k, v, table = q.double(), k.double(), v.double(), table.double()
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, q_len, head_dim, dtype=torch.float64)
    for b in range(batch):
        pk_b = prefix_k if prefix_k is None or prefix_k.dim() == 3 else prefix_k[b]
        pv_b = prefix_v if prefix_v is None or prefix_v.dim() == 3 else prefix_v[b]
        plen = 0 if pk_b is None else (pk_b.shape[1] if lengths is None else int(lengths[b]))
        for h in range(q_heads):
            kvh = h // group
            pk = pk_b[kvh, :plen].double() if pk_b is not None else k.new_zeros(0, head_dim)
            pv = pv_b[kvh, :plen].double() if pv_b is not None else v.new_zeros(0, head_dim)
            keys, values = torch.cat([pk, k[b, kvh]]), torch.cat([pv, v[b, kvh]])
            memory = torch.arange(plen + k_len)
            for i in range(q_len):
                context = plen + k_len - q_len + i
                bucket = T5Attention._relative_position_bucket(memory - context, bidirectional=bidirectional,
                                                               num_buckets=num_buckets, max_distance=max_distance)
                scores = keys @ q[b, h, i] + table[bucket, h]
                visible = torch.ones(plen + k_len, dtype=torch.bool)
                for j in range(k_len):
                    visible[plen + j] = (mask is None or bool(mask[b, j])) and (not causal or j <= i + k_len - q_len)
                if not visible.any():
                    continue
                out[b, h, i] = torch.softmax(scores[visible], dim=0) @ values[visible]
    return out


CASES = [
    dict(),  # decoder-like: causal buckets, shared prefix
    dict(causal=True, padding=True),
    dict(bidirectional=True, prefix=False, padding=True),  # a T5 encoder: no prefix, bidirectional buckets
    dict(causal=True, gqa=True, q_len=1, k_len=9),  # one decoding step with a cache
    dict(causal=True, per_example=True, lengths=True),  # per-example prefixes of different lengths
    dict(bidirectional=True, gqa=True, q_len=7, k_len=37, prefix_len=33, num_buckets=8, max_distance=20),
]


def case_id(case):
    return "-".join(f"{k}{'' if v is True else v}" for k, v in case.items()) or "plain"


def make(case, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dtype).requires_grad_()

    B, Hkv, D = 2, 2, 16
    Hq = 4 if case.get("gqa") else 2
    Sq, Sk, P = case.get("q_len", 19), case.get("k_len", 19), case.get("prefix_len", 5)
    q = rand(B, Hq, Sq, D, s=0.5)
    k, v = rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)
    pk = pv = lengths = None
    if case.get("prefix", True):
        shape = (B, Hkv, P, D) if case.get("per_example") else (Hkv, P, D)
        pk, pv = rand(*shape), rand(*shape)
        if case.get("lengths"):
            lengths = torch.tensor([P, 2], device=device)
    mask = None
    if case.get("padding"):
        mask = (torch.rand(B, Sk, generator=gen) > 0.3).to(device)
        mask[:, -1] = True
    table = rand(case.get("num_buckets", 32), Hq, s=2.0)  # large, so the bias moves the softmax
    buckets = ptkernels.relative_position_buckets(P + Sk + 3, num_buckets=case.get("num_buckets", 32),
                                                  max_distance=case.get("max_distance", 128),
                                                  bidirectional=case.get("bidirectional", False), device=device)
    return q, k, v, pk, pv, mask, lengths, table, buckets


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_relative_bias_matches_t5_oracle(case, backend):
    q, k, v, pk, pv, mask, lengths, table, buckets = make(case, device=DEVICE if backend == "triton" else "cpu")
    causal = case.get("causal", False)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=causal, scale=1.0,
                                     prefix_lengths=lengths, relative_bias_table=table, relative_bias_buckets=buckets,
                                     backend=backend)
    names = [n for n, t in zip("q k v pk pv table".split(), (q, k, v, pk, pv, table)) if t is not None]
    leaves = [t for t in (q, k, v, pk, pv, table) if t is not None]
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    named = dict(zip(names, leaves64))
    want = t5_oracle(named["q"], named["k"], named["v"], named.get("pk"), named.get("pv"),
                     None if mask is None else mask.cpu(), causal, named["table"], case.get("bidirectional", False),
                     None if lengths is None else lengths.cpu(), case.get("num_buckets", 32),
                     case.get("max_distance", 128))
    wanted = assert_matches_fp64(out, leaves, want, leaves64, names, out_tol=2e-5, grad_tol=5e-5)
    assert named["table"].grad is None and wanted[-1].abs().sum() > 0  # the table gets a real gradient


def test_triton_relative_bias_bank_dropout_replayed():
    """A bank with per-entry lengths and attention dropout: the kernels' own keep mask replayed
    through the reference (same seed), forward and backward."""
    from ptkernels.ops.prefix_attention.forward import dropout_keep_mask
    from ptkernels.ops.prefix_attention.function import draw_dropout_seed

    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Sq, Sk, P, D = 3, 4, 2, 13, 21, 9, 16
    q, k, v = (torch.randn(B, h, s, D, generator=gen).requires_grad_() for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    bank_k, bank_v = (torch.randn(2, Hkv, P, D, generator=gen).requires_grad_() for _ in range(2))
    index, lengths = torch.tensor([1, 0, 1]), torch.tensor([4, 9])
    table = (torch.randn(32, Hq, generator=gen) * 2).requires_grad_()
    buckets = ptkernels.relative_position_buckets(P + Sk, bidirectional=False)
    bias = dict(relative_bias_table=table, relative_bias_buckets=buckets, prefix_index=index, prefix_lengths=lengths)
    p = 0.2
    torch.manual_seed(5)
    out = ptkernels.prefix_attention(q, k, v, bank_k, bank_v, causal=True, dropout_p=p, backend="triton", **bias)
    torch.manual_seed(5)
    keep = dropout_keep_mask(B, Hq, Sq, P, Sk, p, draw_dropout_seed(), q.device)
    ref = prefix_attention_reference(q, k, v, bank_k, bank_v, causal=True, dropout_p=p, dropout_keep_mask=keep, **bias)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    leaves = (q, k, v, bank_k, bank_v, table)
    grad_out = torch.randn(out.shape, generator=gen)
    for name, g, w in zip("q k v bank_k bank_v table".split(), torch.autograd.grad(out, leaves, grad_out),
                          torch.autograd.grad(ref, leaves, grad_out)):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_relative_bias_low_precision_flash_attention_rule(dtype):
    case = dict(causal=True, padding=True, gqa=True)
    q, k, v, pk, pv, mask, _, table, buckets = make(case, dtype=dtype)
    table32 = table.detach().float().requires_grad_()
    bias = dict(key_padding_mask=mask, causal=True, scale=1.0, relative_bias_buckets=buckets)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, relative_bias_table=table32, backend="triton", **bias)
    leaves = (q, k, v, pk, pv)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    table64 = table32.detach().double().requires_grad_()
    oracle = prefix_attention_reference(*leaves64, relative_bias_table=table64, **bias)
    same = prefix_attention_reference(q, k, v, pk, pv, relative_bias_table=table, upcast=False, **bias)
    err = (out.double() - oracle).abs().max().item()
    assert err <= flash_attention_bound((same.double() - oracle.detach()).abs().max().item(), is_grad=False,
                                        slack=1e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    got = torch.autograd.grad(out, leaves + (table32,), grad_out)
    base = torch.autograd.grad(same, leaves + (table,), grad_out)
    want = torch.autograd.grad(oracle, tuple(leaves64) + (table64,), grad_out.double())
    for name, g, b, w in zip("q k v pk pv table".split(), got, base, want):
        bound = flash_attention_bound((b.double() - w).abs().max().item(), is_grad=True, slack=1e-5)
        assert (g.double() - w).abs().max().item() <= bound, name


def test_triton_table_gradient_is_deterministic():
    q, k, v, pk, pv, mask, _, table, buckets = make(dict(causal=True, padding=True, gqa=True), seed=4)
    grads = []
    for _ in range(2):
        out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, relative_bias_table=table,
                                         relative_bias_buckets=buckets, backend="triton")
        grads.append(torch.autograd.grad(out.sum(), (table, pk))[0])
    assert torch.equal(grads[0], grads[1])


def test_relative_bias_changes_the_output_and_zero_table_does_not():
    """Guards against a path that silently ignores the bias (and against one that adds something else)."""
    q, k, v, pk, pv, mask, _, table, buckets = make(dict(), device="cpu")
    for backend in ("torch", "triton"):
        plain = ptkernels.prefix_attention(q, k, v, pk, pv, backend=backend)
        biased = ptkernels.prefix_attention(q, k, v, pk, pv, relative_bias_table=table, relative_bias_buckets=buckets,
                                            backend=backend)
        zero = ptkernels.prefix_attention(q, k, v, pk, pv, relative_bias_table=torch.zeros_like(table),
                                          relative_bias_buckets=buckets, backend=backend)
        assert not torch.allclose(plain, biased, atol=1e-3)
        torch.testing.assert_close(zero, plain, atol=2e-6, rtol=2e-6)


def _bad_args():
    table = torch.zeros(32, 2)
    buckets = ptkernels.relative_position_buckets(30)
    return [
        (dict(relative_bias_table=table), ValueError, "must be given together"),
        (dict(relative_bias_buckets=buckets), ValueError, "must be given together"),
        (dict(relative_bias_table=torch.zeros(32, 3), relative_bias_buckets=buckets), ValueError,
         r"\(num_buckets, Hq\) = \(num_buckets, 2\)"),
        (dict(relative_bias_table=torch.zeros(32, 2, dtype=torch.long), relative_bias_buckets=buckets), TypeError,
         "floating"),
        (dict(relative_bias_table=table, relative_bias_buckets=buckets.float()), TypeError, "integer tensor"),
        (dict(relative_bias_table=table, relative_bias_buckets=buckets[1:]), ValueError, "odd length"),
        (dict(relative_bias_table=table, relative_bias_buckets=ptkernels.relative_position_buckets(10)), ValueError,
         r"L >= P \+ Sk = 18"),
        (dict(relative_bias_table=table, relative_bias_buckets=torch.cat([buckets[:-1], buckets.new_full((1,), 32)])),
         ValueError, r"must be in \[0, num_buckets\) = \[0, 32\).*from 0 to 32"),
        (dict(relative_bias_table=table, relative_bias_buckets=torch.cat([buckets[:-1], buckets.new_full((1,), -1)])),
         ValueError, r"must be in \[0, num_buckets\) = \[0, 32\).*from -1 to"),
        (dict(relative_bias_table=table, relative_bias_buckets=buckets, softcap=5.0), NotImplementedError,
         "softcap"),
    ]


@pytest.mark.parametrize("kwargs,error,match", _bad_args())
def test_bad_relative_bias_args(kwargs, error, match):
    q, k, v = torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 13, 8), torch.zeros(1, 2, 13, 8)
    pk = pv = torch.zeros(2, 5, 8)
    with pytest.raises(error, match=match):
        ptkernels.prefix_attention(q, k, v, pk, pv, backend="torch", **kwargs)


def test_bad_relative_position_buckets_args():
    with pytest.raises(ValueError, match="max_position must be a positive int"):
        ptkernels.relative_position_buckets(0)
    with pytest.raises(ValueError, match="num_buckets must be an int >= 2"):
        ptkernels.relative_position_buckets(4, num_buckets=1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", [dict(causal=True, padding=True), dict(bidirectional=True, prefix=False, padding=True),
                                  dict(causal=True, per_example=True, lengths=True, gqa=True)], ids=case_id)
def test_frozen_table_gets_no_gradient_and_the_rest_is_unchanged(backend, case):
    """A frozen table (PEFT freezes T5's): its gradient is not computed (Triton skips the bucket sums,
    the fast path runs SDPA with the bias as its float mask), and the output and the q / k / v /
    prefix gradients are those of the trainable-table run."""
    q, k, v, pk, pv, mask, lengths, table, buckets = make(case, device=DEVICE if backend == "triton" else "cpu",
                                                          seed=6)
    frozen = table.detach()
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    runs = []
    for t in (table, frozen):
        out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=case.get("causal", False),
                                         prefix_lengths=lengths, relative_bias_table=t, relative_bias_buckets=buckets,
                                         backend=backend)
        runs.append((out,) + torch.autograd.grad(out.square().sum(), leaves))
    tol = dict(atol=0, rtol=0) if backend == "triton" else dict(atol=2e-5, rtol=2e-5)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, **tol)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, relative_bias_table=frozen, relative_bias_buckets=buckets,
                                     backend=backend)
    out.sum().backward()
    assert frozen.grad is None and q.grad is not None


def bloom_oracle(q, k, v, prefix_k, prefix_v, mask, causal, slopes):
    """BLOOM's attention over PEFT's cache, fp64: its own ``build_alibi_tensor`` over the mask
    [prefix ones; key padding mask] (each key's slope times its position among the attended keys),
    added to the scaled scores of the concatenated keys, masked, softmax."""
    build_alibi_tensor = pytest.importorskip("transformers.models.bloom.modeling_bloom").build_alibi_tensor
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, head_dim = q.shape
    k_len, plen = k.shape[2], prefix_k.shape[1]
    full_mask = torch.cat([torch.ones(batch, plen, dtype=torch.long),
                           torch.ones(batch, k_len, dtype=torch.long) if mask is None else mask.long()], dim=1)
    alibi = build_alibi_tensor(full_mask, heads, torch.float64).view(batch, heads, 1, plen + k_len)
    assert torch.allclose(alibi[0, :, 0, 1], slopes.double())  # the slopes we hand to ptkernels are BLOOM's
    keys = torch.cat([prefix_k.double().expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.double().expand(batch, -1, -1, -1), v], dim=2)
    scores = q @ keys.transpose(-1, -2) * head_dim**-0.5 + alibi
    visible = full_mask.bool()[:, None, None, :].expand(batch, 1, q_len, plen + k_len).clone()
    if causal:
        i = torch.arange(q_len)[:, None]
        visible[..., plen:] &= torch.arange(k_len)[None, :] <= i + (k_len - q_len)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs @ values


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_slopes_match_blooms_alibi(backend, causal):
    """alibi_slopes (index positions: key position - query position) equals BLOOM's mask-cumsum ALiBi
    over PEFT's cache (each key's position among the attended keys) on unpadded and right-padded rows:
    the difference is a per-row constant. (Left padding shifts BLOOM's real keys against its prefix;
    the op keeps index positions, see the README.)"""
    _get_alibi_slopes = pytest.importorskip("transformers.models.bloom.modeling_bloom")._get_alibi_slopes
    gen = torch.Generator().manual_seed(8)
    B, H, S, P, D = 2, 4, 11, 3, 16
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v = (torch.randn(B, H, S, D, generator=gen).to(device).requires_grad_() for _ in range(3))
    pk, pv = (torch.randn(H, P, D, generator=gen).to(device).requires_grad_() for _ in range(2))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, -4:] = False  # right padding
    slopes = _get_alibi_slopes(H, torch.device("cpu")).float()
    out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask.to(device), causal=causal,
                                     alibi_slopes=slopes.to(device), backend=backend)
    leaves = (q, k, v, pk, pv)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    want = bloom_oracle(*leaves64, mask, causal, slopes)
    real = mask[:, None, :, None].expand(B, H, S, D)  # rows of padded queries are defined by neither
    torch.testing.assert_close(out.detach().cpu().double()[real], want[real], atol=2e-5, rtol=2e-5)
    grad_out = torch.randn(out.shape, generator=gen) * real
    for name, g, w in zip("q k v pk pv".split(), torch.autograd.grad(out, leaves, grad_out.to(device)),
                          torch.autograd.grad(want, leaves64, grad_out.double())):
        torch.testing.assert_close(g.detach().cpu().double(), w, atol=5e-5, rtol=5e-5, msg=name)


def test_bad_alibi_slopes():
    q, k, v = torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 13, 8), torch.zeros(1, 2, 13, 8)
    with pytest.raises(ValueError, match=r"alibi_slopes must be \(Hq,\) = \(2,\)"):
        ptkernels.prefix_attention(q, k, v, None, None, alibi_slopes=torch.ones(3), backend="torch")
    with pytest.raises(TypeError, match="alibi_slopes must be a"):
        ptkernels.prefix_attention(q, k, v, None, None, alibi_slopes=torch.ones(2, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="either alibi_slopes or relative_bias_table"):
        ptkernels.prefix_attention(q, k, v, None, None, alibi_slopes=torch.ones(2), relative_bias_table=torch.ones(32, 2),
                                   relative_bias_buckets=ptkernels.relative_position_buckets(13), backend="torch")


@pytest.mark.skipif(ON_GPU, reason="pins interpreter tiles")
def test_triton_relative_bias_backward_on_other_dq_tiles(monkeypatch):
    """dQ with a trainable relative bias sums dS per bucket inside its key loop, whose width the
    launcher picks (``launch._BACKWARD_BIAS_CANDIDATES``: 128 x 32 at D=128 on a GPU, where 128 x 64
    spilled): on 16 x 32 and 32 x 16 dQ tiles every gradient, the table's included, matches the run
    on the interpreter's 16 x 16 tiles (causal, padding, GQA, a prefix)."""
    from ptkernels.ops.prefix_attention import backward as bwd
    from ptkernels.ops.prefix_attention.launch import INTERPRETER_CONFIG

    q, k, v, pk, pv, mask, _, table, buckets = make(dict(causal=True, padding=True, gqa=True, q_len=37, k_len=45),
                                                    seed=6)
    leaves = (q, k, v, pk, pv, table)

    def grads():
        out = ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, relative_bias_table=table,
                                         relative_bias_buckets=buckets, backend="triton")
        return torch.autograd.grad(out.square().sum(), leaves)

    want = grads()
    original = bwd.backward_config
    for block_m, block_n in ((16, 32), (32, 16)):
        tiles = dict(INTERPRETER_CONFIG, BLOCK_M=block_m, BLOCK_N=block_n)
        monkeypatch.setattr(bwd, "backward_config", lambda *a, **kw: dict(original(*a, **kw), dq=tiles))
        for name, w, g in zip("q k v pk pv table".split(), want, grads()):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=f"{name} dq tiles {block_m}x{block_n}")
