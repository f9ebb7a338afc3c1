#!/usr/bin/env bash
# The GPU run of the `cifar10` score model in one command (docs/cifar10.md, "The larger network on a GPU"): the
# budgeted run of scripts/accel_cifar10.sh for `configs/score_cifar10.py:gpu` (bfloat16 mixed precision), which
# also chooses the network's width on the device and certifies with the paper's protocol.
#
#   bash scripts/gpu_cifar10.sh --data_tar TAR --images NPZ --classifier CLS --out DIR [options]
#
#   1. probe: times the train step of each --widths (model.kwargs.channels, largest first) for --probe_seconds
#      (scripts/probe_score_sizes.py) and picks the widest that trains --min_steps steps in 90 % of
#      --train_seconds, with the step count that fills it (so the cosine schedule ends inside the budget);
#   2. trains that width, evaluating one-step PSNR on the --images ten times (the card's curve);
#   3. ships it as `cifar10` (scripts/ship_score_model.py --store_dtype=auto): float16, or int8 with per-channel
#      scales where float16 would pass --max_mib; the card's PSNR table (noisy, one-step on every --images image,
#      annealed on the first --annealed_images) is measured on that stored copy;
#   4. certifies the first --num_images images at each --sigmas with n0 = 100, N = --n (sequential, stopping
#      each image once the table's radii 0, 0.25, ..., 1.5 are settled), alpha = 0.001 (scripts/paper_table.py):
#      one-step `cifar10`, then one-step --compare, in front of the classifier; it stops at --deadline, and the
#      tables then hold the images finished so far.
#
# Required:
#   --data_tar PATH     the training images as .tar or .tar.gz of train/<class>/*.jpg (not with --resume_from)
#   --images PATH       the lossless test images (.npz with images uint8 NHWC and labels), e.g. the first 1017
#   --classifier PATH   a classifier export (scripts/convert_torch_classifier.py writes one), or a PyTorch
#                       checkpoint file converted here first (needs torch)
#   --out DIR           output, seven files: cifar10.{npz,json,md} (the shipped model and its card), probe.md (the
#                       rates), table.md (certification), run.log, and results.tar.gz (probe/probe.json,
#                       run/metrics.jsonl, table/: records, best.csv, curves.png), rewritten after every step
# Options [defaults]:
#   --work DIR          scratch (data, runs, records); the same command with the same DIR resumes [workdirs/gpu_cifar10]
#   --resume_from DIR   a previous run's --out folder: certify its shipped `cifar10`, reusing its records, without
#                       probing, training or shipping again (a deadline cut it short, and its --work is gone; give
#                       the same flags, --work included, since the records name the files they were made with)
#   --train_seconds S   wall time of the training run, compiling and evaluating included [240]
#   --deadline S        seconds after the start by which certification stops; 0: none [560]
#   --widths LIST       candidate widths, largest first [112,96,64]
#   --probe_seconds S   timed seconds of steps per width [10]
#   --min_steps N       fewest training steps the chosen width must take [15000]
#   --max_mib M         largest shipped file [16]
#   --annealed_images N test images of the card's annealed column [256]
#   --sigmas LIST       noise levels certified [0.25,0.5]
#   --num_images N      first images certified [100]
#   --n0 N, --n N       selection and (at most) estimation draws per image [100, 10000]
#   --batch_size N      certification draws per device per step [1000]
#   --compare SCORE     a score model certified after `cifar10` the same way ('' for none) [cifar10-cpu]
#   --data_note TEXT    what the training images are, for the card
#   --variant V         config variant [gpu] (gpu_tiny: toy runs)
#   --python PY         interpreter [python3]
#   --config_flag F     one more --config.* override for the probe and the training (repeatable)
#   --ship_flag F       one more flag for scripts/ship_score_model.py (repeatable)
set -euo pipefail

