"""TMA tensor-descriptor loads (sm_90+): the full key / query tiles of the forward, dQ, dK/dV and
prefix dK/dV kernels load through ``launch.tma_descriptor`` views instead of pointers.

On this CPU machine the descriptor path runs in Triton's interpreter (which implements descriptor
loads, zero-filling boxes past a tensor's end): the launchers are handed device limits with tma=True,
and every output and gradient must equal the pointer path's bit for bit (the same values loaded
into the same computation), at awkward shapes (odd lengths, a head dim that is not a power of two,
P = 0, GQA, padding, causal, packed sequences, per-example prefixes and banks, dropout). On a
Hopper GPU the same tests compare the compiled kernels within a small tolerance. A recording
launcher checks that the descriptor path was really taken, and the descriptor rules (alignment,
strides, dtypes) fall back to pointer loads rather than fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ptkernels
from ptkernels.ops.prefix_attention import backward, forward, function, launch
from ptkernels.ops.prefix_attention.launch import DeviceLimits, tma_descriptor

from conftest import DEVICE, ON_GPU

pytestmark = pytest.mark.skipif(launch.TensorDescriptor is None, reason="this triton has no tensor descriptors")


def _limits(tma: bool) -> DeviceLimits:
    if ON_GPU:
        if torch.cuda.get_device_capability()[0] < 9 and tma:
            pytest.skip("TMA needs sm_90 or newer")
        return dataclasses.replace(launch.device_limits(DEVICE), tma=tma)
    return DeviceLimits(232448, None, True, tma=tma)


@pytest.fixture
def tma_switch(monkeypatch):
    """set(tma) makes the launchers use limits with TMA on / off and records each kernel's TMA flag."""
    taken = {}

    def recording(kernel, grid):
        run = kernel[grid]

        def launch_and_record(*args, **kwargs):
            if "TMA" in kwargs:
                taken.setdefault(kernel.fn.__name__, set()).add(kwargs["TMA"])
            return run(*args, **kwargs)

        return launch_and_record

    def set_tma(tma: bool):
        limits = _limits(tma)
        for module in (forward, backward):
            monkeypatch.setattr(module, "device_limits", lambda device: limits)
        taken.clear()
        return taken

    # The launchers' default launcher argument is bound at definition: wrap the launchers where the
    # autograd functions call them.
    for name in ("prefix_attention_forward", "prefix_attention_backward"):
        original = getattr(function, name)

        def wrapped(*args, _original=original, **kwargs):
            kwargs.setdefault("launcher", recording)
            return _original(*args, **kwargs)

        monkeypatch.setattr(function, name, wrapped)
    return set_tma


