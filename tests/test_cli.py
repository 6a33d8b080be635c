"""The ``ptkernels`` command: verify (CPU, Triton interpreter, small grid) and bench --quick.

These run the real command in a subprocess (TRITON_INTERPRET=1 must be set before triton is
imported, which an in-process test cannot promise). No test asserts anything about speed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.ops import verify
from benchmarks.ops.registry import VERIFY_GRIDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300, interpret=True):
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "ptkernels.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _device_args():
    return [] if torch.cuda.is_available() else ["--interpret"]


def test_verify_small_grid_passes_and_prints_table():
    r = run_cli("verify", *_device_args(), "--grid", "small", "--dtypes", "fp32,fp16")
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-4000:]
    assert "max abs err" in out and "tolerance" in out and "result" in out
    assert "prefix_attention" in out and "PASS" in out
    assert "RESULT: PASS" in out
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET=1" in out
        assert " triton " in out or "prefix_attention triton skipped" in out


def test_verify_injected_error_fails():
    r = run_cli("verify", "--grid", "small", "--dtypes", "fp32", "--backends", "torch", "--ops", "prefix_attention",
                "--inject-error", interpret=False)
    assert r.returncode != 0
    assert "FAIL" in r.stdout and "RESULT: FAIL" in r.stdout


def test_verify_json(tmp_path):
    path = tmp_path / "verify.json"
    r = run_cli("verify", "--grid", "small", "--dtypes", "fp32", "--backends", "torch", "--json", str(path),
                interpret=False)
    assert r.returncode == 0, r.stdout[-3000:]
    data = json.loads(path.read_text())
    assert data["checks"] and all(c["passed"] for c in data["checks"])
    assert data["meta"]["torch"] == torch.__version__


# ----------------------------------------------------------------------------- comparison unit tests


def test_compare_fp32_catches_wrong_result():
    ref = torch.randn(4, 8, dtype=torch.float64)
    good = ref.float() + 1e-6
    bad = ref.float().clone()
    bad[0, 0] += 0.1
    assert verify.compare(good, ref, None, torch.float32, False)[3]
    err, tol, base, ok = verify.compare(bad, ref, None, torch.float32, False)
    assert not ok and err > tol and base is None


def test_compare_low_precision_flash_attention_rule():
    torch.manual_seed(0)
    ref = torch.randn(64, 64, dtype=torch.float64)
    base = (ref + 1e-2 * torch.randn_like(ref)).half()  # the PyTorch low-precision baseline's error
    base_err = float((base.double() - ref).abs().max())
    within = (ref + 1.5 * base_err * torch.sign(torch.randn_like(ref))).half()
    outside = ref.half().clone()
    outside[3, 3] += 3 * base_err + 0.01
    _, tol, got_base, ok = verify.compare(within, ref, base, torch.float16, False)
    assert got_base == pytest.approx(base_err)
    assert tol >= 2 * base_err and ok
    assert not verify.compare(outside, ref, base, torch.float16, False)[3]
    # gradients get 3x: 2.5x the baseline error passes as a gradient, not as an output
    g = ref.half().clone()
    g[0, 0] = (ref[0, 0] + 2.5 * base_err).half()
    assert verify.compare(g, ref, base, torch.float16, True)[3]
    assert not verify.compare(g, ref, base, torch.float16, False)[3]


def test_compare_nan_and_shape_mismatch_fail():
    ref = torch.zeros(3, 3, dtype=torch.float64)
    nan = torch.zeros(3, 3)
    nan[1, 1] = float("nan")
    assert not verify.compare(nan, ref, None, torch.float32, False)[3]
    assert not verify.compare(torch.zeros(3), ref, None, torch.float32, False)[3]


def test_check_detects_a_wrong_kernel():
    case = VERIFY_GRIDS["small"][0]
    checks = verify.check_prefix_attention(case, "torch", torch.float32, torch.device("cpu"), inject_error=True)
    assert any(not c.passed for c in checks)
    checks = verify.check_prefix_attention(case, "torch", torch.float32, torch.device("cpu"))
    assert all(c.passed for c in checks)
    assert {c.what for c in checks} == {"out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"}


# ----------------------------------------------------------------------------- bench


def test_bench_quick_writes_json_csv_png(tmp_path):
    out = tmp_path / "res"
    r = run_cli("bench", "--quick", "--device", "cpu", "--out", str(out), "--no-progress", interpret=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "End to end (smoke)" in r.stdout and "Prefix attention" in r.stdout and "speed-up" in r.stdout
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "triton", "transformers", "peft", "date", "config"):
        assert key in meta
    att = [x for x in data["results"] if x["section"] == "attention"]
    peers = {x["peer"] for x in att if x["status"] == "ok"}
    assert {"naive", "peft", "sdpa", "ptk-torch"} <= peers
    assert all(x["median_ms"] > 0 for x in att if x["status"] == "ok")
    assert all(x["peak_mem_mib"] >= 0 for x in att if x["status"] == "ok")  # CPU: the profiler's memory events
    e2e = [x for x in data["results"] if x["section"] == "e2e"]  # the headline: PEFT vs patched, train and infer
    assert {(x["variant"], x["mode"]) for x in e2e} == {(v, m) for v in ("peft", "ptkernels") for m in ("train", "infer")}
    assert all(x["median_ms"] > 0 and x["peak_mem_mib"] > 0 for x in e2e)
    assert all(x["speedup_vs_peft"] > 0 for x in e2e if x["variant"] == "ptkernels")
    assert {x["mode"] for x in att} == {"fwd", "fwd+bwd"}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["results"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (out / "summary.md").read_text().startswith("# ptkernels bench")


def test_bench_print_config_is_json():
    r = run_cli("bench", "--print-config", "--config", "gpu", interpret=False)
    assert r.returncode == 0
    cfg = json.loads(r.stdout[r.stdout.index("{"):])
    assert {c["S"] for c in cfg["attention"] if c["family"] == "bert"} == {128, 256, 512, 1024}
    assert {c["P"] for c in cfg["attention"] if c["family"] == "gpt2"} == {16, 64, 128, 256}


def _gpu_check_dry_run(tmp_path, budget):
    """benchmarks/gpu_check.sh with GPU_CHECK_DRY_RUN=1: its summary.txt lines, nothing run."""
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", BUDGET_S=str(budget))
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch" in (tmp_path / "env.txt").read_text()
    return (tmp_path / "summary.txt").read_text().splitlines()


def test_gpu_check_runs_the_headline_first_and_every_step_inside_its_budget(tmp_path):
    lines = _gpu_check_dry_run(tmp_path, 540)
    steps = [line.split(":")[0] for line in lines[:-1]]
    assert steps == ["headline", "headline_no_tma", "head_dim_split", "head_dim_padded", "suite", "e2e", "packing",
                     "adapters", "static_report"]
    assert "--config target" in lines[0] and "PTKERNELS_TMA=0" in lines[1]
    limits = [int(line.split("limit ")[1].split(" s")[0]) for line in lines[:-1]]
    assert all(0 < limit <= 540 for limit in limits)
    # issue 14: the headline shape is in the rows the headline times
    from benchmarks.ops.registry import CONFIGS
    assert dict(B=32, Hq=12, S=512, P=128, D=64, causal=False, padding="none").items() <= \
        CONFIGS["target"]["attention"][0].items()
    # the split / padded pair times head dims the kernels split (and the padded run pads them)
    from ptkernels.ops.prefix_attention.launch import split_head_dim
    assert {row["D"] for row in CONFIGS["split"]["attention"]} == {80, 96}
    assert all(split_head_dim(row["D"])[1] for row in CONFIGS["split"]["attention"])
    assert "PTKERNELS_SPLIT_HEAD_DIM=0" in lines[3] and "--config split" in lines[2] + lines[3]


def test_gpu_check_skips_what_the_budget_cannot_hold(tmp_path):
    lines = _gpu_check_dry_run(tmp_path, 5)
    assert len(lines) == 10 and all(line.endswith("skipped, the budget is spent") for line in lines[:-1])


BAD_CLI_ARGS = [
    (["verify", "--ops", "bogus"], "--ops: unknown bogus; use a comma list of prefix_attention, prompt_embedding"),
    (["verify", "--backends", "torch,bogus"], "--backends: unknown bogus"),
    (["verify", "--dtypes", ""], "--dtypes: no names given"),
    (["verify", "--dtypes", "fp64"], "--dtypes: unknown fp64"),
    (["verify", "--fp32-atol", "-1"], "--fp32-atol: must be a finite number >= 0"),
    (["verify", "--json", "/nonexistent-ptk/dir/x.json"], "--json: folder /nonexistent-ptk/dir does not exist"),
    (["bench", "--sections", "bogus"], "--sections: unknown bogus"),
    (["bench", "--threads", "-1"], "--threads: must be an integer >= 0, got -1"),
    (["bench", "--rounds", "0"], "--rounds: must be an integer >= 1, got 0"),
    (["bench", "--config", "nosuchname", "--print-config"], "--config 'nosuchname' is neither a config name"),
    (["bench", "--e2e", "bogus", "--config", "none"], "--e2e 'bogus' is not a suite; use one of"),
    (["bench", "--peers", "bogus", "--e2e", "none"], r"--peers: unknown or none \['bogus'\]"),
]


@pytest.mark.parametrize("argv,message", BAD_CLI_ARGS, ids=[" ".join(a) for a, _ in BAD_CLI_ARGS])
def test_bad_arguments_exit_2_naming_them_before_running(argv, message, capsys, tmp_path, monkeypatch):
    """Each once ran to a traceback, a "RESULT: PASS" with nothing checked, or an exit 0 that ignored
    the name; now exit status 2 and a message naming the argument, before any check or timing runs."""
    import re

    from ptkernels import cli

    monkeypatch.chdir(tmp_path)  # (nothing may be written; bench would write its results here)
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
