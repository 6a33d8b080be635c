"""Encoder-decoder end to end: a PEFT SEQ_2_SEQ_LM prefix-tuning training step (forward and
backward, no optimizer step), unpatched PEFT against ``ptkernels.patch`` (default: PEFT's placement;
and ``seq2seq_prefix="per_layer"``, which also puts the prefix in every cross-attention), measured
side by side in one process on the same model object.

Models (random weights, a small vocabulary of 8192 so that the LM head does not dominate a CPU step):

* ``--model bart-base``: BART-base's shapes (d_model 768, 6 encoder + 6 decoder layers, 12 heads,
  FFN 3072); results ``seq2seq.json`` / ``seq2seq.md``.
* ``--model t5-small``: T5-small's shapes (d_model 512, 6 + 6 layers, 8 heads of d_kv 64, FFN 2048,
  32 relative-position buckets, max distance 128, dropout 0.1 as T5's config has it); results
  ``seq2seq_t5.json`` / ``seq2seq_t5.md``. The patched model hands ptkernels the bias table and
  buckets instead of the dense bias.

Batch: B source rows of S tokens (right padding, lengths drawn from [S/2, S]) and labels of T tokens,
float32. Unpatched PEFT runs the model's default attention (SDPA; T5's SDPA path adds the dense
position bias as a float mask) through ``ptkernels.testing.with_peft_oracle_shim`` on transformers
>= 5.24 (a signature rename; PEFT's own path otherwise). Each variant is timed alternately for
``rounds`` rounds (``torch.utils.benchmark.Timer``, one step per measurement after a warm-up step);
the median over rounds is reported.

    python benchmarks/seq2seq.py [--model bart-base|t5-small --batch 8 --src 128 --tgt 64 --prefix 32
                                  --rounds 3 --out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from env import environment  # noqa: E402
from timing import median_ms  # noqa: E402

VOCAB = 8192


MODELS = {
    "bart-base": dict(result="seq2seq", pad=1,
                      description="BART-base-shaped (d_model 768, 6 encoder + 6 decoder layers, 12 heads, FFN 3072, "
                                  "vocabulary 8192)"),
    "t5-small": dict(result="seq2seq_t5", pad=0,
                     description="T5-small-shaped (d_model 512, 6 encoder + 6 decoder layers, 8 heads of d_kv 64, "
                                 "FFN 2048, 32 relative-position buckets, max distance 128, dropout 0.1, vocabulary "
                                 "8192)"),
}


def build(prefix: int, model: str = "bart-base"):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from ptkernels.testing import with_peft_oracle_shim

    torch.manual_seed(0)
    if model == "bart-base":
        config = BartConfig(vocab_size=VOCAB, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                            decoder_ffn_dim=3072, max_position_embeddings=1024)
        base = BartForConditionalGeneration(config)
    else:
        config = T5Config(vocab_size=VOCAB, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                          num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                          dropout_rate=0.1, pad_token_id=0, decoder_start_token_id=0)
        base = T5ForConditionalGeneration(config)
    model = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prefix))
    return with_peft_oracle_shim(model).train()


def batch(b: int, s: int, t: int, pad: int = 1):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (b, s), generator=g)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    labels = torch.randint(4, VOCAB, (b, t), generator=g)
    return ids.masked_fill(mask == 0, pad), mask, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="bart-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src", type=int, default=128)
    parser.add_argument("--tgt", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import ptkernels
    from ptkernels.testing import with_peft_oracle_shim, without_peft_oracle_shim

    spec = MODELS[args.model]
    model = build(args.prefix, args.model)
    ids, mask, labels = batch(args.batch, args.src, args.tgt, spec["pad"])

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    def as_variant(name):
        if name == "peft":
            ptkernels.unpatch(model)
            with_peft_oracle_shim(model)
        else:
            without_peft_oracle_shim(model)
            ptkernels.patch(model, seq2seq_prefix="peft" if name == "ptkernels" else "per_layer")

    variants = ["peft", "ptkernels", "ptkernels_per_layer"]
    times = {v: [] for v in variants}
    device = torch.device("cpu")
    for v in variants:  # warm-up
        as_variant(v)
        step()
    for _ in range(args.rounds):
        for v in variants:
            as_variant(v)
            times[v].append(median_ms(step, device, min_run_time=0))
    result = {
        "environment": environment(device),
        "shape": dict(model=f"{args.model}-shaped", vocab=VOCAB, batch=args.batch, src=args.src, tgt=args.tgt,
                      prefix=args.prefix, threads=torch.get_num_threads()),
        "train_step_ms": {v: statistics.median(ts) for v, ts in times.items()},
        "rounds_ms": times,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }
    base = result["train_step_ms"]["peft"]
    lines = ["| variant | train step (ms, median of rounds) | vs PEFT |", "|---|---|---|"]
    lines += [f"| {v} | {ms:.0f} | {base / ms:.2f}x |" for v, ms in result["train_step_ms"].items()]
    print(json.dumps(result["shape"]))
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, spec["result"] + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        command = "python benchmarks/seq2seq.py " + " ".join(sys.argv[1:])
        text = [f"# Seq2seq prefix-tuning training step (benchmarks/seq2seq.py, {args.model})", "",
                json.dumps(result["environment"]), "",
                f"{spec['description']}, PEFT SEQ_2_SEQ_LM prefix tuning P = {args.prefix}, batch {args.batch}, "
                f"source {args.src} / target {args.tgt} tokens, float32, training step (forward and backward), median "
                f"of {args.rounds} alternating rounds, fast PyTorch path (no GPU). Command: `{command}`.", "",
                json.dumps(result["shape"]), "", *lines]
        with open(os.path.join(args.out, spec["result"] + ".md"), "w") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
