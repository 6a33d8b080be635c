"""prefix_attention with a prefix bank (prefix_index), per-entry lengths (prefix_lengths) and
P-Tuning v2's prefix dropout (prefix_dropout_p), on every backend, forward and backward.

The oracle is independent of the code under test: for each example, its bank entry is sliced to its
length by hand and run through the naive fp64 per-(batch, head) loop of test_prefix_attention, with
the bank as the autograd leaf (so each entry's gradient is the sum over the examples that use it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ptkernels
from ptkernels.ops.prefix_attention.reference import prefix_attention_reference
from ptkernels.testing import flash_attention_bound

from conftest import DEVICE
from test_prefix_attention import naive_attention_fp64


@dataclasses.dataclass(frozen=True)
class BankCase:
    batch: int = 4
    entries: int = 3
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 11
    k_len: int = 11
    prefix_len: int = 21
    head_dim: int = 24
    causal: bool = False
    padding: bool = False
    index: tuple = (2, 0, 2, 1)  # prefix_index, or () for no index (kind decides the prefix's shape)
    lengths: tuple = ()  # prefix_lengths, or () for none
    kind: str = "bank"  # bank | shared | per_example

    def __str__(self):
        return (f"{self.kind}-B{self.batch}-A{self.entries}-H{self.q_heads}/{self.kv_heads}-Sq{self.q_len}"
                f"-Sk{self.k_len}-P{self.prefix_len}-D{self.head_dim}{'-causal' if self.causal else ''}"
                f"{'-pad' if self.padding else ''}-idx{''.join(map(str, self.index))}"
                f"-len{'_'.join(map(str, self.lengths))}")


BANK_CASES = [
    BankCase(),
    BankCase(lengths=(21, 5, 0)),  # entry 2 has no prefix key at all
    BankCase(lengths=(3, 17, 21), causal=True, padding=True),
    BankCase(index=(1, 1, 1, 1), lengths=(4, 9, 2)),  # entries 0 and 2 unused: zero gradient
    BankCase(q_heads=4, kv_heads=1, q_len=1, k_len=13, causal=True, padding=True, lengths=(16, 1, 7)),  # decode, MQA
    BankCase(batch=5, entries=2, index=(0, 1, 0, 0, 1), prefix_len=33, head_dim=40, q_len=9, k_len=14,
             lengths=(33, 16), causal=True),  # two full prefix blocks and a tail; splits of 3 + 2
    BankCase(kind="shared", index=(), lengths=(7,), padding=True),
    BankCase(kind="per_example", index=(), lengths=(0, 21, 16, 3), causal=True),
    BankCase(kind="per_example", index=(), lengths=(), head_dim=8, prefix_len=5),
]


def make_bank_inputs(case: BankCase, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q = rand(case.batch, case.q_heads, case.q_len, case.head_dim)
    k = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    v = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    lead = {"bank": (case.entries,), "shared": (), "per_example": (case.batch,)}[case.kind]
    shape = lead + (case.kv_heads, case.prefix_len, case.head_dim)
    prefix_k, prefix_v = rand(*shape), rand(*shape)
    mask = None
    if case.padding:
        mask = torch.rand(case.batch, case.k_len, generator=gen) > 0.3
        mask[:, -1] = True
        mask = mask.to(device)
    index = torch.tensor(case.index, device=device) if case.index else None
    lengths = torch.tensor(case.lengths, device=device) if case.lengths else None
    return q, k, v, prefix_k, prefix_v, mask, index, lengths


def per_example_oracle(case, q, k, v, prefix_k, prefix_v, mask, grad_out, keep=None, prefix_dropout_p=0.0):
    """fp64 output and gradients (q, k, v, prefix_k, prefix_v): example b alone, with its prefix
    sliced by hand (its bank entry, its first ``length`` positions) and, when ``keep`` (2, B, Hkv, P, D)
    is given, multiplied by its prefix-dropout keep mask / (1 - p)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, prefix_k, prefix_v)]
    q64, k64, v64, pk64, pv64 = leaves
    outs = []
    for b in range(case.batch):
        entry = case.index[b] if case.kind == "bank" else b
        if case.kind == "shared":
            pk_b, pv_b = pk64, pv64
        else:
            pk_b, pv_b = pk64[entry], pv64[entry]
        if keep is not None:
            pk_b = pk_b * keep[0, b].double() / (1.0 - prefix_dropout_p)
            pv_b = pv_b * keep[1, b].double() / (1.0 - prefix_dropout_p)
        if case.lengths:
            length = case.lengths[entry if case.kind != "shared" else 0]
            pk_b, pv_b = pk_b[:, :length], pv_b[:, :length]
        m = None if mask is None else mask[b:b + 1]
        outs.append(naive_attention_fp64(q64[b:b + 1], k64[b:b + 1], v64[b:b + 1], pk_b, pv_b, m, case.causal))
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def run_bank(case, backend, q, k, v, prefix_k, prefix_v, mask, index, lengths, **kw):
    return ptkernels.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, causal=case.causal,
                                      prefix_index=index, prefix_lengths=lengths, backend=backend, **kw)


