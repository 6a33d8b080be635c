"""Patched PEFT prompt-learning models under FSDP2 (issue 19): 2 CPU processes, gloo, file://
rendezvous, backend "torch".

``torch.distributed.fsdp.fully_shard`` on every decoder layer, on the prefix / prompt encoder and on
the root, as a 70B run would shard it. Each rank trains on half of the batch for a few AdamW steps in
float64; the trainable parameters (gathered with ``full_tensor()``) must equal one process on the
combined batch: the patched model there, which must itself equal the unpatched PEFT model (the
reference). The same with activation checkpointing (transformers' non-reentrant checkpointing,
which PEFT refuses for prefix tuning). A forward pre-hook on the encoder checks that the patched
model calls it as a module, once per step, on the un-expanded (1, P) indices, with its parameters
unsharded by FSDP2's own pre-forward hook at that moment.

Then the HF ``Trainer`` with ``fsdp`` / ``fsdp_config={"fsdp_version": 2}`` (accelerate's FSDP2
path: ``fully_shard`` per ``LlamaDecoderLayer`` and on the root) on a patched model, 2 processes,
against the single-process Trainer on the unpatched PEFT model with twice the per-device batch.
accelerate 1.15 never selects FSDP for CPU processes (``AcceleratorState`` enables its FSDP plugin
only for GPU-like distributed types, and with ``use_cpu=True`` silently falls back to DDP), so the
ranks flip that one switch (:func:`_accelerate_fsdp_on_cpu`); everything after it is the Trainer's and
accelerate's own FSDP2 code.

FSDP2 on CPU / gloo needed nothing else: frozen and trainable parameters may share a ``fully_shard``
group (each parameter is its own DTensor; frozen ones get no gradient and no reduce-scatter).
"""

from __future__ import annotations

import os

import pytest
import torch

from tiny_models import P, make_batch, make_model, run_ranks, trainable_params

import ptkernels.integrations.transformers as ptk_tf
from ptkernels import patch

pytestmark = pytest.mark.filterwarnings("ignore")

WORLD = 2
PER_RANK = 2
STEPS = 3
LR = 1e-2
TIMEOUT_S = 300
CASES = {
    # name: (arch, task, adapter, padded batch, activation checkpointing)
    "llama_causal_prefix_proj": ("llama", "CAUSAL_LM", "prefix_proj", False, False),
    "llama_causal_prefix_proj_checkpointing": ("llama", "CAUSAL_LM", "prefix_proj", False, True),
    "bert_seqcls_prefix": ("bert", "SEQ_CLS", "prefix", True, False),
    "gpt2_causal_ptuning": ("gpt2", "CAUSAL_LM", "ptuning_mlp", False, False),  # the fused prompt_embedding path
}
TRAINER_TASK, TRAINER_LAYER = "CAUSAL_LM", "LlamaDecoderLayer"
TRAINER_CASES = {
    # name: (arch, adapter). accelerate's auto-wrap also shards the word embedding in its own group, so
    # P-tuning's fused embedding sees a DTensor shard there and looks the tokens up through the module.
    "llama_prefix_proj": ("llama", "prefix_proj"),
    "llama_ptuning": ("llama", "ptuning_mlp"),
}


def _batch(case):
    arch, task, adapter, pad, _ = CASES[case]
    return make_batch(task, batch=WORLD * PER_RANK, seq=6, pad=pad, seed=5)


