"""prefix_attention_varlen: packed sequences (flash-attention's varlen layout) against an independent
per-sequence fp64 oracle, forward and all five gradients, on every backend.

The oracle below is written from the contract (DESIGN.md, "Packed (padding-free) sequences"), not
from ptkernels: per sequence and per query head, the prefix and the sequence's own keys concatenated
by hand, an explicit visibility mask and softmax, in float64. Backend "triton" runs the kernels
(Triton's interpreter on CPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ptkernels


# ----------------------------------------------------------------------------------------------
# The oracle


def per_sequence_fp64(q, k, v, prefix_k, prefix_v, lens_q, lens_k, causal=False, scale=None,
                      prefix_index=None, prefix_lengths=None):
    """Packed prefix attention, the slow obvious way: (total_q, Hq, D) float64."""
    q, k, v = q.double(), k.double(), v.double()
    q_heads, head_dim = q.shape[1], q.shape[2]
    group = q_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(q.shape[0], q_heads, v.shape[-1], dtype=torch.float64)
    sq = sk = 0
    for n, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if prefix_k is None:
            pk = pv = None
            plen = 0
        else:
            entry = n
            if prefix_index is not None:
                entry = int(prefix_index[n])
            pk = prefix_k if prefix_k.dim() == 3 else prefix_k[entry]
            pv = prefix_v if prefix_v.dim() == 3 else prefix_v[entry]
            plen = pk.shape[1]
            if prefix_lengths is not None:
                plen = int(prefix_lengths[entry if prefix_k.dim() == 4 else 0])
        for h in range(q_heads):
            kvh = h // group
            keys, values = k[sk:sk + lk, kvh], v[sk:sk + lk, kvh]
            if pk is not None:
                keys = torch.cat([pk[kvh, :plen].double(), keys])
                values = torch.cat([pv[kvh, :plen].double(), values])
            for i in range(lq):
                visible = [True] * plen + [(not causal) or j <= i + lk - lq for j in range(lk)]
                visible = torch.tensor(visible, dtype=torch.bool)
                if not visible.any():
                    continue  # no key at all: zeros
                scores = (q[sq + i, h] @ keys.T) * scale
                probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
                out[sq + i, h] = probs @ values
        sq, sk = sq + lq, sk + lk
    return out


# ----------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Case:
    lens_q: tuple = (5, 1, 17, 0, 9)
    lens_k: tuple | None = None  # None: the same as lens_q (self-attention)
    q_heads: int = 4
    kv_heads: int = 2
    prefix_len: int = 3
    head_dim: int = 16
    causal: bool = False
    prefix: str = "shared"  # shared | per_sequence | bank | none
    prefix_lengths: bool = False
    scale: float | None = None

    def __str__(self):
        lk = "" if self.lens_k is None else f"-k{'.'.join(map(str, self.lens_k))}"
        return (f"q{'.'.join(map(str, self.lens_q))}{lk}-H{self.q_heads}/{self.kv_heads}-P{self.prefix_len}"
                f"-D{self.head_dim}{'-causal' if self.causal else ''}-{self.prefix}"
                f"{'-plen' if self.prefix_lengths else ''}{'' if self.scale is None else '-scale'}")

    @property
    def k_lens(self):
        return self.lens_q if self.lens_k is None else self.lens_k


CASES = [
    Case(),
    Case(causal=True),
    Case(lens_q=(1,), prefix_len=1),  # one sequence of one token
    Case(lens_q=(3, 0, 0, 4), causal=True),  # empty sequences in the middle
    Case(lens_q=(0, 6, 0)),  # empty at both ends
    Case(lens_q=(2, 5, 3), lens_k=(7, 5, 11), causal=True),  # query shorter than its keys: bottom-right per sequence
    Case(lens_q=(4, 2), lens_k=(0, 3)),  # a sequence with no own keys sees only the prefix
    Case(lens_q=(4, 2), lens_k=(0, 3), prefix_len=0),  # ... and with no prefix either: zeros
    Case(q_heads=4, kv_heads=1, causal=True),  # MQA
    Case(q_heads=3, kv_heads=3, head_dim=40, lens_q=(13, 7)),  # MHA, odd head dim
    Case(prefix="per_sequence", causal=True),
    Case(prefix="bank", prefix_lengths=True),
    Case(prefix="per_sequence", prefix_lengths=True, causal=True),
    Case(prefix="shared", prefix_lengths=True),
    Case(prefix="none", causal=True),
    Case(prefix_len=0),
    Case(prefix_len=19, lens_q=(3, 2)),  # prefix longer than the sequences
    Case(scale=0.3, lens_q=(11, 6)),
    Case(head_dim=128, lens_q=(9, 4), q_heads=2, kv_heads=1, causal=True),  # the Triton head-dim limit
    # 64 < D <= 96: the kernels' head dim as 64 + a 16-channel tail (launch.split_head_dim), packed
    Case(head_dim=72, lens_q=(17, 5), q_heads=4, kv_heads=2, causal=True, prefix="bank", prefix_lengths=True),
]

# small ones for Triton's interpreter (slow)
TRITON_CASES = [CASES[i] for i in (0, 1, 3, 5, 6, 8, 10, 11, len(CASES) - 1)]

BANK_ENTRIES = 3


def make_inputs(case: Case, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    total_q, total_k = sum(case.lens_q), sum(case.k_lens)
    num = len(case.lens_q)
    q = randn(total_q, case.q_heads, case.head_dim)
    k = randn(total_k, case.kv_heads, case.head_dim)
    v = randn(total_k, case.kv_heads, case.head_dim)
    prefix_k = prefix_v = prefix_index = prefix_lengths = None
    shape = (case.kv_heads, case.prefix_len, case.head_dim)
    if case.prefix == "shared":
        prefix_k, prefix_v = randn(*shape), randn(*shape)
    elif case.prefix == "per_sequence":
        prefix_k, prefix_v = randn(num, *shape), randn(num, *shape)
    elif case.prefix == "bank":
        prefix_k, prefix_v = randn(BANK_ENTRIES, *shape), randn(BANK_ENTRIES, *shape)
        prefix_index = torch.randint(0, BANK_ENTRIES, (num,), generator=g)
    if case.prefix_lengths:
        count = {"shared": 1, "per_sequence": num, "bank": BANK_ENTRIES}[case.prefix]
        prefix_lengths = torch.randint(0, case.prefix_len + 1, (count,), generator=g)
    cu_q = torch.tensor([0] + list(torch.tensor(case.lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(case.k_lens).cumsum(0)), dtype=torch.int32)
    return dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, cu_q=cu_q, cu_k=cu_k,
                prefix_index=prefix_index, prefix_lengths=prefix_lengths)


def run_op(case, inputs, backend, max_q=None, max_k=None):
    return ptkernels.prefix_attention_varlen(
        inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], inputs["cu_q"], inputs["cu_k"],
        max(case.lens_q) if max_q is None else max_q, max(case.k_lens) if max_k is None else max_k,
        causal=case.causal, scale=case.scale, prefix_index=inputs["prefix_index"],
        prefix_lengths=inputs["prefix_lengths"], backend=backend,
    )


DIFFERENTIABLE = ("q", "k", "v", "prefix_k", "prefix_v")


def check_against_oracle(case, backend, dtype, atol):
    inputs = make_inputs(case, dtype)
    leaves = {n: inputs[n].clone().requires_grad_(True) for n in DIFFERENTIABLE if inputs[n] is not None}
    got_inputs = {**inputs, **leaves}
    out = run_op(case, got_inputs, backend)
    assert out.shape == inputs["q"].shape and out.dtype == dtype

    ref_leaves = {n: inputs[n].double().requires_grad_(True) for n in leaves}
    ref_inputs = {**inputs, **ref_leaves}
    ref = per_sequence_fp64(ref_inputs["q"], ref_inputs["k"], ref_inputs["v"], ref_inputs["prefix_k"],
                            ref_inputs["prefix_v"], case.lens_q, case.k_lens, case.causal, case.scale,
                            inputs["prefix_index"], inputs["prefix_lengths"])
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(dtype), allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[n] for n in names], grad_out, allow_unused=True)
    for name, got, want in zip(names, grads, ref_grads):
        got = torch.zeros_like(leaves[name]) if got is None else got
        want = torch.zeros_like(ref_leaves[name]) if want is None else want
        torch.testing.assert_close(got.double(), want, atol=atol * 4, rtol=0, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_pytorch_backends_match_per_sequence_oracle_fp32(case, backend):
    check_against_oracle(case, backend, torch.float32, atol=2e-5)


@pytest.mark.parametrize("case", CASES[:6] + CASES[10:12], ids=str)
def test_torch_path_float64_matches_oracle_exactly(case):
    check_against_oracle(case, "torch", torch.float64, atol=1e-12)


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_per_sequence_oracle_fp32(case):
    # fp32 through Triton on a GPU uses TF32 dots; the interpreter computes in fp32
    atol = 2e-5 if not torch.cuda.is_available() else 2e-2
    check_against_oracle(case, "triton", torch.float32, atol=atol)


# ----------------------------------------------------------------------------------------------
# Semantics: each sequence as if it were alone; bounds; determinism; dropout


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_sequence_equals_the_batched_op_on_it_alone(backend):
    case = Case(lens_q=(6, 3, 8), causal=True)
    inputs = make_inputs(case)
    out = run_op(case, inputs, backend)
    start = 0
    for length in case.lens_q:
        q = inputs["q"][start:start + length].transpose(0, 1)[None]
        k = inputs["k"][start:start + length].transpose(0, 1)[None]
        v = inputs["v"][start:start + length].transpose(0, 1)[None]
        alone = ptkernels.prefix_attention(q, k, v, inputs["prefix_k"], inputs["prefix_v"], causal=True,
                                           backend="reference")
        torch.testing.assert_close(out[start:start + length], alone[0].transpose(0, 1), atol=2e-6, rtol=0)
        start += length


def test_max_seqlen_is_an_upper_bound():
    case = Case()
    inputs = make_inputs(case)
    tight = run_op(case, inputs, "torch")
    loose = run_op(case, inputs, "torch", max_q=100, max_k=1000)
    assert torch.equal(tight, loose)


def test_int64_cu_seqlens_and_strided_inputs():
    case = Case(causal=True)
    inputs = make_inputs(case)
    ref = run_op(case, inputs, "reference")
    # HF hands over (1, H, T, D) views of (1, T, H, D) buffers: q[0].transpose(0, 1) is (T, H, D), strided
    strided = {n: inputs[n].transpose(0, 1).contiguous().transpose(0, 1) for n in ("q", "k", "v")}
    inputs = {**inputs, **strided, "cu_q": inputs["cu_q"].long(), "cu_k": inputs["cu_k"].long()}
    assert not inputs["q"].is_contiguous()
    torch.testing.assert_close(run_op(case, inputs, "torch"), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_prefix_gradient_is_bitwise_deterministic(backend):
    case = Case(lens_q=(7, 9, 4, 12), causal=True)
    grads = []
    for _ in range(2):
        inputs = make_inputs(case)
        pk = inputs["prefix_k"].requires_grad_(True)
        run_op(case, inputs, backend).square().sum().backward()
        grads.append(pk.grad)
    assert torch.equal(grads[0], grads[1])


def test_triton_dropout_matches_per_sequence_reference_given_the_kernels_masks():
    """Attention dropout and prefix dropout on packed sequences: each sequence equals the batched
    reference on it alone, replaying the kernels' own keep masks (attention rows numbered h * total_q +
    row, counted in 16-row cells from each sequence's start; prefix masks per sequence)."""
    from ptkernels.ops.prefix_attention.forward import dropout_keep_mask, prefix_dropout_keep_mask
    from ptkernels.ops.prefix_attention.reference import prefix_attention_reference

    case = Case(lens_q=(5, 0, 9, 3), lens_k=(7, 2, 9, 3), causal=True, prefix="bank", prefix_lengths=True,
                prefix_len=5)
    inputs = make_inputs(case)
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_(True)
    max_q, max_k, p, pp = max(case.lens_q), max(case.k_lens), 0.3, 0.2
    torch.manual_seed(4)
    out = ptkernels.prefix_attention_varlen(
        inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], inputs["cu_q"], inputs["cu_k"],
        max_q, max_k, causal=True, dropout_p=p, prefix_dropout_p=pp, prefix_index=inputs["prefix_index"],
        prefix_lengths=inputs["prefix_lengths"], backend="triton")
    torch.manual_seed(4)
    prefix_seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    num, total_q, plen = len(case.lens_q), sum(case.lens_q), case.prefix_len
    akeep = dropout_keep_mask(1, case.q_heads, total_q, plen, max_k, p, seed, "cpu",
                              cu_seqlens_q=inputs["cu_q"])[0]  # (Hq, total_q, P + max_k)
    pkeep = prefix_dropout_keep_mask(num, case.kv_heads, plen, case.head_dim, pp, prefix_seed, "cpu")
    outs = []
    for n in range(num):
        q0, q1 = int(inputs["cu_q"][n]), int(inputs["cu_q"][n + 1])
        k0, k1 = int(inputs["cu_k"][n]), int(inputs["cu_k"][n + 1])
        rows = akeep[:, q0:q1]
        keep = torch.cat([rows[..., :plen], rows[..., plen:plen + k1 - k0]], -1)[None]
        seq = [inputs[t][a:b].transpose(0, 1)[None] for t, (a, b) in (("q", (q0, q1)), ("k", (k0, k1)), ("v", (k0, k1)))]
        entry = inputs["prefix_index"][n:n + 1]
        o = prefix_attention_reference(*seq, inputs["prefix_k"], inputs["prefix_v"], causal=True, prefix_index=entry,
                                       prefix_lengths=inputs["prefix_lengths"], dropout_p=round(p * 65536) / 65536,
                                       dropout_keep_mask=keep, prefix_dropout_p=round(pp * 65536) / 65536,
                                       prefix_dropout_keep_mask=pkeep[:, n:n + 1])
        outs.append(o[0].transpose(0, 1))
    want = torch.cat(outs)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = [inputs[name] for name in DIFFERENTIABLE]
    for name, g, w in zip(DIFFERENTIABLE, torch.autograd.grad(out, leaves, grad_out),
                          torch.autograd.grad(want, leaves, grad_out)):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=5e-5, msg=name)