def grads_of(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("case", BANK_CASES, ids=str)
def test_bank_and_lengths_match_per_example_oracle(case, backend):
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case, device=device)
    out = run_bank(case, backend, q, k, v, pk, pv, mask, index, lengths)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    want_out, want_grads = per_example_oracle(case, q, k, v, pk, pv, mask, grad_out)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
    got = grads_of(out, (q, k, v, pk, pv), grad_out)
    for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want_grads):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5, msg=name)
    if case.kind == "bank":
        unused = sorted(set(range(case.entries)) - set(case.index))
        for a in unused:  # an entry no example reads gets exactly zero
            assert torch.equal(got[3][a], torch.zeros_like(got[3][a]))
    if case.lengths:  # positions past an entry's length get exactly zero
        for a, length in enumerate(case.lengths):
            g = got[3] if case.kind == "shared" else got[3][a]
            assert torch.equal(g[..., length:, :], torch.zeros_like(g[..., length:, :]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_bank_low_precision_flash_attention_rule(dtype):
    case = BankCase(lengths=(21, 9, 14), causal=True, padding=True)
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case, dtype=dtype)
    out = run_bank(case, "triton", q, k, v, pk, pv, mask, index, lengths)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    want_out, want_grads = per_example_oracle(case, q, k, v, pk, pv, mask, grad_out)
    same = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=case.causal, prefix_index=index,
                                      prefix_lengths=lengths, upcast=False)
    err = (out.double() - want_out).abs().max().item()
    assert err <= flash_attention_bound((same.double() - want_out).abs().max().item(), is_grad=False, slack=1e-5)
    got = grads_of(out, (q, k, v, pk, pv), grad_out)
    base = grads_of(same, (q, k, v, pk, pv), grad_out)
    for name, g, b, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, base, want_grads):
        bound = flash_attention_bound((b.double() - w).abs().max().item(), is_grad=True, slack=1e-5)
        assert (g.double() - w).abs().max().item() <= bound, name


