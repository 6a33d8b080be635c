"""The ``ptkernels`` command: thin entry points into the source tree's ``benchmarks/`` folder.

    ptkernels verify [--interpret] [--grid small|default|full] [--dtypes fp32,fp16,bf16] ...
    ptkernels bench [--quick] [--e2e SUITE|none] [--config cpu|gpu|target|quick|FILE.json] [--out DIR] ...

``bench`` first times the end-to-end headline (a PEFT training step and an inference forward,
unpatched against ``ptkernels.patch``, ``benchmarks/e2e.py``), then the op rows
(``benchmarks/ops``). Both need a source checkout (``pip install -e .``), where ``benchmarks/``
sits beside the package.

Nothing that imports triton kernels is imported at module level: ``--interpret`` must set
TRITON_INTERPRET=1 before the first ``@triton.jit`` runs (if something imported triton earlier, the
command re-executes itself with the variable set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ENV_FLAG = "_PTKERNELS_CLI_REEXEC"


def _ensure_interpreter(argv) -> None:
    """Set TRITON_INTERPRET=1 before triton is imported; re-exec if it is too late for this process."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if any(m == "triton" or m.startswith("triton.") for m in sys.modules) and not os.environ.get(ENV_FLAG):
        os.environ[ENV_FLAG] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "ptkernels.cli", *argv])


