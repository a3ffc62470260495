#!/usr/bin/env bash
# The GPU acceptance run: every check only a GPU can make, one PASS / FAIL / SKIP line each, in at most
# 8 minutes on one H100/H200-class GPU (the device tool allows 10 minutes per command):
#
#     bash bench/device_check.sh                   # the checks + benchmarks ($OUT is set by the device tool)
#     PART=structure bash bench/device_check.sh    # how many steps the latent needs on CONFIGS (a second call)
#     PART=all bash bench/device_check.sh          # both in one call: the structure runs train beside the checks
#     QUICK=1 bash bench/device_check.sh           # a CPU dry run of this script: CUDA checks SKIP, tiny benchmarks
#
# PART=checks (the default): the correctness checks run side by side (each its own process; a GPU has room for
# all), then the benchmarks alone, so that nothing else shares the GPU while they time:
#   kernels          every kernel parity test (tests/test_kernels_*.py), Triton compiled, forward and backward
#   resume_*         each trainer's resume-equals-uninterrupted test on the GPU (run.device=auto picks CUDA;
#                    tolerance in tests/conftest.py: assert_resumed_equal)
#   cuda_graph       eager vs CUDA-graph rollout step of the kitti64 generators from one state and seed:
#                    fp32 bit-identical, bf16 runs (tests/test_cuda.py)
#   flat_memory      a 2500-frame rollout whose peak device memory is that of a 500-frame one (tests/test_cuda.py)
#   ddp_2gpu         torchrun --nproc 2 training in step (SKIP on a machine with one GPU)
#   bench_kernels    bench/bench_kernels.py, rows appended to bench/kernels.csv
#   bench_rollout    bench/bench_rollout.py, rows appended to bench/rollout.csv
# PART=structure: the structure generator of each config in CONFIGS (default synth_scroll.yaml) trained
#   STRUCTURE_MINUTES (default 4) with validation every VAL_EVERY steps (val KL, z_use, motion_free_late over
#   the steps: docs/opening_the_latent.md), then 4 val clips x 2 samples x CHECK_FRAMES label maps scored by
#   `evaluate.py --dynamics`; PAPER=1 trains the paper's recipe instead (Gaussian z through the predictor,
#   plain KL, no born weight); STRUCTURE_ARGS adds --key=value options (e.g. "--structure.batch_size=32").
#   Each config's run (log, loss plot, dynamics plot, last checkpoint) comes back as structure_<config>.tgz.
# Every check is cut off after CHECK_TIMEOUT seconds (default 240) and then FAILs, so that one hang cannot
# take the others' results with it. $OUT receives summary.txt (the PASS/FAIL/SKIP lines), checks.log (every
# check's output), env.txt, the CSVs and the structure runs' archives: at most 8 files, as the device tool
# returns.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
PART=${PART:-checks}
case "$PART" in checks|structure|all) ;; *) echo "PART must be checks, structure or all, got $PART"; exit 2 ;; esac
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
mkdir -p "$OUT"
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
: > "$OUT/summary.txt"
: > "$OUT/checks.log"

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python3 -c "import torch, triton, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); \
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"; git log -1 --oneline; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# appended under a lock: checks running side by side finish in any order
append() { local file=$1; if command -v flock > /dev/null; then flock "$file" cat >> "$file"; else cat >> "$file"; fi; }

# check NAME COMMAND...: runs COMMAND (cut off after CHECK_TIMEOUT seconds) with its output in checks.log;
# PASS on exit 0, SKIP when pytest ran nothing but skips (its reason is printed), FAIL otherwise
check() {
    local name=$1; shift
    local log="$LOGS/$name.log" started=$SECONDS verdict
    timeout -k 10 "${CHECK_TIMEOUT:-240}" "$@" > "$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && grep -qE "[0-9]+ skipped" "$log" && ! grep -qE "[0-9]+ passed" "$log"; then
        verdict="SKIP ($(grep -m1 -oE "SKIPPED \[[0-9]+\] [^ ]+ ?(.*)" "$log" | sed -E 's/SKIPPED \[[0-9]+\] [^ ]+ //'))"
    elif [ $rc -eq 0 ]; then
        verdict=PASS
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        verdict="FAIL (cut off after ${CHECK_TIMEOUT:-240} s; $OUT/checks.log)"
    else
        verdict="FAIL (exit $rc; $OUT/checks.log)"
    fi
    { echo "==== $name: $verdict"; cat "$log"; } | append "$OUT/checks.log"
    printf '%-22s %s  %ds\n' "$name" "$verdict" $((SECONDS - started)) | tee -a "$OUT/summary.txt"
}

