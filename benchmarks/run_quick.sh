#!/usr/bin/env bash
# Every benchmark's --quick run, one after another, on this checkout (a fresh clone with ../shared beside it is
# enough: each builds what it needs at a small size under .cache/ and writes its results there, never over
# benchmarks/results/). Prints each one's wall time; stops at the first failure.
#
#     bash benchmarks/run_quick.sh            # all of them
#     bash benchmarks/run_quick.sh walk million   # only these
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python}
declare -A RUNS=(
  [gpu_check]="benchmarks/gpu_check.py --device cpu --quick"
  [encoding]="benchmarks/encoding.py --quick"
  [qnet_throughput]="benchmarks/qnet_throughput.py --quick"
  [graph_build]="benchmarks/graph_build.py --quick"
  [walk]="benchmarks/walk.py --quick"
  [walk_report]="benchmarks/walk_report.py .cache/walk-quick/walk.json --plot .cache/walk-quick/walk.png"
  [ip_index_crossover]="benchmarks/ip_index_crossover.py --quick"
  [million]="benchmarks/million.py --quick"
  [million_sharded]="benchmarks/million_sharded.py --quick"
  [million_heads]="benchmarks/million_heads.py --quick"
  [quality_by_size]="benchmarks/quality_by_size.py --quick"
)
ORDER=(gpu_check encoding qnet_throughput graph_build walk walk_report ip_index_crossover million million_sharded million_heads
  quality_by_size)
[ $# -gt 0 ] && ORDER=("$@")
summary=()
for name in "${ORDER[@]}"; do
  [ -n "${RUNS[$name]:-}" ] || { echo "unknown benchmark: $name (one of ${!RUNS[*]})"; exit 2; }
  echo "=== $name: $PY ${RUNS[$name]}"
  started=$SECONDS
  mkdir -p .cache
  $PY ${RUNS[$name]} > ".cache/run_quick-$name.log" 2>&1 || { tail -30 ".cache/run_quick-$name.log"; echo "FAILED: $name"; exit 1; }
  tail -3 ".cache/run_quick-$name.log"
  summary+=("$name: $((SECONDS - started)) s")
done
echo "=== all passed"
printf '%s\n' "${summary[@]}"
