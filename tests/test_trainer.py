"""The Hugging Face ``Trainer`` on a patched PEFT prompt-learning model (issue 6): a few steps on a
tiny in-memory dataset, CPU, no saving, no reporting.

The patched run is compared with the same Trainer run on the same model unpatched (PEFT's own
path): same per-step losses, same trained parameters. Covered: prefix tuning with gradient
accumulation (the Trainer passes ``num_items_in_batch`` through the model's ``**kwargs``), prefix
tuning with the Trainer's gradient checkpointing (which PEFT refuses for prefix tuning, so the
reference runs without it), and P-Tuning on a classifier; then ``Trainer.evaluate``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tiny_models import make_batch, make_model, trainable_params

import ptkernels.integrations.transformers as ptk_tf
from ptkernels import patch
from ptkernels.integrations import is_patched

pytestmark = pytest.mark.filterwarnings("ignore")


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, task, size=8):
        self.ids, self.mask, self.labels = make_batch(task, batch=size, seq=6, seed=2)
        self.mask[1::3, 4:] = 0  # a few more padded rows
        self.ids = self.ids.masked_fill(self.mask == 0, 0)
        if task != "SEQ_CLS":
            self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


CASES = {
    # name: (arch, task, adapter, extra TrainingArguments)
    "gpt2_prefix_grad_accumulation": ("gpt2", "CAUSAL_LM", "prefix", dict(gradient_accumulation_steps=2)),
    "llama_prefix_proj_gradient_checkpointing": ("llama", "CAUSAL_LM", "prefix_proj", dict(gradient_checkpointing=True)),
    "bert_ptuning_seq_cls": ("bert", "SEQ_CLS", "ptuning_mlp", {}),
}


def _train(model, task, output_dir, **extra):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TinyDataset(task), eval_dataset=TinyDataset(task, size=5))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_runs_patched_model_like_unpatched(case, tmp_path, monkeypatch):
    arch, task, adapter, extra = CASES[case]
    reference = make_model(arch, task, adapter)
    start = trainable_params(reference)
    ref_extra = {k: v for k, v in extra.items() if k != "gradient_checkpointing"}
    ref_losses, ref_trainer = _train(reference, task, tmp_path / "ref", **ref_extra)

    model = patch(make_model(arch, task, adapter), backend="torch")
    calls = []
    real = ptk_tf.prefix_attention
    monkeypatch.setattr(ptk_tf, "prefix_attention", lambda *a, **k: calls.append(a[3] is not None) or real(*a, **k))
    losses, trainer = _train(model, task, tmp_path / "patched", **extra)

    assert trainer.state.global_step == 3 and len(losses) == 3
    assert all(math.isfinite(x) for x in losses)
    assert trainer.model is model and is_patched(model)
    assert calls and all(calls) == adapter.startswith("prefix")  # attention ran through ptkernels
    if extra.get("gradient_checkpointing"):
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    after, ref_after = trainable_params(model), trainable_params(reference)
    changed = [n for n in start if "prompt_encoder" in n and not torch.equal(after[n], start[n])]
    assert changed and len(changed) == sum("prompt_encoder" in n for n in start)  # every encoder param moved
    for name in start:
        torch.testing.assert_close(after[name], ref_after[name], atol=1e-5, rtol=1e-4)

    # evaluation / prediction through the Trainer (no_grad, eval mode, padded batches) after training
    got_eval, ref_eval = trainer.evaluate()["eval_loss"], ref_trainer.evaluate()["eval_loss"]
    assert math.isfinite(got_eval) and got_eval == pytest.approx(ref_eval, rel=1e-5, abs=1e-5)
