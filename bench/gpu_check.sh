#!/usr/bin/env bash
# The GPU check: run it first whenever a GPU is lent (one H100/H200; about 5 minutes, at most 8: every step has its own
# `timeout`, so a hang costs that step, not the lease). From the repository root, after `pip install -e .`:
#   bash bench/gpu_check.sh                 # all steps; the row goes to bench/results/gpu_check.jsonl
#   bash bench/gpu_check.sh --dry-run       # print the steps and their timeouts, run nothing (a test does this)
#   OUT=/some/folder RESULTS=/some/folder/gpu_check.jsonl bash bench/gpu_check.sh    # keep the runs and the row there
# Steps: the device probe; eager training at batch 512 in bf16 and in float32 (images/s, final losses side by side);
# torch.compile (inductor) at batch 4096 in bf16 (images/s, peak memory; the target is 30,000 images/s on one H100);
# the seed notebook's loop on the same GPU (the reference); `--preset quality` for 200 steps with a validation (grid and
# metrics), a checkpoint and the final pipeline, then a resume of its second half; `distill.py` for a few steps from
# it. Then bench/gpu_report.py writes one row with its provenance from what the steps left in $OUT.
# Where the copy being run has no .git (the device tool's), GIT_COMMIT=<hash> GIT_DIRTY=0 give the row its provenance.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package imports even where `pip install -e .` did not run
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TQDM_DISABLE=1

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
if [ "$DRY_RUN" = 1 ]; then OUT=${OUT:-OUT}; else OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"; fi
RESULTS=${RESULTS:-bench/results/gpu_check.jsonl}
FAILED=0

step() {  # name timeout-seconds command...: one step under its own timeout (+5 s to kill), output in $OUT/name.log
  local name=$1 seconds=$2
  shift 2
  echo "step $name timeout $seconds s: $*"
  [ "$DRY_RUN" = 1 ] && return 0
  local started=$SECONDS
  timeout --kill-after=5 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "  $name: exit $code after $((SECONDS - started)) s" | tee -a "$OUT/steps.txt"
  if [ "$code" != 0 ]; then FAILED=1; tail -n 20 "$OUT/$name.log"; fi
}

launch() {  # the real launcher on one GPU; the script and its flags follow
  echo python -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml "$@"
}

TRAIN=(--validation_images_per_label 0 --validation_grid_columns 1 --validation_num_inference_steps 1 --logging_steps 50)
QUALITY=(--preset quality --max_train_steps 200 --checkpointing_steps 100 --validation_steps 100
         --validation_images_per_label 10 --classifier_train_samples 3000 --classifier_cache_dir "$OUT/classifier")

step probe 40 python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
step eager_bf16_512 40 $(launch) train_conditional.py --output_dir "$OUT/eager_bf16_512" --train_batch_size 512 \
  --max_train_steps 150 --mixed_precision bf16 --allow_tf32 "${TRAIN[@]}"
step eager_fp32_512 40 $(launch) train_conditional.py --output_dir "$OUT/eager_fp32_512" --train_batch_size 512 \
  --max_train_steps 150 --mixed_precision no "${TRAIN[@]}"
step compiled_bf16_4096 100 $(launch) --dynamo_backend inductor train_conditional.py \
  --output_dir "$OUT/compiled_bf16_4096" --train_batch_size 4096 --max_train_steps 100 --mixed_precision bf16 \
  --allow_tf32 "${TRAIN[@]}"
step seed_loop_cuda 25 sh -c "python bench/seed_loop.py --device cuda --batch_size 512 --steps 50 > '$OUT/seed_loop.json'"
step quality_200_steps 80 $(launch) train_conditional.py --output_dir "$OUT/quality" "${QUALITY[@]}"
# The second half again, from the checkpoint at step 100 alone (nothing else of the run: a failed resume leaves no
# summary or weights behind to be taken for its own), with the run's record of its files.
step quality_resume 40 sh -c "rm -rf '$OUT/resumed' && mkdir -p '$OUT/resumed/checkpoints' \
  && cp -r '$OUT/quality/checkpoints/checkpoint-100' '$OUT/resumed/checkpoints/' \
  && cp '$OUT/quality/.run_files.json' '$OUT/resumed/' \
  && $(launch) train_conditional.py --output_dir '$OUT/resumed' ${QUALITY[*]} --resume_from_checkpoint latest"
step distill 40 $(launch) distill.py --teacher "$OUT/quality" --output_dir "$OUT/distilled" --max_train_steps 20 \
  --validation_images_per_label 10 --classifier_train_samples 3000 --classifier_cache_dir "$OUT/classifier"
step report 20 python bench/gpu_report.py --out "$OUT" --results "$RESULTS"
[ "$DRY_RUN" = 1 ] || echo "runs and logs in $OUT"
exit $FAILED
