"""Static cost report of the prefix-attention kernels, without a GPU.

Every kernel variant the launchers choose for fp16 and bf16 at head dims 64 and 128, over the
feature sets in ``FEATURE_SETS`` (see ``FEATURES``: the prefix kinds, banks with lengths and prefix
dropout, packed sequences, softcap / sinks / sliding window, causal, padding, dropout, GQA), is compiled ahead of time for one target (``--arch sm_90`` by default) through the real
launchers (``benchmarks/aot_check.py``), down to SASS with the cuobjdump that ships inside the triton
wheel. For each distinct compiled kernel it records one JSON object with exactly these keys:

    kernel       the kernel's name (contains "fwd", "dq" or "dkdv" for those three kinds)
    dtype        "fp16" / "bf16"
    head_dim     64 / 128
    features     list of the feature strings of the case that produced it
    block_m, block_n, num_warps, num_stages
    registers    per thread (cuobjdump -res-usage)
    spill_bytes  bytes of spill stores + spill loads: the LDL / STL of triton's own SASS, checked
                 against ptxas -v (rerun with triton's flags) wherever it is not 0
    shared_bytes dynamic shared memory
    wgmma        the SASS has warpgroup MMAs (HGMMA)
    tma          the SASS has TMA loads (UTMALDG / UBLKCP)
    loops        one entry per innermost loop that holds a matmul:
                 {"sass": instructions in the loop body, "queries": query rows one iteration covers,
                  "keys": key columns one iteration covers}

An innermost loop is the span [target, branch] of a backward branch that contains no other such
span; it holds a matmul when an HMMA / HGMMA instruction lies in it. The forward and dQ kernels
iterate over key blocks (queries = BLOCK_M, keys = BLOCK_N per iteration); the dK/dV kernels over
query blocks (queries = BLOCK_M, keys = BLOCK_N).

It also prints a readable table with, per loop, its local-memory loads / stores (LDL / STL: the
spills that sit inside the loop rather than outside it; not in the JSON) and SASS instructions per (query x key) against Triton's
fused-attention tutorial compiled the same way (``TUTORIAL``: triton's
``python/tutorials/06-fused-attention.py``, bf16, sm_90, triton 3.9: forward D=64 522 per 128x64,
D=128 521 per 128x128; backward D=64 dK/dV 339 per 32x128, dQ 269 per 128x32; the tutorial's
forward at D=64 and its backward use 4 warps, its D=128 forward 8), and, since each of a kernel's
warps runs the loop body once per iteration, the same count times num_warps (issue slots per query
x key: the fair comparison between configs with different warp counts; the ratio column compares
issue slots, ours against the tutorial's). Exit status 1 when a
16-bit kernel at D <= 128 spills beyond the baseline in ``KNOWN_SPILLS`` (the spills found when
this report first read them with the right ptxas: a list to shrink; a kernel not listed must not
spill at all) or a kernel needs more shared memory than the target has (CI fails on that),
``--skip-exit-code`` when this triton cannot compile for NVIDIA GPUs. Spills are the local-memory
accesses of the SASS of triton's cubin; where there are any, ``ptxas -v`` is rerun with the ptxas and
the flags triton uses for the target (checked: the rerun's SASS must be the SASS of triton's cubin)
and must report the same bytes, and the report fails if ptxas does, if no flag set rebuilds the
cubin, or if the two counts differ. ``--quick`` (CI): the feature sets ``QUICK_FEATURE_SETS`` in bf16.

    env -u TRITON_INTERPRET python benchmarks/static_report.py --arch sm_90 --json report.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import torch

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import aot_check  # noqa: E402

FEATURES = ("prefix", "per_example_prefix", "bank", "lengths", "prefix_dropout", "varlen", "softcap", "sinks", "window",
            "relative_bias", "causal", "padding", "dropout", "gqa")
FEATURE_SETS = (
    (),
    ("prefix",),
    ("per_example_prefix",),
    ("prefix", "causal"),
    ("prefix", "padding"),
    ("prefix", "dropout"),
    ("prefix", "gqa"),
    ("prefix", "causal", "padding", "dropout", "gqa"),
    ("per_example_prefix", "causal", "padding", "dropout"),
    ("bank", "lengths", "prefix_dropout", "causal", "gqa"),  # several adapters in one batch, P-Tuning v2's dropout
    ("prefix", "varlen", "causal", "gqa"),  # packed sequences
    ("prefix", "softcap", "sinks", "window", "causal", "padding"),  # Gemma 2 / gpt-oss attention
    ("prefix", "relative_bias", "causal", "padding"),  # a T5 decoder's self-attention
)
QUICK_FEATURE_SETS = (("prefix",), ("prefix", "causal", "padding", "dropout", "gqa"),
                      ("per_example_prefix", "causal", "padding", "dropout"))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# --quick (CI) compiles bf16 only: fp16 builds the same loops (the full report's fp16 and bf16 rows
# spill the same bytes in every kernel of the quick sets), and the ahead-of-time check compiles fp16.
QUICK_DTYPES = ("bf16",)
HEAD_DIMS = (64, 128)
KEYS = ("kernel", "dtype", "head_dim", "features", "block_m", "block_n", "num_warps", "num_stages", "registers",
        "spill_bytes", "shared_bytes", "wgmma", "tma", "loops")

# Triton's fused-attention tutorial, bf16, sm_90, triton 3.9 (issue 14's measurement):
# (kind, head_dim) -> (SASS instructions per iteration, queries, keys, warps)
TUTORIAL = {
    ("fwd", 64): (522, 128, 64, 4),
    ("fwd", 128): (521, 128, 128, 8),
    ("dkdv", 64): (339, 32, 128, 4),
    ("dq", 64): (269, 128, 32, 4),
}

_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b[^;]*?(0x[0-9a-f]+)")


def case_for(dtype: str, head_dim: int, features: tuple) -> aot_check.Case:
    prefix = ("per_example" if "per_example_prefix" in features else "bank" if "bank" in features
              else "shared" if "prefix" in features else "none")
    return aot_check.Case(DTYPES[dtype], head_dim, causal="causal" in features, kpm="padding" in features,
                          prefix=prefix, dropout="dropout" in features, group=4 if "gqa" in features else 1,
                          lengths="lengths" in features, prefix_dropout="prefix_dropout" in features,
                          varlen="varlen" in features, softcap="softcap" in features, sinks="sinks" in features,
                          window="window" in features, relative_bias="relative_bias" in features)


def kind(kernel: str) -> Optional[str]:
    for k in ("dkdv", "dq", "fwd"):
        if k in kernel:
            return k
    return None


def _matmul_loop_bodies(sass: str) -> list[list[str]]:
    """The instruction texts of each innermost loop holding a matmul, in program order."""
    instrs = []  # (address, text)
    for match in _INSTR.finditer(sass):
        instrs.append((int(match.group(1), 16), match.group(2)))
    spans = []
    for address, text in instrs:
        branch = _BRANCH.search(text)
        if branch:
            target = int(branch.group(1), 16)
            if target <= address:
                spans.append((target, address))
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    bodies = []
    for lo, hi in sorted(set(innermost)):
        body = [text for address, text in instrs if lo <= address <= hi]
        if any(_MMA.search(text) for text in body):
            bodies.append(body)
    return bodies


_MMA_SHAPE = re.compile(r"\b(?:HGMMA\.(\d+)x(\d+)x(\d+)|HMMA\.(\d\d)(\d)(\d+))")


def mma_work(body: list[str]) -> int:
    """Multiply-adds of the MMA instructions in one loop body, per issuing thread group: the sum
    of m x n x k over its HGMMA.MxNxK (sm_90) and HMMA.MNK (sm_80: HMMA.16816 is 16 x 8 x 16)."""
    work = 0
    for text in body:
        match = _MMA_SHAPE.search(text)
        if match:
            m, n, k = (int(g) for g in (match.groups()[:3] if match.group(1) else match.groups()[3:]))
            work += m * n * k
    return work


def sass_loops(sass: str, block_m: int, block_n: int, edge_n: Optional[int] = None) -> list[dict]:
    """The innermost loops holding a matmul in cuobjdump -sass text (see the module docstring).
    edge_n: a forward kernel whose masked tiles are edge_n < block_n keys wide
    (``launch.forward_edge_block``); each loop's key count is then block_n scaled by its matmul work
    against the kernel's largest (every forward loop does the same two matmuls per key), so the
    masked loops read edge_n."""
    bodies = _matmul_loop_bodies(sass)
    keys = [block_n] * len(bodies)
    if edge_n is not None and edge_n != block_n and bodies:
        works = [mma_work(body) for body in bodies]
        keys = [round(block_n * work / max(works)) for work in works]
    return [{"sass": len(body), "queries": block_m, "keys": n} for body, n in zip(bodies, keys)]


_LOCAL = re.compile(r"\b(LDL|STL)\b")


def loop_spill_accesses(sass: str) -> list[int]:
    """Local-memory loads and stores (LDL / STL: register spills) in each matmul loop of
    ``sass_loops``, in the same order: a kernel whose spills all sit outside its loops pays for them
    once per program, not once per tile."""
    return [sum(1 for text in body if _LOCAL.search(text)) for body in _matmul_loop_bodies(sass)]


_LOCAL_ACCESS = re.compile(r"\b(LDL|STL)((?:\.[A-Z0-9]+)*)\s")
_ACCESS_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_local_bytes(sass: str) -> tuple[int, int]:
    """(stores, loads): bytes of local-memory stores and loads in ``sass``, each STL / LDL by its
    width (4 bytes, .64 8, .128 16)."""
    stores = loads = 0
    for match in _LOCAL_ACCESS.finditer(sass):
        widths = [_ACCESS_BYTES[m] for m in match.group(2).split(".") if m in _ACCESS_BYTES]
        if match.group(1) == "STL":
            stores += widths[0] if widths else 4
        else:
            loads += widths[0] if widths else 4
    return stores, loads


def sass_spill_bytes(sass: str) -> int:
    """Bytes of local-memory stores plus loads in ``sass`` (``sass_local_bytes``): the spill stores +
    loads of the cubin that runs when the kernel has no local arrays (Triton's kernels have none).
    ``_report_job`` checks it against ``ptxas -v`` (``_ptxas_spills``) wherever it is not 0."""
    return sum(sass_local_bytes(sass))


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself runs for sm_<arch>: triton 3.9 assembles sm_90 and newer with the newer
    ``ptxas-blackwell`` of its wheel, whose PTX version the older ``ptxas`` rejects."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError):  # older triton: one ptxas
        return _tool("ptxas")


# The ptxas flag sets triton's releases pass besides -v and the target: triton 3.9 adds
# --regAllocOptLevel=2 (a workaround for a ptxas 13 bug), which changes the register allocation and
# so the spills; older releases do not. Triton keeps no ptxas log, so _spill_bytes reruns ptxas with
# each set and keeps the one that rebuilds triton's own cubin.
_PTXAS_FLAG_SETS = (["-lineinfo", "--regAllocOptLevel=2"], ["-lineinfo"])


def _spill_bytes(ptx: str, arch: int, sass: str, fp_fusion: bool = True) -> int:
    """Spill stores + loads reported by ptxas -v (``_ptxas_spills``)."""
    return sum(_ptxas_spills(ptx, arch, sass, fp_fusion))


def _ptxas_spills(ptx: str, arch: int, sass: str, fp_fusion: bool = True) -> tuple[int, int]:
    """(spill stores, spill loads) in bytes reported by ptxas -v for the cubin triton built from ``ptx``, whose
    cuobjdump SASS is ``sass`` (``fp_fusion``: the compile's enable_fp_fusion). ptxas is rerun with
    the ptxas triton uses and each flag set of ``_PTXAS_FLAG_SETS``; the count comes from the run whose
    SASS is identical to triton's. Raises if ptxas fails or no flag set reproduces triton's cubin: a
    report that cannot read the spills of the kernel that runs must not say 0 or guess."""
    target = f"sm_{arch}{'a' if arch >= 90 else ''}"  # as triton's sm_arch_from_capability
    fmad = [] if fp_fusion else ["--fmad=false"]
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for flags in _PTXAS_FLAG_SETS:
            out = os.path.join(tmp, "k.cubin")
            proc = subprocess.run([_ptxas(arch), *flags, *fmad, "-v", f"--gpu-name={target}", src, "-o", out],
                                  capture_output=True, text=True, timeout=300)
            found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stdout + proc.stderr)
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"ptxas -v failed for {target} (exit {proc.returncode}): "
                                   f"{(proc.stdout + proc.stderr)[-2000:]}")
            with open(out, "rb") as f:
                if _sass(f.read()) == sass:
                    return sum(int(a) for a, _ in found), sum(int(b) for _, b in found)
            tried.append(" ".join(flags + fmad))
    raise RuntimeError(f"no ptxas flag set rebuilds triton's cubin for {target} (tried: {'; '.join(tried)}): "
                       "add the flags this triton passes to _PTXAS_FLAG_SETS")


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              timeout=300).stdout


def compile_launch(launch: aot_check.Launch, arch: int):
    """(triton's compiled kernel, its options) for one recorded launch on sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = aot_check._specialise(launch, make_backend(target))
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    return compiled, options


def _checked_spill_bytes(ptx: str, arch: int, sass: str, fp_fusion: bool) -> int:
    """``sass_spill_bytes(sass)``; where that is not 0, checked against ptxas's count for the same
    cubin (``_ptxas_spills``): the stores must be ptxas's spill stores exactly (a local array's
    stores are not spill stores), and the loads at least its spill loads (ptxas counts the reloads
    it inserts, and a later pass may copy one: the bank + prefix dropout prefix dK/dV kernel at D=80
    has 21 four-byte LDL where ptxas reports 80 bytes). A kernel with no LDL / STL has no spills, and
    skipping the ptxas rerun there saves about a third of the report's time."""
    stores, loads = sass_local_bytes(sass)
    if stores or loads:
        spill_stores, spill_loads = _ptxas_spills(ptx, arch, sass, fp_fusion)
        if stores != spill_stores or loads < spill_loads:
            raise RuntimeError(f"the SASS has {stores} / {loads} bytes of local stores / loads, ptxas reports "
                               f"{spill_stores} / {spill_loads} bytes of spill stores / loads: a local array? "
                               "sass_local_bytes no longer reads spills")
    return stores + loads


def _report_job(job) -> dict:
    """Compile one launch and measure it (runs in a worker process)."""
    launch, arch, dtype, head_dim, features = job
    compiled, options = compile_launch(launch, arch)
    sass = _sass(compiled.asm["cubin"])
    registers, _ = aot_check._resource_usage(compiled.asm["cubin"])
    block_m = int(launch.kwargs.get("BLOCK_M", 0))
    block_n = int(launch.kwargs.get("BLOCK_N", 0))
    return {
        "kernel": launch.name,
        "dtype": dtype,
        "head_dim": head_dim,
        "features": list(features),
        "block_m": block_m,
        "block_n": block_n,
        "num_warps": int(options.num_warps),
        "num_stages": int(options.num_stages),
        "registers": int(registers),
        "spill_bytes": _checked_spill_bytes(compiled.asm["ptx"], arch, sass, bool(options.enable_fp_fusion)),
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "HGMMA" in sass,
        "tma": bool(re.search(r"\b(UTMALDG|UBLKCP)\b", sass)),
        "loops": sass_loops(sass, block_m, block_n, launch.kwargs.get("EDGE_N")),
        "loop_spill_accesses": loop_spill_accesses(sass),  # (table only; not in the JSON)
    }


def jobs(arch: int, feature_sets, dtypes=tuple(DTYPES), head_dims=HEAD_DIMS) -> list[tuple]:
    """One job per distinct compiled kernel over dtypes x head dims x feature sets (first case wins)."""
    out, seen = [], set()
    for dtype in dtypes:
        for head_dim in head_dims:
            for features in feature_sets:
                for launch in aot_check.case_launches(case_for(dtype, head_dim, features), arch):
                    key = aot_check.launch_key(launch, arch)
                    if key not in seen:
                        seen.add(key)
                        out.append((launch, arch, dtype, head_dim, features))
    return out


def run(arch: int, feature_sets, workers: Optional[int] = None, dtypes=tuple(DTYPES),
        head_dims=HEAD_DIMS) -> list[dict]:
    todo = jobs(arch, feature_sets, dtypes, head_dims)
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(todo) > 1:
        picklable = [(aot_check._picklable((launch, arch, "", True))[0], arch, dt, d, f)
                     for launch, arch, dt, d, f in todo]
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_report_job, picklable, chunksize=1))
    return [_report_job(job) for job in todo]


def per_pair(loop: dict) -> float:
    return loop["sass"] / (loop["queries"] * loop["keys"])


def table(records: list[dict]) -> str:
    """Markdown: one row per kernel and loop, with SASS per (query x key) against the tutorial's."""
    lines = ["| kernel | dtype | D | features | tile m x n | warps/stages | regs | spill B | smem B | wgmma/tma "
             "| loop SASS / (q x k) | per q x k | tutorial | ratio | x warps per q x k | LDL/STL in loop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = (f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {'+'.join(r['features']) or 'none'} | "
                f"{r['block_m']}x{r['block_n']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} | "
                f"{r['spill_bytes']} | {r['shared_bytes']} | {int(r['wgmma'])}/{int(r['tma'])} |")
        if not r["loops"]:
            lines.append(head + " no matmul loop | | | | | |")
        local = r.get("loop_spill_accesses") or [""] * len(r["loops"])
        tutorial = TUTORIAL.get((kind(r["kernel"]), r["head_dim"]))
        reference = tutorial[0] / (tutorial[1] * tutorial[2]) if tutorial else None
        for loop, accesses in zip(r["loops"], local):
            ours = per_pair(loop)
            cells = [f"{loop['sass']} / ({loop['queries']}x{loop['keys']})", f"{ours:.4f}"]
            if reference:  # the ratio of issue slots (x warps): 8 warps halve the per-thread count
                cells += [f"{reference:.4f}", f"{ours * r['num_warps'] / (reference * tutorial[3]):.2f}x"]
            else:
                cells += ["", ""]
            cells.append(f"{ours * r['num_warps']:.3f}")
            cells.append(str(accesses))
            lines.append(head + " " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Spills recorded when the report learnt to read them (see the file's "about"): per target, the
# kernels that spilled then and how much. CI fails on any other spill and on any growth.
KNOWN_SPILLS = pathlib.Path(ROOT) / "benchmarks" / "results" / "static-sm90" / "known_spills.json"


def spill_key(r: dict) -> tuple:
    return r["kernel"], r["dtype"], r["head_dim"], tuple(r["features"])


def known_spills(arch: int, path: pathlib.Path = KNOWN_SPILLS) -> dict:
    """{(kernel, dtype, head_dim, features): spill bytes} recorded for sm_<arch> (empty if none)."""
    if not path.exists():
        return {}
    return {spill_key(r): r["spill_bytes"] for r in json.loads(path.read_text()).get(f"sm_{arch}", [])}


def baseline_triton(path: pathlib.Path = KNOWN_SPILLS) -> Optional[str]:
    """The triton version the spill baseline was recorded with (None without a baseline)."""
    return json.loads(path.read_text()).get("triton") if path.exists() else None


def baseline_applies(version: Optional[str] = None, path: pathlib.Path = KNOWN_SPILLS) -> bool:
    """Whether the spill baseline holds for triton ``version`` (default: the installed one): only for
    the triton it was recorded with, since another release allocates registers differently (triton
    3.6, the GPU image's, spills in kernels that 3.9 compiles without)."""
    if version is None:
        import triton

        version = triton.__version__
    return version == baseline_triton(path)


def spilling(records: list[dict], known: Optional[dict] = None) -> list[dict]:
    """The 16-bit kernels at D <= 128 that spill more than ``known`` records for them (nothing
    recorded: any spill)."""
    known = known or {}
    return [r for r in records if r["dtype"] in ("fp16", "bf16") and r["head_dim"] <= 128
            and r["spill_bytes"] > known.get(spill_key(r), 0)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="sm_90 (default) or sm_80, ...")
    parser.add_argument("--json", default=None, help="write the records here (a JSON list)")
    parser.add_argument("--quick", action="store_true",
                        help=f"only the feature sets {QUICK_FEATURE_SETS} in {QUICK_DTYPES} (CI)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS),
                        help="head dims to compile (default 64 128; 96 / 80 show the head-dim split, "
                             "PTKERNELS_SPLIT_HEAD_DIM=0 the same padded to 128)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="dtypes to compile (default fp16 bf16; --quick: bf16)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--skip-exit-code", type=int, default=0,
                        help="exit with this code when this triton cannot compile for NVIDIA GPUs")
    args = parser.parse_args(argv)
    arch = int(args.arch.lower().replace("sm_", "").replace("sm", ""))
    if arch not in aot_check.TARGETS:
        parser.error(f"--arch must be one of {['sm_%d' % a for a in aot_check.TARGETS]}, got {args.arch!r}")
    if (reason := aot_check.unavailable_reason()) is not None:
        print(f"cannot compile for NVIDIA GPUs here: {reason}")
        return args.skip_exit_code
    start = time.perf_counter()
    head_dims = tuple(args.head_dims)
    dtypes = tuple(args.dtypes or (QUICK_DTYPES if args.quick else DTYPES))
    records = run(arch, QUICK_FEATURE_SETS if args.quick else FEATURE_SETS, args.workers, dtypes, head_dims)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{key: r[key] for key in KEYS} for r in records], f, indent=1)
    known = known_spills(arch)
    bad = spilling(records, known)
    for r in bad:
        print(f"SPILL {r['kernel']} {r['dtype']} D={r['head_dim']} {'+'.join(r['features'])}: {r['spill_bytes']} bytes"
              f" (recorded: {known.get(spill_key(r), 0)})")
    if not baseline_applies():  # another triton allocates registers differently: listed, not failed
        import triton

        print(f"(the spill baseline {KNOWN_SPILLS.name} is for triton {baseline_triton()}, this is triton "
              f"{triton.__version__}: spills beyond it are listed above, not counted as failures)")
        bad = []
    spills = spilling(records)
    limit = aot_check.TARGETS[arch][0]
    too_big = [r for r in records if r["shared_bytes"] > limit]
    for r in too_big:
        print(f"SHARED {r['kernel']} {r['dtype']} D={r['head_dim']} {'+'.join(r['features'])}: {r['shared_bytes']} bytes "
              f"> {limit}")
    print(f"{len(records)} kernels for sm_{arch}, {len(spills)} spilling 16-bit kernels at D <= 128 "
          f"({len(bad)} beyond the {len(known)} recorded in {KNOWN_SPILLS.name}), "
          f"{len(too_big)} over the shared memory limit, {time.perf_counter() - start:.0f}s")
    return 1 if bad or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
