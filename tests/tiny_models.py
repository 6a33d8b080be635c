"""Tiny HF models with PEFT prompt-learning adapters, shared by the model-level hardening tests
(test_hardening_models.py, test_distributed.py, test_fsdp.py, test_trainer.py), and the launcher
of their CPU process groups (:func:`run_ranks`). Not a test module.

Everything is built from configs with fixed seeds (no download). Dropout is off unless asked for,
so two builds with the same seed give the same parameters and, in train mode, the same outputs.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model  # noqa: E402
from ptkernels.testing import (  # noqa: E402,F401  (the oracles, re-exported for the tests)
    greedy_by_full_forwards,
    peft_needs_oracle_shim,
    with_peft_oracle_shim,
    without_peft_oracle_shim,
)
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
)

VOCAB = 61
P = 3  # virtual tokens
NUM_LABELS = 3
MAX_POSITIONS = 32


def make_config(arch: str, *, dropout: float = 0.0, attn_dropout: float = 0.0):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                  max_position_embeddings=MAX_POSITIONS, pad_token_id=0)
    if arch == "bert":
        return BertConfig(**common, hidden_dropout_prob=dropout, attention_probs_dropout_prob=attn_dropout)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=attn_dropout,
                          pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    if arch == "llama":  # GQA: 4 query heads, 2 key/value heads, head dim 8
        return LlamaConfig(**common, num_key_value_heads=2, attention_dropout=attn_dropout)
    raise ValueError(arch)


_AUTO = {"SEQ_CLS": AutoModelForSequenceClassification, "CAUSAL_LM": AutoModelForCausalLM, "FEATURE_EXTRACTION": AutoModel}


def make_base(arch: str, task: str, *, seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    config = make_config(arch, **config_kwargs)
    if task == "SEQ_CLS":
        config.num_labels = NUM_LABELS
        config.problem_type = "single_label_classification"
    return _AUTO[task].from_config(config, attn_implementation="sdpa")


def make_peft_config(adapter: str, task: str, num_virtual_tokens: int = P):
    """PEFT config for adapter in ("prefix", "prefix_proj", "ptuning_mlp", "ptuning_lstm", "prompt")."""
    task_type = getattr(TaskType, task)
    if adapter == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    if adapter == "prefix_proj":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens, prefix_projection=True,
                                  encoder_hidden_size=24)
    if adapter in ("ptuning_mlp", "ptuning_lstm"):
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=24,
                                   encoder_reparameterization_type="MLP" if adapter == "ptuning_mlp" else "LSTM")
    if adapter == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    raise ValueError(adapter)


def make_model(arch: str, task: str, adapter: str, *, seed: int = 0, **config_kwargs):
    base = make_base(arch, task, seed=seed, **config_kwargs)
    torch.manual_seed(seed + 1)
    return with_peft_oracle_shim(get_peft_model(base, make_peft_config(adapter, task)))


def make_batch(task: str, *, batch: int = 2, seq: int = 6, pad: bool = True, seed: int = 1):
    """(input_ids, attention_mask, labels); with ``pad`` the last example is right-padded to half length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB - 1, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[-1, seq // 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    if task == "SEQ_CLS":
        labels = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def trainable_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def trainable_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def real_outputs(out, mask, task: str, adapter: str):
    """The model outputs of the real tokens (logits of real tokens; sequence logits for SEQ_CLS)."""
    if task == "SEQ_CLS":
        return out.logits
    logits = out.logits
    if adapter not in ("prefix", "prefix_proj"):  # prompt tuning: the virtual tokens are in the output
        logits = logits[:, P:]
    return logits[mask.bool()]



def _rank_main(rank, worker, dump_after_s, *args):
    """A rank's entry point: if it is still running after ``dump_after_s``, faulthandler prints every
    thread's Python stack to stderr (so a hang shows where it is), then ``worker(rank, *args)``.

    A rank whose worker returned (its results saved, its process group destroyed) leaves through
    ``os._exit(0)``, skipping the interpreter's and C++'s teardown: once in a CI run (2026-12-02) a
    rank of the FSDP test aborted there ("terminate called without an active exception", SIGABRT,
    a native thread still joinable at exit) after finishing its work and saving it, and the spawn
    context failed the whole module for it. A worker that raises still fails its rank with the
    traceback, as before."""
    import faulthandler

    faulthandler.dump_traceback_later(dump_after_s, exit=False)
    try:
        worker(rank, *args)
    finally:
        faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, tmp_path, *, world: int = 2, timeout_s: float = 240, attempts: int = 2) -> list:
    """Run ``worker(rank, world, init_file, out_dir)`` in ``world`` CPU processes and return what each
    rank saved to ``out_dir/rank{r}.pt`` (``torch.save``), in rank order.

    The worker joins a gloo group through ``init_file`` (``init_method=f"file://{init_file}"``: no
    ports, no torchrun). spawn: forked ranks (a fork of this multi-threaded pytest process) sometimes
    hung until the timeout (2 ranks past 240 s, once in a local CI run and once in a run of the three
    distributed test files), while spawned ranks start in seconds; fork only on request
    (PTKERNELS_TEST_START_METHOD=fork, and never once CUDA is initialised here: CUDA does not survive
    a fork). A failing rank raises here with its traceback. Ranks still running after ``timeout_s``
    print their stacks (faulthandler) and are killed; that is retried once with a fresh rendezvous
    (``attempts``), because spawned gloo ranks also hung, rarely (the DDP test, which takes about 10 s,
    past 240 s in one of three CI runs), in a way no rank's error explains; a second timeout fails.
    """
    import torch.multiprocessing as mp

    method = "spawn"
    if (os.environ.get("PTKERNELS_TEST_START_METHOD") == "fork" and not torch.cuda.is_initialized()
            and "fork" in multiprocessing.get_all_start_methods()):
        method = "fork"
    for attempt in range(attempts):
        init_file = str(tmp_path / f"rendezvous{attempt}")
        ctx = mp.start_processes(_rank_main, args=(worker, max(timeout_s - 10, 1), world, init_file, str(tmp_path)),
                                 nprocs=world, join=False, start_method=method)
        deadline = time.monotonic() + timeout_s
        finished = True
        while not ctx.join(timeout=1):  # raises if a rank failed, with its traceback
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                finished = False
                break
        if finished:
            break
        warnings.warn(f"run_ranks: {world} ranks did not finish in {timeout_s} s (attempt {attempt + 1} of "
                      f"{attempts}; their stacks are on stderr)")
    else:
        pytest.fail(f"{world} ranks did not finish in {timeout_s} s, {attempts} times")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
