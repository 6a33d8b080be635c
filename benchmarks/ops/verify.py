"""``ptkernels verify``: every op and backend on this machine against an fp64 reference.

Tolerances (the FlashAttention rule):
  * float16 / bfloat16: err(kernel vs fp64 ref) <= 2 x err(PyTorch in the same precision, no upcast,
    vs fp64 ref) + atol for outputs, 3 x for gradients; atol = eps(dtype)/2 * max(1, max|ref|),
    one output rounding.
  * float32: err <= fp32_atol * max(1, max|ref|) (default fp32_atol = 1e-3, loose enough for TF32
    tensor-core dots on GPU, still orders of magnitude below what a real bug produces).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ptkernels.testing import FWD_FACTOR, GRAD_FACTOR, flash_attention_bound, max_abs_err, output_rounding

from .. import env
from .registry import DTYPE_NAMES, DTYPES, EMBEDDING_GRIDS, VERIFY_GRIDS, EmbeddingCase, VerifyCase

FP32_ATOL = 1e-3


@dataclass
class Check:
    op: str
    backend: str
    dtype: str
    case: str
    what: str  # "out" or "grad:<name>"
    err: float
    tol: float
    base_err: Optional[float]  # error of PyTorch in the same low precision (None for fp32)
    passed: bool


def tolerance(dtype: torch.dtype, is_grad: bool, ref: torch.Tensor, base_err: Optional[float],
              fp32_atol: float = FP32_ATOL) -> float:
    """The FlashAttention rule (see the module docstring; the rule itself lives in ptkernels.testing)."""
    if dtype in (torch.float32, torch.float64):
        return fp32_atol * max(1.0, float(ref.detach().abs().max()) if ref.numel() else 1.0)
    return flash_attention_bound(float(base_err), is_grad=is_grad, slack=output_rounding(dtype, ref))


def compare(kernel: torch.Tensor, ref64: torch.Tensor, baseline: Optional[torch.Tensor], dtype: torch.dtype,
            is_grad: bool, fp32_atol: float = FP32_ATOL):
    """(err, tol, base_err, passed) for one tensor."""
    base_err = max_abs_err(baseline, ref64) if baseline is not None else None
    err = max_abs_err(kernel, ref64)
    if kernel.shape != ref64.shape:
        return float("inf"), 0.0, base_err, False
    tol = tolerance(dtype, is_grad, ref64, base_err, fp32_atol)
    return err, tol, base_err, err <= tol


# ----------------------------------------------------------------------------- prefix attention


def _attention_inputs(case: VerifyCase, seed: int):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {"q": r(case.B, case.Hq, case.Sq, case.D), "k": r(case.B, case.Hkv, case.Sk, case.D),
         "v": r(case.B, case.Hkv, case.Sk, case.D)}
    if case.prefix == "shared":
        x["prefix_k"], x["prefix_v"] = r(case.Hkv, case.P, case.D), r(case.Hkv, case.P, case.D)
    elif case.prefix == "per_example":
        x["prefix_k"], x["prefix_v"] = r(case.B, case.Hkv, case.P, case.D), r(case.B, case.Hkv, case.P, case.D)
    elif case.prefix == "bank":
        x["prefix_k"], x["prefix_v"] = r(3, case.Hkv, case.P, case.D), r(3, case.Hkv, case.P, case.D)
    if "sinks" in case.features:
        x["sinks"] = r(case.Hq)
    if "relative_bias" in case.features:
        x["relative_bias_table"] = r(32, case.Hq)
    kpm = None
    if case.padding == "random":
        lengths = torch.randint(1, case.Sk + 1, (case.B,), generator=g)
        kpm = torch.arange(case.Sk)[None, :] < lengths[:, None]
    elif case.padding == "one":
        pos = torch.randint(0, case.Sk, (case.B,), generator=g)
        kpm = torch.arange(case.Sk)[None, :] == pos[:, None]
    grad_out = r(case.B, case.Hq, case.Sq, case.D)
    options = {}  # the non-differentiable arguments of the case's features
    if case.prefix == "bank":
        options["prefix_index"] = torch.randint(0, 3, (case.B,), generator=g)
        options["prefix_lengths"] = torch.tensor([case.P, case.P // 2, 1])
    if "softcap" in case.features:
        options["softcap"] = 2.0
    if "window" in case.features:
        options["window"] = 7
    if "relative_bias" in case.features:
        from ptkernels import relative_position_buckets

        options["relative_bias_buckets"] = relative_position_buckets(case.P + case.Sk, bidirectional=not case.causal)
    return x, kpm, grad_out, options


def _run_attention(fn, x: dict, kpm, grad_out, dtype, device, causal, options=None):
    leaves = {n: t.detach().to(device=device, dtype=dtype).requires_grad_(True) for n, t in x.items()}
    options = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in (options or {}).items()}
    out = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("prefix_k"), leaves.get("prefix_v"),
             key_padding_mask=None if kpm is None else kpm.to(device), causal=causal, sinks=leaves.get("sinks"),
             relative_bias_table=leaves.get("relative_bias_table"), **options)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device=device, dtype=dtype))
    return out.detach(), {n: gr for n, gr in zip(leaves, grads)}


def check_prefix_attention(case: VerifyCase, backend: str, dtype: torch.dtype, device: torch.device,
                           seed: int = 0, inject_error: bool = False, fp32_atol: float = FP32_ATOL) -> List[Check]:
    from ptkernels import prefix_attention
    from ptkernels.ops.prefix_attention.reference import prefix_attention_reference

    x, kpm, grad_out, options = _attention_inputs(case, seed)
    # The fp64 oracle sees exactly the values the kernel sees (rounded to dtype first).
    x_rounded = {n: t.to(dtype).to(torch.float64) for n, t in x.items()}
    ref_out, ref_grads = _run_attention(prefix_attention_reference, x_rounded, kpm, grad_out.to(dtype).double(),
                                        torch.float64, device, case.causal, options)
    base_out, base_grads = None, {}
    if dtype not in (torch.float32, torch.float64):
        def lowp(*a, **kw):
            return prefix_attention_reference(*a, upcast=False, **kw)

        base_out, base_grads = _run_attention(lowp, x, kpm, grad_out, dtype, device, case.causal, options)

    def kernel(*a, **kw):
        return prefix_attention(*a, backend=backend, **kw)

    out, grads = _run_attention(kernel, x, kpm, grad_out, dtype, device, case.causal, options)
    if inject_error:  # hidden --inject-error: proves a wrong kernel makes verify fail
        out = out.clone()
        out.view(-1)[0] += 0.5
    checks = []
    name = DTYPE_NAMES.get(dtype, str(dtype))
    err, tol, base_err, ok = compare(out, ref_out, base_out, dtype, False, fp32_atol)
    checks.append(Check("prefix_attention", backend, name, case.name, "out", err, tol, base_err, ok))
    for n, gr in grads.items():
        err, tol, base_err, ok = compare(gr, ref_grads[n], base_grads.get(n), dtype, True, fp32_atol)
        checks.append(Check("prefix_attention", backend, name, case.name, "d" + n, err, tol, base_err, ok))
    return checks


# ----------------------------------------------------------------------------- prompt embedding


def _embedding_reference(op: str, ids, weight, prompt):
    """torch.cat([prompt.expand(B, -1, -1), F.embedding(ids, weight)], 1), or the virtual-token gather."""
    B = ids.shape[0]
    V = weight.shape[0]
    batched = prompt if prompt.dim() == 3 else prompt.unsqueeze(0).expand(B, -1, -1)
    if op == "prompt_embedding":
        return torch.cat([batched, F.embedding(ids, weight)], dim=1)
    is_prompt = ids >= V
    words = F.embedding(ids.clamp(max=V - 1), weight)
    prompts = torch.gather(batched, 1, (ids - V).clamp(min=0).unsqueeze(-1).expand(-1, -1, weight.shape[1]))
    return torch.where(is_prompt.unsqueeze(-1), prompts, words)


def check_embedding(case: EmbeddingCase, backend: str, dtype: torch.dtype, device: torch.device, mod,
                    seed: int = 0, inject_error: bool = False, fp32_atol: float = FP32_ATOL) -> List[Check]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(case.V, case.E, generator=g)
    prompt = torch.randn(*((case.P, case.E) if case.prompt == "shared" else (case.B, case.P, case.E)), generator=g)
    hi = case.V if case.op == "prompt_embedding" else case.V + case.P
    ids = torch.randint(0, hi, (case.B, case.S), generator=g).to(device)
    out_len = case.P + case.S if case.op == "prompt_embedding" else case.S
    grad_out = torch.randn(case.B, out_len, case.E, generator=g)

    def run(fn, dt):
        w = weight.to(dtype).to(device=device, dtype=dt).requires_grad_(case.weight_grad)
        p = prompt.to(dtype).to(device=device, dtype=dt).requires_grad_(True)
        out = fn(ids, w, p)
        leaves = [p] + ([w] if case.weight_grad else [])
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype).to(device=device, dtype=dt))
        names = ["dprompt"] + (["dweight"] if case.weight_grad else [])
        return out.detach(), dict(zip(names, grads))

    ref = lambda i, w, p: _embedding_reference(case.op, i, w, p)  # noqa: E731
    ref_out, ref_grads = run(ref, torch.float64)
    base_out, base_grads = (None, {}) if dtype == torch.float32 else run(ref, dtype)
    fn = getattr(mod, case.op)
    out, grads = run(lambda i, w, p: fn(i, w, p, backend=backend), dtype)
    if inject_error:
        out = out.clone()
        out.view(-1)[0] += 0.5
    name = DTYPE_NAMES.get(dtype, str(dtype))
    checks = []
    err, tol, base_err, ok = compare(out, ref_out, base_out, dtype, False, fp32_atol)
    checks.append(Check(case.op, backend, name, case.name, "out", err, tol, base_err, ok))
    for n, gr in grads.items():
        err, tol, base_err, ok = compare(gr, ref_grads[n], base_grads.get(n), dtype, True, fp32_atol)
        checks.append(Check(case.op, backend, name, case.name, n, err, tol, base_err, ok))
    return checks


# ----------------------------------------------------------------------------- driver

COLUMNS = [("op", 23), ("backend", 7), ("dtype", 5), ("case", 40), ("check", 10), ("max abs err", 11),
           ("tolerance", 10), ("lowp torch", 10), ("result", 6)]


def _fmt_row(values) -> str:
    return "  ".join(str(v).ljust(w) for v, (_, w) in zip(values, COLUMNS)).rstrip()


def _row(c: Check) -> str:
    base = "-" if c.base_err is None else f"{c.base_err:.2e}"
    return _fmt_row([c.op, c.backend, c.dtype, c.case, c.what, f"{c.err:.2e}", f"{c.tol:.2e}", base,
                     "PASS" if c.passed else "FAIL"])


@dataclass
class Plan:
    device: torch.device
    jobs: list = field(default_factory=list)  # (label, callable returning List[Check])
    notes: list = field(default_factory=list)


def plan(device: torch.device, grid: str, dtypes: Sequence[str], ops: Sequence[str], backends: Sequence[str],
         seed: int, inject_error: bool, fp32_atol: float) -> Plan:
    p = Plan(device)
    want = [DTYPES[d] for d in dtypes]
    if device.type == "cuda" and torch.bfloat16 in want and not torch.cuda.is_bf16_supported():
        want.remove(torch.bfloat16)
        p.notes.append("bf16 skipped: this GPU does not support it")

    def dtypes_for(backend: str):
        if backend == "triton" and device.type == "cpu" and torch.bfloat16 in want:
            note = ("bf16 skipped for triton on CPU: tl.dot on bf16 is unreliable in Triton's interpreter "
                    "(checked on GPU instead)")
            if note not in p.notes:
                p.notes.append(note)
            return [d for d in want if d != torch.bfloat16]
        return want

    def available(op: str) -> List[str]:
        """The requested backends that run here; a note for each one that does not."""
        ok = []
        for b in backends:
            why = env.triton_status(device) if b == "triton" else None
            if why:
                p.notes.append(f"{op} triton skipped: {why}")
            else:
                ok.append(b)
        return ok

    if "prefix_attention" in ops:
        for b in available("prefix_attention"):
            for dt in dtypes_for(b):
                for case in VERIFY_GRIDS[grid]:
                    p.jobs.append(lambda case=case, b=b, dt=dt: check_prefix_attention(
                        case, b, dt, device, seed, inject_error, fp32_atol))
    if "prompt_embedding" in ops:
        import ptkernels.ops.prompt_embedding as mod

        for b in available("prompt_embedding"):
            for dt in dtypes_for(b):
                for case in EMBEDDING_GRIDS[grid]:
                    p.jobs.append(lambda case=case, b=b, dt=dt: check_embedding(
                        case, b, dt, device, mod, seed, inject_error, fp32_atol))
    p.notes.append("dropout_p > 0 is not compared (a random mask has no fp64 oracle); the tests cover it")
    return p


def run(p: Plan, out=sys.stdout, verbose: bool = True) -> List[Check]:
    print(f"ptkernels verify on {env.device_name(p.device)}; torch {torch.__version__}, triton "
          f"{env._version('triton')}, TRITON_INTERPRET={'1' if env.interpreter_enabled() else '0'}", file=out)
    print(f"tolerance: fp32 err <= atol*max(1,|ref|); fp16/bf16 err <= {FWD_FACTOR:g}x (grads {GRAD_FACTOR:g}x) "
          "'lowp torch' err + eps/2*max(1,|ref|); errors are max abs vs an fp64 reference\n", file=out)
    print(_fmt_row([c[0] for c in COLUMNS]), file=out)
    print("  ".join("-" * w for _, w in COLUMNS), file=out, flush=True)
    checks: List[Check] = []
    start = time.perf_counter()
    for job in p.jobs:
        try:
            got = job()
        except Exception as exc:
            # A crash is a failure, reported as a row, never a traceback that hides the rest of the table.
            label = getattr(job, "__defaults__", None)
            case, backend, dt = label if label else ("?", "?", "?")
            got = [Check("prefix_attention" if isinstance(case, VerifyCase) else getattr(case, "op", "?"), backend,
                         DTYPE_NAMES.get(dt, str(dt)), getattr(case, "name", str(case)),
                         "raised", float("inf"), 0.0, None, False)]
            print(f"    {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200], file=out)
        for c in got:
            if verbose or not c.passed:
                print(_row(c), file=out, flush=True)
        checks.extend(got)
    failed = [c for c in checks if not c.passed]
    print(f"\n{len(checks)} checks, {len(checks) - len(failed)} passed, {len(failed)} failed "
          f"({time.perf_counter() - start:.1f} s)", file=out)
    for n in p.notes:
        print(f"note: {n}", file=out)
    print("RESULT: " + ("FAIL" if failed else "PASS"), file=out, flush=True)
    return checks
