"""The prefix-attention kernels compile for real GPUs (sm_90, sm_80), checked ahead of time on any machine.

The other kernel tests run in Triton's interpreter when there is no GPU, and the interpreter accepts
code that the real compiler rejects. This test compiles every kernel, through the real launchers and
with a real launch's argument specialisation, down to a cubin for sm_90 (H100) and sm_80 (A100), and
checks that each fits the target's shared memory and that the launch grids fit CUDA's limits even for
B * H > 65535 (see benchmarks/aot_check.py, which does it with explicit sm_90 / sm_80 device limits).

conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, and triton.jit reads it at import time,
so the check runs in one subprocess with TRITON_INTERPRET removed from its environment.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_EXIT_CODE = 77


def test_kernels_compile_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aot_check.py"), "--quick", "--arch", "90", "80",
         "--skip-exit-code", str(SKIP_EXIT_CODE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode == SKIP_EXIT_CODE:
        pytest.skip(output.strip().splitlines()[-1])
    assert proc.returncode == 0, output[-20000:]
    assert "0 failed, 0 grid problems, 0 kernels not launched" in proc.stdout, output[-20000:]


def test_quick_cases_launch_every_kernel_with_the_targets_limits():
    # Recorded in this (interpreted) process, nothing compiled: the CI set of each target (sm_80 a
    # subset of sm_90's) reaches every kernel of
    # the launchers' KERNELS, with the block configs chosen for each target's shared memory.
    # Compiled for an NVIDIA GPU, the attention dropout's Philox takes the inline-PTX multiplies, and
    # the attention kernels ask for floating-point contraction (launch.FP_FUSION).
    from benchmarks import aot_check
    from ptkernels.ops.prefix_attention.common import DROPOUT_PTX, DROPOUT_PTX_KEYS
    from ptkernels.ops.prefix_attention.launch import backward_config, block_d, forward_config

    for arch in (90, 80):
        limits = aot_check.target_limits(arch)
        launched = set()
        for case in aot_check.quick_cases(arch):
            for launch in aot_check.case_launches(case, arch, allow_interpreted=True):
                launched.add(launch.name)
                if launch.name.startswith("_prefix_attention_"):  # contraction pinned, whatever triton's default
                    assert launch.kwargs.get("enable_fp_fusion") is True, (arch, str(case), launch.name)
                if "DROPOUT" in launch.kwargs:
                    want_dropout = DROPOUT_PTX if case.dropout or launch.name == "_dropout_keep_mask_kernel" else 0
                    if want_dropout and (launch.name == "_prefix_attention_bwd_dkdv_kernel" or (
                            launch.name == "_prefix_attention_bwd_prefix_dkdv_kernel" and block_d(case.head_dim) > 64)):
                        # their round keys are kernel arguments (the prefix dK/dV kernel's above D=64,
                        # the head dim split as 64 + a tail included)
                        want_dropout = DROPOUT_PTX_KEYS
                    assert launch.kwargs["DROPOUT"] == want_dropout, (arch, str(case), launch.name)
                if launch.name == "_prefix_attention_fwd_kernel":
                    want = forward_config(case.head_dim, case.dtype, limits, dropout=case.dropout,
                                          bias=case.relative_bias)
                elif launch.name.startswith("_prefix_attention_bwd_"):
                    configs = backward_config(case.head_dim, case.dtype, limits, dropout=case.dropout,
                                              bias=case.relative_bias)
                    want = configs["dq" if launch.name == "_prefix_attention_bwd_dq_kernel" else "dkdv"]
                    if launch.name == "_prefix_attention_bwd_prefix_dkdv_kernel" and case.q_len == 1:
                        # one query tile: no pipeline (triton 3.6's pipeliner failed there with T5's bias)
                        want = dict(want, num_stages=1)
                else:
                    continue
                assert {key: launch.kwargs[key] for key in want} == want, (arch, str(case), launch.name)
        assert launched == set(aot_check.kernels()), arch


def test_static_report_schema_and_no_new_spills(tmp_path):
    """benchmarks/static_report.py --quick for sm_90: one record per compiled kernel with exactly
    the documented keys, the matmul loops found in the SASS, and no register spills in any 16-bit
    kernel at D <= 128 beyond the recorded baseline (known_spills.json; the script exits 1 on any
    other spill or on growth), where the installed triton is the baseline's."""

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--quick", "--arch", "sm_90",
         "--json", str(report), "--skip-exit-code", str(SKIP_EXIT_CODE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode == SKIP_EXIT_CODE:
        pytest.skip(output.strip().splitlines()[-1])
    assert proc.returncode == 0, output[-20000:]
    from benchmarks.static_report import KEYS

    records = json.loads(report.read_text())
    assert records and all(list(r) == list(KEYS) for r in records)
    kinds = {k for r in records for k in ("fwd", "dq", "dkdv") if k in r["kernel"]}
    assert kinds == {"fwd", "dq", "dkdv"}
    for r in records:
        if any(k in r["kernel"] for k in ("fwd", "dq", "dkdv")):
            assert r["loops"], f"no matmul loop found in {r['kernel']}"
            assert r["wgmma"], f"{r['kernel']} does not use warpgroup MMA on sm_90"
        assert all(set(loop) == {"sass", "queries", "keys"} and loop["sass"] > 0 for loop in r["loops"])
    from benchmarks.static_report import KNOWN_SPILLS, baseline_applies, known_spills, spill_key, spilling

    known = known_spills(90)
    if baseline_applies():  # (another triton allocates registers differently: 3.6 spills elsewhere)
        assert spilling(records, known) == []
        # the baseline is exact for its triton: a kernel that now spills less must be lowered there
        # (and a reader that saw no spills at all would fail here)
        stale = [(spill_key(r), r["spill_bytes"], known[spill_key(r)]) for r in records
                 if spill_key(r) in known and r["spill_bytes"] != known[spill_key(r)]]
        assert stale == [], f"update {KNOWN_SPILLS}: (kernel, spills now, recorded) {stale}"


def test_loops_of_half_width_masked_tiles_count_their_own_keys():
    """A forward kernel whose masked tiles are EDGE_N < BLOCK_N keys wide: each loop's key count
    comes from its matmul work against the kernel's largest loop (sm_90's HGMMA.MxNxK shapes,
    sm_80's HMMA.16816), so a per-key comparison does not credit a half tile with a whole one's keys."""
    from benchmarks.static_report import mma_work, sass_loops

    def loop(start, mmas):
        lines = [f"/*{start + 16 * i:04x}*/ {m} R24, gdesc[UR24], R24 ;" for i, m in enumerate(mmas)]
        lines.append(f"/*{start + 16 * len(mmas):04x}*/ @P0 BRA 0x{start:x} ;")
        return "\n".join(lines)

    full_128 = ["HGMMA.64x128x16.F32.BF16"] * 16  # D=128: QK^T 8 x (64x128x16), PV 8 x (64x128x16)
    half_128 = ["HGMMA.64x64x16.F32.BF16"] * 8 + ["HGMMA.64x128x16.F32.BF16"] * 4  # 64 keys
    sass = loop(0x100, full_128) + "\n" + loop(0x400, half_128)
    assert mma_work(half_128) * 2 == mma_work(full_128) == 16 * 64 * 128 * 16
    assert [x["keys"] for x in sass_loops(sass, 128, 128, 64)] == [128, 64]
    assert [x["keys"] for x in sass_loops(sass, 128, 128)] == [128, 128]  # no EDGE_N: every loop BLOCK_N
    sm80 = loop(0x100, ["HMMA.16816.F32.BF16"] * 32) + "\n" + loop(0x400, ["HMMA.16816.F32.BF16"] * 16)
    assert mma_work(["HMMA.16816.F32.BF16"]) == 16 * 8 * 16
    assert [x["keys"] for x in sass_loops(sm80, 128, 64, 32)] == [64, 32]


def test_forward_edge_block_halves_where_whole_masked_tiles_spilled():
    from ptkernels.ops.prefix_attention.launch import forward_edge_block

    assert forward_edge_block(128, 128) == 128  # plain prefix / causal / GQA: whole tiles
    for feature in ("dropout", "padding", "varlen", "softcap", "bias", "prefix_dropout"):
        assert forward_edge_block(128, 128, **{feature: True}) == 64, feature
        assert forward_edge_block(64, 128, **{feature: True}) == 32, feature  # sm_80's 128 x 64 tiles
    assert forward_edge_block(64, 64, dropout=True) == 32
    for feature in ("padding", "varlen", "softcap", "bias", "prefix_dropout"):  # at D=64 only dropout spilled
        assert forward_edge_block(64, 64, **{feature: True}) == 64, feature
    assert forward_edge_block(32, 64, dropout=True) == 32  # fp32 / D=256 / interpreter tiles: never split
    assert forward_edge_block(16, 64, dropout=True) == 16
    assert forward_edge_block(64, 256, dropout=True) == 64


def test_static_report_compiles_the_dtypes_and_head_dims_asked_for(monkeypatch, capsys):
    # (.ci/run compiles every feature set at D = 96 / 128 in bf16 with triton 3.6 this way)
    from benchmarks import aot_check, static_report

    asked = []
    monkeypatch.setattr(aot_check, "unavailable_reason", lambda: None)
    monkeypatch.setattr(static_report, "run", lambda arch, sets, workers, dtypes, head_dims:
                        asked.append((arch, sets, dtypes, head_dims)) or [])
    assert static_report.main(["--arch", "sm_90", "--head-dims", "96", "128", "--dtypes", "bf16"]) == 0
    assert static_report.main(["--arch", "sm_80", "--quick", "--head-dims", "64"]) == 0
    assert static_report.main(["--arch", "sm_90"]) == 0
    assert asked == [(90, static_report.FEATURE_SETS, ("bf16",), (96, 128)),
                     (80, static_report.QUICK_FEATURE_SETS, ("bf16",), (64,)),
                     (90, static_report.FEATURE_SETS, ("fp16", "bf16"), (64, 128))]
    with pytest.raises(SystemExit):
        static_report.main(["--dtypes", "fp32"])
    assert "--dtypes" in capsys.readouterr().err


def test_spill_baseline_logic():
    from benchmarks.static_report import spilling

    def rec(kernel, dtype="bf16", head_dim=64, spill=0):
        return dict(kernel=kernel, dtype=dtype, head_dim=head_dim, features=["prefix"], spill_bytes=spill)

    known = {("a", "bf16", 64, ("prefix",)): 100}
    records = [rec("a", spill=100), rec("a", head_dim=128, spill=8), rec("b", spill=4), rec("c"),
               rec("d", dtype="fp32", spill=50), rec("e", head_dim=256, spill=50)]
    assert [r["kernel"] for r in spilling(records, known)] == ["a", "b"]  # a at D=128 is not recorded
    assert [r["head_dim"] for r in spilling([rec("a", spill=101)], known)] == [64]  # growth
    assert spilling([rec("a", spill=60)], known) == []


def test_spill_baseline_holds_only_for_its_triton(tmp_path):
    """The baseline is compared only under the triton it was recorded with (the GPU image's 3.6
    spills in kernels that 3.9 compiles without); no baseline file: never."""
    from benchmarks.static_report import KNOWN_SPILLS, baseline_applies, baseline_triton

    path = tmp_path / "known_spills.json"
    path.write_text(json.dumps({"triton": "3.9.0", "sm_90": []}))
    assert baseline_triton(path) == "3.9.0"
    assert baseline_applies("3.9.0", path) and not baseline_applies("3.6.0", path)
    assert not baseline_applies("3.9.0", tmp_path / "absent.json")
    assert baseline_triton() == json.loads(KNOWN_SPILLS.read_text())["triton"] == "3.9.0"


def test_sass_spill_bytes_counts_each_local_access_by_its_width():
    from benchmarks.static_report import sass_local_bytes, sass_spill_bytes

    sass = """
        /*0100*/                   STL.64 [R1+0x8], R4 ;
        /*0110*/                   LDL.LU.128 R8, [R1+0x10] ;
        /*0120*/                   LDL R3, [R1+0x4] ;
        /*0130*/                   STL [R1], R2 ;
        /*0140*/                   LDG.E.64 R6, desc[UR4][R2.64] ;
        /*0150*/                   STS.128 [R0], R8 ;
        /*0160*/                   LDL.U8 R5, [R1+0x3] ;
    """
    assert sass_spill_bytes(sass) == 8 + 16 + 4 + 4 + 1
    assert sass_local_bytes(sass) == (8 + 4, 16 + 4 + 1)
    assert sass_spill_bytes("/*0100*/ LDG.E R2, desc[UR4][R2.64] ;") == 0


@pytest.mark.parametrize("ptxas_counts, accepted", [
    ((4, 8), True),    # as ptxas reports
    ((4, 4), True),    # a reload copied after ptxas counted its reloads (the D=80 bank + prefix dropout kernel)
    ((0, 0), False),   # local stores that are not spill stores: a local array
    ((8, 8), False),   # fewer stores than ptxas's: the reader misses some
    ((4, 12), False),  # fewer loads than ptxas's
])
def test_spill_count_is_checked_against_ptxas(monkeypatch, ptxas_counts, accepted):
    """The report's spill bytes are the SASS's LDL / STL; where there are any, ptxas -v for the same
    cubin must report the same stores and at most as many loads (no ptxas run here: its counts are
    given)."""
    from benchmarks import static_report

    monkeypatch.setattr(static_report, "_ptxas_spills", lambda *args: ptxas_counts)
    sass = "/*0100*/ STL [R1], R2 ;\n/*0110*/ LDL R3, [R1] ;\n/*0120*/ LDL R4, [R1] ;\n"
    if accepted:
        assert static_report._checked_spill_bytes("", 90, sass, True) == 12
    else:
        with pytest.raises(RuntimeError, match="local array"):
            static_report._checked_spill_bytes("", 90, sass, True)


def test_spill_reader_reads_triton_ptx_and_fails_loudly():
    from benchmarks import aot_check
    from benchmarks.static_report import _spill_bytes

    if (reason := aot_check.unavailable_reason()) is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="ptxas"):
        _spill_bytes("this is not PTX", 90, "")


