"""Several prefix adapters in one batch, and P-Tuning v2's prefix dropout: what they cost.

Mixed batch (issue 17): one GPT-2-shaped model (hidden 768, 12 heads) with 4 PEFT prefix-tuning adapters
of different lengths (P = 16, 24, 32, 48), B examples, B / 4 per adapter, right-padded to S. Variants,
timed on the same model object, alternately, for ``rounds`` rounds (median of
``torch.utils.benchmark.Timer.blocked_autorange`` per round, median over rounds):

    peft-separate       unpatched PEFT: ``set_adapter(a)`` and one batch of its B / 4 examples, 4 times
                        (PEFT's prompt learning has no ``adapter_names``: this is what one does today)
    ptkernels-separate  the same 4 batches after ``ptkernels.patch``
    ptkernels-mixed     one batch of B with ``adapter_names=[...]`` after ``ptkernels.patch``

train = forward + backward of HF's loss (every adapter's encoder trainable), infer = forward under
no_grad. Peak memory of one step from the profiler's memory events (``benchmarks/timing.py``).

Prefix dropout: one adapter, a patched training step with ``patch(prefix_dropout=0.1)`` against
``prefix_dropout=0`` (the same model; its other dropouts as configured).

Backends: the fast PyTorch path on CPU; Triton on a GPU (not measured here: no GPU on this machine).
Run ``python benchmarks/adapters.py --out benchmarks/results/cpu-2core-adapters`` (about 2 minutes on
2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

try:  # as part of the benchmarks package, or run as a script
    from .env import environment, pick_device
    from .timing import median_ms, peak_memory_mib
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from env import environment, pick_device
    from timing import median_ms, peak_memory_mib

SIZES = (16, 24, 32, 48)


def build(layers: int, seed: int = 0):
    import peft
    import transformers

    from ptkernels.testing import with_peft_oracle_shim

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=768, n_layer=layers, n_head=12, vocab_size=8192, n_positions=1024,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    model = None
    for i, size in enumerate(SIZES):
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=size)
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("prompt_encoder."))
    return with_peft_oracle_shim(model)


def batch(B: int, S: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 8192, (B, S), generator=g)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    names = [f"a{b % len(SIZES)}" for b in range(B)]
    return ids, mask, labels, names


def step_fns(model, ids, mask, labels, names):
    groups = {n: [b for b, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}

    def separate(train: bool):
        def run():
            for name, rows in groups.items():
                model.set_adapter(name)
                for n, p in model.named_parameters():  # set_adapter freezes the others; keep all trainable
                    p.requires_grad_(n.startswith("prompt_encoder."))
                with torch.set_grad_enabled(train):
                    out = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
                if train:
                    out.loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def mixed(train: bool):
        def run():
            with torch.set_grad_enabled(train):
                out = model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
            if train:
                out.loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    return separate, mixed


def measure(fns: dict, device, rounds: int, min_run_time: float) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, (prepare, fn) in fns.items():
            prepare()
            times[name].append(median_ms(fn, device, min_run_time))
    mem = {}
    for name, (prepare, fn) in fns.items():
        prepare()
        fn()
        mem[name] = peak_memory_mib(fn, device)
    return {k: {"ms": statistics.median(v), "rounds_ms": v, "peak_mib": mem[k]} for k, v in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--S", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="folder for adapters.json and adapters.md")
    args = parser.parse_args(argv)
    device = pick_device(args.device)

    import ptkernels

    model = build(args.layers).to(device).train()
    ids, mask, labels, names = (t.to(device) if isinstance(t, torch.Tensor) else t for t in batch(args.B, args.S))
    separate, mixed = step_fns(model, ids, mask, labels, names)

    def unpatched():
        if ptkernels.integrations.is_patched(model):
            ptkernels.unpatch(model)

    def patched(dropout=0.0):
        return lambda: ptkernels.patch(model, prefix_dropout=dropout)

    results = {"env": environment(device), "args": vars(args), "sizes": SIZES, "mixed": {}, "prefix_dropout": {}}
    for mode, train in (("train", True), ("infer", False)):
        fns = {
            "peft-separate": (unpatched, separate(train)),
            "ptkernels-separate": (patched(), separate(train)),
            "ptkernels-mixed": (patched(), mixed(train)),
        }
        results["mixed"][mode] = measure(fns, device, args.rounds, args.min_run_time)
        print(mode, {k: round(v["ms"], 1) for k, v in results["mixed"][mode].items()}, flush=True)
    model.set_adapter("a2")
    single = ids[:, :], mask, labels

    def one_adapter():
        out = model(input_ids=single[0], attention_mask=single[1], labels=single[2])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    results["prefix_dropout"] = measure({"p=0": (patched(0.0), one_adapter), "p=0.1": (patched(0.1), one_adapter)},
                                        device, args.rounds, args.min_run_time)
    print("prefix dropout", {k: round(v["ms"], 1) for k, v in results["prefix_dropout"].items()}, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "adapters.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "adapters.md"), "w") as f:
            f.write(markdown(results))
    return results


def markdown(r: dict) -> str:
    e, a = r["env"], r["args"]
    lines = [
        "# Several prefix adapters in one batch, and prefix dropout (benchmarks/adapters.py)",
        "",
        f"date {e['date']}, {e['device_name']}, torch {e['torch']}, transformers {e['transformers']}, "
        f"peft {e['peft']}, triton {e['triton']}, python {e['python']}",
        "",
        f"GPT-2-shaped (hidden 768, 12 heads), {a['layers']} layers, 4 prefix adapters P = {', '.join(map(str, r['sizes']))}, "
        f"B = {a['B']} ({a['B'] // 4} per adapter), S = {a['S']} (right-padded, lengths in [S/2, S]); "
        f"median of {a['rounds']} interleaved rounds.",
        "",
        "| mode | variant | ms / step | steps/s | vs peft-separate | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for mode, rows in r["mixed"].items():
        ref = rows["peft-separate"]["ms"]
        for name, v in rows.items():
            lines.append(f"| {mode} | {name} | {v['ms']:.1f} | {1000 / v['ms']:.2f} | **{ref / v['ms']:.2f}x** | "
                         f"{v['peak_mib']:.0f} |")
    d = r["prefix_dropout"]
    lines += [
        "",
        "Prefix dropout (one adapter, P = 32, the same batch, patched training step):",
        "",
        "| prefix_dropout | ms / step | cost | peak MiB |",
        "|---|---|---|---|",
    ]
    for name, v in d.items():
        lines.append(f"| {name[2:]} | {v['ms']:.1f} | {v['ms'] / d['p=0']['ms']:.2f}x | {v['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