def _run(fn, inputs, seed=0):
    """Outputs and gradients of fn(*inputs) for a fixed upstream gradient (dropout seed fixed)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if x is not None else None for x in inputs]
    torch.manual_seed(seed)
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32).to(out)
    out.backward(grad)
    return [out.detach()] + [x.grad for x in leaves if x is not None and x.is_floating_point()]


def _assert_same(a, b):
    for x, y in zip(a, b):
        if ON_GPU:
            torch.testing.assert_close(x, y, atol=2e-3, rtol=2e-3)
        else:
            assert torch.equal(x, y)


def _kernel_names(prefix: bool) -> set:
    names = {"_prefix_attention_fwd_kernel", "_prefix_attention_bwd_dq_kernel", "_prefix_attention_bwd_dkdv_kernel"}
    return names | ({"_prefix_attention_bwd_prefix_dkdv_kernel"} if prefix else set())


@pytest.mark.parametrize("dtype, prefix, head_dim", [
    (torch.float16, "none", 24), (torch.float16, "shared", 24), (torch.bfloat16, "per_example", 32),
    (torch.float16, "bank", 24), (torch.float16, "shared", 72)])
def test_tma_matches_pointer_loads(tma_switch, dtype, prefix, head_dim):
    """head_dim 24: the descriptors' 32-wide boxes read zeros past the head dim. head_dim 72: the
    attention kernels load the head dim's 16-wide tail (channels 64..71 and 8 zeros) through
    descriptors of the tensors' views from channel 64 on (``launch.split_tma_descriptors``)."""
    # The interpreter's 16 x 16 tiles: one full and one partial tile of queries, keys and prefix.
    batch, q_heads, kv_heads, q_len, k_len, prefix_len = 3, 4, 2, 19, 25, 21
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    # q as Hugging Face lays it out ((B, S, H, D) viewed as BHSD), k / v contiguous
    q = rand(batch, q_len, q_heads, head_dim).transpose(1, 2)
    k, v = rand(batch, kv_heads, k_len, head_dim), rand(batch, kv_heads, k_len, head_dim)
    shape = {"none": (kv_heads, 0, head_dim), "shared": (kv_heads, prefix_len, head_dim),
             "per_example": (batch, kv_heads, prefix_len, head_dim), "bank": (2, kv_heads, prefix_len, head_dim)}[prefix]
    pk, pv = rand(*shape), rand(*shape)
    index = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE) if prefix == "bank" else None
    mask = torch.ones(batch, k_len, dtype=torch.bool, device=DEVICE)
    mask[1, 20:] = False  # right padding
    mask[2, :5] = False  # left padding
    mask[0, 10:13] = False  # a hole: not one run of keys (the general mask path, every tile loads its mask)

    # Without a padding mask the edge tiles (the causal diagonal, the last partial key / query tile,
    # the prefix's last partial tile) load through TMA too; with one, the real keys' edges do not.
    for causal, dropout_p, kpm in ((False, 0.0, mask), (True, 0.2, None)):
        def fn(q, k, v, pk, pv):
            return ptkernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=causal,
                                              dropout_p=dropout_p, prefix_index=index, backend="triton")

        taken = tma_switch(False)
        pointer = _run(fn, (q, k, v, pk, pv))
        assert taken and all(flags == {False} for flags in taken.values())
        taken = tma_switch(True)
        tma = _run(fn, (q, k, v, pk, pv))
        assert set(taken) == _kernel_names(prefix != "none") and all(flags == {True} for flags in taken.values())
        _assert_same(tma, pointer)


@pytest.mark.parametrize("prefix", ["shared", "per_sequence"])
def test_tma_packed_sequences(tma_switch, prefix):
    """Packed sequences: one descriptor batch of total rows, each sequence at its cu_seqlens row. The
    prefix dK/dV kernel loads a sequence's last, partial query tile through TMA as well: with the
    interpreter's 16-row tiles, sequence 0's rows 16..31 are its last 3 queries and sequence 1's first
    13, which must weigh 0 (as the pointer path's zeros do), bit for bit."""
    dtype, q_heads, kv_heads, head_dim, prefix_len = torch.float16, 4, 2, 32, 18
    lens_q, lens_k = [19, 33, 5], [19, 40, 17]
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    q = rand(sum(lens_q), q_heads, head_dim)
    k, v = rand(sum(lens_k), kv_heads, head_dim), rand(sum(lens_k), kv_heads, head_dim)
    shape = (kv_heads, prefix_len, head_dim) if prefix == "shared" else (3, kv_heads, prefix_len, head_dim)
    pk, pv = rand(*shape), rand(*shape)
    cu_q = torch.tensor([0, 19, 52, 57], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 19, 59, 76], dtype=torch.int32, device=DEVICE)

    def fn(q, k, v, pk, pv):
        return ptkernels.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                                 backend="triton")

    tma_switch(False)
    pointer = _run(fn, (q, k, v, pk, pv))
    taken = tma_switch(True)
    tma = _run(fn, (q, k, v, pk, pv))
    assert set(taken) == _kernel_names(True) and all(flags == {True} for flags in taken.values())
    _assert_same(tma, pointer)