die() { echo "gpu_cifar10: $*" >&2; exit 2; }
DATA_TAR="" IMAGES="" CLASSIFIER="" OUT_DIR=""
WORK=workdirs/gpu_cifar10 TRAIN_SECONDS=240 DEADLINE=560 WIDTHS=112,96,64 PROBE_SECONDS=10 MIN_STEPS=15000
MAX_MIB=16 ANNEALED_IMAGES=256 SIGMAS=0.25,0.5 NUM_IMAGES=100 N0=100 N=10000 BATCH_SIZE=1000 COMPARE=cifar10-cpu
VARIANT=gpu PYTHON=python3 RESUME_FROM=""
DATA_NOTE="CIFAR-10 training split, 50,000 JPEG images (quality 75, about 30 dB against the originals), random flips"
config_flags=() ship_flags=()
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  (($# >= 2)) || die "$1 needs a value (see the header of $0)"
  case $1 in
    --data_tar) DATA_TAR=$2 ;; --images) IMAGES=$2 ;; --classifier) CLASSIFIER=$2 ;; --out) OUT_DIR=$2 ;;
    --work) WORK=$2 ;; --resume_from) RESUME_FROM=$2 ;; --train_seconds) TRAIN_SECONDS=$2 ;;
    --deadline) DEADLINE=$2 ;; --widths) WIDTHS=$2 ;;
    --probe_seconds) PROBE_SECONDS=$2 ;; --min_steps) MIN_STEPS=$2 ;; --max_mib) MAX_MIB=$2 ;;
    --annealed_images) ANNEALED_IMAGES=$2 ;; --sigmas) SIGMAS=$2 ;; --num_images) NUM_IMAGES=$2 ;;
    --n0) N0=$2 ;; --n) N=$2 ;; --batch_size) BATCH_SIZE=$2 ;; --compare) COMPARE=$2 ;;
    --data_note) DATA_NOTE=$2 ;; --variant) VARIANT=$2 ;; --python) PYTHON=$2 ;;
    --config_flag) config_flags+=("$2") ;; --ship_flag) ship_flags+=("$2") ;;
    *) die "unknown flag $1 (see the header of $0)" ;;
  esac
  shift 2
