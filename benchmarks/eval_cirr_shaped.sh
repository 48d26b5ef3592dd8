#!/usr/bin/env bash
# The shared path of stage II at CIRR validation's shape, tiled (the default at inference) against untiled
# (shared_tile_rows = 0, the path before tiling), in ONE process: the same sampled passes are timed 3 rounds per
# path, interleaved, and the per-pair path (the original's) once; prints the CPU model, the load, the JSON line and
# a summary of the ratios. Reduced from the RESULTS.md command to fit about 8 minutes on 2 cores: 1 sampled pass
# (instead of 5) and 1 per-pair query (instead of 2), no per-batch grouping. Usage (from the repository root):
#   benchmarks/eval_cirr_shaped.sh [python] [more bench options, e.g. --cirr-pass-sample 5 --cirr-sample 2]
set -euo pipefail
PY=${1:-.venv/bin/python}
shift || true
lscpu | grep -E '^(Model name|CPU\(s\)|Thread|L2|L3)' || true
uptime
start=$(date +%s)
line=$(HF_HUB_OFFLINE=1 "$PY" -m cirlib.bench --preset blip-base --reranker dual --cases eval-cirr-shaped \
  --cirr-queries 4181 --cirr-pass-sample 1 --cirr-sample 1 --cirr-per-batch false --cirr-repeats 3 \
  --cirr-untiled true --threads 2 "$@")
echo "$line"
uptime
echo "wall time: $(( $(date +%s) - start )) s"
"$PY" - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"machine: {r['machine']}; FLOP ratio {r['flop_ratio']}; tile rows {r['shared_tile_rows']}")
print(f"tiled / untiled speed, each round: {r['tiled_over_untiled_rounds']} (median round {r['tiled_over_untiled']})")
print(f"speedup over per-pair: tiled {r['speedup']} ({r['speedup'] / r['flop_ratio']:.2f} of the FLOP ratio), "
      f"untiled {r['untiled_speedup']} ({r['untiled_speedup'] / r['flop_ratio']:.2f})")
print(f"max |score diff|: tiled vs per-pair {r['max_abs_score_diff']:.2e}, "
      f"tiled vs untiled {r['max_abs_score_diff_untiled']:.2e}")
PY