def test_tma_with_lengths_window_softcap_and_hf_layout(tma_switch):
    """Per-example prefix lengths, a causal sliding window and softcapping, with q, k and v all in
    Hugging Face's (B, S, H, D) layout viewed as (B, H, S, D)."""
    dtype, batch, q_heads, kv_heads, q_len, k_len, prefix_len, head_dim = torch.float16, 2, 4, 2, 35, 41, 21, 32
    gen = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    q = rand(batch, q_len, q_heads, head_dim).transpose(1, 2)
    k = rand(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    v = rand(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    pk, pv = rand(batch, kv_heads, prefix_len, head_dim), rand(batch, kv_heads, prefix_len, head_dim)
    lengths = torch.tensor([21, 9], dtype=torch.int32, device=DEVICE)

    def fn(q, k, v, pk, pv):
        return ptkernels.prefix_attention(q, k, v, pk, pv, causal=True, prefix_lengths=lengths, window=40,
                                          softcap=20.0, backend="triton")

    tma_switch(False)
    pointer = _run(fn, (q, k, v, pk, pv))
    taken = tma_switch(True)
    tma = _run(fn, (q, k, v, pk, pv))
    assert taken and all(flags == {True} for flags in taken.values())
    _assert_same(tma, pointer)


def test_tma_descriptor_boxes_follow_each_kernels_tiles():
    """The descriptors' boxes are the tiles each kernel loads: (1, 1, BLOCK_N, BLOCK_D) for the key
    tiles of the forward and dQ kernels, (1, 1, BLOCK_M, BLOCK_D) for the query / dO tiles of the
    dK/dV kernels, with sm_90's real (non-square) forward tiles (recorded launches, no compile)."""
    from benchmarks import aot_check

    case = aot_check.Case(torch.bfloat16, 64, causal=True, kpm=True, prefix="shared", group=2)
    launches = aot_check.case_launches(case, 90, allow_interpreted=True)
    checked = set()
    for recorded in launches:
        descs = [a for a in recorded.args if type(a).__name__ == "TensorDescriptor"]
        if not descs:
            continue
        assert recorded.kwargs["TMA"] is True
        rows = recorded.kwargs["BLOCK_M"] if "dkdv" in recorded.name else recorded.kwargs["BLOCK_N"]
        assert all(d.block_shape == [1, 1, rows, recorded.kwargs["BLOCK_D"]] for d in descs), recorded.name
        checked.add(recorded.name)
    assert checked == _kernel_names(True)
    fwd = next(x for x in launches if x.name == "_prefix_attention_fwd_kernel")
    assert fwd.kwargs["BLOCK_M"] != fwd.kwargs["BLOCK_N"]  # a swap of the two would show


def test_tma_tail_descriptors_view_the_head_dims_tail():
    """At D=96 every attention kernel (forward, dQ, dK/dV, prefix dK/dV) takes, after the first 64
    channels' descriptors, the same tensors' descriptors from channel 64 on with 32-wide boxes (the
    tail, ``launch.split_head_dim``) (recorded launches, no compile)."""
    from benchmarks import aot_check

    case = aot_check.Case(torch.bfloat16, 96, causal=True, prefix="shared", group=2)
    launches = aot_check.case_launches(case, 90, allow_interpreted=True)
    checked = set()
    for recorded in launches:
        descs = [a for a in recorded.args if type(a).__name__ == "TensorDescriptor"]
        if not descs:
            continue
        rows = recorded.kwargs["BLOCK_M"] if "dkdv" in recorded.name else recorded.kwargs["BLOCK_N"]
        assert (recorded.kwargs["BLOCK_D"], recorded.kwargs["BLOCK_D_TAIL"]) == (64, 32)
        heads = [d for d in descs if d.block_shape[-1] == 64]
        tails = [d for d in descs if d.block_shape[-1] == 32]
        tensors = 2 if "dkdv" in recorded.name else 4  # (Q, dO) or (K, V, prefix K, prefix V)
        assert len(heads) == len(tails) == tensors and len(descs) == 2 * tensors, recorded.name
        for head, tail in zip(heads, tails):
            assert tail.base.data_ptr() == head.base.data_ptr() + 64 * head.base.element_size()
            assert list(tail.shape) == list(head.shape[:-1]) + [32]
            # (a size-1 dim's stride is never stepped: tma_descriptor gives it a made-up one)
            assert [s for s, n in zip(tail.strides, tail.shape) if n > 1] == [
                s for s, n in zip(head.strides, head.shape) if n > 1]
            assert head.block_shape[:3] == [1, 1, rows] and tail.block_shape[:3] == [1, 1, rows]
        checked.add(recorded.name)
    assert checked == _kernel_names(True)


@pytest.mark.parametrize("head_dim, parts", [(8, (16, 0)), (64, (64, 0)), (65, (64, 16)), (72, (64, 16)),
                                             (80, (64, 16)), (81, (64, 32)), (96, (64, 32)), (97, (128, 0)),
                                             (128, (128, 0)), (256, (256, 0))])
def test_split_head_dim(head_dim, parts, monkeypatch):
    """64 < D <= 96: a 64-channel part and a 16- or 32-channel tail; elsewhere one padded tile, and
    everywhere with PTKERNELS_SPLIT_HEAD_DIM=0."""
    monkeypatch.delenv("PTKERNELS_SPLIT_HEAD_DIM", raising=False)
    assert launch.split_head_dim(head_dim) == parts
    monkeypatch.setenv("PTKERNELS_SPLIT_HEAD_DIM", "0")
    assert launch.split_head_dim(head_dim) == (launch.block_d(head_dim), 0)


def test_half_width_edge_tiles_through_tma_only_where_ptxas_compiles_them(monkeypatch):
    """Triton 3.6's ptxas crashed on the D = 80 / 96 / 128 forward whose half-width masked tiles load
    through TMA: there they load through pointers (D=64 compiled either way; triton 3.9's ptxas
    compiles all), and the forward launcher passes the choice to its kernel."""
    assert launch.half_width_edge_tma(128, (3, 6)) is False and launch.half_width_edge_tma(96, (3, 8)) is False
    assert launch.half_width_edge_tma(64, (3, 6)) is True and launch.half_width_edge_tma(128, (3, 9)) is True
    from benchmarks import aot_check

    for allowed in (False, True):  # (as triton 3.6 / 3.9 decide it)
        monkeypatch.setattr(forward, "half_width_edge_tma", lambda head_dim, allowed=allowed: allowed)
        case = aot_check.Case(torch.bfloat16, 128, prefix="shared", dropout=True)
        fwd = next(x for x in aot_check.case_launches(case, 90, allow_interpreted=True)
                   if x.name == "_prefix_attention_fwd_kernel")
        assert fwd.kwargs["HALF_EDGE_TMA"] is allowed


def test_tma_falls_back_to_pointer_loads(tma_switch):
    """A k whose storage starts 2 bytes past a 16-byte boundary cannot be a TMA source: the forward
    then loads through pointers (TMA off for all of its tensors: a kernel takes all descriptors or
    none), with the same result as an aligned copy."""
    dtype, head_dim = torch.float16, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 20, head_dim, generator=gen).to(DEVICE, dtype)
    storage = torch.randn(2 * 2 * 20 * head_dim + 1, generator=gen).to(DEVICE, dtype)
    k = storage[1:].view(2, 2, 20, head_dim)
    v = torch.randn(2, 2, 20, head_dim, generator=gen).to(DEVICE, dtype)
    pk = torch.randn(2, 16, head_dim, generator=gen).to(DEVICE, dtype)
    pv = torch.randn(2, 16, head_dim, generator=gen).to(DEVICE, dtype)
    taken = tma_switch(True)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, backend="triton")
    assert taken == {"_prefix_attention_fwd_kernel": {False}}
    taken = tma_switch(True)
    aligned = ptkernels.prefix_attention(q, k.clone(), v, pk, pv, backend="triton")
    assert taken == {"_prefix_attention_fwd_kernel": {True}}
    _assert_same([out], [aligned])


