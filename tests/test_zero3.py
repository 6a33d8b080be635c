"""What DeepSpeed ZeRO-3 needs from a patched model (issue 19), and ZeRO-3 itself where installed.

ZeRO-3 partitions every parameter across ranks: outside its module's call a parameter's data is an
empty (0,) tensor; a forward pre-hook gathers it and a hook on the module's outputs gathers it again
for backward. So the prefix / prompt encoder must be *called as a module*, once per step, and no
parameter may be read outside a module call that gathers it.

* ``test_encoder_is_called_as_a_module_once_per_forward``: a forward pre-hook on PEFT's encoder sees
  exactly one call per patched forward, on the un-expanded (1, P) indices (PEFT: (B, P)).
* ``test_patched_model_under_simulated_zero3_partitioning``: :class:`PartitionedParameters` empties
  every parameter's data outside its own module's call (with ZeRO-3's re-gather for backward); the
  patched model gives the same loss and gradients as without it (and as unpatched PEFT).
* ``test_deepspeed_zero3_matches_single_process``: real ``deepspeed.initialize`` with ZeRO stage 3
  on 2 CPU processes (gloo; DeepSpeed's CPU accelerator), a few AdamW steps, against one process on
  the combined batch. Skipped when DeepSpeed is not installed (``pip install deepspeed``; it is not
  a test dependency: it builds a C++ op on first use).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tiny_models import P, make_batch, make_model, run_ranks, trainable_grads, trainable_params

from ptkernels import patch

pytestmark = pytest.mark.filterwarnings("ignore")

ADAPTERS = ("prefix", "prefix_proj", "ptuning_mlp", "ptuning_lstm", "prompt")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_encoder_is_called_as_a_module_once_per_forward(adapter):
    ids, mask, labels = make_batch("CAUSAL_LM", batch=3, seq=5)
    model = patch(make_model("llama", "CAUSAL_LM", adapter), backend="torch")
    calls = []
    model.prompt_encoder["default"].register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert calls == [(1, P)]


class PartitionedParameters:
    """ZeRO-3's contract, in one process: each module's own parameters hold their data only inside
    that module's call (forward pre-hook: restore; forward hook: release, and wrap the outputs so
    the data is restored before backward reaches the module, as ZeRO-3's pre-backward hook does).
    Outside, ``param.data`` is an empty (0,) tensor, as a ZeRO-3 partition on a rank is.

    modules: every module whose parameters are partitioned (ZeRO-3 partitions all of them);
    keep: parameters left whole (a tied weight is a parameter of two modules).
    """

    def __init__(self, modules, keep=()):
        self.full = {}
        self.handles = []
        keep = {id(p) for p in keep}
        for module in modules:
            params = [p for p in module.parameters(recurse=False) if id(p) not in keep]
            if not params:
                continue
            for p in params:
                self.full[p] = p.data
            self.handles.append(module.register_forward_pre_hook(lambda m, args, ps=params: self._gather(ps)))
            self.handles.append(module.register_forward_hook(lambda m, args, out, ps=params: self._release(ps, out)))
        self._release(list(self.full), None)

    def _gather(self, params):
        for p in params:
            p.data = self.full[p]

    def _release(self, params, out):
        if out is not None:
            out = _RegatherForBackward.wrap(out, lambda: self._gather(params))
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        return out

    def gather_all(self):
        self._gather(list(self.full))


class _RegatherForBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gather, *tensors):
        ctx.gather = gather
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.gather()
        return (None, *grads)

    @classmethod
    def wrap(cls, out, gather):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            return cls.apply(gather, out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].requires_grad:
            return (cls.apply(gather, out[0]), *out[1:])  # LSTM: (output, (h, c))
        return out


@pytest.mark.parametrize("adapter", ["prefix_proj", "ptuning_lstm"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patched_model_under_simulated_zero3_partitioning(arch, adapter):
    ids, mask, labels = make_batch("CAUSAL_LM", batch=3, seq=5, pad=False)
    reference = make_model(arch, "CAUSAL_LM", adapter).double().train()
    ref_loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_loss.backward()
    model = patch(make_model(arch, "CAUSAL_LM", adapter).double().train(), backend="torch")
    encoder = model.prompt_encoder["default"]
    # the patched P-tuning path reads the word-embedding weight itself (the fused prompt embedding);
    # ZeRO-3 gathers such a read inside a forward by itself (its external-parameter hook), so that
    # weight is left whole here (GPT-2's LM head shares it); every other parameter is partitioned
    keep = [model.word_embeddings.weight] if adapter.startswith("ptuning") else []
    partitioned = PartitionedParameters(list(model.modules()), keep=keep)
    try:
        assert encoder.embedding.weight.numel() == 0  # really partitioned outside the call
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert encoder.embedding.weight.numel() == 0
        loss.backward()
    finally:
        partitioned.gather_all()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)  # transformers' loss is float32
    grads, ref_grads = trainable_grads(model), trainable_grads(reference)
    assert grads.keys() == ref_grads.keys() and any("prompt_encoder" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-7, rtol=1e-6, msg=lambda m: f"{name}: {m}")
        assert ref_grads[name].abs().max() > 0, name


# ---------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 itself (2 CPU processes), where installed
# ---------------------------------------------------------------------------------------------------

STEPS = 3
PER_RANK = 2
ZERO3_CASES = {"llama_prefix_proj": ("llama", "prefix_proj"), "gpt2_ptuning": ("gpt2", "ptuning_mlp")}
DS_CONFIG = {  # the README's ZeRO-3 config, with the optimizer spelled out for a CPU run
    "train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
}


def _zero3_worker(rank, world, init_file, out_dir):
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for case, (arch, adapter) in ZERO3_CASES.items():
        model = patch(make_model(arch, "CAUSAL_LM", adapter), backend="torch").train()
        engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        weight = model.prompt_encoder["default"].embedding.weight
        partitioned = weight.numel() == 0 and tuple(weight.ds_shape) != (0,)
        ids, mask, labels = (t[rank * PER_RANK:(rank + 1) * PER_RANK] for t in _zero3_batch())
        losses = []
        for _ in range(STEPS):
            loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        params = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                with deepspeed.zero.GatheredParameters([p]):
                    params[name] = p.detach().clone()
        results[case] = dict(losses=losses, params=params, partitioned=partitioned)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _zero3_batch():
    return make_batch("CAUSAL_LM", batch=2 * PER_RANK, seq=6, pad=False, seed=5)


def test_deepspeed_zero3_matches_single_process(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = run_ranks(_zero3_worker, tmp_path, world=2, timeout_s=300)
    ids, mask, labels = _zero3_batch()
    for case, (arch, adapter) in ZERO3_CASES.items():
        reference = make_model(arch, "CAUSAL_LM", adapter).train()  # unpatched PEFT, one process, whole batch
        start = trainable_params(reference)
        opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
        ref_losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            ref_losses.append(loss.item())
        ref_params = trainable_params(reference)
        for r, rank in enumerate(ranks):
            got = rank[case]
            assert got["partitioned"], (case, r)
            mean = [(a + b) / 2 for a, b in zip(ranks[0][case]["losses"], ranks[1][case]["losses"])]
            assert mean == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), case
            for name in ref_params:
                # float32 and AdamW: an entry with a near-zero gradient may move by a few 1e-6 differently
                torch.testing.assert_close(got["params"][name], ref_params[name], atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"{case} rank {r} {name}: {m}")
                assert (ref_params[name] - start[name]).abs().max() > 1e-3, (case, name)  # it trained


def test_partitioned_parameters_catch_a_read_outside_the_call():
    """The simulation above is strict: reading a partitioned weight outside its module fails."""
    encoder = nn.Linear(4, 4)
    partitioned = PartitionedParameters([encoder])
    try:
        with pytest.raises(RuntimeError):
            torch.nn.functional.linear(torch.randn(2, 4), encoder.weight)
        assert encoder(torch.randn(2, 4)).shape == (2, 4)
    finally:
        partitioned.gather_all()
