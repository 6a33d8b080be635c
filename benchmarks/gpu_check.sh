#!/usr/bin/env bash
# One-command GPU check (issue 14): on a machine with a CUDA GPU, from the checkout's root,
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# runs, in this order, each step's output kept even when a later one fails:
#   1. the whole test suite with compiled Triton kernels (conftest uses the interpreter only without CUDA);
#   2. the op benchmarks (`ptkernels bench --e2e none`: Triton vs the fast PyTorch path vs PEFT's path
#      vs cat + SDPA, fp16/bf16), the end-to-end `gpu` suite (PEFT vs patched training steps), the
#      packed-sequence step (issue 16) and the mixed-adapter / prefix-dropout step (issue 17), and the
#      attention rows once more with PTKERNELS_TMA=0 (pointer loads instead of TMA descriptors);
#   3. the static report for the GPU's architecture (SASS per loop, registers, spills);
# and writes everything under benchmarks/results/gpu-<date>-<gpu>/ (or OUT_DIR) with device,
# versions and date in env.txt. Budget: under 10 minutes on an H100/H200 (the e2e suite runs
# 2 rounds; pass ROUNDS=5 for the committed table).
set -uo pipefail
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y-%m-%d)
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo none)
out=${1:-benchmarks/results/gpu-${stamp}-${gpu}}
mkdir -p "$out"
status=0
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  git rev-parse HEAD 2>/dev/null
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

arch=$(python -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'sm_{a}{b}')")

echo "== 1/3 test suite (compiled kernels)"
timeout 420 python -m pytest tests -q -x -p no:cacheprovider > "$out/pytest.txt" 2>&1 \
  || timeout 420 python -m pytest tests -q -p no:cacheprovider > "$out/pytest.txt" 2>&1 || status=1
tail -3 "$out/pytest.txt"

echo "== 2/3 benchmarks"
timeout 240 ptkernels bench --e2e none --out "$out/ops" > "$out/bench_ops.txt" 2>&1 || status=1
tail -20 "$out/bench_ops.txt"
# the attention rows again with the TMA loads off (cp.async pointer loads): TMA vs not, each against
# the same SDPA rows
PTKERNELS_TMA=0 timeout 150 ptkernels bench --e2e none --sections attention --peers sdpa,ptk-triton \
  --out "$out/ops_no_tma" > "$out/bench_ops_no_tma.txt" 2>&1 || status=1
tail -12 "$out/bench_ops_no_tma.txt"
timeout 240 python benchmarks/e2e.py --suite gpu --rounds "${ROUNDS:-2}" --min-run-time 0.5 --out "$out/e2e" \
  > "$out/e2e.txt" 2>&1 || status=1
tail -25 "$out/e2e.txt"
timeout 120 python benchmarks/packing.py --device cuda --rounds 2 --out "$out/packing" > "$out/packing.txt" 2>&1 || status=1
tail -8 "$out/packing.txt"
timeout 120 python benchmarks/adapters.py --device cuda --rounds 2 --out "$out/adapters" > "$out/adapters.txt" 2>&1 || status=1
tail -12 "$out/adapters.txt"

echo "== 3/3 static report ($arch)"
env -u TRITON_INTERPRET timeout 300 python benchmarks/static_report.py --arch "$arch" --json "$out/static_report.json" \
  > "$out/static_report.txt" 2>&1 || status=1
tail -3 "$out/static_report.txt"

echo "results in $out (exit $status)"
exit $status
