#!/usr/bin/env bash
# One-command GPU check (issue 14): on a machine with a CUDA GPU, from the checkout's root,
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# runs, most telling first, each step under its own time cap and all of them inside one budget
# (BUDGET_S seconds, default 540: a step gets min(its cap, what is left); once under 20 s are
# left, the remaining steps are skipped, and summary.txt says so):
#   1. headline: the `target` op rows (`ptkernels bench --config target`: issue 14's B=32, H=12,
#      S=512, P=128, D=64 forward+backward against cat + SDPA's flash backend without a mask and the
#      other peers, the same causal and padded, one Llama GQA row);
#   2. the same attention rows with PTKERNELS_TMA=0 (pointer loads instead of TMA descriptors), and
#      head dims 96 and 80 (`--config split`) as the kernels split them (64 + 32 / 16) and padded to
#      128 (PTKERNELS_SPLIT_HEAD_DIM=0);
#   3. the whole test suite with compiled Triton kernels (conftest uses the interpreter only without
#      CUDA), its files split over SHARDS pytest processes run side by side (compiling the kernel
#      variants is CPU work; SHARDS defaults to 4);
#   4. the end-to-end `gpu` suite (PEFT vs patched training steps), the packed-sequence step (issue
#      16) and the mixed-adapter / prefix-dropout step (issue 17);
#   5. the static report for the GPU's architecture (SASS per loop, registers, spills).
# Everything lands under benchmarks/results/gpu-<date>-<gpu>/ (or OUT_DIR): env.txt (device,
# versions, date, commit), one <step>.txt per step, summary.txt (each step's exit code, seconds,
# limit). GPU_CHECK_DRY_RUN=1 writes summary.txt with the commands and limits and runs nothing (no
# GPU needed; tests/test_cli.py checks the script that way). The full GPU op grid is
# `ptkernels bench --e2e none` (several minutes; not part of this check).
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-540}
SHARDS=${SHARDS:-4}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
start=$SECONDS
stamp=$(date -u +%Y-%m-%d)
if [[ $DRY_RUN == 1 ]]; then
  gpu=dry-run
  arch=sm_90
else
  gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo none)
  arch=$(python -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'sm_{a}{b}')")
fi
out=${1:-benchmarks/results/gpu-${stamp}-${gpu}}
mkdir -p "$out"
: > "$out/summary.txt"
status=0
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('torch', 'triton', 'transformers', 'peft')))"
  [[ $DRY_RUN == 1 ]] || python -c "import torch; print('cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null
  echo "budget ${BUDGET_S} s, ${SHARDS} test shards, arch ${arch}"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

left() { echo $((BUDGET_S - (SECONDS - start))); }

# step NAME CAP COMMAND...: COMMAND under min(CAP, budget left) seconds, output in $out/NAME.txt
step() {
  local name=$1 cap=$2 rc t0 limit
  shift 2
  limit=$(left)
  (( cap < limit )) && limit=$cap
  if (( limit < 20 )); then
    echo "$name: skipped, the budget is spent" | tee -a "$out/summary.txt"
    return
  fi
  if [[ $DRY_RUN == 1 ]]; then
    echo "$name: limit ${limit} s: $*" >> "$out/summary.txt"
    return
  fi
  echo "== $name (limit ${limit} s)"
  t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  rc=$?
  (( rc )) && status=1
  echo "$name: exit $rc in $((SECONDS - t0)) s, limit ${limit} s$( ((rc == 124)) && echo ', TIMED OUT')" \
    | tee -a "$out/summary.txt"
  tail -n 15 "$out/$name.txt"
}

# the suite's test files, dealt round-robin to SHARDS pytest processes run at once
suite() {
  local files shard pids=() rc=0
  mapfile -t files < <(ls tests/test_*.py)
  for ((shard = 0; shard < SHARDS; shard++)); do
    local mine=()
    for ((i = shard; i < ${#files[@]}; i += SHARDS)); do mine+=("${files[i]}"); done
    python -m pytest "${mine[@]}" -q -p no:cacheprovider > "$out/suite-shard$shard.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  tail -n 2 "$out"/suite-shard*.txt
  return $rc
}

step headline 120 ptkernels bench --e2e none --config target --out "$out/ops"
step headline_no_tma 60 env PTKERNELS_TMA=0 ptkernels bench --e2e none --config target --sections attention \
  --peers sdpa,ptk-triton --out "$out/ops_no_tma"
step head_dim_split 30 ptkernels bench --e2e none --config split --sections attention --peers sdpa,ptk-triton \
  --out "$out/ops_split"
step head_dim_padded 30 env PTKERNELS_SPLIT_HEAD_DIM=0 ptkernels bench --e2e none --config split --sections attention \
  --peers ptk-triton --out "$out/ops_padded"
export -f suite
export out SHARDS
step suite 300 bash -c suite
step e2e 90 python benchmarks/e2e.py --suite gpu --rounds "${ROUNDS:-2}" --min-run-time 0.5 --out "$out/e2e"
step packing 45 python benchmarks/packing.py --device cuda --rounds 2 --out "$out/packing"
step adapters 45 python benchmarks/adapters.py --device cuda --rounds 2 --out "$out/adapters"
step static_report 120 env -u TRITON_INTERPRET python benchmarks/static_report.py --arch "$arch" \
  --json "$out/static_report.json"

echo "total $((SECONDS - start)) s of ${BUDGET_S}; results in $out (exit $status)" | tee -a "$out/summary.txt"
exit $status
