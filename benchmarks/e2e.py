"""End to end: a PEFT training step and an inference forward, unpatched PEFT against
``ptkernels.patch``, measured side by side in one process.

Each case builds one randomly initialised model (BERT-, GPT-2- or Llama-shaped, see ``MODELS``) with
one PEFT adapter, and one padded batch (right padding, lengths drawn from [S/2, S], the longest S).
The same model object is timed unpatched and patched, alternately, for ``rounds`` rounds; each
measurement is the median of ``torch.utils.benchmark.Timer.blocked_autorange``, and the reported
time is the median over rounds (5 by default: robust to two disturbed rounds on a shared machine),
so both variants see the same machine state. Peak memory of one
step is read from the profiler's memory events (what a CPU user can measure; on CUDA,
``torch.cuda.max_memory_allocated``).

Variants:
    peft       the unpatched PEFT model (PEFT's own path: prefix in a DynamicCache, torch.cat in every
               layer, a dense 4D mask, SDPA). On transformers >= 5.24 PEFT 0.21.2 refuses prefix tuning
               for sequence classification; it runs through ``ptkernels.testing.with_peft_oracle_shim``
               (a signature rename, nothing else), so that its own path can still be timed.
    ptkernels  after ``ptkernels.patch(model)`` (backend "auto": Triton on CUDA, the fast PyTorch path
               elsewhere)

Run ``python benchmarks/e2e.py --help``; ``ptkernels bench`` runs the ``default`` suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

try:  # as part of the benchmarks package (ptkernels bench), or run as a script
    from .timing import median_ms, peak_memory_mib
except ImportError:
    from timing import median_ms, peak_memory_mib

VOCAB = 8192  # a small vocabulary keeps the LM head from dominating a CPU step; attention shapes are the models'


def _bert(layers):
    from transformers import BertConfig

    return BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=VOCAB, max_position_embeddings=1024)


def _gpt2(layers):
    from transformers import GPT2Config

    return GPT2Config(n_embd=768, n_layer=layers, n_head=12, vocab_size=VOCAB, n_positions=1024,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _llama(layers):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=2048, pad_token_id=0)


# model name -> (config builder taking the layer count, task type, what it is)
MODELS: Dict[str, tuple] = {
    "bert": (_bert, "SEQ_CLS", "BERT-base-shaped (hidden 768, 12 heads), sequence classification"),
    "gpt2": (_gpt2, "CAUSAL_LM", "GPT-2-small-shaped (hidden 768, 12 heads), causal LM"),
    "llama": (_llama, "CAUSAL_LM", "Llama-shaped GQA (hidden 1024, 16 query / 4 KV heads of 64), causal LM"),
}
ADAPTERS = ("prefix", "prefix_proj", "ptuning")


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    adapter: str
    B: int
    S: int
    P: int
    layers: int = 4

    @property
    def name(self) -> str:
        return f"{self.model}-{self.adapter}-L{self.layers}-B{self.B}-S{self.S}-P{self.P}"


def _matrix() -> List[Case]:
    cases = [Case("bert", a, 8, s, p) for s in (128, 384) for p in (32, 128) for a in ADAPTERS]
    cases += [Case("gpt2", a, 8, s, 32) for s in (256, 512) for a in ADAPTERS]
    cases += [Case("llama", a, 8, 256, 32) for a in ADAPTERS]
    return cases


# Suites: "default" is ``ptkernels bench`` on a CPU machine (about a minute on 2 cores); "matrix" is
# the committed table (issue 13's shapes); "gpu" the same shapes, larger batches, on a GPU.
SUITES: Dict[str, Callable[[], List[Case]]] = {
    "default": lambda: [Case("gpt2", "prefix", 4, 256, 32, layers=2), Case("bert", "prefix_proj", 4, 128, 32, layers=2),
                        Case("llama", "ptuning", 2, 256, 32, layers=2)],
    "matrix": _matrix,
    "gpu": lambda: [dataclasses.replace(c, B=32) for c in _matrix()],
    "smoke": lambda: [Case("gpt2", "prefix", 2, 16, 4, layers=1), Case("bert", "ptuning", 2, 16, 4, layers=1)],
}


def build(case: Case, device: torch.device, seed: int = 0):
    """(peft model, batch dict, optimizer) for one case."""
    import peft
    import transformers

    from ptkernels.testing import with_peft_oracle_shim

    config_fn, task, _ = MODELS[case.model]
    torch.manual_seed(seed)
    config = config_fn(case.layers)
    auto = transformers.AutoModelForSequenceClassification if task == "SEQ_CLS" else transformers.AutoModelForCausalLM
    base = auto.from_config(config)
    if case.adapter == "prefix":
        adapter = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=case.P)
    elif case.adapter == "prefix_proj":
        adapter = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=case.P, prefix_projection=True,
                                          encoder_hidden_size=config.hidden_size)
    elif case.adapter == "ptuning":
        adapter = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=case.P,
                                           encoder_hidden_size=config.hidden_size)
    else:
        raise ValueError(f"unknown adapter {case.adapter!r}; choose from {ADAPTERS}")
    model = with_peft_oracle_shim(peft.get_peft_model(base, adapter)).to(device)

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(case.S // 2, case.S + 1, (case.B,), generator=g)
    lengths[0] = case.S
    ids = torch.randint(1, VOCAB, (case.B, case.S), generator=g)
    mask = (torch.arange(case.S)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(0, 2, (case.B,), generator=g) if task == "SEQ_CLS" else ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, batch, optimizer


def _set_variant(model, variant: str) -> None:
    import ptkernels
    from ptkernels.testing import with_peft_oracle_shim, without_peft_oracle_shim

    if variant == "peft":
        ptkernels.unpatch(model)
        with_peft_oracle_shim(model)
    else:
        without_peft_oracle_shim(model)  # the patched model needs no shim
        ptkernels.patch(model)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, device: torch.device, *, rounds: int = 5, min_run_time: float = 1.0,
             modes=("train", "infer"), memory: bool = True) -> List[dict]:
    """Records (one per mode and variant) for one case."""
    model, batch, optimizer = build(case, device)

    def train_step():
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        model.eval()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    steps = {"train": train_step, "infer": infer_step}
    variants = ("peft", "ptkernels")
    times: Dict[tuple, List[float]] = {(m, v): [] for m in modes for v in variants}
    for round_index in range(rounds):
        for mode in modes:
            for variant in variants:
                _set_variant(model, variant)
                if round_index == 0:
                    steps[mode]()  # warm-up
                _synchronize(device)
                times[(mode, variant)].append(median_ms(steps[mode], device, min_run_time))
    records = []
    for mode in modes:
        for variant in variants:
            _set_variant(model, variant)
            ms = sorted(times[(mode, variant)])[len(times[(mode, variant)]) // 2]
            mem = peak_memory_mib(steps[mode], device) if memory else None
            records.append(dict(case=case.name, **dataclasses.asdict(case), task=MODELS[case.model][1], mode=mode,
                                variant=variant, median_ms=ms, rounds_ms=times[(mode, variant)], peak_mem_mib=mem,
                                tokens_per_s=int(batch["attention_mask"].sum()) * 1000.0 / ms))
    _set_variant(model, "peft")
    by = {(r["mode"], r["variant"]): r for r in records}
    for mode in modes:
        peft_rec, ptk = by[(mode, "peft")], by[(mode, "ptkernels")]
        ptk["speedup_vs_peft"] = peft_rec["median_ms"] / ptk["median_ms"]
        if memory:
            ptk["memory_vs_peft"] = ptk["peak_mem_mib"] / peft_rec["peak_mem_mib"]
    return records


def environment(device: torch.device) -> dict:
    import platform

    import peft
    import transformers

    info = dict(date=time.strftime("%Y-%m-%d"), device=str(device), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), machine=platform.machine(), cpus=os.cpu_count())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        import triton

        info["triton"] = triton.__version__
    return info


def summary_table(records: List[dict]) -> str:
    """Markdown: one row per case and mode, PEFT against patched."""
    lines = ["| case | mode | PEFT ms | ptkernels ms | speed-up | PEFT peak MiB | ptkernels peak MiB |",
             "|---|---|---|---|---|---|---|"]
    by = {}
    for r in records:
        by.setdefault((r["case"], r["mode"]), {})[r["variant"]] = r
    for (case, mode), pair in by.items():
        p, k = pair["peft"], pair["ptkernels"]
        mem = lambda r: "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"  # noqa: E731
        lines.append(f"| {case} | {mode} | {p['median_ms']:.1f} | {k['median_ms']:.1f} | "
                     f"**{k['speedup_vs_peft']:.2f}x** | {mem(p)} | {mem(k)} |")
    return "\n".join(lines)


def plot(records: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for r in records if r["variant"] == "ptkernels"]
    labels = [f"{r['case']} {r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    ax.barh(labels, [r["speedup_vs_peft"] for r in rows], color=["#4c72b0" if r["mode"] == "train" else "#55a868"
                                                                 for r in rows])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("speed-up of ptkernels.patch over unpatched PEFT (x, higher is better)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_suite(suite: str, device: torch.device, out_dir: Optional[str], *, rounds: int, min_run_time: float,
              modes, memory: bool = True, progress: bool = True) -> List[dict]:
    cases = SUITES[suite]()
    records: List[dict] = []
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cases), desc=f"end-to-end ({suite})", unit="case", file=sys.stderr)
        except ImportError:
            bar = None
    for case in cases:
        if bar is not None:
            bar.set_postfix_str(case.name)
        records.extend(run_case(case, device, rounds=rounds, min_run_time=min_run_time, modes=modes, memory=memory))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "e2e.json"), "w") as f:
            json.dump({"environment": environment(device), "suite": suite, "rounds": rounds,
                       "min_run_time_s": min_run_time, "records": records}, f, indent=1)
        with open(os.path.join(out_dir, "e2e.md"), "w") as f:
            env = environment(device)
            f.write(f"# End to end, suite `{suite}`: unpatched PEFT vs ptkernels.patch\n\n")
            f.write(", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n")
            f.write(summary_table(records) + "\n")
        plot(records, os.path.join(out_dir, "e2e.png"))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="default", choices=sorted(SUITES))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement (blocked_autorange)")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None, help="write e2e.json, e2e.md and e2e.png here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    records = run_suite(args.suite, device, args.out, rounds=args.rounds, min_run_time=args.min_run_time,
                        modes=tuple(args.modes.split(",")), memory=not args.no_memory)
    print(summary_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
