"""Packed (padding-free) training against padded PEFT: a training step on a realistic length mix.

One batch of B sequences with lengths drawn uniformly from [min_len, max_len] (seeded), one PEFT
prefix-tuning adapter (P virtual tokens), one randomly initialised model (``e2e.MODELS``' shapes).
Variants of the same training step (forward, backward, AdamW step), on the same model object,
interleaved for ``rounds`` rounds (median of medians, as ``e2e.py``):

    peft-padded       unpatched PEFT on the padded batch (B, max length): PEFT's own path
    ptkernels-padded  ``ptkernels.patch`` on the padded batch
    ptkernels-packed  ``ptkernels.patch`` on the packed row (1, sum of lengths), position ids restarting
                      per sequence (what ``DataCollatorWithFlattening`` / TRL's padding_free give):
                      ``prefix_attention_varlen``, no padding computed at all

Tokens per second count real tokens only (the same for every variant). Backend "auto": the fast
PyTorch path on CPU (Triton on a GPU). An op-level table also times the varlen op's fast PyTorch
path (one SDPA per sequence) against padding the sequences into a batch with a key padding mask
(``prefix_attention`` "torch"), forward + backward, to back the choice made in
``ops/prefix_attention_varlen/torch_path.py``.

    python benchmarks/packing.py --out benchmarks/results/cpu-2core-packing
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

try:  # as part of the benchmarks package, or run as a script
    from .e2e import MODELS, VOCAB
    from .env import environment, pick_device
    from .timing import median_ms
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from e2e import MODELS, VOCAB
    from env import environment, pick_device
    from timing import median_ms


def lengths_mix(batch: int, min_len: int, max_len: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()


def build(model_name: str, layers: int, prefix_len: int, lengths: list[int], device, seed: int = 0):
    import peft
    import transformers

    from ptkernels.testing import with_peft_oracle_shim

    config_fn, task, _ = MODELS[model_name]
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(config_fn(layers))
    model = with_peft_oracle_shim(peft.get_peft_model(base, peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=prefix_len))).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    longest = max(lengths)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
        mask[b, :len(s)] = 1
    padded = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    packed_ids = torch.cat(seqs)[None]
    labels = packed_ids.clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts] = -100  # as the collators do: no prediction across a sequence boundary
    packed = dict(input_ids=packed_ids, labels=labels,
                  position_ids=torch.cat([torch.arange(n) for n in lengths])[None])
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, to(padded), to(packed), optimizer


def _variant(model, name: str) -> dict:
    import ptkernels
    from ptkernels.testing import with_peft_oracle_shim, without_peft_oracle_shim

    if name == "peft-padded":
        ptkernels.unpatch(model)
        with_peft_oracle_shim(model)
    else:
        without_peft_oracle_shim(model)
        ptkernels.patch(model)


def run_model(model_name: str, layers: int, prefix_len: int, lengths: list[int], device, rounds: int) -> list[dict]:
    model, padded, packed, optimizer = build(model_name, layers, prefix_len, lengths, device)
    batches = {"peft-padded": padded, "ptkernels-padded": padded, "ptkernels-packed": packed}

    def step(batch):
        def run():
            model.train()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    times = {name: [] for name in batches}
    for r in range(rounds):
        for name, batch in batches.items():
            _variant(model, name)
            if r == 0:
                step(batch)()  # warm-up
            times[name].append(median_ms(step(batch), device, min_run_time=0))
    tokens = sum(lengths)
    records = []
    for name, ts in times.items():
        ms = sorted(ts)[len(ts) // 2]
        records.append(dict(model=model_name, layers=layers, P=prefix_len, B=len(lengths), lengths=lengths,
                            tokens=tokens, padded_tokens=len(lengths) * max(lengths), variant=name, median_ms=ms,
                            rounds_ms=ts, tokens_per_s=tokens * 1000.0 / ms))
    base = records[0]["median_ms"]
    for rec in records:
        rec["speedup_vs_peft_padded"] = base / rec["median_ms"]
    _variant(model, "peft-padded")
    return records


def run_op(lengths: list[int], prefix_len: int, device, heads=(16, 4), head_dim=64, rounds: int = 3) -> list[dict]:
    """Forward + backward of the varlen op's torch path against padding into a batch + key padding mask."""
    import ptkernels

    hq, hkv = heads
    g = torch.Generator().manual_seed(0)
    total, longest = sum(lengths), max(lengths)
    q = torch.randn(total, hq, head_dim, generator=g).to(device).requires_grad_(True)
    k = torch.randn(total, hkv, head_dim, generator=g).to(device).requires_grad_(True)
    v = torch.randn(total, hkv, head_dim, generator=g).to(device).requires_grad_(True)
    pk = torch.randn(hkv, prefix_len, head_dim, generator=g).to(device).requires_grad_(True)
    pv = torch.randn(hkv, prefix_len, head_dim, generator=g).to(device).requires_grad_(True)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(device)

    def varlen():
        out = ptkernels.prefix_attention_varlen(q, k, v, pk, pv, cu, cu, longest, longest, causal=True, backend="torch")
        out.sum().backward()

    def padded():
        def pad(x):  # (total, H, D) -> (N, H, max, D), differentiably
            parts = torch.split(x, lengths)
            return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True).transpose(1, 2)
        out = ptkernels.prefix_attention(pad(q), pad(k), pad(v), pk, pv, key_padding_mask=mask, causal=True,
                                         backend="torch")
        out.transpose(1, 2)[mask].sum().backward()

    records = []
    for name, fn in (("varlen: SDPA per sequence", varlen), ("padded batch + key padding mask", padded)):
        fn()
        ts = [median_ms(fn, device, min_run_time=0.5) for _ in range(rounds)]
        records.append(dict(op=name, lengths=lengths, P=prefix_len, Hq=hq, Hkv=hkv, D=head_dim,
                            median_ms=sorted(ts)[len(ts) // 2], rounds_ms=ts))
    return records


def to_markdown(env: dict, steps: list[dict], ops: list[dict], length_range: tuple) -> str:
    lines = ["# Packed (padding-free) training step vs padded PEFT", "",
             f"{env['date']}, {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, triton {env['triton']} (backend auto = "
             f"{'Triton' if env['device'] == 'cuda' else 'fast PyTorch path'})", ""]
    first = steps[0]
    lines += [f"Batch: B = {first['B']} sequences, lengths drawn uniformly from "
              f"{length_range[0]}..{length_range[1]} ({first['tokens']} real tokens; padded to {first['padded_tokens']}), prefix tuning P = {first['P']}, "
              "training step = forward + backward + AdamW step, median of interleaved rounds.", "",
              "| model | variant | step (ms) | tokens / s | vs PEFT padded |", "|---|---|---:|---:|---:|"]
    for r in steps:
        lines.append(f"| {r['model']} ({r['layers']} layers) | {r['variant']} | {r['median_ms']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['speedup_vs_peft_padded']:.2f}x |")
    lines += ["", "Op level (varlen fast PyTorch path, causal, forward + backward):", "",
              "| implementation | Hq/Hkv | D | ms |", "|---|---|---:|---:|"]
    for r in ops:
        lines.append(f"| {r['op']} | {r['Hq']}/{r['Hkv']} | {r['D']} | {r['median_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama,gpt2")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="folder for packing.json / packing.md")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    lengths = lengths_mix(args.batch, args.min_len, args.max_len)
    steps = []
    for name in args.models.split(","):
        steps += run_model(name, args.layers, args.prefix, lengths, device, args.rounds)
        for r in steps[-3:]:
            print(f"{r['model']:6s} {r['variant']:17s} {r['median_ms']:8.0f} ms  {r['tokens_per_s']:8.0f} tok/s  "
                  f"{r['speedup_vs_peft_padded']:.2f}x", flush=True)
    ops = run_op(lengths, args.prefix, device)
    for r in ops:
        print(f"op {r['op']:35s} {r['median_ms']:8.1f} ms", flush=True)
    env = environment(device)
    md = to_markdown(env, steps, ops, (args.min_len, args.max_len))
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "packing.json"), "w") as f:
            json.dump(dict(environment=env, lengths=lengths, steps=steps, ops=ops), f, indent=1)
        with open(os.path.join(args.out, "packing.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
