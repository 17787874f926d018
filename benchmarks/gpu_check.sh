#!/usr/bin/env bash
# The project's GPU check in one command: the loss head beside Liger-Kernel and the unchunked
# matmul floor at the two GPU shapes, the recipe beside transformers + Liger-Kernel end to end at
# Qwen2.5-3B -> half and Gemma2-9B -> a third, the CUDA tests, and a summary of the targets
# (issue 19), every result as JSON in one folder.
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
# The steps that measure the targets come first, the CUDA tests (which passed at 7525fee) last.
#   install     [60 s]  pip install --no-index --no-deps --target $GPU_CHECK_SITE (/tmp/site)
#                       of WHEELS_DIR/*.whl; PYTHONPATH and PATH then point there
#   imports     [45 s]  gpu_check.py check-install: versions, the GPU, every needed module
#                       (transformers, liger_kernel.chunked_loss, triton), and that the
#                       installed project is this checkout (a stale wheel fails here)
#   loss        [130 s] loss_bench.py at 8192,151936,2048,bf16 then 8192,256000,3584,bf16, one
#                       process (inductor recompiles each shape afresh), rows of 2048 tokens
#                       (the GPU configs' max_seq_len: the teacher projections the head keeps
#                       are a row's): the recipe's head
#                       (fused_step_recipe: the GPU configs' head settings, chunks of 1024,
#                       compiled, TAD's teacher projections kept, the weight gradient summed in
#                       bf16) with TAD and with forward KL, with TAD its three variants that
#                       check those settings (the schema's default teacher cache; a cache of one
#                       chunk; the float32 sum: the compiled code is the recipe head's, no
#                       compile of their own), the default eager head (fused_step/tad), the
#                       unchunked 4-matmul floor, Liger's LigerFusedLinearJSDLoss as CE +
#                       forward KL; 3 paired
#                       rounds after a warm-up; peak memory of one more step per case in the
#                       same process (max_memory_allocated)        -> loss_bench.json;
#                       the code inductor generates for each case -> inductor_code/ (none in
#                       the dry run), read by the summary as head_kernels.py reads its own;
#                       then one step of each target's case under torch.profiler
#                       (step_profile.py: device busy time, kernel time by kind, the top
#                       kernels), written into its row once the rows are saved
#   recipe_qwen2_5_3b_half [120 s]  recipe_bench.py --archs qwen2_5_3b_half --variants
#                       fused_compiled --loops minimal peer peer_eager (seq 2048, batch 4,
#                       bf16, random weights; 2 warm-up + 6 rounds), then one profiled step
#                       of each loop (--profile)    -> recipe_bench_qwen2_5_3b_half.json
#   recipe_gemma2_9b_third_short [140 s]  the same at gemma2_9b_third_short (Gemma2-9B, 42
#                       layers, -> 14; seq 1024, batch 2), --loops peer
#                                                   -> recipe_bench_gemma2_9b_third_short.json
#   pytest      [120 s] pytest -m cuda tests/test_cuda.py: fused == unfused in float32 and bf16
#                       for every divergence and the fused head, the head in bf16 and from
#                       each teacher cache also through inductor (its GPU code and settings;
#                       15 graphs, counted by Dynamo on a CPU: 2 a case, TAD's 3; 20 when the
#                       two constant variants compiled too), Liger's JSD at
#                       the benchmarked beta == our forward KL, document masks by flex
#                       attention == the dense ones (compiles flex attention's kernels), a
#                       model loaded into FSDP2's shards on one rank, on the GPU and with CPU
#                       offload (NCCL)                             -> pytest_cuda.xml
#   pytest_recipe [100 s] its 2-step `tune run tad_distill`, bf16 + compile + fused against
#                       eager                                  -> pytest_cuda_recipe.xml
#   loss_chunk  [90 s]  not a target, in the budget left (not run or out of time: reported,
#                       the check still complete): loss_bench.py at the same two shapes,
#                       fused_step_recipe/tad against fused_step_recipe_half_chunk/tad and
#                       fused_step_recipe_double_chunk/tad (the recipe's head at half and
#                       twice loss_chunk_size, 512 and 2048 rows: the head's chunk function
#                       has a dynamic token dimension, only the teacher's split compiles
#                       anew) on rows of
#                       2048 tokens, as the loss step (no chunk crosses a row of kept
#                       teacher projections), 3 paired rounds, peak memory (issue 19, item 5)
#                                                   -> loss_chunk.json
#   summary             gpu_check.py summary: targets met/missed, and per shape (item 5,
#                       not a target) the fastest CE + TAD head within Liger's memory among
#                       the recipe's and its variants, with the config keys it changes; the
#                       profiled steps, the recipe heads' time against Liger's and the
#                       recipe's step against the compiled peer's split by kind
#                       (profile_gaps, recipe_gaps)
#                                                                    -> summary.json
# Everything printed also goes to OUT_DIR/gpu_check.log (8 files and inductor_code/ in all).
# The caps are estimates until a GPU run records each step's seconds (summary.json "steps");
# the loss and recipe steps' time is mostly inductor compiling (the recipe's blocks and head,
# the peer's layers, Liger's chunk step), the steps themselves are seconds. Targets
# (gpu_check.py): the recipe's head with TAD <= 1.15x Liger's CE + forward KL time and <= 1.0x
# its peak memory, with forward KL <= 1.0x its time, <= 1.5x the unchunked floor, at both
# shapes; end to end the recipe >= 1.10x the compiled transformers + Liger loop and MFU >= 50% at
# Qwen2.5-3B -> half, >= 1.05x at Gemma2-9B -> a third.
# --dry-run: no install, --device cpu, the same steps, options and cases at stand-in sizes:
# loss_bench at 2048,1000,64,fp32 and 2048,1536,96,fp32 (2 rounds, memory by the profiler's
# allocations), recipe_bench at tiny_qwen2 and tiny_gemma2 (Qwen2 and Gemma2 pairs of width 64;
# seq 64, batch 2, 1 warm-up + 2 rounds), every torch.compile through Dynamo with the eager
# backend (inductor's C++ code generation would take minutes on 2 cores), and where liger-kernel
# is not installed (CI: its wheel requires triton) loss_bench.LigerStandIn in Liger's place,
# marked in every row and target it touches; the CUDA tests are collected and skipped (CI runs
# the bodies of those that need no GPU kernel on the CPU: tests/test_cuda_on_cpu.py).
# tests/benchmarks/test_gpu_check.py runs it in CI. GPU_CHECK_ONLY="pytest loss" runs only
# the steps named (install and imports always run), e.g. to retry one step. The profiled steps
# (diagnostics, not targets) are skipped from GPU_CHECK_PROFILE_MARGIN_S (20) seconds before a
# step's cap on, so that they never make a step that measured its figures run out of time.
#
# Preparing the wheels, here in the repository root (`/.whl/` is in .gitignore), for the GPU
# machine's Python 3.12 on manylinux x86_64. That machine has torch 2.11 + CUDA 13, triton 3.6,
# transformers 5.17 (the peer loop's models), PyYAML, safetensors, tqdm, tokenizers, numpy,
# pyarrow, pandas, fsspec, huggingface-hub, requests, pytest (the imports step prints the
# versions it finds), and what importing torchtune, datasets and kagglehub needs beyond them
# (xxhash, protobuf, sentencepiece, tiktoken, blobfile, psutil, pillow: torchtune imported there
# at 7525fee; a Python 3.12 rehearsal without them fails the imports step, RESULTS.md).
# Missing there, pinned to what `pip install -e .` resolves beside the project's own pins:
# torchtune, torchao, torchdata; HF datasets with dill and
# multiprocess (`import torchtune` imports it; it wants pyarrow>=24, fsspec<=2026.9.0 and
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
# The eight files come back from $OUT; the summary ends the output.
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
profile_margin=${GPU_CHECK_PROFILE_MARGIN_S:-20}
work=$(mktemp -d)
steps_file=$work/steps.tsv
: >"$steps_file"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there

