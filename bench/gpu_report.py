"""The row of bench/gpu_check.sh: what its steps left in their output folder, with the provenance of the check.

    python bench/gpu_report.py --out OUT_DIR [--results bench/results/gpu_check.jsonl]

Reads each step's `training_summary.json` (and the seed loop's JSON line), appends one JSON line to --results and
prints it. A step that failed or timed out has `null` figures and its exit code in `steps`.
"""

import argparse
import json
from pathlib import Path

from provenance import append_row, run_record
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "gpu_check.jsonl"
TARGET_IMG_S = 30_000  # compiled training on one H100 (the GPU issue's goal)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_figures(run_dir: Path) -> dict | None:
    """Throughput, final loss, memory and validation metrics of one training run (None if it did not finish)."""
    summary = read_json(run_dir / "training_summary.json")
    if summary is None:
        return None
    keys = ("device", "mixed_precision", "compiled", "global_batch_size", "global_step", "steps_this_run", "final_loss",
            "images_per_s", "images_per_s_last_window", "peak_gpu_memory_mb", "final_metrics")  # fmt: skip
    return {key: summary.get(key) for key in keys}


def max_weight_difference(first: Path, second: Path) -> float | None:
    """Largest difference between two saved UNets' weights (a resume against the uninterrupted run)."""
    try:
        a, b = (load_file(folder / "unet" / "diffusion_pytorch_model.safetensors") for folder in (first, second))
    except OSError:
        return None
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="The folder bench/gpu_check.sh ran its steps in.")
    parser.add_argument("--results", default=str(RESULTS), help="JSON-lines file to append the row to.")
    args = parser.parse_args()
    out = Path(args.out)

    steps = {}
    for line in (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").exists() else []:
        name, rest = line.strip().split(": exit ")
        code, seconds = rest.removesuffix(" s").split(" after ")
        steps[name] = {"exit_code": int(code), "seconds": int(seconds)}
    runs = {name: training_figures(out / folder) for name, folder in (
        ("eager_bf16_512", "eager_bf16_512"), ("eager_fp32_512", "eager_fp32_512"),
        ("compiled_bf16_4096", "compiled_bf16_4096"), ("quality", "quality"), ("quality_resumed", "resumed"),
        ("distilled", "distilled"))}  # fmt: skip
    seed_loop = read_json(out / "seed_loop.json")
    compiled = runs["compiled_bf16_4096"]
    figures = {
        "steps": steps,
        **runs,
        "seed_loop_cuda": seed_loop,
        "compiled_vs_target": None if compiled is None else {
            "img_s": compiled["images_per_s_last_window"], "target_img_s": TARGET_IMG_S,
            "met": compiled["images_per_s_last_window"] >= TARGET_IMG_S},  # fmt: skip
        "eager_bf16_vs_seed_loop": None if not (runs["eager_bf16_512"] and seed_loop) else round(
            runs["eager_bf16_512"]["images_per_s_last_window"] / seed_loop["img_s"], 2),  # fmt: skip
        "resume_max_weight_difference": max_weight_difference(out / "quality", out / "resumed"),
    }
    row = {"name": "gpu-check", "provenance": run_record(), **figures}
    append_row(args.results, row)
    for name, run in runs.items():
        if run:
            print(f"{name}: {run['images_per_s_last_window']:.0f} img/s, final loss {run['final_loss']:.4f}, "
                  f"peak GPU memory {run['peak_gpu_memory_mb']} MB, metrics {run['final_metrics'] or '-'}")  # fmt: skip
        else:
            print(f"{name}: no summary (the step failed; see its log)")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