def test_dropout_same_seed_same_output_and_prefix_dropout_per_sequence():
    case = Case(lens_q=(6, 6))
    inputs = make_inputs(case)

    def run(seed, **kw):
        torch.manual_seed(seed)
        return ptkernels.prefix_attention_varlen(
            inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], inputs["cu_q"],
            inputs["cu_k"], 6, 6, backend="torch", **kw)

    for kw in (dict(dropout_p=0.3), dict(prefix_dropout_p=0.5)):
        assert torch.equal(run(0, **kw), run(0, **kw))
        assert not torch.equal(run(0, **kw), run(1, **kw))
    # the two sequences are identical inputs, but draw independent prefix dropout masks
    same = {**inputs, "q": torch.cat([inputs["q"][:6]] * 2), "k": torch.cat([inputs["k"][:6]] * 2),
            "v": torch.cat([inputs["v"][:6]] * 2)}
    torch.manual_seed(0)
    out = ptkernels.prefix_attention_varlen(same["q"], same["k"], same["v"], same["prefix_k"], same["prefix_v"],
                                            same["cu_q"], same["cu_k"], 6, 6, prefix_dropout_p=0.5, backend="torch")
    assert not torch.equal(out[:6], out[6:])


def test_auto_backend_is_torch_on_cpu():
    case = Case()
    inputs = make_inputs(case)
    assert torch.equal(run_op(case, inputs, "auto"), run_op(case, inputs, "torch"))