def test_bank_backward_is_bitwise_deterministic():
    case = BankCase(batch=5, entries=2, index=(0, 1, 0, 0, 1), lengths=(21, 12), causal=True)
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case)
    grad_out = torch.randn(case.batch, case.q_heads, case.q_len, case.head_dim).to(DEVICE)
    runs = [grads_of(run_bank(case, "triton", q, k, v, pk, pv, mask, index, lengths), (pk, pv), grad_out)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bank_prefix_dropout_backward_is_bitwise_deterministic():
    """With prefix dropout the prefix dK/dV kernel adds each example's share into float32 sums in
    memory (relaxed atomic adds, each element by one thread in example order): the same bits every
    run. In the interpreter the adds run in order whatever the code, so this catches what else could
    differ between runs (sums not zeroed first fail it); the GPU version below is the one that could
    catch a reordering of the adds."""
    case = BankCase(batch=3, entries=2, index=(0, 1, 0), lengths=(21, 12), causal=True, q_len=5, k_len=7)
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case)
    grad_out = torch.randn(case.batch, case.q_heads, case.q_len, case.head_dim).to(DEVICE)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        out = run_bank(case, "triton", q, k, v, pk, pv, mask, index, lengths, prefix_dropout_p=0.3)
        runs.append(grads_of(out, (q, k, v, pk, pv), grad_out))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bank_prefix_dropout_backward_deterministic_50x(dtype, monkeypatch):
    """Compiled (D=128: the kernel's packed keep words and atomic adds), 8 examples over 3 entries,
    each entry's examples in one program (one split: on a GPU the launcher would otherwise give
    each program one example, and every element one add onto zero, which no reordering changes)."""
    from ptkernels.ops.prefix_attention import backward

    monkeypatch.setattr(backward, "bank_splits", lambda *args, **kwargs: 1)
    case = BankCase(batch=8, entries=3, index=(0, 1, 2, 0, 1, 2, 0, 0), q_heads=8, kv_heads=2, q_len=200,
                    k_len=200, prefix_len=160, head_dim=128, causal=True, lengths=(160, 100, 37))
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case, dtype=dtype, device="cuda")
    grad_out = torch.randn(case.batch, case.q_heads, case.q_len, case.head_dim, device="cuda", dtype=dtype)

    def grads():
        torch.manual_seed(7)
        out = run_bank(case, "triton", q, k, v, pk, pv, mask, index, lengths, prefix_dropout_p=0.1)
        return grads_of(out, (q, k, v, pk, pv), grad_out)

    first = grads()
    for _ in range(50):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_bank_of_one_entry_equals_shared_prefix_and_per_example_bank_equals_per_example():
    """Two ways to say the same thing must give the same bits (Triton): a bank of one entry read by
    every example is the shared prefix; a bank read by arange(B) is the per-example prefix."""
    case = BankCase(kind="shared", index=(), causal=True, padding=True)
    q, k, v, pk, pv, mask, _, _ = make_bank_inputs(case)
    shared = run_bank(case, "triton", q, k, v, pk, pv, mask, None, None)
    zeros = torch.zeros(case.batch, dtype=torch.long, device=q.device)
    bank = run_bank(case, "triton", q, k, v, pk[None], pv[None], mask, zeros, None)
    torch.testing.assert_close(bank, shared, atol=0, rtol=0)
    pk_b = pk.detach()[None].repeat(case.batch, 1, 1, 1).requires_grad_()
    pv_b = pv.detach()[None].repeat(case.batch, 1, 1, 1).requires_grad_()
    per_example = run_bank(case, "triton", q, k, v, pk_b, pv_b, mask, None, None)
    by_index = run_bank(case, "triton", q, k, v, pk_b, pv_b, mask, torch.arange(case.batch, device=q.device), None)
    torch.testing.assert_close(by_index, per_example, atol=0, rtol=0)
    torch.testing.assert_close(per_example, shared, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Prefix dropout (P-Tuning v2): one keep mask per example, KV head, position and channel


def recovered_prefix_keep(backend, case, p, seed):
    """Run with only the prefix visible (every real key masked) and a per-example prefix, and read
    the prefix-dropout keep mask off the gradients: a dropped element of example b's prefix K or V
    gets gradient exactly 0, a kept one (generically) not. Returns (keep (2, B, Hkv, P, D), inputs, out)."""
    q, k, v, pk, pv, _, _, _ = make_bank_inputs(case, device=DEVICE if backend == "triton" else "cpu")
    mask = torch.zeros(case.batch, case.k_len, dtype=torch.bool, device=q.device)
    torch.manual_seed(seed)
    out = run_bank(case, backend, q, k, v, pk, pv, mask, None, None, prefix_dropout_p=p)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    dpk, dpv = grads_of(out, (pk, pv), grad_out)
    return torch.stack([dpk != 0, dpv != 0]), (q, k, v, pk, pv, mask), out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_prefix_dropout_mask_recovered_exactly_when_only_the_prefix_is_visible(backend):
    case = BankCase(kind="per_example", index=(), q_heads=4, kv_heads=2, batch=3, prefix_len=13, head_dim=24)
    p = 0.4
    keep, (q, k, v, pk, pv, mask), out = recovered_prefix_keep(backend, case, p, seed=11)
    assert keep.shape == (2, case.batch, case.kv_heads, case.prefix_len, case.head_dim)
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 0.05, frac
    # independent per example, head, position and channel: examples' and heads' masks differ
    assert not torch.equal(keep[:, 0], keep[:, 1]) and not torch.equal(keep[:, :, 0], keep[:, :, 1])
    assert not torch.equal(keep[0], keep[1])  # keys and values have their own masks
    # the same mask for every query and query head: the reference given the recovered mask agrees
    p_eff = round(p * 65536) / 65536  # both backends quantise p to 16 bits
    want = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, prefix_dropout_p=p_eff,
                                      prefix_dropout_keep_mask=keep)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if backend == "triton":  # the kernels' mask helper draws the same mask
        from ptkernels.ops.prefix_attention.forward import prefix_dropout_keep_mask

        torch.manual_seed(11)
        prefix_seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
        helper = prefix_dropout_keep_mask(case.batch, case.kv_heads, case.prefix_len, case.head_dim, p,
                                          prefix_seed, q.device)
        assert torch.equal(helper, keep)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind, head_dim", [("bank", 24), ("shared", 24), ("per_example", 24), ("bank", 80)])
