#!/usr/bin/env bash
# The accelerator run of docs/cifar10.md in one command: trains `configs/score_cifar10.py:accel` within a wall-time
# budget, ships the result as `cifar10-cpu` (float16), and measures every table of the model card and the README.
#
#   TRAIN_SECONDS=300 bash scripts/accel_cifar10.sh workdirs/accel_out
#
# A budget makes the run fit a fixed time limit (docs/cifar10.md, "Reproduce"): a 300-step probe
# run measures the training rate first, and the real run gets the step count that fills 90 % of TRAIN_SECONDS, so its
# cosine schedule decays to zero inside the budget rather than being cut off half-way. TRAIN_SECONDS=0 trains the
# config's own 30,000 steps.
#
# Environment (defaults in brackets):
#   DATA_TAR        the CIFAR-10 training JPEGs as .tar or .tar.gz (train/<class>/*.jpg; required)
#   FIXTURES        folder with cifar10_test_first1017.npz and resnet20-12fca82f.th (required)
#   TRAIN_SECONDS   wall time of the training steps, compilation and evaluations included [300]
#   PROBE_STEPS     steps of the probe run [300]
#   MIN_STEPS       fewest steps worth training; a slower probe stops the run [1000]
#   DEADLINE        seconds after the start by which the certification step stops (unset: no limit), so that a
#                   run with a fixed time limit still returns the tables finished so far; re-running resumes them
#   WORK            scratch folder for data, runs and results [workdirs/accel]
#   PYTHON          interpreter [python3]
#   TRAIN_FLAGS, SHIP_FLAGS, RESULTS_FLAGS  extra flags for the three scripts (toy runs, other sizes)
# Writes to OUT_DIR (the first argument) [workdirs/accel_out]: the shipped model (cifar10-cpu.npz, .json, .md),
# metrics.jsonl of the real run, results.tar.gz (scripts/cifar10_results.py's workdir: psnr.md, table_l2.md,
# table_l1.md, denoising.png, Cohen-format records) and run.log. Every step resumes when re-run with the same WORK.
set -euo pipefail

OUT_DIR=${1:-workdirs/accel_out}
DATA_TAR=${DATA_TAR:-}
FIXTURES=${FIXTURES:-}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
PROBE_STEPS=${PROBE_STEPS:-300}
MIN_STEPS=${MIN_STEPS:-1000}
WORK=${WORK:-workdirs/accel}
PYTHON=${PYTHON:-python3}
CONFIG=configs/score_cifar10.py:accel
TEST_NPZ=$FIXTURES/cifar10_test_first1017.npz

for f in "$DATA_TAR" "$TEST_NPZ" "$FIXTURES/resnet20-12fca82f.th"; do
  [[ -f $f ]] || { echo "accel_cifar10: $f not found; set DATA_TAR / FIXTURES (see the header of $0)" >&2; exit 2; }
done
mkdir -p "$OUT_DIR" "$WORK"
exec > >(tee -a "$OUT_DIR/run.log") 2>&1
# Compiled programs are reused across the probe, the run, shipping and certification where they coincide.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache} PYTHONUNBUFFERED=1
start=$SECONDS
stamp() { echo "[accel_cifar10 +$((SECONDS - start))s] $*"; }

if [[ ! -d $WORK/data/train ]]; then
  stamp "extracting $DATA_TAR"
  mkdir -p "$WORK/data.partial" && tar xf "$DATA_TAR" -C "$WORK/data.partial" && mv "$WORK/data.partial" "$WORK/data"
fi
train_flags=(--config "$CONFIG" "--config.data.name=folder:$WORK/data" "--config.data.eval_name=npz:$TEST_NPZ")
# shellcheck disable=SC2206  # the *_FLAGS variables are word lists on purpose
train_flags+=(${TRAIN_FLAGS:-})