# the loss shapes and recipe architectures in the order of gpu_check.py's LOSS_TARGET_SHAPES
# and RECIPE_TARGETS; each architecture's loops beside the recipe
if [[ $dry == 1 ]]; then
    device=cpu
    loss_shapes=(2048,1000,64,fp32 2048,1536,96,fp32)
    loss_options=(--warmup 1 --repeats 2 --cpu-memory allocations)
    recipe_archs=(tiny_qwen2 tiny_gemma2)
    recipe_options=(--steps 2 --warmup 1)
    stand_in=(--compile-backend eager --liger-stand-in)
    require=()
else
    device=cuda
    loss_shapes=(8192,151936,2048,bf16 8192,256000,3584,bf16)
    loss_options=(--warmup 1 --repeats 3)
    recipe_archs=(qwen2_5_3b_half gemma2_9b_third_short)
    recipe_options=(--steps 6 --warmup 2)
    stand_in=()
    require=(--require-cuda --require liger_kernel.chunked_loss triton)
fi
recipe_loops=("minimal peer peer_eager" "peer")
recipe_caps=(120 140)
recipe_names=(qwen2_5_3b_half gemma2_9b_third_short)
# Liger last in each round: its torch.compile is the slowest warm-up
loss_cases=(fused_step_recipe/tad fused_step_recipe/forward_kl
            fused_step_recipe_default_cache/tad fused_step_recipe_chunk_cache/tad
            fused_step_recipe_fp32_wgrad/tad fused_step/tad
            matmul_floor_unchunked/none liger_fused_jsd_ce/forward_kl)
