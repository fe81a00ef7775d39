"""Quality against training time: evaluate every checkpoint of a finished run; append the curve to bench/results/.

    # 1. train with checkpoints (add --resume_from_checkpoint latest to continue after an interruption)
    accelerate launch --config_file accelerate_configs/cpu.yaml train_conditional.py --preset quick \\
        --output_dir output/bench/quick-curve --checkpointing_steps 250 --validation_images_per_label 0
    # 2. the curve: each checkpoint's pipeline (EMA weights) scored like the final one
    python bench/time_to_quality.py --name quick --model_dir output/bench/quick-curve
    # 3. the picture, from the latest curve of each name
    python bench/plot_time_to_quality.py

The time of a point is the run's training wall time when it wrote that checkpoint, as its `training_state.json`
recorded it (summed over resumed segments; evaluation is not counted). Each point samples with the pipeline's saved
default (or --scheduler/--num_inference_steps/--guidance_scale) and is scored by the held-out evaluator against
--reference, over --seeds.
"""

import argparse
import json
import time
from pathlib import Path

from provenance import append_row, run_record

from pipeline.checkpointing import STATE_FILE, list_checkpoints, pipeline_at_checkpoint
from pipeline.evaluate import REFERENCES, default_dataset, evaluate
from pipeline.schedulers import SCHEDULERS, set_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="Name of the curve (the preset or recipe).")
    parser.add_argument("--model_dir", required=True, help="A finished run trained with --checkpointing_steps.")
    parser.add_argument("--dataset", default=default_dataset(), help="Default: the bundled data/mnist.")
    parser.add_argument("--reference", choices=REFERENCES, default="test", help="Evaluation reference.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Sampling seeds of each point.")
    parser.add_argument("--num_images_per_label", type=int, default=100, help="Images per class and seed.")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="Default: the saved one.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the saved one.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the saved one.")
    parser.add_argument("--results", default="bench/results/time_to_quality.jsonl", help="JSON-lines file.")
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    summary = json.loads((model_dir / "training_summary.json").read_text())
    row = {"name": args.name, "provenance": run_record(), "model_dir": str(model_dir), "dataset": args.dataset,
           "reference": args.reference,
           "seeds": args.seeds, "num_images_per_label": args.num_images_per_label,
           "total_train_time_s": summary["total_train_time_s"], "points": []}  # fmt: skip
    for checkpoint in list_checkpoints(str(model_dir)):
        state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
        pipe = pipeline_at_checkpoint(str(model_dir), checkpoint)
        if args.scheduler:
            set_scheduler(pipe, args.scheduler)
        pipe.set_progress_bar_config(disable=True)
        started = time.perf_counter()
        results = evaluate(
            pipe,
            dataset=args.dataset,
            reference=args.reference,
            seeds=tuple(args.seeds),
            num_images_per_label=args.num_images_per_label,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
        )
        point = {
            "step": state["global_step"],
            "train_time_s": state["train_time_s"],
            "cond_accuracy": results["cond_accuracy"]["mean"],
            "cond_accuracy_std": results["cond_accuracy"]["std"],
            "fid": results["fid"]["mean"],
            "fid_std": results["fid"]["std"],
            "fid_real_floor": results["fid_real_floor"]["mean"],
            "scheduler": type(pipe.scheduler).__name__,
            "eval_wall_s": round(time.perf_counter() - started, 1),
        }
        row["points"].append(point)
        print(json.dumps(point), flush=True)
    append_row(args.results, row)


if __name__ == "__main__":
    main()
