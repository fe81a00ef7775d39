"""Train one recipe and evaluate it under the held-out protocol; append the measured row to bench/results/.

    python bench/quality.py --name quick --eval dpm++:20:2 --cas 100 -- --preset quick
    python bench/quality.py --name quick-guidance --model_dir output/bench/quick --skip_training \
        --reference validation --eval dpm++:20:1.5 dpm++:20:2 dpm++:20:3       # a tuning row: validation reference
    (add --timestep_spacing trailing to sample every evaluation from pure noise instead of the saved spacing)

Everything after `--` goes to train_conditional.py, or to distill.py with `--script distill.py` (run through
`accelerate launch` with the given config, into OUTPUT_ROOT/NAME). Each evaluation is
`sampler:steps[:guidance[:start-stop]]` (the saved guidance scale and interval when left out; `dpm++:20:2:0.2-0.8`
guides the middle 60 % of the steps only), run by `python -m pipeline.evaluate` with every --seeds seed against
--reference (test for reporting, validation for tuning). The row holds this command exactly, its commit, date and
machine (see provenance.py), the measured training wall time and the run's `training_summary.json`; README's tables
are rendered from such rows by bench/report.py.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from provenance import append_row, run_record

from pipeline.evaluate import REFERENCES
from pipeline.run_folder import locked_folder
from pipeline.schedulers import TIMESTEP_SPACINGS

REPO_ROOT = Path(__file__).resolve().parent.parent


def train(output_dir: Path, config: str, script: str, train_args: list[str]) -> float:
    """Run `script` (train_conditional.py or distill.py) through `accelerate launch`; return its wall time in s."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO_ROOT / "accelerate_configs" / config), str(REPO_ROOT / script),
               "--output_dir", str(output_dir), "--overwrite_output_dir", *train_args]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, TQDM_DISABLE="1"))
    return round(time.perf_counter() - started, 1)


def evaluate(output_dir: Path, spec: str, args: argparse.Namespace, cas: int | None) -> dict:
    """One `sampler:steps[:guidance[:start-stop]]` evaluation by `python -m pipeline.evaluate`, with its wall time."""
    sampler, steps, *guidance = spec.split(":")
    command = [sys.executable, "-m", "pipeline.evaluate", "--model", str(output_dir), "--scheduler", sampler,
               "--num_inference_steps", steps, "--num_images_per_label", str(args.num_images_per_label),
               "--reference", args.reference, "--seeds", *map(str, args.seeds)]  # fmt: skip
    if guidance:
        command += ["--guidance_scale", guidance[0]]
    if len(guidance) > 1:
        command += ["--guidance_interval", *guidance[1].split("-")]
    if args.timestep_spacing:
        command += ["--timestep_spacing", args.timestep_spacing]
    if cas:
        command += ["--cas", str(cas)]
    started = time.perf_counter()
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    return {**evaluation, "sampler": sampler, "eval_wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="Name of the row (and of the output folder).")
    parser.add_argument("--config", default="cpu.yaml", help="accelerate config in accelerate_configs/.")
    parser.add_argument(
        "--script",
        default="train_conditional.py",
        choices=["train_conditional.py", "distill.py"],
        help="What makes the pipeline: training, or distilling a teacher (pass --teacher after --).",
    )
    parser.add_argument("--eval", nargs="+", default=["ddim:50"], help="sampler:steps[:guidance[:start-stop]].")
    parser.add_argument("--reference", choices=REFERENCES, default="test", help="Evaluation reference.")
    parser.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="Every evaluation's timestep spacing (default: the model's saved one).")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Sampling seeds of each evaluation.")
    parser.add_argument("--num_images_per_label", type=int, default=100, help="Images per class and seed.")
    parser.add_argument("--cas", type=int, default=None, metavar="N", help="CAS, N images per class (1st --eval).")
    parser.add_argument("--output_root", default="output/bench", help="Where the trained pipelines go.")
    parser.add_argument("--model_dir", default=None, help="The pipeline folder (default: OUTPUT_ROOT/NAME).")
    parser.add_argument("--results", default="bench/results/quality.jsonl", help="JSON-lines file to append to.")
    parser.add_argument("--skip_training", action="store_true", help="Evaluate an existing output folder.")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train_conditional.py flags.")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    output_dir = Path(args.model_dir or Path(args.output_root) / args.name).resolve()

    row = {"name": args.name, "provenance": run_record(), "accelerate_config": args.config, "script": args.script,
           "train_args": train_args}  # fmt: skip
    row["train_wall_s"] = None if args.skip_training else train(output_dir, args.config, args.script, train_args)
    summary_path = output_dir / "training_summary.json"
    if summary_path.exists():  # the run's own record: total time over resumed segments, steps, batch, final loss
        summary = json.loads(summary_path.read_text())
        summary.pop("loss_history", None)
        row["training_summary"] = summary

    row["evaluations"] = []
    with locked_folder(str(output_dir), "--model_dir"):  # no run may replace the model while it is measured
        for index, spec in enumerate(args.eval):
            evaluation = evaluate(output_dir, spec, args, args.cas if index == 0 else None)
            evaluation.pop("per_seed")  # the mean and std stay; every seed's figures are in the evaluator's output
            row["evaluations"].append(evaluation)
            print(json.dumps({"eval": spec, "cond_accuracy": evaluation["cond_accuracy"]["mean"],
                              "fid": evaluation["fid"]["mean"], "floor": evaluation["fid_real_floor"]["mean"]}),
                  flush=True)  # fmt: skip

    append_row(args.results, row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
