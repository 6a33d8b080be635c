"""Prompt embedding: fused prompt_embedding vs torch.cat([prompt.expand(B,-1,-1), F.embedding(ids, weight)], 1)."""

import pytest
import torch

from ptkernels.benchmarking import cases, env, peers
from ptkernels.benchmarking.timing import synced

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CFG = cases.config_from_env(DEVICE)
DTYPE = cases.resolve_dtype(CFG.get("dtype", "auto"), DEVICE)
CASES = CFG.get("prompt_embedding", [])


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", peers.EMBEDDING_PEER_ORDER)
@pytest.mark.parametrize("case", CASES, ids=[cases.embedding_case_name(c).replace(" ", "-") for c in CASES])
def test_prompt_embedding(benchmark, case, peer, mode):
    mod, why = env.prompt_embedding_module()
    if mod is None:
        pytest.skip(why)
    fns, backward = peers.make_embedding_peers(case, DTYPE, DEVICE)
    fn = fns[peer]
    if isinstance(fn, str):
        pytest.skip(fn)
    step = fn if mode == "fwd" else backward(fn)
    benchmark.group = f"{cases.embedding_case_name(case)} {mode}"
    benchmark.extra_info.update(case=case, peer=peer, mode=mode, dtype=str(DTYPE))
    step()
    benchmark(synced(step, DEVICE))