# the loss cases also profiled (one step each, after the timed ones): the targets' cases
profile_cases=(fused_step_recipe/tad fused_step_recipe/forward_kl matmul_floor_unchunked/none
               liger_fused_jsd_ce/forward_kl)
# tokens per row of the loss steps' batches: the GPU configs' max_seq_len
row_tokens=2048
# the loss_chunk step's: the recipe's head at loss_chunk_size and at twice it
chunk_cases=(fused_step_recipe/tad fused_step_recipe_half_chunk/tad
             fused_step_recipe_double_chunk/tad)
# steps measured in the time left: one not run or out of time does not fail the check
optional_steps=" loss_chunk "

failed=0
deadline=$((SECONDS + budget))

wanted() {  # STEP: whether GPU_CHECK_ONLY (empty: every step) names it
    [[ -z $only || " $only " == *" $1 "* || $1 == install || $1 == imports ]]
}

run_step() {  # NAME CAP_S COMMAND...: under timeout, its exit code and time recorded
    local name=$1 cap=$2
    shift 2
    wanted "$name" || return 0
    local limit=$cap left=$((deadline - SECONDS)) optional=0
    [[ $optional_steps == *" $name "* ]] && optional=1
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: not run, the time budget (${budget} s) is spent"
        printf '%s\t200\t0\t0\t%s\n' "$name" "$optional" >>"$steps_file"
        ((optional)) || failed=1
        return
    fi
    echo "== $name (at most ${limit} s$( ((optional)) && echo ', not a target')): $*"
    local start=$SECONDS rc=0
    # the profiles (step_profile.py, diagnostics) stop $profile_margin s before the cap; at
    # the cap SIGINT, so that pytest still writes its --junitxml (the tests run so far), SIGKILL
    # 10 s later
    GPU_CHECK_STEP_DEADLINE=$(($(date +%s) + limit - profile_margin)) \
        timeout --signal=INT --kill-after=10 "$limit" "$@" || rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "$optional" \
        >>"$steps_file"
    if ((rc != 0)); then
        echo "== $name FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ', timed out'))"
        ((optional && (rc == 124 || rc == 137))) || failed=1
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
    run_step imports 45 "$py" benchmarks/gpu_check.py check-install "${require[@]}"
    run_step loss 130 "$py" benchmarks/loss_bench.py --device "$device" \
        --shapes "${loss_shapes[@]}" --cases "${loss_cases[@]}" --row-tokens "$row_tokens" \
        "${loss_options[@]}" "${stand_in[@]}" --inductor-code "$out/inductor_code" \
        --profile "${profile_cases[@]}" --json "$out/loss_bench.json"
    local i loops
    for i in "${!recipe_archs[@]}"; do
        read -r -a loops <<<"${recipe_loops[$i]}"
        run_step "recipe_${recipe_names[$i]}" "${recipe_caps[$i]}" "$py" \
            benchmarks/recipe_bench.py --device "$device" --archs "${recipe_archs[$i]}" \
            --variants fused_compiled --loops "${loops[@]}" "${recipe_options[@]}" \
            "${stand_in[@]}" --profile --json "$out/recipe_bench_${recipe_archs[$i]}.json"
    done
    # two runs, so that the recipe's compile running out of time keeps the other results
    local recipe_test=tests/test_cuda.py::test_compiled_bf16_recipe_matches_eager
    run_step pytest 120 "$py" -m pytest -m cuda -q -rs -p no:cacheprovider \
        --junitxml="$out/pytest_cuda.xml" tests/test_cuda.py --deselect "$recipe_test"
    run_step pytest_recipe 100 "$py" -m pytest -m cuda -q -rs -p no:cacheprovider \
        --junitxml="$out/pytest_cuda_recipe.xml" "$recipe_test"
    run_step loss_chunk 90 "$py" benchmarks/loss_bench.py --device "$device" \
        --shapes "${loss_shapes[@]}" --cases "${chunk_cases[@]}" --row-tokens "$row_tokens" \
        "${loss_options[@]}" "${stand_in[@]}" --json "$out/loss_chunk.json"
    local rc=0
    echo "== summary"
    timeout --kill-after=5 40 "$py" benchmarks/gpu_check.py summary "$out" \
        --steps "$steps_file" --loss-shapes "${loss_shapes[@]}" \
        --recipe-archs "${recipe_archs[@]}" $( [[ $dry == 1 ]] && echo --dry-run ) || rc=$?
    rm -rf "$work"
    ((failed || rc)) && return 1
    return 0
}

main 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