steps_flags=()
if [[ $TRAIN_SECONDS != 0 && ! -f $WORK/num_steps ]]; then
  stamp "probe: $PROBE_STEPS steps to measure the training rate"
  probe_log=$((PROBE_STEPS / 3 / 10 * 10))
  "$PYTHON" scripts/train_score.py "${train_flags[@]}" --workdir "$WORK/probe" \
    "--config.train.num_steps=$PROBE_STEPS" "--config.optim.warmup_steps=$probe_log" \
    "--config.train.log_every=$probe_log" "--config.train.eval_every=$PROBE_STEPS" \
    "--config.train.checkpoint_every=$PROBE_STEPS"
  # The last logged rate is free of compilation; 90 % of the budget leaves room for compiling and evaluating.
  "$PYTHON" - "$WORK/probe/metrics.jsonl" "$TRAIN_SECONDS" "$MIN_STEPS" > "$WORK/num_steps.partial" <<'EOF'
import json, sys
rates = [r["steps_per_sec"] for r in map(json.loads, open(sys.argv[1])) if "steps_per_sec" in r]
steps = int(rates[-1] * float(sys.argv[2]) * 0.9) // 10 * 10
if steps < int(sys.argv[3]):
  sys.exit(f"{rates[-1]:.2f} steps/s leaves {steps} steps in {sys.argv[2]} s (MIN_STEPS={sys.argv[3]}); raise "
           "TRAIN_SECONDS or train without a budget (TRAIN_SECONDS=0)")
print(steps)
EOF
  mv "$WORK/num_steps.partial" "$WORK/num_steps"
fi
if [[ -f $WORK/num_steps ]]; then
  steps=$(cat "$WORK/num_steps")
  stamp "training $steps steps (about $TRAIN_SECONDS s at the probe's rate)"
  steps_flags=("--config.train.num_steps=$steps" --config.train.eval_every=1000 "--config.train.checkpoint_every=1000")
fi
"$PYTHON" scripts/train_score.py "${train_flags[@]}" "${steps_flags[@]}" --workdir "$WORK/run"
cp "$WORK/run/metrics.jsonl" "$OUT_DIR/"

if [[ ! -f $WORK/shipped/cifar10-cpu.md ]]; then
  stamp "shipping"
  data="CIFAR-10 training split, 50,000 images as JPEG (29.90 dB against the originals)"
  command="TRAIN_SECONDS=$TRAIN_SECONDS bash scripts/accel_cifar10.sh"
  command+=" (python scripts/train_score.py --config $CONFIG ${steps_flags[*]} ${TRAIN_FLAGS:-})"
  # shellcheck disable=SC2206
  "$PYTHON" scripts/ship_score_model.py --workdir "$WORK/run" --name cifar10-cpu --store_dtype=float16 \
    --test_npz "$TEST_NPZ" --data "$data" --command "$command" ${SHIP_FLAGS:-}
  mkdir -p "$WORK/shipped.partial" && cp scoresmooth_jax/shipped/cifar10-cpu.{npz,json,md} "$WORK/shipped.partial/"
  mv "$WORK/shipped.partial" "$WORK/shipped"
fi
cp "$WORK"/shipped/cifar10-cpu.* scoresmooth_jax/shipped/  # a resumed run certifies what it shipped
cp "$WORK"/shipped/cifar10-cpu.* "$OUT_DIR/"

stamp "tables: PSNR, figure, certification"
limit=()
if [[ -n ${DEADLINE:-} ]]; then
  left=$((DEADLINE - (SECONDS - start)))
  limit=(timeout $((left > 1 ? left : 1)))  # `timeout 0` would mean no limit
fi
status=0
# shellcheck disable=SC2206
"${limit[@]}" "$PYTHON" scripts/cifar10_results.py --workdir "$WORK/results" --fixtures_dir "$FIXTURES" \
  ${RESULTS_FLAGS:-} || status=$?
tar czf "$OUT_DIR/results.tar.gz" -C "$WORK" results
if ((status)); then
  stamp "cifar10_results.py stopped (exit $status; 124 = DEADLINE); the same command resumes it"
  exit "$status"
fi
stamp "done: $OUT_DIR"
