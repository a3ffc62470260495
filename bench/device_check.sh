#!/usr/bin/env bash
# The checks only a GPU can make, prepared for a lent GPU machine. The device tool allows 10 minutes per
# command and 15 minutes of device time per session, so it runs as two back-to-back calls (the machine
# stays warm between them):
#
#     PART=bench bash bench/device_check.sh        # tests + benchmarks, about 5 minutes ($OUT is set by the tool)
#     PART=structure bash bench/device_check.sh    # data + STRUCTURE_MINUTES of training + a 500-frame check, about 5 minutes
#
# 1. the kernel tests on CUDA (Triton compiled, not interpreted; forward and backward against the
#    plain-torch references), 2. the kernel and rollout benchmarks (rows appended to bench/*.csv, copied
#    to $OUT), 3. the structure generator of CONFIG (default synth_scroll.yaml) trained for STRUCTURE_MINUTES
#    (default 4) with validation every VAL_EVERY steps: how many steps its latent needs before the rollouts
#    keep moving (val KL, z_use, motion_free_late; docs/opening_the_latent.md); PAPER=1 trains the paper's
#    recipe instead (Gaussian z through the predictor only, plain KL), 4. the persistent-rollout bar on that
#    model: 4 val clips x 2 samples rolled out for CHECK_FRAMES (default 500) label maps, scored by
#    `evaluate.py --dynamics` (change and births per step, class mix against the data's).
# PART=all (the default) runs both in one command. At most 8 files come back from $OUT, so it holds at
# most: env.txt, bench.log, kernels.csv, rollout.csv, structure.log, structure_loss.png,
# structure_dynamics.png.
# QUICK=1 makes every part tiny (a CPU dry run of this script: nothing on CUDA is then measured).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
PART=${PART:-all}
case "$PART" in all|bench|structure) ;; *) echo "PART must be all, bench or structure, got $PART"; exit 2 ;; esac
MINUTES=${STRUCTURE_MINUTES:-4}
FRAMES=${CHECK_FRAMES:-500}
VAL_EVERY=${VAL_EVERY:-2000}
RUN_DIR=${RUN_DIR:-runs/device_check_structure}
CONFIG=${CONFIG:-synth_scroll.yaml}
recipe=()
[ "${PAPER:-0}" = 1 ] && recipe=(--structure.latent=gaussian --structure.z_to_decoder=false --structure.kl_balance=0
                                   --structure.born_weight=0 --structure.born_weight_decay=false --structure.z_pool=1)
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
mkdir -p "$OUT"
status=0
step() { echo "== $(date -u +%H:%M:%S) $*"; }

if [ "${QUICK:-0}" = 1 ]; then
    tests=(tests/test_kernels_dispatch.py); kernel_args=(--quick --no-csv); rollout_args=(--batches 1 --steps 1 --no-csv)
    MINUTES=${STRUCTURE_MINUTES:-0.2}
    FRAMES=${CHECK_FRAMES:-40}
    data_args=(--data.root=runs/device_check_data --data.synth_sequences=3 --data.synth_val=1 --data.synth_test=1)
else
    tests=(tests/test_kernels_*.py); kernel_args=(--budget 2); rollout_args=(); data_args=()
fi
structure_args=(--cfg "$CONFIG" "--run.dir=$RUN_DIR" "--structure.max_minutes=$MINUTES"
                --structure.iterations=10000000 "--structure.eval_every=$VAL_EVERY" "--structure.ckpt_every=$VAL_EVERY"
                "${recipe[@]}" "${data_args[@]}")

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python3 -c "import torch, triton, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); \
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"; git log -1 --oneline; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$PART" != bench ]; then
    step "synthetic data (in the background while the benchmarks run)"
    python3 -c "import sys, common, data; data.ensure_dataset(common.load_config(sys.argv[1], sys.argv[2:]))" \
        "$CONFIG" "${data_args[@]/#--/}" > "$OUT/structure.log" 2>&1 &
    data_pid=$!
fi

if [ "$PART" != structure ]; then
    step "kernel tests on the GPU"
    python3 -m pytest -q "${tests[@]}" 2>&1 | tee "$OUT/bench.log" || status=1
    step "kernel benchmark"
    python3 bench/bench_kernels.py "${kernel_args[@]}" 2>&1 | tee -a "$OUT/bench.log" || status=1
    step "rollout benchmark"
    python3 bench/bench_rollout.py "${rollout_args[@]}" 2>&1 | tee -a "$OUT/bench.log" || status=1
    cp bench/kernels.csv bench/rollout.csv "$OUT/" 2>/dev/null
fi

if [ "$PART" != bench ]; then
    step "waiting for the data"
    wait "$data_pid" || { echo "data generation failed (see structure.log)"; exit 1; }
    step "structure generator, $MINUTES minutes"
    python3 train_structure.py "${structure_args[@]}" >> "$OUT/structure.log" 2>&1 || status=1
    grep -E "val nll|stopping|parameters" "$OUT/structure.log"
    cp "$RUN_DIR/structure/loss.png" "$OUT/structure_loss.png" 2>/dev/null
    step "the trained model's rollouts: $FRAMES label maps, evaluate.py --dynamics"
    check_args=(--cfg "$CONFIG" "--run.dir=$RUN_DIR" "${recipe[@]}" "${data_args[@]}")
    { python3 rollout.py "${check_args[@]}" --frames "$FRAMES" --clips 4 --samples 2 --rollout.image_ckpt=none \
          --rollout.videos=false "--rollout.chunk=$(( FRAMES < 100 ? FRAMES : 100 ))" &&
      python3 evaluate.py "${check_args[@]}" --dynamics "--evaluate.time_stride=$(( FRAMES / 20 ))"; } \
        >> "$OUT/structure.log" 2>&1 || status=1
    grep -E "label dynamics" "$OUT/structure.log"
    cp "$RUN_DIR/rollout/eval/label_dynamics.png" "$OUT/structure_dynamics.png" 2>/dev/null
fi
step "done (status $status)"
exit $status
