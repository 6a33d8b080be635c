"""Prefix attention, forward and forward+backward, every peer of ``ptkernels bench``."""

import pytest
import torch

from ptkernels.benchmarking import cases, peers
from ptkernels.benchmarking.timing import synced

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CFG = cases.config_from_env(DEVICE)
DTYPE = cases.resolve_dtype(CFG.get("dtype", "auto"), DEVICE)
CASES = CFG.get("attention", [])


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", peers.PEER_ORDER)
@pytest.mark.parametrize("case", CASES, ids=[cases.attention_case_name(c).replace(" ", "-") for c in CASES])
def test_prefix_attention(benchmark, case, peer, mode):
    inp = peers.make_attention_inputs(case, DTYPE, DEVICE)
    fn = peers.make_attention_peers(inp, DEVICE, [peer])[peer]
    if isinstance(fn, str):
        pytest.skip(fn)
    step = fn if mode == "fwd" else peers.with_backward(fn, inp)
    benchmark.group = f"{cases.attention_case_name(case)} {mode}"
    benchmark.extra_info.update(case=case, peer=peer, mode=mode, dtype=str(DTYPE))
    step()  # warm-up (and compile, for Flex)
    benchmark(synced(step, DEVICE))
