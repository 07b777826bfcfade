#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, one after the other, on an otherwise idle machine.
#   bench/run_all.sh [FLICKR8K_DIR]        (default ../shared/data/flickr8k; without it, sample photos are used)
# Each script's JSON goes to bench/results/<name>.json (the last line of its output).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${1:-../shared/data/flickr8k}
OUT=bench/results
mkdir -p "$OUT"
if [ -d "$DATA/images" ]; then IMAGES=(--images "$DATA/images"); else IMAGES=(); fi
load=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN{exit !($load > 0.5)}"; then
  echo "warning: load average $load: other jobs are running, the figures will be low and noisy" >&2
fi
run() {  # run NAME ARGS...: keep the script's final JSON line
  local name=$1; shift
  echo "== $name: $*" >&2
  "$PY" "$@" | tail -n 1 > "$OUT/$name.json"
}
if [ -d "$DATA/images" ]; then
  run batch bench/bench_batch.py --images "$DATA/images" --limit 500
else
  run batch bench/bench_batch.py --samples 200
fi
run latency bench/bench_latency.py --runs 40
run latency_exact bench/bench_latency.py --runs 40 --levers none
run pipeline bench/bench_pipeline.py "${IMAGES[@]}" --n 64
run service bench/bench_service.py --requests 16 --warmup 8
run service_2workers bench/bench_service.py --requests 16 --warmup 8 --workers 2 --max-batch 8
run service_exact bench/bench_service.py --requests 16 --warmup 8 --levers none --max-batch 8
run train bench/bench_train.py "${IMAGES[@]}"
run train_extract_exact bench/bench_train.py "${IMAGES[@]}" --skip-decoder --levers none
echo "results in $OUT/" >&2