def test_spill_reader_reads_the_cubin_triton_built():
    """The spill count comes from a ptxas run that rebuilds triton's own cubin (same SASS): triton 3.9
    passes ptxas --regAllocOptLevel=2, which moves the spills, so a plain ``ptxas -v`` reads another
    kernel's. A SASS that no flag set rebuilds is an error, not a count. In a subprocess, for the
    reason in the module docstring."""
    code = """
import sys
from benchmarks import aot_check, static_report as sr
if (reason := aot_check.unavailable_reason()) is not None:
    print(reason)
    sys.exit(%d)
case = sr.case_for("bf16", 64, ("prefix",))
launch = next(l for l in aot_check.case_launches(case, 90) if l.name == "_sum_splits_kernel")
compiled, options = sr.compile_launch(launch, 90)
sass = sr._sass(compiled.asm["cubin"])
assert "STL" not in sass, "this small kernel should not spill"
assert sr._spill_bytes(compiled.asm["ptx"], 90, sass, bool(options.enable_fp_fusion)) == 0
try:
    sr._spill_bytes(compiled.asm["ptx"], 90, sass.replace("EXIT", "NOP"), bool(options.enable_fp_fusion))
except RuntimeError as exc:
    assert "no ptxas flag set rebuilds" in str(exc), exc
else:
    raise AssertionError("a SASS no ptxas run rebuilds was given a spill count")
print("ok")
""" % SKIP_EXIT_CODE
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode == SKIP_EXIT_CODE:
        pytest.skip(output.strip().splitlines()[-1])
    assert proc.returncode == 0 and "ok" in proc.stdout, output[-20000:]
