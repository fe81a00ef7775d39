"""The learning test's calibration: the `smoke` preset trained with several seeds, as tests/test_learning.py trains it.

    python bench/learning.py --seeds 0 1 2        # about 2 minutes per seed on 2 cores

For each seed it records the training wall time, the loss of the first and last logging windows and the conditional
accuracy and FID of the final validation (the validation reference, 20 images per class, judged by the classifier
the tests use: trained on the first 3,000 fit images). The row goes to bench/results/learning.jsonl; the test's
threshold is set well below the worst seed of the latest row and at least 3x chance.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import append_row, run_record

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ["--preset", "smoke", "--classifier_train_samples", "3000"]  # tests/test_learning.py's run


def train_once(seed: int, classifier_cache_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"), str(REPO_ROOT / "train_conditional.py"),
                   "--output_dir", output_dir, "--seed", str(seed), "--classifier_cache_dir", classifier_cache_dir,
                   *TRAIN_ARGS]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        wall_s = round(time.perf_counter() - started, 1)
        summary = json.loads((Path(output_dir) / "training_summary.json").read_text())
    metrics = summary["final_metrics"]
    return {"seed": seed, "wall_s": wall_s, "first_loss": summary["loss_history"][0][1],
            "final_loss": summary["loss_history"][-1][1], "cond_accuracy": metrics["cond_accuracy"],
            "fid": metrics["fid"], "fid_real_floor": metrics["fid_real_floor"],
            "reference": metrics["reference"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds.")
    parser.add_argument("--results", default="bench/results/learning.jsonl", help="JSON-lines file to append to.")
    args = parser.parse_args()
    row = {"name": "smoke", "provenance": run_record(), "train_args": TRAIN_ARGS, "runs": []}
    with tempfile.TemporaryDirectory() as classifier_cache_dir:  # a fresh cache: trained once, like CI's
        for seed in args.seeds:
            row["runs"].append(train_once(seed, classifier_cache_dir))
            print(json.dumps(row["runs"][-1]), flush=True)
    row["worst_cond_accuracy"] = min(run["cond_accuracy"] for run in row["runs"])
    row["worst_loss_ratio"] = round(max(run["final_loss"] / run["first_loss"] for run in row["runs"]), 4)
    append_row(args.results, row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
