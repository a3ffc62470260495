#!/usr/bin/env bash
# The GPU acceptance run: every check only a GPU can make, one PASS / FAIL / SKIP line each, in at most
# 8 minutes on one H100/H200-class GPU (the device tool allows 10 minutes per command):
#
#     bash bench/device_check.sh                   # the checks + benchmarks ($OUT is set by the device tool)
#     PART=structure bash bench/device_check.sh    # how many steps the latent needs on CONFIG (a second call)
#     QUICK=1 bash bench/device_check.sh           # a CPU dry run of this script: CUDA checks SKIP, tiny benchmarks
#
# PART=checks (the default):
#   kernels          every kernel parity test (tests/test_kernels_*.py), Triton compiled, forward and backward
#   resume_*         each trainer's resume-equals-uninterrupted test on the GPU (run.device=auto picks CUDA;
#                    tolerance in tests/conftest.py: assert_resumed_equal)
#   cuda_graph       eager vs CUDA-graph rollout step of the kitti64 generators from one state and seed:
#                    fp32 bit-identical, bf16 runs (tests/test_cuda.py)
#   flat_memory      a 2500-frame rollout whose peak device memory is that of a 500-frame one (tests/test_cuda.py)
#   ddp_2gpu         torchrun --nproc 2 training in step (SKIP on a machine with one GPU)
#   bench_kernels    bench/bench_kernels.py, rows appended to bench/kernels.csv
#   bench_rollout    bench/bench_rollout.py, rows appended to bench/rollout.csv
# PART=structure: the structure generator of CONFIG (default synth_scroll.yaml) trained STRUCTURE_MINUTES
#   (default 4) with validation every VAL_EVERY steps (val KL, z_use, motion_free_late over the steps:
#   docs/opening_the_latent.md), then 4 val clips x 2 samples x CHECK_FRAMES label maps scored by
#   `evaluate.py --dynamics`; PAPER=1 trains the paper's recipe instead (Gaussian z through the predictor,
#   plain KL, no born weight).
# $OUT receives summary.txt (the PASS/FAIL/SKIP lines), checks.log (every check's output), env.txt, the
# CSVs, and for PART=structure structure.log, structure_loss.png, structure_dynamics.png.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
PART=${PART:-checks}
case "$PART" in checks|structure) ;; *) echo "PART must be checks or structure, got $PART"; exit 2 ;; esac
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
mkdir -p "$OUT"
: > "$OUT/summary.txt"
failed=0

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python3 -c "import torch, triton, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); \
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"; git log -1 --oneline; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# check NAME COMMAND...: runs COMMAND with its output in checks.log; PASS on exit 0, SKIP when pytest ran
# nothing but skips (its reason is printed), FAIL otherwise
check() {
    local name=$1; shift
    local log="$OUT/check_$name.log" started=$SECONDS verdict
    "$@" > "$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && grep -qE "[0-9]+ skipped" "$log" && ! grep -qE "[0-9]+ passed" "$log"; then
        verdict="SKIP ($(grep -m1 -oE "SKIPPED \[[0-9]+\] [^ ]+ ?(.*)" "$log" | sed -E 's/SKIPPED \[[0-9]+\] [^ ]+ //'))"
    elif [ $rc -eq 0 ]; then
        verdict=PASS
    else
        verdict="FAIL (exit $rc; $OUT/checks.log)"; failed=1
    fi
    { echo "==== $name: $verdict"; cat "$log"; } >> "$OUT/checks.log"
    rm -f "$log"
    printf '%-15s %s  %ds\n' "$name" "$verdict" $((SECONDS - started)) | tee -a "$OUT/summary.txt"
}

if [ "$PART" = checks ]; then
    pytest=(python3 -m pytest -q -rs -p no:cacheprovider)
    if [ "${QUICK:-0}" = 1 ]; then
        kernel_tests=(tests/test_kernels_dispatch.py)
        kernel_args=(--quick --no-csv); rollout_args=(--batches 1 --steps 1 --no-csv)
    else
        kernel_tests=(tests/test_kernels_*.py); kernel_args=(--budget 2); rollout_args=()
    fi
    check kernels "${pytest[@]}" "${kernel_tests[@]}"
    check resume_struct "${pytest[@]}" tests/test_structure.py::test_resume_equals_uninterrupted
    check resume_image "${pytest[@]}" tests/test_image.py::test_resume_equals_uninterrupted
    check resume_edge "${pytest[@]}" tests/test_edge.py::test_train_resume_equals_uninterrupted
    check cuda_graph "${pytest[@]}" tests/test_cuda.py -k cuda_graph
    check flat_memory "${pytest[@]}" tests/test_cuda.py -k memory_flat
    check ddp_2gpu "${pytest[@]}" tests/test_cuda.py -k two_gpus
    check bench_kernels python3 bench/bench_kernels.py "${kernel_args[@]}"
    check bench_rollout python3 bench/bench_rollout.py "${rollout_args[@]}"
    cp bench/kernels.csv bench/rollout.csv "$OUT/" 2>/dev/null
else
    MINUTES=${STRUCTURE_MINUTES:-4}
    FRAMES=${CHECK_FRAMES:-500}
    VAL_EVERY=${VAL_EVERY:-2000}
    RUN_DIR=${RUN_DIR:-runs/device_check_structure}
    CONFIG=${CONFIG:-synth_scroll.yaml}
    recipe=(); data_args=()
    [ "${PAPER:-0}" = 1 ] && recipe=(--structure.latent=gaussian --structure.z_to_decoder=false --structure.kl_balance=0
                                       --structure.born_weight=0 --structure.born_weight_decay=false --structure.z_pool=1)
    if [ "${QUICK:-0}" = 1 ]; then
        MINUTES=${STRUCTURE_MINUTES:-0.2}; FRAMES=${CHECK_FRAMES:-40}
        data_args=(--data.root=runs/device_check_data --data.synth_sequences=3 --data.synth_val=1 --data.synth_test=1)
    fi
    common_args=(--cfg "$CONFIG" "--run.dir=$RUN_DIR" "${recipe[@]}" "${data_args[@]}")
    check structure python3 train_structure.py "${common_args[@]}" "--structure.max_minutes=$MINUTES" \
        --structure.steps=10000000 "--structure.eval_every=$VAL_EVERY" "--structure.save_every=$VAL_EVERY"
    grep -E "val nll|stopping|parameters" "$OUT/checks.log" | tee "$OUT/structure.log"
    cp "$RUN_DIR/structure/loss.png" "$OUT/structure_loss.png" 2>/dev/null
    check dynamics bash -c 'python3 rollout.py "$@" --frames '"$FRAMES"' --clips 4 --samples 2 \
        --rollout.image_ckpt=none --rollout.videos=false --rollout.chunk='"$(( FRAMES < 100 ? FRAMES : 100 ))"' &&
        python3 evaluate.py "$@" --dynamics --evaluate.time_stride='"$(( FRAMES / 20 ))" _ "${common_args[@]}"
    grep -E "label dynamics" "$OUT/checks.log" | tee -a "$OUT/structure.log"
    cp "$RUN_DIR/rollout/eval/label_dynamics.png" "$OUT/structure_dynamics.png" 2>/dev/null
fi
echo "device_check: $([ $failed = 0 ] && echo "every check passed or was skipped" || echo "FAILED")" | tee -a "$OUT/summary.txt"
exit $failed
