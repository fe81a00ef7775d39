"""Train one recipe and evaluate it: wall time, conditional accuracy and classifier FID, as one JSON row.

    python bench/quality.py --name quick -- --preset quick
    python bench/quality.py --name seed --eval "ddim:50" "dpm++:10" -- --preset seed

Everything after `--` goes to train_conditional.py (run through `accelerate launch` with the given config). Each
evaluation is `sampler:steps[:guidance]`. Rows are appended to --results (JSON lines) and printed; the last line of
the output is a JSON object of the whole run.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="Name of the row (and of the output folder).")
    parser.add_argument("--config", default="cpu.yaml", help="accelerate config in accelerate_configs/.")
    parser.add_argument("--eval", nargs="+", default=["ddim:50"], help="sampler:steps[:guidance] to evaluate.")
    parser.add_argument("--num_images_per_label", type=int, default=100, help="Images per class for evaluation.")
    parser.add_argument("--output_root", default="output/bench", help="Where the trained pipelines go.")
    parser.add_argument("--results", default="bench/results/quality.jsonl", help="JSON-lines file to append to.")
    parser.add_argument("--skip_training", action="store_true", help="Evaluate an existing output folder.")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train_conditional.py flags.")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    output_dir = Path(args.output_root) / args.name

    row = {
        "name": args.name,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "train_args": train_args,
        "accelerate_config": args.config,
    }
    if not args.skip_training:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO_ROOT / "accelerate_configs" / args.config),
            str(REPO_ROOT / "train_conditional.py"),
            "--output_dir",
            str(output_dir),
            "--overwrite_output_dir",
            *train_args,
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, env=dict(os.environ, TQDM_DISABLE="1"))
        row["train_wall_s"] = round(time.perf_counter() - started, 1)
    summary_path = output_dir / "training_summary.json"
    if summary_path.exists():
        row["training_summary"] = json.loads(summary_path.read_text())

    row["evaluations"] = []
    for spec in args.eval:
        sampler, steps, *guidance = spec.split(":")
        command = [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "--model",
            str(output_dir),
            "--scheduler",
            sampler,
            "--num_inference_steps",
            steps,
            "--guidance_scale",
            guidance[0] if guidance else "1.0",
            "--num_images_per_label",
            str(args.num_images_per_label),
        ]
        started = time.perf_counter()
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        evaluation = json.loads(result.stdout.strip().splitlines()[-1])
        evaluation["sampler"], evaluation["eval_wall_s"] = sampler, round(time.perf_counter() - started, 1)
        row["evaluations"].append(evaluation)
        print(
            json.dumps(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "acc": evaluation["cond_accuracy"]["overall"],
                    "fid": evaluation["fid"],
                    "floor": evaluation["fid_real_floor"],
                }
            ),
            flush=True,
        )

    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
