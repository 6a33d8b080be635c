"""Encoder-decoder end to end: a BART-base-shaped PEFT SEQ_2_SEQ_LM prefix-tuning training step,
unpatched PEFT against ``ptkernels.patch`` (default: PEFT's placement; and ``seq2seq_prefix=
"per_layer"``, which also puts the prefix in every cross-attention), measured side by side in one
process on the same model object.

Model: BART-base's attention shapes (d_model 768, 6 encoder + 6 decoder layers, 12 heads, FFN 3072)
with a small vocabulary (8192, so the LM head does not dominate a CPU step), random weights. Batch:
B source rows of S tokens (right padding, lengths drawn from [S/2, S]) and labels of T tokens.
Unpatched PEFT runs through ``ptkernels.testing.with_peft_oracle_shim`` on transformers >= 5.24
(a signature rename; PEFT's own path otherwise). Each variant is timed alternately for ``rounds``
rounds (``torch.utils.benchmark.Timer``, one step per measurement after a warm-up step); the
median over rounds is reported.

    python benchmarks/seq2seq.py [--batch 8 --src 128 --tgt 64 --prefix 32 --rounds 3 --out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms  # noqa: E402

VOCAB = 8192


def build(prefix: int):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration

    from ptkernels.testing import with_peft_oracle_shim

    config = BartConfig(vocab_size=VOCAB, d_model=768, encoder_layers=6, decoder_layers=6,
                        encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                        decoder_ffn_dim=3072, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = get_peft_model(BartForConditionalGeneration(config),
                           PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prefix))
    return with_peft_oracle_shim(model).train()


def batch(b: int, s: int, t: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (b, s), generator=g)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    labels = torch.randint(4, VOCAB, (b, t), generator=g)
    return ids.masked_fill(mask == 0, 1), mask, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src", type=int, default=128)
    parser.add_argument("--tgt", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import ptkernels
    from ptkernels.testing import with_peft_oracle_shim, without_peft_oracle_shim

    model = build(args.prefix)
    ids, mask, labels = batch(args.batch, args.src, args.tgt)

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
        "shape": dict(model="bart-base-shaped", vocab=VOCAB, batch=args.batch, src=args.src, tgt=args.tgt,
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
        with open(os.path.join(args.out, "seq2seq.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "seq2seq.md"), "w") as f:
            f.write(f"{json.dumps(result['shape'])}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