def _model(case):
    """The float64 model of a case, patched unless ``case`` names the unpatched reference."""
    arch, task, adapter, _, checkpointing = CASES[case]
    model = make_model(arch, task, adapter).double().train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _adamw(model, forward, ids, mask, labels):
    """STEPS of AdamW; returns the per-step losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _decoder_layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _shard(model):
    """fully_shard each decoder layer, the prompt / prefix encoder, then the root."""
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    assert len(layers) == model.get_base_model().config.num_hidden_layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model.prompt_encoder["default"])
    fully_shard(model)


def _watch_encoder(encoder, calls):
    """Forward pre-hook (registered after FSDP2's, so it runs after the unshard): record the input
    shape and whether every parameter is a plain, full-size tensor at that moment."""
    from torch.distributed.tensor import DTensor

    full_shapes = {n: p.shape for n, p in encoder.named_parameters()}  # DTensor shapes are the global ones

    def hook(module, args):
        params = dict(module.named_parameters())
        unsharded = all(not isinstance(p, DTensor) and p.shape == full_shapes[n] for n, p in params.items())
        calls.append((tuple(args[0].shape), unsharded, len(params) == len(full_shapes)))

    encoder.register_forward_pre_hook(hook)


def _full_params(model) -> dict:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _accelerate_fsdp_on_cpu():
    """Let accelerate take its FSDP path in CPU processes: after ``AcceleratorState.__init__`` picked
    MULTI_CPU, do what it does for GPU types when given an FSDP plugin (accelerate 1.15, state.py)."""
    from accelerate.state import AcceleratorState, DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # the state is shared; later AcceleratorState() calls (no plugin) would reset the type
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init_with_fsdp


def _trainer(model, output_dir, batch_size, **extra):
    from transformers import Trainer, TrainingArguments

    from test_trainer import TinyDataset

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=batch_size, learning_rate=LR,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TinyDataset(TRAINER_TASK))
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        attention_calls = []
        real = ptk_tf.prefix_attention
        ptk_tf.prefix_attention = lambda *a, **k: attention_calls.append(1) or real(*a, **k)
        results = {}
        for case in CASES:
            model = patch(_model(case), backend="torch")
            _shard(model)
            calls = []
            _watch_encoder(model.prompt_encoder["default"], calls)
            ids, mask, labels = (t[rank * PER_RANK:(rank + 1) * PER_RANK] for t in _batch(case))
            attention_calls.clear()
            losses = _adamw(model, model, ids, mask, labels)
            results[case] = dict(losses=losses, params=_full_params(model), encoder_calls=calls,
                                 attention_calls=len(attention_calls))

        # the HF Trainer with accelerate's FSDP2 plugin (float64 models, as above); the Trainer
        # reads the launcher's environment (the group itself is already up)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        _accelerate_fsdp_on_cpu()
        for case, (arch, adapter) in TRAINER_CASES.items():
            model = patch(make_model(arch, TRAINER_TASK, adapter).double(), backend="torch")
            trainer, losses = _trainer(model, f"{out_dir}/{case}", PER_RANK, fsdp="full_shard auto_wrap",
                                       fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": [TRAINER_LAYER]})
            wrapped = [type(m).__name__ for m in trainer.model.modules() if type(m).__name__.startswith("FSDP")]
            results[case] = dict(losses=losses, params=_full_params(trainer.model), wrapped=wrapped,
                                 distributed_type=str(trainer.accelerator.distributed_type),
                                 sharded=all(isinstance(p, DTensor) for p in trainer.model.parameters()))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("fsdp"), world=WORLD, timeout_s=TIMEOUT_S)


def _assert_close(got, want, what):
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_matches_single_process_on_combined_batch(ranks, case):
    arch, task, adapter, _, checkpointing = CASES[case]
    ids, mask, labels = _batch(case)
    reference = make_model(arch, task, adapter).double().train()  # unpatched PEFT, no checkpointing (it refuses)
    ref_losses = _adamw(reference, reference, ids, mask, labels)
    ref_params = trainable_params(reference)
    single = patch(_model(case), backend="torch")
    one_losses = _adamw(single, single, ids, mask, labels)
    one_params = trainable_params(single)
    start = trainable_params(make_model(arch, task, adapter).double())

    assert ref_params and any("prompt_encoder" in n for n in ref_params), case
    torch.testing.assert_close(one_losses, ref_losses, atol=1e-12, rtol=1e-12)
    for name in ref_params:
        _assert_close(one_params[name], ref_params[name], f"{case}: single-process patched {name}")
        # it trained: every encoder parameter moved by far more than the tolerance
        assert (ref_params[name] - start[name]).abs().max() > 1e-4, (case, name)
    for r, rank in enumerate(ranks):
        got = rank[case]
        assert got["params"].keys() == ref_params.keys(), (case, r)
        for name in ref_params:
            _assert_close(got["params"][name], ref_params[name], f"{case} rank {r}: {name} after {STEPS} AdamW steps")
    for name in ref_params:  # the ranks ran different halves, yet hold identical parameters
        assert torch.equal(ranks[0][case]["params"][name], ranks[1][case]["params"][name]), (case, name)
    assert not torch.equal(ranks[0][case]["losses"], ranks[1][case]["losses"]), case  # the halves differ
    # (transformers computes the causal-LM loss on float32 logits, so the losses carry float32 rounding)
    torch.testing.assert_close((ranks[0][case]["losses"] + ranks[1][case]["losses"]) / 2, ref_losses,
                               atol=1e-6, rtol=1e-6)

    layers = single.get_base_model().config.num_hidden_layers
    for r, rank in enumerate(ranks):
        # the encoder ran as a module call, once per step, on (1, P) indices, with its parameters
        # unsharded by FSDP2's pre-forward hook
        assert rank[case]["encoder_calls"] == [((1, P), True, True)] * STEPS, (case, r, rank[case]["encoder_calls"])
        # attention went through ptkernels, and with checkpointing it was recomputed in backward
        assert rank[case]["attention_calls"] == STEPS * layers * (2 if checkpointing else 1), (case, r)


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_hf_trainer_fsdp2_matches_single_process_peft(ranks, case, tmp_path):
    arch, adapter = TRAINER_CASES[case]
    reference = make_model(arch, TRAINER_TASK, adapter).double()
    start = trainable_params(reference)
    _, ref_losses = _trainer(reference, tmp_path, WORLD * PER_RANK)  # one process, the combined batch
    ref_params = trainable_params(reference)
    for r, rank in enumerate(ranks):
        got = rank[case]
        assert got["distributed_type"] == "DistributedType.FSDP" and got["sharded"], (r, got["distributed_type"])
        assert got["wrapped"].count(f"FSDP{TRAINER_LAYER}") == 2 and got["wrapped"][0].startswith("FSDPPeftModel")
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), r
        for name in ref_params:
            _assert_close(got["params"][name], ref_params[name], f"Trainer {case} rank {r}: {name}")
            assert torch.equal(got["params"][name], ranks[0][case]["params"][name]), (r, name)
    assert all((ref_params[n] - start[n]).abs().max() > 1e-4 for n in start)  # it trained
