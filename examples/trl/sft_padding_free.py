"""Padding-free (packed) SFT of a prefix-tuned model with TRL's SFTTrainer and ptkernels.

    python examples/trl/sft_padding_free.py                       # tiny random Llama, CPU, a few steps
    python examples/trl/sft_padding_free.py --compare             # and the same steps on padded batches
    python examples/trl/sft_padding_free.py --model Qwen/Qwen2.5-0.5B --steps 100   # a real model

``SFTConfig(padding_free=True)`` makes TRL's collator concatenate the batch into one row with
position ids restarting at 0 per sequence and the flash-attention keywords ``cu_seq_lens_q/k``,
``max_length_q/k``. Unpatched PEFT would put the prefix in front of the first sequence of that row
only (silently changing all the others); after ``ptkernels.patch(model)`` every packed sequence
attends to the prefix as if it were alone, so the loss is the loss of the padded run, without the
padding's compute. (TRL only needs flash-attention for padding-free training when the model runs
its own attention; a patched model runs ptkernels' varlen attention instead.)
"""

from __future__ import annotations

import argparse

import torch


def tiny_tokenizer(vocab_size: int = 64):
    """A word-level tokenizer over the words "w0" .. "w{V-3}" plus <pad> and <eos> (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model(vocab_size: int = 64, seed: int = 0, dtype=torch.float32):
    """A randomly initialised Llama-shaped causal LM (GQA), small enough for a CPU test."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)


def tiny_dataset(num: int = 16, vocab_size: int = 64, seed: int = 0):
    """Pre-tokenised examples of lengths 3..24 (TRL uses "input_ids" columns as they are)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 25, (num,), generator=g).tolist()
    rows = [torch.randint(2, vocab_size, (n,), generator=g).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": rows})


def train(model, dataset, tokenizer, *, padding_free: bool, steps: int, out_dir: str, batch_size: int = 4,
          lr: float = 1e-2, seed: int = 0, num_virtual_tokens: int = 4):
    """SFTTrainer on ``model`` with a fresh PEFT prefix-tuning adapter, patched by ``ptkernels.patch``
    (backend "auto": Triton on CUDA, PyTorch on CPU); returns (per-step losses, trainer).

    padding_free=False gives the padded baseline (the patched model computes what PEFT computes on
    padded batches; unpatched PEFT 0.21.2 prefix tuning does not run under TRL 1.16's fused-LM-head
    loss on transformers 5.24)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from trl import SFTConfig, SFTTrainer

    import ptkernels

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                          num_virtual_tokens=num_virtual_tokens))
    ptkernels.patch(peft_model)
    args = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=seed,
        padding_free=padding_free, max_length=None, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Hugging Face causal LM (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compare", action="store_true", help="also run the same steps on padded batches")
    args = parser.parse_args()

    if args.model is None:
        tokenizer, dataset = tiny_tokenizer(), tiny_dataset()
        make_model = tiny_model
    else:
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        dataset = load_dataset("trl-lib/Capybara", split="train[:256]")

        def make_model():
            return AutoModelForCausalLM.from_pretrained(args.model)

    with tempfile.TemporaryDirectory() as out:
        packed, _ = train(make_model(), dataset, tokenizer, padding_free=True, steps=args.steps,
                          out_dir=out)
        print("padding-free + ptkernels losses:", packed)
        if args.compare:
            padded, _ = train(make_model(), dataset, tokenizer, padding_free=False, steps=args.steps,
                              out_dir=out)
            print("padded + ptkernels losses:      ", padded)


if __name__ == "__main__":
    main()