def test_tma_descriptor_rules():
    """tma_descriptor: a 4-D (batch, head, row, D) view or None where TMA cannot read the tensor."""
    on = DeviceLimits(232448, None, True, tma=True)
    off = DeviceLimits(232448, None, True, tma=False)
    x = torch.zeros(2, 3, 40, 64, dtype=torch.bfloat16)
    desc = tma_descriptor(x, 32, 64, limits=on)
    assert desc.shape == [2, 3, 40, 64] and desc.block_shape == [1, 1, 32, 64]
    assert tma_descriptor(x, 32, 64, limits=off) is None
    assert tma_descriptor(x, 32, 64, limits=None) is None
    # Hugging Face's (B, S, H, D) buffer viewed as (B, H, S, D): strides (S*H*D, D, H*D, 1)
    bshd = torch.zeros(2, 40, 3, 64, dtype=torch.float16).transpose(1, 2)
    assert tma_descriptor(bshd, 32, 64, limits=on).strides == [40 * 3 * 64, 64, 3 * 64, 1]
    # packed (total, H, D) -> (1, H, total, D); a shared prefix (Hkv, P, D) -> (1, Hkv, P, D)
    packed = torch.zeros(50, 3, 64, dtype=torch.float16)
    assert tma_descriptor(packed, 16, 64, varlen=True, limits=on).shape == [1, 3, 50, 64]
    assert tma_descriptor(packed, 16, 64, limits=on).shape == [1, 50, 3, 64]
    assert tma_descriptor(torch.zeros(2, 0, 64, dtype=torch.float16), 16, 64, limits=on) is None
    assert tma_descriptor(x.float(), 32, 64, limits=on) is None  # fp32 keeps pointer loads
    assert tma_descriptor(x[..., :60], 32, 64, limits=on) is not None  # row stride 128 bytes, D = 60
    assert tma_descriptor(torch.zeros(2, 3, 40, 68, dtype=torch.float16)[..., :64], 32, 64,
                          limits=on) is None  # row stride 136 bytes
    head_dim_8 = torch.zeros(2, 3, 40, 8, dtype=torch.float16)  # 16-byte rows: legal
    assert tma_descriptor(head_dim_8, 32, 16, limits=on) is not None
    assert tma_descriptor(torch.zeros(2, 3, 40, 4, dtype=torch.float16), 32, 16, limits=on) is None
    assert tma_descriptor(torch.zeros(1, 3, 40, 64, dtype=torch.float16).expand(2, 3, 40, 64), 32, 64,
                          limits=on) is None  # batch stride 0
    misaligned = torch.zeros(2 * 3 * 40 * 64 + 1, dtype=torch.float16)[1:].view(2, 3, 40, 64)
    assert tma_descriptor(misaligned, 32, 64, limits=on) is None
    # int32 coordinates: 2**31 rows of a packed tensor are out (meta tensors: no memory)
    huge = torch.empty(2**31, 1, 64, dtype=torch.float16, device="meta")
    assert tma_descriptor(huge, 16, 64, varlen=True, limits=on) is None
    assert tma_descriptor(huge[: 2**31 - 16], 16, 64, varlen=True, limits=on) is not None


def test_tma_supported_only_on_sm90_and_newer():
    assert launch.tma_supported(9, False, False, None)
    assert launch.tma_supported(10, False, False, "1")
    assert not launch.tma_supported(8, False, False, None)  # A100: cp.async
    assert not launch.tma_supported(9, True, False, None)  # ROCm
    assert not launch.tma_supported(9, False, True, None)  # the interpreter (tests ask for it explicitly)
    assert not launch.tma_supported(9, False, False, "0")  # PTKERNELS_TMA=0
    assert not launch.tma_supported(9, False, False, None, has_descriptors=False)


def test_tma_off_unless_hopper_or_asked(monkeypatch):
    """Off the GPU the limits never turn TMA on by themselves (the interpreter tests ask for it)."""
    assert launch.device_limits("cpu").tma is False
    if ON_GPU:
        major = torch.cuda.get_device_capability()[0]
        launch._cuda_device_limits.cache_clear()
        assert launch.device_limits(DEVICE).tma == (major >= 9 and not torch.version.hip)
        monkeypatch.setenv(launch.TMA_ENV, "0")
        assert launch.device_limits(DEVICE).tma is False
