#!/usr/bin/env bash
# The project's GPU check in one command: the CUDA tests, the loss benchmark at the two GPU
# shapes beside Liger-Kernel, the recipe benchmark at Qwen2.5-3B -> half depth, and a summary of
# the targets, every result as JSON in one folder.
#
#   bash benchmarks/gpu_check.sh WHEELS_DIR OUT_DIR   # a bare CUDA machine (H100/H200 class)
#   bash benchmarks/gpu_check.sh - OUT_DIR            # the packages already installed
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    # (or GPU_CHECK_DRY=1) CPU, tiny shapes
#
# Steps, in this order, each under `timeout` (its cap in brackets), all of them within
# GPU_CHECK_BUDGET_S (420 s) and then the summary (at most 40 s), so the whole ends within 8
# minutes; a step that fails or times out is recorded and the next one runs; the exit code is
# non-zero when any step failed or the summary finds the check incomplete (a test failed, a CUDA
# test was skipped on the GPU, a target without a figure). A MISSED target is a result: exit 0.
#   install     [60 s]  pip install --no-index --no-deps --target $GPU_CHECK_SITE (/tmp/site)
#                       of WHEELS_DIR/*.whl; PYTHONPATH and PATH then point there
#   imports     [60 s]  gpu_check.py check-install: versions, the GPU, every needed module, and
#                       that the installed project is this checkout (a stale wheel fails here)
#   pytest      [60 s]  pytest -m cuda tests/test_cuda.py: fused == unfused in float32 and bf16
#                       for every divergence and the fused head, Liger's JSD at the benchmarked
#                       beta == our forward KL                        -> pytest_cuda.xml
#   pytest_recipe [120 s] its 2-step `tune run tad_distill`, bf16 + compile + fused against
#                       eager                                  -> pytest_cuda_recipe.xml
#   loss_256000 [120 s] loss_bench.py --shapes 8192,256000,3584,bf16: fused TAD and forward KL,
#                       the fused head (fused_step, also with the bf16 weight-gradient sum), the
#                       matmul floor, Liger's LigerFusedLinearJSDLoss as forward KL; time and
#                       peak memory                         -> loss_bench_8192x256000x3584.json
#   recipe      [170 s] recipe_bench.py --archs qwen2_5_3b_half --variants fused_compiled
#                       --seq 2048 (batch 4, bf16, random weights)  -> recipe_bench.json
#   loss_151936 [100 s] loss_bench.py at 8192,151936,2048,bf16, the same cases but the bf16
#                       weight-gradient sum               -> loss_bench_8192x151936x2048.json
#   summary             gpu_check.py summary: targets met/missed     -> summary.json
# Everything printed also goes to OUT_DIR/gpu_check.log (7 files in all). Targets: on one
# H100/H200, >= 30,000 tokens/s (about 40% MFU) for the recipe; the fused TAD head <= 1.5x the
# matmul floor and <= 2 GiB beyond the gradients at (8192, 256000, 3584).
# --dry-run: no install, --device cpu, loss_bench at 256,1000,64,fp32 (2 repeats), recipe_bench
# --archs demo --variants fused --seq 64 --batch 2 --steps 2 --warmup 1; the CUDA tests are
# collected and skipped, the Liger case is reported unavailable; about 53 s on the project's
# 2-core machine, half of it the loss benchmark's 6 fresh processes (4.5 s of imports each);
# tests/benchmarks/test_gpu_check.py runs it in CI. GPU_CHECK_ONLY="pytest recipe" runs only
# the steps named (install and imports always run), e.g. to retry one step.
#
# Preparing the wheels, here in the repository root (`/.whl/` is in .gitignore), for the GPU
# machine's Python 3.12 on manylinux x86_64. That machine has torch 2.11 + CUDA, triton 3.6,
# PyYAML, safetensors, tqdm, tokenizers, numpy, pyarrow, pandas, fsspec, huggingface-hub,
# requests, pytest (the device notes' KINDS.md). Missing there, pinned to what `pip install -e .`
# resolves beside the project's own pins: torchtune, torchao, torchdata; HF datasets with dill
# and multiprocess (`import torchtune` imports it; it wants pyarrow>=24, fsspec<=2026.9.0 and
# huggingface-hub>=1.31, 1.33 there: the imports step prints the versions found); kagglehub
# with kagglesdk (the `tune` command imports it); omegaconf 2.4.0 (needs only PyYAML; 2.3
# would need antlr4 4.9.3, which has no wheel); liger-kernel 0.8.5 (Requires-Dist:
# torch>=2.1.2, triton>=2.3.1, both there; its LigerFusedLinearJSDLoss at beta 0 is forward
# KL); and the project:
#
#   rm -rf .whl && P="--only-binary=:all: --python-version 3.12 --implementation cp
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   python3 -m pip download --no-deps $P -d .whl torchtune==0.6.1 torchao==0.13.0 \
#     torchdata==0.11.0 omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#     kagglehub==1.0.3 kagglesdk==0.1.38 liger-kernel==0.8.5
#   python3 -m pip wheel --no-deps -w .whl .    # the project: rebuild it after every edit
#
# (15 MiB; the `imports` step fails on a project wheel older than the checkout). Through the
# device tool, one call from a checkout holding this script, the wheels carried (the machine
# keeps nothing, so every call installs them again):
#
#   run(command='bash benchmarks/gpu_check.sh .whl "$OUT"', carry=[".whl"], timeout_s=560)
#
# The seven files come back from $OUT; the summary ends the output.
set -u -o pipefail
cd "$(dirname "$0")/.."

