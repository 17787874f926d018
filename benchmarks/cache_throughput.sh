#!/usr/bin/env bash
# Training throughput from the teacher caches against the live teacher, paired round by round on
# the bundled demo (benchmarks/RESULTS.md, "The teacher caches", table 3):
#
#   bash benchmarks/cache_throughput.sh OUT_DIR [ROUNDS]      # 5 rounds by default
#
# Makes the bucket cache (top_m:48) and the sampled cache (sampled:12:32) of the demo config
# once, then per round and per method (TAD, forward KL) runs 60 steps online, from the bucket
# cache and from the sampled cache, one after another, and prints each run's median tokens/s
# over steps 6-60, then each cache's ratio to online: median (range) over the rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
(( $# >= 1 )) || { echo "usage: $0 OUT_DIR [ROUNDS]" >&2; exit 2; }
out=$1
rounds=${2:-5}
tune=${TUNE:-.venv/bin/tune}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
common=(max_steps=60 validation_dataset=null eval_every_n_steps=null save_every_n_steps=null
        export_hf=false log_every_n_steps=1)
declare -A method_args=(
    [tad]=""
    [forward_kl]="kd_loss._component_=tad_torchtune.losses.ForwardKLLoss ~kd_loss.k ~kd_loss.beta"
)
declare -A cache_args=(
    [top_m]="cache_mode=top_m cache_top_m=48"
    [sampled]="cache_mode=sampled cache_top_m=12 cache_samples=32"
)
for cache in top_m sampled; do
    [[ -f $out/$cache/manifest.json ]] && continue
    # shellcheck disable=SC2086
    "$tune" run tad_cache --config demo teacher_cache_dir="$out/$cache" ${cache_args[$cache]} \
        output_dir="$out/unused" >"$out/tad_cache_$cache.log" 2>&1
done
: >"$out/runs.tsv"
for round in $(seq 1 "$rounds"); do
    for method in tad forward_kl; do
        for source in online top_m sampled; do
            run=$out/r${round}_${method}_${source}
            rm -rf "$run"
            from=()
            [[ $source != online ]] && from=(teacher_cache_dir="$out/$source")
            # shellcheck disable=SC2086
            "$tune" run tad_distill --config demo output_dir="$run" "${common[@]}" \
                ${method_args[$method]} "${from[@]}" >"$run.log" 2>&1
            "$py" - "$run" "$round" "$method" "$source" <<'PY' | tee -a "$out/runs.tsv"
import json, statistics, sys
run, round_, method, source = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if line.strip()]
tps = statistics.median(r["tokens_per_second"] for r in rows if r["step"] > 5)
print(f"{round_}\t{method}\t{source}\t{tps:.1f}")
PY
        done
    done
done
"$py" - "$out/runs.tsv" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    round_, method, source, tps = line.split("\t")
    runs[(round_, method, source)] = float(tps)
for method in ("tad", "forward_kl"):
    rounds = sorted({r for r, m, _ in runs if m == method})
    online = [runs[(r, method, "online")] for r in rounds]
    line = [f"{method}: online {statistics.median(online):.0f} tokens/s ({min(online):.0f}-{max(online):.0f})"]
    for source in ("top_m", "sampled"):
        ratios = [runs[(r, method, source)] / runs[(r, method, "online")] for r in rounds]
        line.append(f"{source} / online {statistics.median(ratios):.2f}x "
                    f"({min(ratios):.2f}-{max(ratios):.2f})")
    print(", ".join(line))
PY