# structure CONFIG: train, roll out, score; the run's files archived into $OUT/structure_<config>.tgz
structure() {
    local config=$1 name=${1%.yaml}
    local minutes=${STRUCTURE_MINUTES:-4} frames=${CHECK_FRAMES:-2500} val_every=${VAL_EVERY:-2000}
    local run_dir=${RUN_DIR:-runs/device_check}_$name
    local recipe=() data_args=()
    [ "${PAPER:-0}" = 1 ] && recipe=(--structure.latent=gaussian --structure.z_to_decoder=false
        --structure.kl_balance=0 --structure.born_weight=0 --structure.born_weight_decay=false --structure.z_pool=1)
    if [ "${QUICK:-0}" = 1 ]; then
        minutes=${STRUCTURE_MINUTES:-0.2}; frames=${CHECK_FRAMES:-40}
        data_args=("--data.root=runs/device_check_data_$name" --data.synth_sequences=3 --data.synth_val=1 --data.synth_test=1)
    fi
    # shellcheck disable=SC2206  # STRUCTURE_ARGS: extra --key=value options, split on spaces
    local args=(--cfg "$config" "--run.dir=$run_dir" "${recipe[@]}" "${data_args[@]}" ${STRUCTURE_ARGS:-})
    CHECK_TIMEOUT=$(python3 -c "print(int($minutes * 60 + 120))") check "structure_$name" python3 train_structure.py \
        "${args[@]}" "--structure.max_minutes=$minutes" --structure.steps=10000000 \
        "--structure.eval_every=$val_every" "--structure.save_every=$val_every"
    check "dynamics_$name" bash -c 'python3 rollout.py "$@" --frames '"$frames"' --clips 4 --samples 2 \
        --rollout.image_ckpt=none --rollout.videos=false --rollout.chunk='"$(( frames < 100 ? frames : 100 ))"' &&
        python3 evaluate.py "$@" --dynamics --evaluate.time_stride='"$(( frames / 20 ))" _ "${args[@]}"
    cat "$LOGS/structure_$name.log" "$LOGS/dynamics_$name.log" > "$run_dir/device_check.log"
    grep -hE "val nll|stopping|parameters|label dynamics" "$run_dir/device_check.log" | sed "s/^/$name: /"
    tar -czf "$OUT/structure_$name.tgz" --exclude='*.mp4' --exclude='*.gif' --exclude='.state' \
        -C "$(dirname "$run_dir")" "$(basename "$run_dir")" 2>/dev/null
}

if [ "$PART" != checks ]; then
    for config in ${CONFIGS:-synth_scroll.yaml}; do structure "$config" & done
fi
if [ "$PART" != structure ]; then
    pytest=(python3 -m pytest -q -rs -p no:cacheprovider)
    if [ "${QUICK:-0}" = 1 ]; then
        kernel_tests=(tests/test_kernels_dispatch.py)
        kernel_args=(--quick --no-csv); rollout_args=(--batches 1 --steps 1 --no-csv)
    else
        kernel_tests=(tests/test_kernels_*.py); kernel_args=(--budget 2); rollout_args=()
        # Triton compiles on the CPU: spread the kernel tests over workers where pytest-xdist is installed
        python3 -c "import xdist" 2> /dev/null && kernel_tests+=(-n 8)
    fi
    check kernels "${pytest[@]}" "${kernel_tests[@]}" &
    # -s: the resume and memory checks print what they measured
    check resume_struct "${pytest[@]}" -s tests/test_structure.py::test_resume_equals_uninterrupted &
    check resume_image "${pytest[@]}" -s tests/test_image.py::test_resume_equals_uninterrupted &
    check resume_edge "${pytest[@]}" -s tests/test_edge.py::test_train_resume_equals_uninterrupted &
    check cuda_graph "${pytest[@]}" tests/test_cuda.py -k cuda_graph &
    check flat_memory "${pytest[@]}" -s tests/test_cuda.py -k memory_flat &
    check ddp_2gpu "${pytest[@]}" tests/test_cuda.py -k two_gpus &
fi
wait  # the benchmarks time the GPU alone
if [ "$PART" != structure ]; then
    check bench_kernels python3 bench/bench_kernels.py "${kernel_args[@]}"; cp bench/kernels.csv "$OUT/"
    check bench_rollout python3 bench/bench_rollout.py "${rollout_args[@]}"; cp bench/rollout.csv "$OUT/"
fi
if grep -q FAIL "$OUT/summary.txt"; then failed=1; else failed=0; fi
echo "device_check: $([ $failed = 0 ] && echo "every check passed or was skipped" || echo "FAILED")" | tee -a "$OUT/summary.txt"
exit $failed
