"""The op runner: prefix attention (forward, forward+backward) and prompt embedding, every peer of
``peers`` on every case of ``registry``, side by side."""

from __future__ import annotations

import gc
import sys
from typing import Callable, List, Optional

import torch

from ..timing import median_ms, peak_memory_mib
from . import peers as peers_mod
from . import registry as cases_mod

MODES = ("fwd", "fwd+bwd")


def attention_flops(case: dict, mode: str) -> float:
    """DESIGN.md convention: forward 4*B*Hq*Sq*(P+Sk)*D (causal: P + Sk/2), backward 2.5x forward."""
    keys = case["P"] + (case["S"] / 2 if case.get("causal") else case["S"])
    fwd = 4.0 * case["B"] * case["Hq"] * case["S"] * keys * case["D"]
    return fwd if mode == "fwd" else fwd * 3.5


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except Exception:  # pragma: no cover - tqdm is a bench extra
        return None
    # disable=None: a bar on a terminal, silence when stderr is a file or a pipe (CI logs stay readable)
    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True, leave=False, disable=None,
                mininterval=0.5)


def _measure(fn: Callable, device, timing: dict, count_flops: Optional[float]) -> dict:
    """status, median ms, TFLOP/s (GPU) and peak MiB of ``fn``; a peer that fails (OOM, compile
    error) is reported as status "error" with the reason, not fatal."""
    try:
        ms = median_ms(fn, device, min_run_time=timing.get("min_run_time", 0.5))
    except Exception as exc:
        _free(device)
        return dict(status="error", note=_error(exc))
    mem = peak_memory_mib(fn, device)
    tflops = None
    if device.type == "cuda" and count_flops:
        tflops = count_flops / (ms * 1e-3) / 1e12
    return dict(status="ok", median_ms=ms, tflops=tflops, peak_mem_mib=mem)


def _error(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {line[:160]}"


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(records: List[dict], ptk_names=("ptk-triton", "ptk-torch")) -> None:
    """records of one case and mode: set ``speedup`` = this peer's time / ptkernels' time."""
    by_peer = {r["peer"]: r for r in records}
    ptk = next((by_peer[n] for n in ptk_names if n in by_peer and by_peer[n]["status"] == "ok"), None)
    for r in records:
        r["vs"] = ptk["peer"] if ptk else None
        r["speedup"] = (r["median_ms"] / ptk["median_ms"]) if (ptk and r["status"] == "ok") else None


def run_attention(cfg: dict, device, dtype, peers=None, progress=True) -> List[dict]:
    timing = cfg.get("timing", {})
    peers = peers or peers_mod.PEER_ORDER
    todo = cfg.get("attention", [])
    bar = _progress(len(todo) * len(peers) * len(MODES), "attention", progress)
    records: List[dict] = []
    for case in todo:
        name = cases_mod.attention_case_name(case)
        inp = peers_mod.make_attention_inputs(case, dtype, device)
        fns = peers_mod.make_attention_peers(inp, device, peers)
        for mode in MODES:
            group = []
            for peer in peers:
                if bar is not None:
                    bar.set_postfix_str(f"{name} {mode} {peer}"[:60])
                base = dict(section="attention", case=name, **{k: case.get(k) for k in
                            ("family", "B", "Hq", "Hkv", "S", "P", "D", "causal", "padding")},
                            dtype=cases_mod.DTYPE_NAMES.get(dtype, str(dtype)), mode=mode, peer=peer,
                            peer_label=peers_mod.PEER_LABELS.get(peer, peer), median_ms=None, tflops=None,
                            peak_mem_mib=None, note="")
                fn = fns.get(peer, "not requested")
                if isinstance(fn, str):
                    base.update(status="n/a" if not fn.startswith("error") else "error", note=fn)
                else:
                    step = fn if mode == "fwd" else peers_mod.with_backward(fn, inp)
                    base.update(_measure(step, device, timing, attention_flops(case, mode)))
                group.append(base)
                if bar is not None:
                    bar.update(1)
            add_speedups(group)
            records.extend(group)
        del inp, fns
        _free(device)
    if bar is not None:
        bar.close()
    return records


def run_prompt_embedding(cfg: dict, device, dtype, progress=True) -> List[dict]:
    timing = cfg.get("timing", {})
    todo = cfg.get("prompt_embedding", [])
    order = peers_mod.EMBEDDING_PEER_ORDER
    bar = _progress(len(todo) * len(order) * len(MODES), "prompt embedding", progress)
    records: List[dict] = []
    for case in todo:
        name = cases_mod.embedding_case_name(case)
        fns, backward = peers_mod.make_embedding_peers(case, dtype, device)
        for mode in MODES:
            group = []
            for peer in order:
                base = dict(section="prompt_embedding", case=name, **{k: case.get(k) for k in
                            ("family", "V", "E", "B", "S", "P")}, dtype=cases_mod.DTYPE_NAMES.get(dtype, str(dtype)),
                            mode=mode, peer=peer, peer_label=peers_mod.EMBEDDING_PEER_LABELS[peer], median_ms=None,
                            tflops=None, peak_mem_mib=None, note="")
                fn = fns[peer]
                if isinstance(fn, str):
                    base.update(status="n/a", note=fn)
                else:
                    step = fn if mode == "fwd" else backward(fn)
                    base.update(_measure(step, device, timing, None))
                group.append(base)
                if bar is not None:
                    bar.update(1)
            add_speedups(group)
            records.extend(group)
        _free(device)
    if bar is not None:
        bar.close()
    return records