# ----------------------------------------------------------------------------------------------
# Bad input


def _good():
    return dict(q=torch.randn(9, 4, 8), k=torch.randn(9, 2, 8), v=torch.randn(9, 2, 8),
                prefix_k=torch.randn(2, 3, 8), prefix_v=torch.randn(2, 3, 8),
                cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=5)


I32 = dict(dtype=torch.int32)
BAD_INPUTS = [
    ("q rank", dict(q=torch.randn(1, 9, 4, 8)), ValueError, r"q must be 3-D.*\(1, 9, 4, 8\)"),
    ("q type", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("k dtype", dict(k=torch.randn(9, 2, 8).double()), TypeError, "k must have q's dtype"),
    ("k/v shapes", dict(v=torch.randn(8, 2, 8)), ValueError, r"k and v must have the same shape.*\(9, 2, 8\).*\(8, 2, 8\)"),
    ("head dim", dict(k=torch.randn(9, 2, 4), v=torch.randn(9, 2, 4)), ValueError, "k must have q's head dim 8"),
    ("heads", dict(k=torch.randn(9, 3, 8), v=torch.randn(9, 3, 8)), ValueError, "multiple of k's.*q heads 4.*k heads 3"),
    ("cu float", dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 9.0])), TypeError, "cu_seqlens_q must be an integer tensor.*float32"),
    ("cu bool", dict(cu_seqlens_k=torch.tensor([False, True])), TypeError, "cu_seqlens_k must be an integer tensor.*bool"),
    ("cu list", dict(cu_seqlens_q=[0, 4, 9]), TypeError, "cu_seqlens_q must be an integer torch.Tensor.*list"),
    ("cu 2-D", dict(cu_seqlens_q=torch.tensor([[0, 4, 9]], **I32)), ValueError, r"cu_seqlens_q must be 1-D.*\(1, 3\)"),
    ("cu start", dict(cu_seqlens_q=torch.tensor([1, 4, 9], **I32)), ValueError, r"cu_seqlens_q must start at 0.*= 1"),
    ("cu decreasing", dict(cu_seqlens_k=torch.tensor([0, 6, 4, 9], **I32), cu_seqlens_q=torch.tensor([0, 4, 4, 9], **I32)),
     ValueError, r"cu_seqlens_k must be non-decreasing.*cu_seqlens_k\[1\] = 6 > cu_seqlens_k\[2\] = 4"),
    ("cu end q", dict(cu_seqlens_q=torch.tensor([0, 4, 8], **I32)), ValueError, r"cu_seqlens_q must end at total_q.*9.*= 8"),
    ("cu end k", dict(cu_seqlens_k=torch.tensor([0, 4, 10], **I32)), ValueError, r"cu_seqlens_k must end at total_k.*9.*= 10"),
    ("cu counts", dict(cu_seqlens_k=torch.tensor([0, 2, 4, 9], **I32)), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have the same length N \\+ 1, got 3 and 4"),
    ("max small", dict(max_seqlen_q=4), ValueError, "max_seqlen_q must be at least the longest sequence.*5, got 4"),
    ("max small k", dict(max_seqlen_k=0), ValueError, "max_seqlen_k must be at least.*5, got 0"),
    ("max float", dict(max_seqlen_q=5.0), TypeError, "max_seqlen_q must be a Python int, got float"),
    ("max tensor", dict(max_seqlen_k=torch.tensor(5)), TypeError, "max_seqlen_k must be a Python int, got Tensor"),
    ("prefix heads", dict(prefix_k=torch.randn(4, 3, 8), prefix_v=torch.randn(4, 3, 8)), ValueError,
     r"prefix_k must be \(Hkv, P, D\).*\(N, Hkv, P, D\) = \(2, 2, P, 8\) per sequence.*got \(4, 3, 8\)"),
    ("prefix per seq count", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)), ValueError,
     r"prefix_k must be.*\(2, 2, P, 8\) per sequence.*got \(3, 2, 3, 8\)"),
    ("prefix pair", dict(prefix_v=None), ValueError, "prefix_k and prefix_v must both be tensors or both be None"),
    ("prefix_index length", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                                 prefix_index=torch.tensor([0, 1, 2])), ValueError, "prefix_index must be 1-D of length N = 2"),
    ("prefix_index range", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                                prefix_index=torch.tensor([0, 3])), ValueError, r"prefix_index must be in \[0, A\)"),
    ("prefix_lengths per seq", dict(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8),
                                    prefix_lengths=torch.tensor([1])), ValueError,
     r"prefix_lengths must be 1-D of length N \(one per sequence\) = 2"),
    ("prefix_lengths value", dict(prefix_lengths=torch.tensor([4])), ValueError, r"prefix_lengths must be in \[0, P\]"),
    ("prefix dropout", dict(prefix_dropout_p=1.0), ValueError, "prefix_dropout_p must be a float in"),
    ("causal Lq > Lk", dict(causal=True, cu_seqlens_k=torch.tensor([0, 6, 9], **I32), max_seqlen_k=6), ValueError,
     "needs each sequence's query length <= its key length, got sequence 1 with 5 queries and 3 keys"),
    ("causal type", dict(causal=1), TypeError, "causal must be a bool"),
    ("dropout", dict(dropout_p=1.0), ValueError, "dropout_p must be a float in"),
    ("scale", dict(scale="big"), TypeError, "scale must be a float"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale must be a finite float.*nan"),
    ("head dim 0", dict(q=torch.randn(9, 4, 0), k=torch.randn(9, 2, 0), v=torch.randn(9, 2, 0),
                        prefix_k=torch.randn(2, 3, 0), prefix_v=torch.randn(2, 3, 0)),
     ValueError, r"head dim \(its last dim\) must be at least 1"),
    ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
]

_POSITIONAL = ("q", "k", "v", "prefix_k", "prefix_v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


@pytest.mark.parametrize("what,override,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_bad_input_raises_naming_the_argument(what, override, exc, match, backend):
    args = {**_good(), "backend": backend, **override}
    positional = [args.pop(n) for n in _POSITIONAL]
    with pytest.raises(exc, match=match):
        ptkernels.prefix_attention_varlen(*positional, **args)


def test_float64_is_not_for_triton():
    args = _good()
    args = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in args.items()}
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        ptkernels.prefix_attention_varlen(*[args[n] for n in _POSITIONAL], backend="triton")
