"""Peak memory of one prefix-tuning training step, unpatched PEFT against ``ptkernels.patch``, as the
batch B, the prefix length P and the number of layers L grow (issue 19).

PEFT expands the virtual tokens to the batch before the prefix encoder, so it holds B copies of
every layer's prefix K/V (B x P x L x 2 x Hkv x D values), the encoder's activations for B x P
tokens (with ``prefix_projection=True``: the (B, P, H_enc) hidden layer and the (B, P, 2 L Hkv D)
output), and per layer the ``torch.cat`` of prefix and K/V, the dense (B, 1, S, P + S) mask and,
for GQA, K/V repeated to all query heads. A patched model runs the encoder once on P tokens and
holds one (2L, Hkv, P, D) prefix shared by the batch. This script measures what that does to the
peak memory of a whole training step (forward, backward, AdamW step) on a Llama-shaped GQA model.

Each case builds one randomly initialised model and batch (``benchmarks/e2e.py``'s ``build``: padded
batch, a small vocabulary so the LM head does not dominate), runs one warm-up step per variant (so
AdamW's state exists), then measures one step per variant with ``timing.peak_memory_mib`` (CPU:
the profiler's memory events; CUDA: ``max_memory_allocated``): the peak above what was allocated
before the step (parameters, optimizer state and gradients of earlier steps excluded).

    python benchmarks/memory.py --out benchmarks/results/cpu-2core-memory --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, List

import torch

try:  # as part of the benchmarks package, or run as a script
    from .e2e import Case, _set_variant, build, environment
    from .timing import peak_memory_mib
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from e2e import Case, _set_variant, build, environment
    from timing import peak_memory_mib

BASE = dict(B=4, P=64, layers=4)  # the point every sweep passes through
SWEEPS: Dict[str, tuple] = {"B": (1, 2, 4, 8, 16), "P": (16, 64, 128, 256), "layers": (2, 4, 8)}
S = 64  # short real sequences: the prefix is a large part of what attention sees, as in prefix tuning
ADAPTERS = ("prefix_proj", "prefix")


def cases(adapters=ADAPTERS, sweeps=SWEEPS, model: str = "llama") -> List[tuple]:
    """(sweep name, Case) for every point of every sweep, the other two at BASE."""
    out = []
    for adapter in adapters:
        for name, values in sweeps.items():
            for value in values:
                point = dict(BASE, **{name: value})
                out.append((name, Case(model, adapter, point["B"], S, point["P"], layers=point["layers"])))
    return out


def prefix_values(case: Case, hkv: int, head_dim: int, shared: bool) -> int:
    """Prefix K/V values held for one forward: (B x) P x L x 2 x Hkv x D."""
    return (1 if shared else case.B) * case.P * case.layers * 2 * hkv * head_dim


def measure(case: Case, device: torch.device) -> Dict[str, float]:
    """{"peft": MiB, "ptkernels": MiB}: peak memory of one training step of each variant."""
    model, batch, optimizer = build(case, device)
    model.train()

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {}
    for variant in ("peft", "ptkernels"):
        _set_variant(model, variant)
        step()  # warm-up: AdamW's state exists from here on
        result[variant] = peak_memory_mib(step, device)
    _set_variant(model, "peft")
    cfg = model.get_base_model().config
    hkv, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    bytes_per = next(model.parameters()).element_size()
    result["peft_prefix_mib"] = prefix_values(case, hkv, head_dim, shared=False) * bytes_per / 2**20
    result["ptkernels_prefix_mib"] = prefix_values(case, hkv, head_dim, shared=True) * bytes_per / 2**20
    return result


def table(records: List[dict]) -> str:
    lines = ["| adapter | sweep | B | P | L | PEFT peak MiB | patched peak MiB | patched / PEFT | prefix K/V MiB PEFT → patched |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['adapter']} | {r['sweep']} | {r['B']} | {r['P']} | {r['layers']} | {r['peft']:.0f} | "
                     f"{r['ptkernels']:.0f} | {r['ptkernels'] / r['peft']:.2f} | "
                     f"{r['peft_prefix_mib']:.1f} → {r['ptkernels_prefix_mib']:.2f} |")
    return "\n".join(lines)


def plot(records: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = sorted({r["adapter"] for r in records}, reverse=True)
    fig, axes = plt.subplots(len(adapters), len(SWEEPS), figsize=(4 * len(SWEEPS), 3.2 * len(adapters)), squeeze=False)
    for row, adapter in enumerate(adapters):
        for col, sweep in enumerate(SWEEPS):
            ax = axes[row][col]
            rs = [r for r in records if r["adapter"] == adapter and r["sweep"] == sweep]
            x = [r[sweep] for r in rs]
            ax.plot(x, [r["peft"] for r in rs], "o-", color="#c44e52", label="PEFT")
            ax.plot(x, [r["ptkernels"] for r in rs], "s-", color="#4c72b0", label="ptkernels.patch")
            others = ", ".join(f"{k}={v}" for k, v in BASE.items() if k != sweep)
            ax.set_title(f"{adapter}: vs {sweep} ({others}, S={S})", fontsize=9)
            ax.set_xlabel(sweep)
            ax.set_ylabel("peak MiB of a training step")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    parser.add_argument("--out", default=None, help="write memory.json, memory.md and memory.png here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    for sweep, case in cases(tuple(args.adapters.split(","))):
        mib = measure(case, device)
        records.append(dict(dataclasses.asdict(case), sweep=sweep, **mib))
        print(f"{case.name}: PEFT {mib['peft']:.0f} MiB, patched {mib['ptkernels']:.0f} MiB", file=sys.stderr)
    md = table(records)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = environment(device)
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump({"environment": env, "base": BASE, "sweeps": SWEEPS, "S": S, "records": records}, f, indent=1)
        with open(os.path.join(args.out, "memory.md"), "w") as f:
            f.write("# Peak memory of a prefix-tuning training step: unpatched PEFT vs ptkernels.patch\n\n")
            f.write(", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n")
            f.write(f"Llama-shaped GQA model (hidden 1024, 16 query / 4 KV heads of 64), S={S}, "
                    f"padded batch; each sweep varies one of B, P, L with the others at {BASE}.\n\n")
            f.write(md + "\n")
        plot(records, os.path.join(args.out, "memory.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