def test_prefix_dropout_matches_oracle_given_the_backends_keep_mask(backend, kind, head_dim):
    """Full attention (real keys, causal, padding, lengths) with prefix dropout and attention dropout
    off: forward and gradients equal the oracle replaying the backend's own keep mask. The Triton
    prefix gradient adds each example's share into float32 partials in memory: the bank's entry 2
    (examples 0 and 2) and the shared prefix sum two examples in one program (2 splits of 2 in the
    interpreter), the per-example prefix one. head_dim 80: every attention kernel draws the keep
    mask of channels 64..79 in the head dim's tail tile (``launch.split_head_dim``)."""
    case = BankCase(kind=kind, index=(2, 0, 2, 1) if kind == "bank" else (), causal=True, padding=True,
                    lengths={"bank": (21, 6, 13), "shared": (9,), "per_example": (21, 0, 9, 16)}[kind],
                    head_dim=head_dim)
    p = 0.25
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case, device=device)
    torch.manual_seed(3)
    out = run_bank(case, backend, q, k, v, pk, pv, mask, index, lengths, prefix_dropout_p=p)
    torch.manual_seed(3)
    shape = (2, case.batch, case.kv_heads, case.prefix_len, case.head_dim)
    if backend == "triton":
        from ptkernels.ops.prefix_attention.forward import prefix_dropout_keep_mask

        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
        keep = prefix_dropout_keep_mask(*shape[1:], p, seed, device)
    else:
        from ptkernels.ops.prefix_attention.torch_path import dropout_keep_mask

        keep, _ = dropout_keep_mask(shape, p, device)
    p_eff = round(p * 65536) / 65536  # both backends quantise p to 16 bits
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    want_out, want_grads = per_example_oracle(case, q, k, v, pk, pv, mask, grad_out, keep=keep, prefix_dropout_p=p_eff)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
    for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads_of(out, (q, k, v, pk, pv), grad_out),
                          want_grads):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_prefix_dropout_same_seed_same_output_and_independent_of_attention_dropout(backend):
    case = BankCase(kind="shared", index=(), q_len=7, k_len=7, prefix_len=9)
    q, k, v, pk, pv, _, _, _ = make_bank_inputs(case, device=DEVICE if backend == "triton" else "cpu")
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(run_bank(case, backend, q, k, v, pk, pv, None, None, None, prefix_dropout_p=0.3))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    plain = run_bank(case, backend, q, k, v, pk, pv, None, None, None)
    assert not torch.allclose(outs[0], plain)
    torch.manual_seed(5)  # both dropouts at once run and differ from either alone
    both = run_bank(case, backend, q, k, v, pk, pv, None, None, None, prefix_dropout_p=0.3, dropout_p=0.2)
    assert torch.isfinite(both).all() and not torch.allclose(both, outs[0])


