"""Patched PEFT prefix-tuning (and P-Tuning) models under torch DistributedDataParallel (issue 6):
2 CPU processes, gloo, file:// rendezvous (no torchrun, no ports), backend "torch".

Each rank runs half of the batch; after one backward DDP's averaged gradients of every trainable
parameter must equal the gradients of ONE process on the combined batch: of the unpatched PEFT
model (the reference) and of the patched model. The ranks then take a few SGD steps and must stay
in sync with each other and with the single-process run.

The loss is a mean over equally sized halves (sequence classification: one loss per example;
causal LM: no padding, so each half has the same number of tokens), so the mean of the two rank
losses is the loss of the combined batch and the averaged gradient is its gradient.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_batch, make_model, run_ranks, trainable_grads, trainable_params

from ptkernels import patch

pytestmark = pytest.mark.filterwarnings("ignore")

WORLD = 2
PER_RANK = 2
STEPS = 3
LR = 0.5
TIMEOUT_S = 150  # the test takes about 10 s
CASES = {
    # name: (arch, task, adapter, padded batch)
    "bert_seqcls_prefix_proj": ("bert", "SEQ_CLS", "prefix_proj", True),
    "llama_causal_prefix": ("llama", "CAUSAL_LM", "prefix", False),
    "gpt2_causal_ptuning": ("gpt2", "CAUSAL_LM", "ptuning_mlp", False),  # the fused prompt_embedding path
}


def _batch(case):
    arch, task, adapter, pad = CASES[case]
    return make_batch(task, batch=WORLD * PER_RANK, seq=6, pad=pad, seed=5)


def _train(model, forward, ids, mask, labels):
    """STEPS of SGD; returns (per-step losses, gradients of the first backward, final parameters)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, first = [], None
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if first is None:
            first = trainable_grads(model)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), first, trainable_params(model)


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for case, (arch, task, adapter, _) in CASES.items():
            model = patch(make_model(arch, task, adapter), backend="torch").train()
            ddp = DistributedDataParallel(model)
            ids, mask, labels = (t[rank * PER_RANK:(rank + 1) * PER_RANK] for t in _batch(case))
            results[case] = _train(model, ddp, ids, mask, labels)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_close(got, want, what):
    """atol 1e-5, tightened for tensors whose entries are small (the prefix gradients of a tiny
    classifier are ~1e-5 themselves): at most 1e-3 of the largest reference entry."""
    atol = min(1e-5, 1e-3 * want.abs().max().item()) + 1e-12
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def test_ddp_matches_single_process_on_combined_batch(tmp_path):
    ranks = run_ranks(_worker, tmp_path, world=WORLD, timeout_s=TIMEOUT_S)
    for case, (arch, task, adapter, _) in CASES.items():
        ids, mask, labels = _batch(case)
        unpatched = make_model(arch, task, adapter).train()
        ref_losses, ref_grads, ref_params = _train(unpatched, unpatched, ids, mask, labels)
        single = patch(make_model(arch, task, adapter), backend="torch").train()
        one_losses, one_grads, one_params = _train(single, single, ids, mask, labels)

        assert ref_grads and any("prompt_encoder" in n for n in ref_grads), case
        for r, (losses, grads, params) in enumerate(rank[case] for rank in ranks):
            assert grads.keys() == ref_grads.keys(), (case, r)
            for name in ref_grads:
                # DDP's all-reduced gradient == one process on the whole batch (unpatched and patched)
                _assert_close(grads[name], ref_grads[name], f"{case} rank {r} grad {name}")
                _assert_close(grads[name], one_grads[name], f"{case} rank {r} grad {name} vs patched single process")
            for name in ref_params:
                _assert_close(params[name], ref_params[name], f"{case} rank {r} param {name} after {STEPS} steps")
        for name in ref_params:
            _assert_close(one_params[name], ref_params[name], f"{case} single-process patched param {name}")
        # the ranks ran different halves, yet hold bit-identical parameters
        for name in ref_params:
            assert torch.equal(ranks[0][case][2][name], ranks[1][case][2][name]), (case, name)
        assert not torch.equal(ranks[0][case][0], ranks[1][case][0]), case  # the halves really differ
        mean_losses = (ranks[0][case][0] + ranks[1][case][0]) / 2
        torch.testing.assert_close(mean_losses, ref_losses, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one_losses, ref_losses, atol=1e-5, rtol=1e-5)
        start = trainable_params(make_model(arch, task, adapter))
        assert all(not torch.equal(ref_params[n], start[n]) for n in start if "prompt_encoder" in n), case  # it trained
