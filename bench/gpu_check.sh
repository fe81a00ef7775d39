#!/usr/bin/env bash
# One prepared GPU check that fits a 10-minute window. From the repository root, after `pip install -e .`:
#   bash bench/gpu_check.sh            # full: ~6-8 minutes on one H100
#   bash bench/gpu_check.sh --quick    # fewer steps
# Prints the device, training images/s of the seed model at batch 512 and 4096 (bf16 autocast + TF32, eager and
# torch.compile), sampling images/s, and peak GPU memory; the last line is one JSON object of all figures.
# STEPS_512, STEPS_4096 and COMPILE_BACKEND override the defaults (COMPILE_BACKEND=aot_eager smoke-tests on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS_512=${STEPS_512:-300}
STEPS_4096=${STEPS_4096:-100}
if [ "${1:-}" = "--quick" ]; then STEPS_512=100; STEPS_4096=40; fi
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
OUT=$(mktemp -d)

python - <<'PY'
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU)")
PY

run() {  # name batch steps dynamo-backend(or no) extra-flags...
  local name=$1 batch=$2 steps=$3 dynamo=$4; shift 4
  python -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml --dynamo_backend "$dynamo" \
    train_conditional.py \
    --output_dir "$OUT/$name" --train_batch_size "$batch" --max_train_steps "$steps" \
    --logging_steps $((steps / 2)) --mixed_precision bf16 --allow_tf32 --validation_images_per_label 0 \
    --validation_grid_columns 1 --validation_num_inference_steps 1 --learning_rate 1e-3 "$@" > "$OUT/$name.log" 2>&1 \
    || { tail -n 30 "$OUT/$name.log"; exit 1; }
  python -c "import json; s = json.load(open('$OUT/$name/training_summary.json')); print(f\"$name: {s['images_per_s_last_window']:.0f} img/s steady (whole loop {s['images_per_s']:.0f}), peak GPU memory {s['peak_gpu_memory_mb']} MB\")"
}

run eager_512 512 "$STEPS_512" no
run compiled_512 512 "$STEPS_512" "$COMPILE_BACKEND"
run eager_4096 4096 "$STEPS_4096" no
run compiled_4096 4096 "$STEPS_4096" "$COMPILE_BACKEND"

python - "$OUT" <<'PY'
import json, sys, time
import torch
from pipeline.loading import load_pipeline
from pipeline.schedulers import set_scheduler

out = sys.argv[1]
figures = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
for name in ("eager_512", "compiled_512", "eager_4096", "compiled_4096"):
    summary = json.load(open(f"{out}/{name}/training_summary.json"))
    figures[f"train_{name}_img_s"] = summary["images_per_s_last_window"]
    figures[f"train_{name}_peak_gpu_mb"] = summary["peak_gpu_memory_mb"]
pipe = load_pipeline(f"{out}/eager_512", dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
pipe.set_progress_bar_config(disable=True)
set_scheduler(pipe, "dpm++")
labels = list(range(10)) * 100
pipe(labels[:10], num_inference_steps=2)  # warm-up
if torch.cuda.is_available():
    torch.cuda.synchronize()
started = time.perf_counter()
pipe(labels, num_inference_steps=10, output_type="pt")
if torch.cuda.is_available():
    torch.cuda.synchronize()
figures["sampling_dpmpp10_bf16_img_s"] = round(len(labels) / (time.perf_counter() - started), 1)
best = max(figures[key] for key in figures if key.startswith("train_") and key.endswith("img_s"))
figures["best_train_img_s"] = best
figures["seed_200_epochs_minutes_at_best"] = round(200 * 60000 / best / 60, 1)
print(f"sampling: {figures['sampling_dpmpp10_bf16_img_s']} img/s (DPM-Solver++ 10 steps, bf16, 1000 images)")
print(f"best training: {best:.0f} img/s -> the seed's 200 epochs in {figures['seed_200_epochs_minutes_at_best']} min")
print(json.dumps(figures))
PY