dry=${GPU_CHECK_DRY:-0}
if [[ ${1:-} == --dry-run ]]; then
    dry=1
    shift
fi
if [[ $dry == 1 ]]; then
    (( $# == 1 )) || { echo "usage: $0 --dry-run OUT_DIR" >&2; exit 2; }
    wheels=-
    out=$1
else
    (( $# == 2 )) || { echo "usage: $0 WHEELS_DIR|- OUT_DIR, or $0 --dry-run OUT_DIR" >&2
                       exit 2; }
    wheels=$1
    out=$2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/site}
budget=${GPU_CHECK_BUDGET_S:-420}
only=${GPU_CHECK_ONLY:-}
work=$(mktemp -d)
steps_file=$work/steps.tsv
: >"$steps_file"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there

if [[ $dry == 1 ]]; then
    device=cpu
    loss_shapes=(256,1000,64,fp32)
    loss_options=(--warmup 1 --repeats 2)
    recipe_options=(--archs demo --variants fused --seq 64 --batch 2 --steps 2 --warmup 1)
    target_shape=256,1000,64,fp32
    require=()
else
    device=cuda
    loss_shapes=(8192,256000,3584,bf16 8192,151936,2048,bf16)
    loss_options=(--warmup 1 --repeats 5)
    recipe_options=(--archs qwen2_5_3b_half --variants fused_compiled --seq 2048 --steps 10
                    --warmup 3)
    target_shape=8192,256000,3584,bf16
    require=(--require-cuda --require liger_kernel.chunked_loss triton)
fi
# Liger last: its torch.compile is the slowest warm-up, so a step cut short loses it first
cases_all=(fused/tad fused/forward_kl fused_step/tad fused_step_bf16_wgrad/tad matmul_floor/none
           liger_fused_jsd/forward_kl)

failed=0
deadline=$((SECONDS + budget))

wanted() {  # STEP: whether GPU_CHECK_ONLY (empty: every step) names it
    [[ -z $only || " $only " == *" $1 "* || $1 == install || $1 == imports ]]
}

run_step() {  # NAME CAP_S COMMAND...: under timeout, its exit code and time recorded
    local name=$1 cap=$2
    shift 2
    wanted "$name" || return 0
    local limit=$cap left=$((deadline - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: not run, the time budget (${budget} s) is spent"
        printf '%s\t200\t0\t0\n' "$name" >>"$steps_file"
        failed=1
        return
    fi
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$steps_file"
    if ((rc != 0)); then
        echo "== $name FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ', timed out'))"
        failed=1
    fi
}

main() {
    echo "gpu_check: $(date -u +%FT%TZ), $( [[ $dry == 1 ]] && echo 'DRY RUN, ')device $device," \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), out $out"
    if [[ $dry != 1 ]]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
            --format=csv 2>&1 || true
    fi
    if [[ $wheels != - ]]; then
        run_step install 60 "$py" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
    fi
    run_step imports 60 "$py" benchmarks/gpu_check.py check-install "${require[@]}"
    # two runs, so that the recipe's compile running out of time keeps the other results
    local recipe_test=tests/test_cuda.py::test_compiled_bf16_recipe_matches_eager
    run_step pytest 60 "$py" -m pytest -m cuda -q -rs -p no:cacheprovider \
        --junitxml="$out/pytest_cuda.xml" tests/test_cuda.py --deselect "$recipe_test"
    run_step pytest_recipe 120 "$py" -m pytest -m cuda -q -rs -p no:cacheprovider \
        --junitxml="$out/pytest_cuda_recipe.xml" "$recipe_test"
    local i=0 shape case cases dims
    for shape in "${loss_shapes[@]}"; do
        IFS=, read -r -a dims <<<"$shape"
        cases=()
        for case in "${cases_all[@]}"; do  # the bf16 weight-gradient sum at the target shape
            ((i > 0)) && [[ $case == fused_step_bf16_wgrad/* ]] && continue
            cases+=("$case")
        done
        run_step "loss_${dims[1]}" $( ((i == 0)) && echo 120 || echo 100 ) \
            "$py" benchmarks/loss_bench.py --device "$device" --shapes "$shape" \
            --cases "${cases[@]}" "${loss_options[@]}" \
            --json "$out/loss_bench_${dims[0]}x${dims[1]}x${dims[2]}.json"
        if ((i == 0)); then  # the recipe right after the target shape: both targets first
            run_step recipe 170 "$py" benchmarks/recipe_bench.py --device "$device" \
                "${recipe_options[@]}" --json "$out/recipe_bench.json"
        fi
        i=$((i + 1))
    done
    local rc=0
    echo "== summary"
    timeout --kill-after=5 40 "$py" benchmarks/gpu_check.py summary "$out" \
        --steps "$steps_file" --target-shape "$target_shape" \
        $( [[ $dry == 1 ]] && echo --dry-run ) || rc=$?
    rm -rf "$work"
    ((failed || rc)) && return 1
    return 0
}

main 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
