"""Tables on stdout, results.json / results.csv / summary.md, PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
        return "\n".join(lines)
    sep = "  "
    lines = [sep.join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip(),
             sep.join("-" * w for w in widths)]
    lines += [sep.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells[1:]]
    return "\n".join(lines)


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _grouped(records: List[dict]):
    groups: "OrderedDict[tuple, Dict[str, dict]]" = OrderedDict()
    for r in records:
        groups.setdefault((r["case"], r["mode"]), {})[r["peer"]] = r
    return groups


def op_tables(records: List[dict], peer_order: Sequence[str], labels: Dict[str, str], markdown=False) -> str:
    """Time table (median ms and ptkernels' speed-up over each peer), plus a memory table on GPU."""
    if not records:
        return ""
    groups = _grouped(records)
    shown = [p for p in peer_order if any(g.get(p, {}).get("status") == "ok" for g in groups.values())]
    gpu = any(r.get("tflops") is not None for r in records)
    headers = ["case", "mode"] + [labels.get(p, p) + " ms" for p in shown]
    headers += ["ptkernels speed-up vs " + ", ".join(p for p in shown if not p.startswith("ptk"))]
    if gpu:
        headers.append("ptkernels TFLOP/s")
    rows = []
    for (case, mode), g in groups.items():
        row = [case, mode]
        for p in shown:
            r = g.get(p)
            row.append(_ms(r["median_ms"]) if r and r["status"] == "ok" else "n/a")
        ratios = []
        ref = next((r for r in g.values() if r.get("vs")), None)
        for p in shown:
            if p.startswith("ptk"):
                continue
            r = g.get(p)
            ratios.append(f"{r['speedup']:.2f}x" if r and r.get("speedup") else "n/a")
        row.append(" / ".join(ratios))
        if gpu:
            vs = ref["vs"] if ref else None
            tf = g.get(vs, {}).get("tflops") if vs else None
            row.append(f"{tf:.1f}" if tf else "n/a")
        rows.append(row)
    out = [format_table(headers, rows, markdown)]
    if any(r.get("peak_mem_mib") is not None for r in records):
        mheaders = ["case", "mode"] + [labels.get(p, p) + " MiB" for p in shown]
        mrows = []
        for (case, mode), g in groups.items():
            mrows.append([case, mode] + [
                f"{g[p]['peak_mem_mib']:.0f}" if p in g and g[p].get("peak_mem_mib") is not None else "n/a"
                for p in shown])
        out.append("\nPeak memory above the inputs (GPU: torch.cuda.max_memory_allocated; CPU: the profiler's memory events):\n")
        out.append(format_table(mheaders, mrows, markdown))
    else:
        out.append("\nPeak memory: n/a on CPU (torch keeps no allocator statistics there; not estimated).")
    notes = sorted({f"{labels.get(r['peer'], r['peer'])}: {r['note']}" for r in records
                    if r["status"] != "ok" and r.get("note")})
    if notes:
        out.append("\nNot run:\n" + "\n".join(f"  - {n}" for n in notes))
    return "\n".join(out)


# ----------------------------------------------------------------------------- files

CSV_FIELDS = ["section", "family", "case", "model", "variant", "B", "Hq", "Hkv", "S", "P", "D", "V", "E", "causal",
              "padding", "dtype", "mode", "peer", "peer_label", "status", "median_ms",
              "tflops", "peak_mem_mib", "vs", "speedup", "steps_per_s", "tokens_per_s", "note"]


def write_results(out_dir: str, meta: dict, records: List[dict], summary: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=1, default=str)
    paths.append(path)
    path = os.path.join(out_dir, "results.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    paths.append(path)
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write(summary)
    paths.append(path)
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_attention(out_dir: str, records: List[dict], labels: Dict[str, str]) -> List[str]:
    """speedup_<family>.png: ptkernels' speed-up over each peer vs S, one line per P, rows fwd / fwd+bwd.
    memory_<family>.png (GPU): peak memory vs S per peer, one panel per P."""
    recs = [r for r in records if r["section"] == "attention"]
    if not recs:
        return []
    plt = _pyplot()
    paths = []
    for family in sorted({r["family"] for r in recs}):
        fam = [r for r in recs if r["family"] == family]
        modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in fam)]
        peers = [p for p in dict.fromkeys(r["peer"] for r in fam)
                 if any(r["peer"] == p and r.get("speedup") and r["peer"] != r.get("vs") for r in fam)]
        vs = next((r["vs"] for r in fam if r.get("vs")), None)
        if peers:
            fig, axes = plt.subplots(len(modes), len(peers), figsize=(3.6 * len(peers), 3.0 * len(modes)),
                                     squeeze=False, sharex=True)
            for i, mode in enumerate(modes):
                for j, peer in enumerate(peers):
                    ax = axes[i][j]
                    for P in sorted({r["P"] for r in fam}):
                        pts = sorted((r["S"], r["speedup"]) for r in fam
                                     if r["mode"] == mode and r["peer"] == peer and r["P"] == P and r.get("speedup"))
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"P={P}")
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                    ax.set_xscale("log", base=2)
                    ax.set_title(f"{mode}: vs {labels.get(peer, peer)}", fontsize=9)
                    if j == 0:
                        ax.set_ylabel(f"speed-up of {labels.get(vs, vs)}", fontsize=8)
                    if i == len(modes) - 1:
                        ax.set_xlabel("S (real tokens)")
                    ax.legend(fontsize=7)
            fig.suptitle(f"{family}: ptkernels speed-up (>1 = faster)", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"speedup_{family.replace('/', '_')}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
        if any(r.get("peak_mem_mib") is not None for r in fam):
            Ps = sorted({r["P"] for r in fam})
            fig, axes = plt.subplots(len(modes), len(Ps), figsize=(3.6 * len(Ps), 3.0 * len(modes)), squeeze=False)
            for i, mode in enumerate(modes):
                for j, P in enumerate(Ps):
                    ax = axes[i][j]
                    for peer in dict.fromkeys(r["peer"] for r in fam):
                        pts = sorted((r["S"], r["peak_mem_mib"]) for r in fam if r["mode"] == mode and r["peer"] == peer
                                     and r["P"] == P and r.get("peak_mem_mib") is not None)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels.get(peer, peer))
                    ax.set_xscale("log", base=2)
                    ax.set_title(f"{mode}, P={P}", fontsize=9)
                    ax.set_xlabel("S")
                    ax.set_ylabel("peak MiB")
                    ax.legend(fontsize=6)
            fig.suptitle(f"{family}: peak memory above inputs", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"memory_{family.replace('/', '_')}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