def _benchmarks():
    """Make the checkout's ``benchmarks`` package importable (it is not installed with ptkernels)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__init__.py").is_file():
        raise SystemExit("ptkernels bench / verify run from a source checkout (pip install -e .): "
                         f"no benchmarks/ folder beside {Path(__file__).resolve().parent}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def _csv(s: str):
    return [x.strip() for x in s.split(",") if x.strip()]


def _names(valid):
    """argparse type: a non-empty comma list of names from ``valid``."""
    def parse(s: str):
        names = _csv(s)
        if not names:
            raise argparse.ArgumentTypeError(f"no names given; use a comma list of {', '.join(valid)}")
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; use a comma list of {', '.join(valid)}")
        return names
    return parse


def _int_at_least(low: int):
    """argparse type: an integer >= low."""
    def parse(s: str):
        value = int(s)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _tolerance(s: str) -> float:
    value = float(s)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return value


def _writable_file(s: str) -> str:
    """argparse type: a path whose folder exists (checked before anything runs)."""
    folder = Path(s).expanduser().resolve().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    return s


VERIFY_DTYPES = ("fp32", "fp16", "bf16")
VERIFY_OPS = ("prefix_attention", "prompt_embedding")
VERIFY_BACKENDS = ("torch", "reference", "triton")
BENCH_SECTIONS = ("attention", "prompt_embedding")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptkernels", description="ptkernels: verify and benchmark the fused kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="check every op and backend against an fp64 reference; exit 1 on failure",
                       description="Run every op and backend available here against an fp64 reference, forward "
                                   "and backward, over a grid of shapes; print a table; exit 1 on any failure.")
    v.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    v.add_argument("--interpret", action="store_true",
                   help="on CPU, also run the Triton kernels in Triton's interpreter (sets TRITON_INTERPRET=1; slow)")
    v.add_argument("--grid", default="default", choices=["small", "default", "full"],
                   help="shape grid: small (CI, ~6 shapes), default (~30), full (adds large shapes)")
    v.add_argument("--dtypes", default="fp32,fp16,bf16", type=_names(VERIFY_DTYPES), help="comma list of fp32,fp16,bf16")
    v.add_argument("--ops", default="prefix_attention,prompt_embedding", type=_names(VERIFY_OPS),
                   help="comma list of prefix_attention,prompt_embedding")
    v.add_argument("--backends", default="torch,reference,triton", type=_names(VERIFY_BACKENDS),
                   help="comma list of torch,reference,triton")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--fp32-atol", type=_tolerance, default=None, help="fp32 tolerance (default 1e-3 x max(1,|ref|))")
    v.add_argument("--json", default=None, type=_writable_file, help="also write every check to this JSON file")
    v.add_argument("--failures-only", action="store_true", help="print only failing rows")
    v.add_argument("--inject-error", action="store_true", help=argparse.SUPPRESS)  # testing: corrupt kernel output

    b = sub.add_parser("bench", help="benchmark ptkernels against PEFT and the usual implementations",
                       description="End to end first: a PEFT training step and an inference forward, unpatched "
                                   "against ptkernels.patch, side by side in one process (benchmarks/e2e.py). Then "
                                   "prefix attention (forward, forward+backward) and prompt embedding against naive "
                                   "concat, the PEFT path, SDPA and FlexAttention (benchmarks/ops). Writes "
                                   "results.json, results.csv, summary.md and PNG plots under --out.")
    b.add_argument("--quick", action="store_true", help="tiny configs (seconds): checks the pipeline, not the speed")
    b.add_argument("--e2e", default=None,
                   help="end-to-end suite: default | matrix | gpu | smoke | none (default: gpu on CUDA, default "
                        "otherwise; smoke with --quick)")
    b.add_argument("--config", default=None,
                   help="op rows: cpu | gpu | target | quick | none | path to a JSON config (default: gpu on CUDA, cpu otherwise)")
    b.add_argument("--print-config", action="store_true", help="print the op config as JSON and exit")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="override the op config's dtype")
    b.add_argument("--sections", default="attention,prompt_embedding", type=_names(BENCH_SECTIONS),
                   help="comma list of attention, prompt_embedding")
    b.add_argument("--peers", default=None, type=_csv,
                   help="comma list of naive,peft,sdpa,flex,ptk-torch,ptk-triton (default: all)")
    b.add_argument("--rounds", type=_int_at_least(1), default=None, help="end-to-end: interleaved rounds (default 5; 2 for the default and smoke suites)")
    b.add_argument("--threads", type=_int_at_least(0), default=0,
                   help="torch CPU threads (default: torch's choice)")
    b.add_argument("--out", default=None, help="results folder (default bench-results/<timestamp>)")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cmd_verify(args) -> int:
    _benchmarks()
    from benchmarks import env
    from benchmarks.ops import verify

    device = env.pick_device(args.device)
    plan = verify.plan(device, args.grid, args.dtypes, args.ops, args.backends, args.seed, args.inject_error,
                       args.fp32_atol if args.fp32_atol is not None else verify.FP32_ATOL)
    checks = verify.run(plan, verbose=not args.failures_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": env.environment(device), "notes": plan.notes,
                       "checks": [dataclasses.asdict(c) for c in checks]}, f, indent=1)
    return 0 if checks and all(c.passed for c in checks) else 1


def _load_config(args, device):
    from benchmarks.ops import registry as cases

    if args.config == "none":
        return {}
    if args.quick:
        return dict(cases.QUICK)
    if args.config is None:
        return dict(cases.default_config(device))
    if args.config in cases.CONFIGS:
        return dict(cases.CONFIGS[args.config])
    with open(args.config) as f:
        return json.load(f)


def cmd_bench(args) -> int:
    import torch

    _benchmarks()
    from benchmarks import e2e, env
    from benchmarks.ops import peers, report
    from benchmarks.ops import registry as cases
    from benchmarks.ops import run as ops_run

    configs = sorted(cases.CONFIGS) + ["none"]
    if args.config is not None and args.config not in configs and not Path(args.config).is_file():
        print(f"ptkernels bench: --config {args.config!r} is neither a config name ({', '.join(configs)}) nor a "
              "JSON file", file=sys.stderr)
        return 2
    suites = sorted(e2e.SUITES) + ["none"]
    if args.e2e is not None and args.e2e not in suites:
        print(f"ptkernels bench: --e2e {args.e2e!r} is not a suite; use one of {', '.join(suites)}", file=sys.stderr)
        return 2
    unknown = [p for p in args.peers or () if p not in peers.PEER_ORDER]
    if unknown or args.peers == []:
        print(f"ptkernels bench: --peers: unknown or none {unknown}; use a comma list of "
              f"{', '.join(peers.PEER_ORDER)}", file=sys.stderr)
        return 2
    device = env.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _load_config(args, device)
    if args.dtype:
        cfg["dtype"] = args.dtype
    if args.print_config:
        print(json.dumps(cfg, indent=1))
        return 0
    suite = args.e2e or ("smoke" if args.quick else ("gpu" if device.type == "cuda" else "default"))
    out_dir = args.out or os.path.join("bench-results", time.strftime("%Y%m%d-%H%M%S"))
    meta = env.environment(device)
    meta.update(config=cfg, e2e_suite=suite, out=out_dir)
    progress = not args.no_progress
    print(f"ptkernels bench on {meta['device_name']}: torch {meta['torch']}, triton {meta['triton']}, "
          f"transformers {meta['transformers']}, peft {meta['peft']}")
    records, summary = [], [f"# ptkernels bench\n\n{meta['date']}, {meta['device_name']}, torch {meta['torch']}, "
                            f"triton {meta['triton']}, transformers {meta['transformers']}, peft {meta['peft']}\n"]
    t0 = time.perf_counter()
    if suite != "none":
        rounds = args.rounds if args.rounds is not None else (2 if suite in ("default", "smoke") else 5)
        min_run_time = 0.1 if suite == "smoke" else 0.5
        e2e_records = e2e.run_suite(suite, device, out_dir, rounds=rounds, min_run_time=min_run_time,
                                    modes=("train", "infer"), progress=progress)
        table = e2e.summary_table(e2e_records)
        print(f"\nEnd to end ({suite}): unpatched PEFT vs ptkernels.patch, medians of {rounds} interleaved rounds; "
              f"speed-up = PEFT time / ptkernels time\n")
        print(table)
        summary.append(f"## End to end ({suite}): unpatched PEFT vs ptkernels.patch\n\n{table}\n")
        records.extend(dict(r, section="e2e") for r in e2e_records)
    if cfg:
        dtype = cases.resolve_dtype(cfg.get("dtype", "auto"), device)
        meta["dtype"] = str(dtype).replace("torch.", "")
        print(f"\nOps: {cases.describe_config(cfg)}, dtype {meta['dtype']}; speed-up = peer time / ptkernels time "
              f"(ptkernels = triton where it runs, else the fast PyTorch path)")
        if "attention" in args.sections and cfg.get("attention"):
            recs = ops_run.run_attention(cfg, device, dtype, args.peers, progress)
            records.extend(recs)
            print("\nPrefix attention (median ms):\n")
            print(report.op_tables(recs, peers.PEER_ORDER, peers.PEER_LABELS))
            summary.append("## Prefix attention (median ms)\n\n" +
                           report.op_tables(recs, peers.PEER_ORDER, peers.PEER_LABELS, markdown=True) + "\n")
        if "prompt_embedding" in args.sections and cfg.get("prompt_embedding"):
            recs = ops_run.run_prompt_embedding(cfg, device, dtype, progress)
            records.extend(recs)
            print("\nPrompt embedding (median ms):\n")
            print(report.op_tables(recs, peers.EMBEDDING_PEER_ORDER, peers.EMBEDDING_PEER_LABELS))
            summary.append("## Prompt embedding (median ms)\n\n" + report.op_tables(
                recs, peers.EMBEDDING_PEER_ORDER, peers.EMBEDDING_PEER_LABELS, markdown=True) + "\n")
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    paths = report.write_results(out_dir, meta, records, "\n".join(summary))
    if not args.no_plots:
        try:
            paths += report.plot_attention(out_dir, [r for r in records if r.get("section") == "attention"],
                                           peers.PEER_LABELS)
        except Exception as exc:
            print(f"note: plots skipped: {type(exc).__name__}: {exc}")
        if suite != "none":
            paths.append(os.path.join(out_dir, "e2e.png"))
    print(f"\n{len(records)} measurements in {meta['elapsed_s']} s; wrote " + ", ".join(paths))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "interpret", False):
        _ensure_interpreter(argv)
    if args.command == "verify":
        return cmd_verify(args)
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
