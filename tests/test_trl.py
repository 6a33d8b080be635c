"""TRL: SFTTrainer(padding_free=True) trains a patched prefix-tuned model with the loss of the padded run.

Runs examples/trl/sft_padding_free.py's ``train`` (tiny random Llama, CPU). One batch holds the
whole dataset, so both runs see the same examples at every step whatever the sampler's order:
* padding-free + ptkernels against padded + ptkernels: the same loss at every step;
* the first step's loss against the UNPATCHED PEFT model on the padded batch (same initial
  parameters), computed directly: TRL's padding-free loss is PEFT's per-sequence loss.
Skipped when trl (or datasets) is not installed.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")

pytestmark = pytest.mark.filterwarnings("ignore")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "trl" / "sft_padding_free.py"


def load_example():
    spec = importlib.util.spec_from_file_location("sft_padding_free", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_padding_free_equals_padded_and_unpatched_peft(tmp_path):
    ex = load_example()
    tokenizer, dataset = ex.tiny_tokenizer(), ex.tiny_dataset(num=8)
    steps, batch = 3, len(dataset)
    packed, packed_trainer = ex.train(ex.tiny_model(), dataset, tokenizer, padding_free=True, steps=steps,
                                      out_dir=str(tmp_path / "packed"), batch_size=batch)
    padded, padded_trainer = ex.train(ex.tiny_model(), dataset, tokenizer, padding_free=False, steps=steps,
                                      out_dir=str(tmp_path / "padded"), batch_size=batch)
    assert len(packed) == len(padded) == steps
    packed_batch = next(iter(packed_trainer.get_train_dataloader()))
    assert packed_batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in packed_batch  # really padding-free
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), rtol=2e-6, atol=0)
    assert packed[-1] != packed[0]  # it trained

    # step 1 against unpatched PEFT on the padded batch, with the same initial parameters
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from ptkernels.testing import with_peft_oracle_shim

    base = ex.tiny_model()
    torch.manual_seed(0)  # as train() does before get_peft_model
    peft_model = with_peft_oracle_shim(get_peft_model(base, PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)))
    padded_batch = next(iter(padded_trainer.get_train_dataloader()))
    assert padded_batch["input_ids"].shape[0] == batch
    with torch.no_grad():
        loss = peft_model(input_ids=padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"],
                          labels=padded_batch["labels"]).loss
    torch.testing.assert_close(torch.tensor(packed[0]), loss, rtol=2e-6, atol=0)
