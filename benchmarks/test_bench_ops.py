"""The op rows of ``ptkernels bench`` under pytest-benchmark: ``pytest benchmarks/`` (not part of the
test suite). Prefix attention and prompt embedding, forward and forward+backward, every peer."""

import pytest
import torch

from benchmarks.ops import peers
from benchmarks.ops import registry as cases
from benchmarks.timing import synced

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CFG = cases.config_from_env(DEVICE)
DTYPE = cases.resolve_dtype(CFG.get("dtype", "auto"), DEVICE)
ATTENTION = CFG.get("attention", [])
EMBEDDING = CFG.get("prompt_embedding", [])


def _bench(benchmark, fn, group, **info):
    if isinstance(fn, str):
        pytest.skip(fn)
    benchmark.group = group
    benchmark.extra_info.update(dtype=str(DTYPE), **info)
    fn()  # warm-up (and compile, for Flex)
    benchmark(synced(fn, DEVICE))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", peers.PEER_ORDER)
@pytest.mark.parametrize("case", ATTENTION, ids=[cases.attention_case_name(c).replace(" ", "-") for c in ATTENTION])
def test_prefix_attention(benchmark, case, peer, mode):
    inp = peers.make_attention_inputs(case, DTYPE, DEVICE)
    fn = peers.make_attention_peers(inp, DEVICE, [peer])[peer]
    if not isinstance(fn, str) and mode != "fwd":
        fn = peers.with_backward(fn, inp)
    _bench(benchmark, fn, f"{cases.attention_case_name(case)} {mode}", case=case, peer=peer, mode=mode)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", peers.EMBEDDING_PEER_ORDER)
@pytest.mark.parametrize("case", EMBEDDING, ids=[cases.embedding_case_name(c).replace(" ", "-") for c in EMBEDDING])
def test_prompt_embedding(benchmark, case, peer, mode):
    fns, backward = peers.make_embedding_peers(case, DTYPE, DEVICE)
    fn = fns[peer]
    if not isinstance(fn, str) and mode != "fwd":
        fn = backward(fn)
    _bench(benchmark, fn, f"{cases.embedding_case_name(case)} {mode}", case=case, peer=peer, mode=mode)