@pytest.mark.parametrize("head_dim, index", [(24, (2, 0, 2, 1)), (72, (2, 2, 1, 2))])
def test_prefix_dropout_with_attention_dropout_matches_reference_given_both_kernel_masks(head_dim, index):
    """head_dim 72: above D=64 under attention dropout the prefix dK/dV kernel's example loop counts
    to examples_per_split (2: 4 examples in the interpreter's 2 splits) and skips what is past its
    split of the entry's list: entry 2's examples 0, 1, 3 split as 2 + 1, entry 1's one example leaves
    its second split empty, and entry 0 has none (its gradient is 0)."""
    from ptkernels.ops.prefix_attention.forward import dropout_keep_mask, prefix_dropout_keep_mask

    case = BankCase(causal=True, lengths=(21, 4, 11), head_dim=head_dim, index=index)
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case)
    torch.manual_seed(8)
    out = run_bank(case, "triton", q, k, v, pk, pv, mask, index, lengths, prefix_dropout_p=0.2, dropout_p=0.3)
    torch.manual_seed(8)
    prefix_seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    pkeep = prefix_dropout_keep_mask(case.batch, case.kv_heads, case.prefix_len, case.head_dim, 0.2, prefix_seed,
                                     q.device)
    akeep = dropout_keep_mask(case.batch, case.q_heads, case.q_len, case.prefix_len, case.k_len, 0.3, seed, q.device)
    want = prefix_attention_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=True, prefix_index=index,
                                      prefix_lengths=lengths, dropout_p=round(0.3 * 65536) / 65536,
                                      dropout_keep_mask=akeep, prefix_dropout_p=round(0.2 * 65536) / 65536,
                                      prefix_dropout_keep_mask=pkeep)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    for name, g, w in zip("q k v pk pv".split(), grads_of(out, (q, k, v, pk, pv), grad_out),
                          grads_of(want, (q, k, v, pk, pv), grad_out)):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_index_and_lengths_made_under_inference_mode(backend):
    """prefix_index / prefix_lengths that are inference tensors (made inside torch.inference_mode, as a
    patched model's generate() makes them) have no version counter: the same output as under no_grad,
    not "Inference tensors do not track version counter" from the value check's cache."""
    case = BankCase(causal=True, lengths=(21, 4, 11))
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v, pk, pv, mask, index, lengths = make_bank_inputs(case, device=device)
    with torch.no_grad():
        want = run_bank(case, backend, q, k, v, pk, pv, mask, index, lengths)
    with torch.inference_mode():
        index_inf, lengths_inf = index.clone(), lengths.clone()
        assert index_inf.is_inference()
        for _ in range(2):  # (a second call: nothing cached wrongly either)
            got = run_bank(case, backend, q, k, v, pk, pv, mask, index_inf, lengths_inf)
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_cpu_index_written_behind_the_version_counter_is_checked_again():
    """On the CPU every call checks the values (the cache is for a GPU's sync): an index made invalid
    through .numpy() after a good call (which leaves its version unchanged) still raises."""
    case = BankCase()
    q, k, v, pk, pv, _, index, _ = make_bank_inputs(case, device="cpu")
    with torch.no_grad():
        run_bank(case, "torch", q, k, v, pk, pv, None, index, None)
        version = index._version
        index.numpy()[1] = 1000
        assert index._version == version
        with pytest.raises(ValueError, match=r"prefix_index must be in \[0, A\).*to 1000"):
            run_bank(case, "torch", q, k, v, pk, pv, None, index, None)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_bank_with_no_prefix_keys_and_no_keys_gives_zeros(backend):
    """P = 0 and Sk = 0 with a bank of A != B entries: no key at all, zeros (the PyTorch path's
    no-key shortcut once read the (A, Hkv, 0, D) bank as a per-example prefix and failed)."""
    device = DEVICE if backend == "triton" else "cpu"
    q = torch.randn(2, 2, 3, 8, device=device, requires_grad=True)
    k = v = torch.randn(2, 1, 0, 8, device=device)
    bank = torch.randn(3, 1, 0, 8, device=device)
    index = torch.tensor([2, 0], device=device)
    out = ptkernels.prefix_attention(q, k, v, bank, bank, prefix_index=index, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# ----------------------------------------------------------------------------------------------
# Bad input


def _bad_bank_inputs():
    case = BankCase()
    return make_bank_inputs(case, device="cpu")


BAD_BANK = [
    ("index out of range", dict(prefix_index=torch.tensor([0, 1, 3, 0])), ValueError, r"prefix_index.*\[0, 3\)"),
    ("index negative", dict(prefix_index=torch.tensor([0, -1, 2, 0])), ValueError, "prefix_index"),
    ("index float", dict(prefix_index=torch.tensor([0.0, 1, 2, 0])), TypeError, "prefix_index.*integer"),
    ("index bool", dict(prefix_index=torch.tensor([True, False, True, False])), TypeError, "prefix_index.*integer"),
    ("index list", dict(prefix_index=[0, 1, 2, 0]), TypeError, "prefix_index"),
    ("index wrong length", dict(prefix_index=torch.tensor([0, 1, 2])), ValueError, "prefix_index.*length B = 4"),
    ("index 2-D", dict(prefix_index=torch.tensor([[0, 1, 2, 0]])), ValueError, "prefix_index"),
    ("lengths above P", dict(prefix_lengths=torch.tensor([3, 22, 1])), ValueError, r"prefix_lengths.*\[0, P\]"),
    ("lengths negative", dict(prefix_lengths=torch.tensor([3, -1, 1])), ValueError, "prefix_lengths"),
    ("lengths float", dict(prefix_lengths=torch.tensor([3.0, 1, 1])), TypeError, "prefix_lengths.*integer"),
    ("lengths wrong size", dict(prefix_lengths=torch.tensor([3, 1, 1, 1])), ValueError, "prefix_lengths.*A"),
    ("prefix dropout 1", dict(prefix_dropout_p=1.0), ValueError, "prefix_dropout_p"),
    ("prefix dropout negative", dict(prefix_dropout_p=-0.1), ValueError, "prefix_dropout_p"),
    ("prefix dropout bool", dict(prefix_dropout_p=True), ValueError, "prefix_dropout_p"),
]


@pytest.mark.parametrize("what,override,exc,match", BAD_BANK, ids=[b[0] for b in BAD_BANK])
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_bad_bank_input_raises_naming_the_argument(what, override, exc, match, backend):
    q, k, v, pk, pv, mask, index, lengths = _bad_bank_inputs()
    kwargs = dict(prefix_index=index, prefix_lengths=None)
    kwargs.update(override)
    with pytest.raises(exc, match=match):
        ptkernels.prefix_attention(q, k, v, pk, pv, backend=backend, **kwargs)


def test_index_with_a_shared_prefix_or_without_a_prefix_is_an_error():
    case = BankCase(kind="shared", index=())
    q, k, v, pk, pv, _, _, _ = make_bank_inputs(case, device="cpu")
    index = torch.zeros(case.batch, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix_index needs a bank"):
        ptkernels.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend="torch")
    with pytest.raises(ValueError, match="prefix_index needs a prefix"):
        ptkernels.prefix_attention(q, k, v, None, None, prefix_index=index, backend="torch")
    with pytest.raises(ValueError, match=r"prefix_lengths.*1 \(a shared prefix\)"):
        ptkernels.prefix_attention(q, k, v, pk, pv, prefix_lengths=torch.tensor([1, 2]), backend="torch")
    with pytest.raises(ValueError, match="bank entries"):  # a bank's leading dim is A, and B without an index
        ptkernels.prefix_attention(q, k, v, pk[None].expand(3, -1, -1, -1), pv[None].expand(3, -1, -1, -1),
                                   backend="torch")


def test_index_value_check_is_cached_per_tensor_version_but_sees_in_place_changes():
    """The range check of prefix_index is paid once per tensor (every layer of a model gets the same
    one), but an in-place change of the tensor (a new version) is checked again."""
    q, k, v, pk, pv, mask, index, lengths = _bad_bank_inputs()
    ptkernels.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend="torch")
    ptkernels.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend="torch")
    index[1] = 7  # out of range now
    with pytest.raises(ValueError, match="prefix_index must be in"):
        ptkernels.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend="torch")
