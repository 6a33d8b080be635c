"""The attention dropout's random numbers: the Triton kernels' keep mask equals an independent
pure-Python Philox4x32-7 over the documented numbering, does not depend on the tile shape a kernel
uses (the GPU launchers pick 128 x 128, 128 x 64 or 64 x 64 tiles, the interpreter 16 x 16), the extreme
thresholds (1, which Triton specialises, and 65535) draw as documented, and the draws look independent.
On an NVIDIA GPU the kernels run common.philox with inline-PTX multiplies (common.DROPOUT_PTX), in
the interpreter tl.philox (DROPOUT_PORTABLE); the kernels' masks are compared with the Python Philox
in whichever mode the device runs, common.philox's rounds with tl.philox (with tl.umulhi in place of
the assembly where it cannot run), and on a GPU the two modes' masks with each other."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE

triton = pytest.importorskip("triton")
tl = triton.language

from ptkernels.ops.prefix_attention.common import (  # noqa: E402
    DROPOUT_PORTABLE,
    DROPOUT_PTX,
    DROPOUT_PTX_KEYS,
    PHILOX_ROUNDS,
    attention_dropout_keep,
    consecutive_lanes_keep,
    consecutive_lanes_keep_bits,
    opaque,
    philox,
    philox_keyed,
    unpack_keep_bits,
)
from ptkernels.ops.prefix_attention.forward import dropout_keep_mask  # noqa: E402
from ptkernels.ops.prefix_attention.launch import (  # noqa: E402
    DeviceLimits,
    device_limits,
    dropout_mode,
    keyed_dropout_mode,
    philox_mode,
    philox_round_keys,
)
from ptkernels.ops.prefix_attention.reference import attention_dropout_keep_reference  # noqa: E402


@triton.jit(do_not_specialize=["seed"])
def _keep_tiles_kernel(OUT, first_row, threshold, seed, width, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       DROPOUT: tl.constexpr):
    """OUT (rows, width) int8: the keep mask drawn tile by tile with (BLOCK_R, BLOCK_K) tiles (lanes 0..)."""
    start_r = tl.program_id(0) * BLOCK_R
    start_k = tl.program_id(1) * BLOCK_K
    r = start_r + tl.arange(0, BLOCK_R)
    k = start_k + tl.arange(0, BLOCK_K)
    keep = attention_dropout_keep(seed, first_row + start_r, start_k, threshold, BLOCK_R, BLOCK_K, DROPOUT)
    tl.store(OUT + r[:, None] * width + k[None, :], keep.to(tl.int8))


def _tiles(rows, width, block_r, block_k, seed=2**40 + 77, first_row=0, threshold=16384, mode=None):
    out = torch.empty(rows, width, dtype=torch.int8, device=DEVICE)
    grid = (rows // block_r, width // block_k)
    mode = philox_mode(device_limits(DEVICE)) if mode is None else mode
    _keep_tiles_kernel[grid](out, first_row, threshold, seed, width, BLOCK_R=block_r, BLOCK_K=block_k, DROPOUT=mode)
    return out.bool().cpu()


@triton.jit(do_not_specialize=["seed"])
def _philox_pair_kernel(OURS, THEIRS, seed, c3, N: tl.constexpr, ROUNDS: tl.constexpr, PTX: tl.constexpr):
    """OURS, THEIRS (4, N) uint32 as int32: common.philox and tl.philox of the same counters."""
    i = tl.arange(0, N)
    c0 = i.to(tl.uint32) * 2654435761
    c1 = (i * 40503 + 7).to(tl.uint32)
    c2 = (i ^ 0x5BD1E995).to(tl.uint32)
    c3 = c3.to(tl.uint32)  # (an int64 argument when above 2**31)
    a0, a1, a2, a3 = philox(seed, c0, c1, c2, c3, ROUNDS, PTX)
    b0, b1, b2, b3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=ROUNDS)
    for row, (a, b) in enumerate([(a0, b0), (a1, b1), (a2, b2), (a3, b3)]):
        tl.store(OURS + row * N + i, a.to(tl.int32, bitcast=True))
        tl.store(THEIRS + row * N + i, b.to(tl.int32, bitcast=True))


@pytest.mark.parametrize("rounds", [1, PHILOX_ROUNDS, 10])
def test_philox_rounds_equal_tl_philox(rounds):
    """common.philox (the DROPOUT_PTX kernels' generator) is tl.philox bit for bit: here with
    tl.umulhi multiplies (PTX=False: the interpreter cannot run the inline assembly), on a GPU also
    with the PTX wide multiplies. Seeds with both 32-bit halves set; the counters cover all bits."""
    n = 256
    modes = [False] + ([True] if philox_mode(device_limits(DEVICE)) == DROPOUT_PTX else [])
    for ptx in modes:
        for seed, c3 in [(2**40 + 77, 0), (0xDEADBEEF12345678, 0xFFFFFFFF), (1, 123456789)]:
            ours = torch.empty(4, n, dtype=torch.int32, device=DEVICE)
            theirs = torch.empty_like(ours)
            _philox_pair_kernel[(1,)](ours, theirs, seed, c3, N=n, ROUNDS=rounds, PTX=ptx)
            assert torch.equal(ours.cpu(), theirs.cpu()), (ptx, seed, c3)
            assert ours.unique().numel() > 4 * n - 8  # the words are not constant or repeated


@triton.jit(do_not_specialize=["seed", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11",
                                "k12", "k13"])
def _philox_keyed_pair_kernel(OURS, THEIRS, seed, k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13,
                              N: tl.constexpr, PTX: tl.constexpr):
    """OURS, THEIRS (4, N) uint32 as int32: common.philox_keyed with the given round keys and
    tl.philox of the seed, same counters, PHILOX_ROUNDS rounds."""
    i = tl.arange(0, N)
    c0 = i.to(tl.uint32) * 2654435761
    c1 = (i * 40503 + 7).to(tl.uint32)
    c2 = (i ^ 0x5BD1E995).to(tl.uint32)
    c3 = (i * 3 + 1).to(tl.uint32)
    keys = (k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13)
    a0, a1, a2, a3 = philox_keyed(keys, c0, c1, c2, c3, PHILOX_ROUNDS, PTX)
    b0, b1, b2, b3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=PHILOX_ROUNDS)
    for row, (a, b) in enumerate([(a0, b0), (a1, b1), (a2, b2), (a3, b3)]):
        tl.store(OURS + row * N + i, a.to(tl.int32, bitcast=True))
        tl.store(THEIRS + row * N + i, b.to(tl.int32, bitcast=True))


def test_round_keys_from_the_host_draw_tl_philox_of_the_seed():
    """launch.philox_round_keys (the prefix dK/dV kernel's DROPOUT_PTX_KEYS arguments) with
    common.philox_keyed is tl.philox(seed) bit for bit: seeds whose key words wrap around 2**32 within
    the 7 rounds, a seed below 2**31, one with the top bit of 2**63 - 1 set; every key passed in
    [2**32, 2**33), so that Triton gives all of them one type whatever the seed."""
    n = 128
    modes = [False] + ([True] if philox_mode(device_limits(DEVICE)) == DROPOUT_PTX else [])
    for ptx in modes:
        for seed in (2**40 + 77, 0xFFFFFFF0_FFFFFFF0, 7, 2**63 - 1, 0x12345678_9ABCDEF0):
            keys = philox_round_keys(seed)
            assert len(keys) == 2 * PHILOX_ROUNDS and all(2**32 <= k < 2**33 for k in keys)
            ours = torch.empty(4, n, dtype=torch.int32, device=DEVICE)
            theirs = torch.empty_like(ours)
            _philox_keyed_pair_kernel[(1,)](ours, theirs, seed, *keys, N=n, PTX=ptx)
            assert torch.equal(ours.cpu(), theirs.cpu()), (ptx, hex(seed))
    assert philox_round_keys(5)[:2] == (5 + 2**32, 2**32)  # round 0: the seed's two words
    assert philox_round_keys(5)[2] == 5 + 0x9E3779B9 + 2**32


def test_keyed_dkdv_kernels_draw_the_seeds_dropout(monkeypatch):
    """The dK/dV kernels in DROPOUT_PTX_KEYS mode, end to end: with the launcher's round keys
    (``philox_round_keys``) in place of the seed, the backward's gradients are the seed's, bit for
    bit (GQA, causal, padding, a shared prefix, D=72 so that the prefix dK/dV kernel takes the keys
    too, and a seed whose key words wrap around 2**32). The mode is forced both ways (a GPU's
    launchers key by themselves; the interpreter runs ``philox_keyed`` with tl.umulhi products), and
    a launcher records which mode each kernel ran, so the test fails if the keys went unused."""
    from ptkernels.ops.prefix_attention import backward
    from ptkernels.ops.prefix_attention.forward import prefix_attention_forward
    from ptkernels.ops.prefix_attention.launch import launch_kernel

    gen = torch.Generator().manual_seed(3)
    batch, q_heads, kv_heads, q_len, k_len, prefix_len, head_dim = 2, 4, 2, 19, 21, 5, 72

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    q, k, v = rand(batch, q_heads, q_len, head_dim), rand(batch, kv_heads, k_len, head_dim), rand(
        batch, kv_heads, k_len, head_dim)
    prefix_k, prefix_v = rand(kv_heads, prefix_len, head_dim), rand(kv_heads, prefix_len, head_dim)
    mask = torch.ones(batch, k_len, dtype=torch.bool, device=DEVICE)
    mask[1, 15:] = False
    grad_out = rand(batch, q_heads, q_len, head_dim)
    seed, p, scale = 0xFFFFFF00_FFFFFFF0, 0.3, head_dim ** -0.5
    out, lse = prefix_attention_forward(q, k, v, prefix_k, prefix_v, mask, True, scale, p, seed)

    def backward_pass():
        modes = {}

        def recording(kernel, grid):
            launch = launch_kernel(kernel, grid)

            def run(*args, **kwargs):
                modes[kernel.fn.__name__] = kwargs.get("DROPOUT")
                return launch(*args, **kwargs)
            return run
        grads = backward.prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, True, scale,
                                                   p, seed, launcher=recording)
        return grads[:5], modes

    monkeypatch.setattr(backward, "keyed_dropout_mode", lambda mode: mode)  # the seed (a GPU would key by itself)
    plain, plain_modes = backward_pass()
    monkeypatch.setattr(backward, "keyed_dropout_mode", lambda mode: int(DROPOUT_PTX_KEYS) if mode else mode)
    keyed, keyed_modes = backward_pass()
    assert keyed_modes["_prefix_attention_bwd_dkdv_kernel"] == DROPOUT_PTX_KEYS
    assert keyed_modes["_prefix_attention_bwd_prefix_dkdv_kernel"] == DROPOUT_PTX_KEYS
    assert plain_modes["_prefix_attention_bwd_dkdv_kernel"] != DROPOUT_PTX_KEYS
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), plain, keyed):
        assert torch.equal(a, b), name
    # the keys matter: a wrong key schedule draws other masks and other gradients
    monkeypatch.setattr(backward, "philox_round_keys", lambda s: philox_round_keys(s + 1))
    wrong, _ = backward_pass()
    assert not torch.equal(wrong[1], plain[1]) and not torch.equal(wrong[3], plain[3])


def test_the_launchers_pick_the_philox_of_the_backend():
    interpreted = DeviceLimits(232448, None, interpreted=True)
    rocm = DeviceLimits(65536, 304, interpreted=False, hip=True)
    cuda = DeviceLimits(232448, 132, interpreted=False)
    assert [philox_mode(x) for x in (interpreted, rocm, cuda)] == [DROPOUT_PORTABLE, DROPOUT_PORTABLE, DROPOUT_PTX]
    assert [dropout_mode(p, cuda) for p in (0.0, 0.1)] == [0, DROPOUT_PTX]
    assert dropout_mode(0.5, interpreted) == DROPOUT_PORTABLE
    # the dK/dV kernels take the round keys where they run the PTX Philox
    assert [keyed_dropout_mode(m) for m in (0, DROPOUT_PORTABLE, DROPOUT_PTX)] == [0, DROPOUT_PORTABLE, DROPOUT_PTX_KEYS]


@pytest.mark.skipif(philox_mode(device_limits(DEVICE)) != DROPOUT_PTX,
                    reason="inline PTX runs in kernels compiled for an NVIDIA GPU only")
@pytest.mark.parametrize("block_r,block_k", [(16, 16), (64, 64), (128, 64)])
def test_ptx_and_portable_philox_draw_the_same_bits(block_r, block_k):
    for seed, first_row in [(2**40 + 77, 0), (3, 2**33 + 16), (2**63 - 1, 5 * 2**31)]:
        ptx = _tiles(256, 256, block_r, block_k, seed=seed, first_row=first_row, mode=DROPOUT_PTX)
        portable = _tiles(256, 256, block_r, block_k, seed=seed, first_row=first_row, mode=DROPOUT_PORTABLE)
        assert torch.equal(ptx, portable), (seed, first_row)


@pytest.mark.parametrize("prefix_len,k_len,q_len", [(5, 7, 19), (0, 16, 16), (20, 33, 24), (16, 1, 9)])
def test_kernel_mask_equals_python_philox_of_the_documented_numbering(prefix_len, k_len, q_len):
    """Odd lengths, P = 0, rows past a 16-row cell boundary; two examples x heads (row ids 0.. and Sq..)."""
    seed, p = 2**40 + 12345, 0.3
    got = dropout_keep_mask(1, 2, q_len, prefix_len, k_len, p, seed, DEVICE).cpu()  # (1, 2, Sq, P + Sk)
    for head in range(2):
        want = attention_dropout_keep_reference(q_len, prefix_len, k_len, p, seed, first_row=head * q_len)
        assert torch.equal(got[0, head], want), head


@pytest.mark.parametrize("p", [2**-16, 1 - 2**-18, 0.5])
def test_extreme_thresholds_follow_the_documented_numbering(p):
    """p = 2**-16 is threshold 1 (an int argument Triton compiles as a constant); 1 - 2**-18 the cap, 65535."""
    seed = 5
    got = dropout_keep_mask(1, 1, 18, 3, 21, p, seed, DEVICE).cpu()[0, 0]
    assert torch.equal(got, attention_dropout_keep_reference(18, 3, 21, p, seed))


def test_mask_of_packed_sequences_checks_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        dropout_keep_mask(1, 1, 30, 3, 10, 0.5, 1, DEVICE, cu_seqlens_q=torch.tensor([0, 5, 26], dtype=torch.int32))


def test_packed_sequences_number_rows_from_each_sequence_start():
    seed, p = 99, 0.5
    cu = torch.tensor([0, 5, 5, 26], dtype=torch.int32)
    got = dropout_keep_mask(1, 1, 26, 3, 10, p, seed, DEVICE, cu_seqlens_q=cu).cpu()[0, 0]
    assert torch.equal(got[:5], attention_dropout_keep_reference(5, 3, 10, p, seed, first_row=0))
    assert torch.equal(got[5:], attention_dropout_keep_reference(21, 3, 10, p, seed, first_row=5))


def test_tile_shape_does_not_change_the_bits():
    rows, width = 64, 64
    base = _tiles(rows, width, 16, 16)
    for block_r, block_k in [(32, 16), (16, 64), (64, 32)]:
        assert torch.equal(_tiles(rows, width, block_r, block_k), base), (block_r, block_k)
    other_rows = _tiles(rows, width, 16, 16, first_row=rows)  # the next example's rows
    assert not torch.equal(other_rows, base)


def test_draws_look_independent():
    """P(keep) within 5 sigma of 1 - p; the rows and lanes one philox call serves are not alike
    (rows i and i + 8, keys j and j + 8, keys j and j + 1 agree about as often as independent draws)."""
    p = 0.25
    keep = _tiles(256, 256, 32, 32, threshold=round(p * 65536)).float()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    expected_agreement = (1 - p) ** 2 + p ** 2
    for a, b in [(keep[0::16], keep[8::16]), (keep[:, 0::16], keep[:, 8::16]), (keep[:, 0::2], keep[:, 1::2]),
                 (keep[:-1], keep[1:])]:
        agree = (a == b).float().mean().item()
        m = a.numel()
        assert abs(agree - expected_agreement) < 5 * (expected_agreement * (1 - expected_agreement) / m) ** 0.5


# ----------------------------------------------------------------------------------------------
# The prefix dropout's keep mask packed into words (the prefix dK/dV kernel holds it that way)


@triton.jit(do_not_specialize=["seed"])
def _packed_keep_kernel(MASK, UNPACKED, WORDS, first_lane, threshold, seed, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """MASK, UNPACKED (BLOCK_R, BLOCK_K) int8: consecutive_lanes_keep, and the same lanes packed by
    consecutive_lanes_keep_bits and unpacked again; WORDS (BLOCK_R, BLOCK_K // min(32, BLOCK_K)) the words."""
    WORD: tl.constexpr = min(32, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    row_lanes = first_lane + r.to(tl.int64) * (BLOCK_K + 24)  # rows a philox call apart, as a prefix row's D
    mask = consecutive_lanes_keep(seed, row_lanes, 8, threshold, BLOCK_R, BLOCK_K)
    words = consecutive_lanes_keep_bits(seed, row_lanes, 8, threshold, BLOCK_R, BLOCK_K)
    unpacked = unpack_keep_bits(opaque(words, PTX), BLOCK_R, BLOCK_K)
    tl.store(MASK + r[:, None] * BLOCK_K + k[None, :], mask.to(tl.int8))
    tl.store(UNPACKED + r[:, None] * BLOCK_K + k[None, :], unpacked.to(tl.int8))
    w = tl.arange(0, BLOCK_K // WORD)
    tl.store(WORDS + r[:, None] * (BLOCK_K // WORD) + w[None, :], words)


@pytest.mark.parametrize("block_k", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("threshold", [1, 26214, 65535])
def test_packed_prefix_keep_words_hold_the_keep_mask_bit_for_bit(block_k, threshold):
    """Bit j of word w of a row is element WORD * w + j of the mask (WORD = min(32, BLOCK_K)), and
    unpacking gives the mask back, at every tile width a head dim can take and at the extreme
    thresholds (1, which Triton specialises, and 65535); the words use all 32 bits."""
    block_r, word = 16, min(32, block_k)
    mask = torch.empty(block_r, block_k, dtype=torch.int8, device=DEVICE)
    unpacked = torch.empty_like(mask)
    words = torch.empty(block_r, block_k // word, dtype=torch.int32, device=DEVICE)
    ptx = philox_mode(device_limits(DEVICE)) == DROPOUT_PTX
    _packed_keep_kernel[(1,)](mask, unpacked, words, 2**33 + 40, threshold, 2**40 + 9, BLOCK_R=block_r,
                              BLOCK_K=block_k, PTX=ptx)
    mask, unpacked, words = mask.cpu(), unpacked.cpu(), words.cpu().to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(unpacked, mask)
    bits = (words[:, :, None] >> torch.arange(word)) & 1  # (rows, words, bit)
    assert torch.equal(bits.reshape(block_r, block_k).to(torch.int8), mask)
    if threshold == 26214:  # p = 0.4: both values of a bit occur, the top bit among them
        assert 0 < mask.float().mean().item() < 1 and bool(((words >> (word - 1)) & 1).any())