done
for flag in images=IMAGES classifier=CLASSIFIER out=OUT_DIR; do
  var=${flag#*=}
  [[ -n ${!var} ]] || die "--${flag%%=*} is required (see the header of $0)"
done
[[ -n $RESUME_FROM || -f $DATA_TAR ]] || die "--data_tar '$DATA_TAR' not found (required unless --resume_from)"
[[ -f $IMAGES ]] || die "--images $IMAGES not found"
[[ -e $CLASSIFIER ]] || die "--classifier $CLASSIFIER not found"

mkdir -p "$OUT_DIR" "$WORK"
exec > >(tee -a "$OUT_DIR/run.log") 2>&1
# Compiled programs are reused where the steps compile the same ones (and by a resumed run).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache} PYTHONUNBUFFERED=1
start=$SECONDS
stamp() { echo "[gpu_cifar10 +$((SECONDS - start))s] $*"; }
json() { "$PYTHON" -c 'import json, sys; print(eval(sys.argv[2], {"j": json.load(open(sys.argv[1]))}))' "$@"; }
pack() {  # what is not one of the output's own files, so that a run cut short still returns what it made
  local have=() f
  for f in probe run/metrics.jsonl table; do [[ ! -e $WORK/$f ]] || have+=("$f"); done
  ((${#have[@]} == 0)) || tar czf "$OUT_DIR/results.tar.gz" -C "$WORK" "${have[@]}"
}

classifier=$CLASSIFIER
if [[ ! -d $CLASSIFIER ]]; then
  classifier=$WORK/classifier
  if [[ ! -d $classifier ]]; then
    stamp "converting $CLASSIFIER"
    "$PYTHON" scripts/convert_torch_classifier.py --checkpoint "$CLASSIFIER" --output "$classifier.partial" \
      --eval_npz "$IMAGES"
    mv "$classifier.partial" "$classifier"
  fi
fi

if [[ -n $RESUME_FROM && ! -f $WORK/shipped/cifar10.md ]]; then
  stamp "resuming from $RESUME_FROM: its shipped model, probe and certification records"
  for f in cifar10.npz cifar10.json cifar10.md results.tar.gz; do
    [[ -f $RESUME_FROM/$f ]] || die "--resume_from $RESUME_FROM has no $f: give the --out folder of a run that shipped"
  done
  tar xzf "$RESUME_FROM/results.tar.gz" -C "$WORK"  # the probe, the training log and the records so far
  mkdir -p "$WORK/shipped.partial"
  cp "$RESUME_FROM"/cifar10.{npz,json,md} "$WORK/shipped.partial/" && mv "$WORK/shipped.partial" "$WORK/shipped"
fi
shipped=$([[ -f $WORK/shipped/cifar10.md ]] && echo 1 || true)  # then probing, training and shipping are done

if [[ -z $shipped && ! -d $WORK/data/train ]]; then
  stamp "extracting $DATA_TAR"
  rm -rf "$WORK/data.partial" && mkdir -p "$WORK/data.partial"
  tar xf "$DATA_TAR" -C "$WORK/data.partial" && mv "$WORK/data.partial" "$WORK/data"
fi
train_flags=(--config "configs/score_cifar10.py:$VARIANT" "--config.data.name=folder:$WORK/data"
             "--config.data.eval_name=npz:$IMAGES" ${config_flags[@]+"${config_flags[@]}"})

if [[ ! -f $WORK/probe/probe.json ]]; then
  stamp "probe: widths $WIDTHS, $PROBE_SECONDS s of steps each"
  rm -rf "$WORK/probe.partial"
  if ! "$PYTHON" scripts/probe_score_sizes.py "${train_flags[@]}" --widths "$WIDTHS" --seconds "$PROBE_SECONDS" \
      --train_seconds "$TRAIN_SECONDS" --min_steps "$MIN_STEPS" --out "$WORK/probe.partial/probe.json"; then
    cp "$WORK/probe.partial/probe.md" "$OUT_DIR/" 2>/dev/null || true
    die "no width fits the budget (probe.md); raise --train_seconds, lower --min_steps or add a narrower width"
  fi
  mv "$WORK/probe.partial" "$WORK/probe"
fi
cp "$WORK/probe/probe.md" "$OUT_DIR/" && pack
read -r channels steps eval_every checkpoint_every < <(json "$WORK/probe/probe.json" \
  '" ".join(str(j["chosen"][k]) for k in ("channels", "num_steps", "eval_every", "checkpoint_every"))')
run_flags=("--config.model.kwargs.channels=$channels" "--config.train.num_steps=$steps"
           "--config.train.eval_every=$eval_every" "--config.train.checkpoint_every=$checkpoint_every")

if [[ -z $shipped && ! -f $WORK/run/export/metadata.json ]]; then
  stamp "training $channels channels for $steps steps (about $TRAIN_SECONDS s at the probe's rate)"
  "$PYTHON" scripts/train_score.py "${train_flags[@]}" "${run_flags[@]}" --workdir "$WORK/run"
fi
pack

if [[ -z $shipped ]]; then
  stamp "shipping as cifar10 (at most $MAX_MIB MiB) and measuring the stored copy"
  command="bash scripts/gpu_cifar10.sh --train_seconds $TRAIN_SECONDS --widths $WIDTHS --min_steps $MIN_STEPS"
  command+=" (python scripts/train_score.py --config configs/score_cifar10.py:$VARIANT ${run_flags[*]}"
  command+="${config_flags[*]:+ ${config_flags[*]}})"
  notes=$(json "$WORK/probe/probe.json" 'j["chosen"]["note"]')
  rm -rf "$WORK/shipped.partial"
  "$PYTHON" scripts/ship_score_model.py --workdir "$WORK/run" --name cifar10 --store_dtype=auto \
    --max_mib "$MAX_MIB" --out_dir "$WORK/shipped.partial" --test_npz "$IMAGES" \
    --annealed_images "$ANNEALED_IMAGES" --data "$DATA_NOTE" --command "$command" --notes "$notes" \
    ${ship_flags[@]+"${ship_flags[@]}"}
  mv "$WORK/shipped.partial" "$WORK/shipped"
fi
cp "$WORK"/shipped/cifar10.{npz,json,md} "$OUT_DIR/"
pack

rows=(--row "cifar10=$classifier@$WORK/shipped/cifar10.npz")
[[ -z $COMPARE ]] || rows+=(--row "$COMPARE=$classifier@$COMPARE")
table=("$PYTHON" scripts/paper_table.py --workdir "$WORK/table" --dataset "npz:$IMAGES" "${rows[@]}"
       --sigmas "$SIGMAS" --num_images "$NUM_IMAGES" --n0 "$N0" --n "$N" --alpha 0.001 --batch_size "$BATCH_SIZE")
limit=()
if ((DEADLINE > 0)); then
  left=$((DEADLINE - (SECONDS - start)))
  limit=(timeout $((left > 1 ? left : 1)))  # `timeout 0` would mean no limit
fi
stamp "certification: ${rows[*]} at sigma $SIGMAS, $NUM_IMAGES images, N = $N"
status=0
${limit[@]+"${limit[@]}"} "${table[@]}" || status=$?
if ((status)); then
  stamp "paper_table.py stopped (exit $status: 124 is --deadline, 2 bad input, said above); tables of the images done:"
  "${table[@]}" --report_only || true
fi
[[ ! -f $WORK/table/table.md ]] || cp "$WORK/table/table.md" "$OUT_DIR/"
pack
stamp "done: $OUT_DIR"
exit "$status"
