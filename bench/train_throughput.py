"""Training speed, memory and data-loading throughput: our loop against the seed's, same machine, same run.

    python bench/train_throughput.py            # batches 128 and 512, a few steps each (~6 minutes on 2 cores)
    python bench/train_throughput.py --quick    # fewer steps (~3 minutes)
    python bench/train_throughput.py --name quick --batch_sizes 64 --steps 40 --extra --preset quick

The last form measures a preset (or any flags) at its own batch size; the seed loop runs the same batch sizes beside
it, so rows measured on different days compare through their ratio to it.

Both loops train the seed model (channels 32, 64, 64; the seed's attention) in float32 with Adam; ours runs as
`train_conditional.py` under `accelerate launch` with its defaults (on a CPU: micro-batches of up to 128 images, the
same numerics as one big batch). Each measurement runs in its own process; images/s counts the training loop only.
The run is appended as one JSON line, with its provenance (command, commit, date, machine), to --results, from which
bench/report.py renders README's table; the last line printed is that row.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import append_row, run_record

from pipeline.data import load_split

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "train_throughput.jsonl"


def seed_loop(batch_size: int, steps: int) -> dict:
    # On the CPU like ours (accelerate_configs/cpu.yaml), even where a GPU is present.
    command = [sys.executable, str(REPO_ROOT / "bench" / "seed_loop.py"), "--batch_size", str(batch_size),
               "--steps", str(steps), "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def our_loop(batch_size: int, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"), str(REPO_ROOT / "train_conditional.py"),
                   "--output_dir", output_dir, "--train_batch_size", str(batch_size), "--max_train_steps", str(steps),
                   "--logging_steps", str(steps), "--validation_images_per_label", "0", "--validation_grid_columns",
                   "1", "--validation_num_inference_steps", "1", *extra]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        return json.loads((Path(output_dir) / "training_summary.json").read_text())


def loader_throughput(batch_size: int = 512, batches: int = 200) -> dict:
    """Decode-once cost (cached by `datasets`) and batches per second of the in-memory uint8 tensor."""
    started = time.perf_counter()
    train = load_split(str(REPO_ROOT / "data" / "mnist"), "train")
    load_s = time.perf_counter() - started
    order = torch.randperm(len(train))
    started = time.perf_counter()
    for index in range(batches):
        indices = order[index * batch_size % (len(train) - batch_size) :][:batch_size]
        clean_images = train.images[indices].float() / 127.5 - 1
        labels = train.labels[indices]
    elapsed = time.perf_counter() - started
    assert clean_images.shape == (batch_size, 1, 28, 28) and len(labels) == batch_size
    return {"load_cached_s": round(load_s, 2), "loader_img_s": round(batches * batch_size / elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="default", help="Name of the row (README shows the latest of each name).")
    parser.add_argument("--quick", action="store_true", help="Fewer steps per measurement (about 3 minutes).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[128, 512], help="Batch sizes to measure.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per measurement (default: 10 at 128, 4 at 512).")
    parser.add_argument("--results", default=str(RESULTS), help="JSON-lines file to append to.")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More train_conditional.py flags.")
    args = parser.parse_args()
    default_steps = {128: 4 if args.quick else 10, 512: 2 if args.quick else 4}
    if not args.steps and set(args.batch_sizes) - set(default_steps):
        parser.error(f"--steps is needed for batch sizes other than {sorted(default_steps)}")
    steps = {size: args.steps or default_steps[size] for size in args.batch_sizes}

    provenance = run_record()  # taken first: the code measured is the code at the start of the run
    figures = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    for batch_size, count in steps.items():
        seed = seed_loop(batch_size, count)
        ours = our_loop(batch_size, count, args.extra)
        figures[f"batch_{batch_size}"] = {
            "seed_img_s": seed["img_s"],
            "ours_img_s": ours["images_per_s"],
            "ratio": round(ours["images_per_s"] / seed["img_s"], 2),
            "seed_peak_rss_mb": seed["peak_rss_mb"],
            "ours_peak_rss_mb": ours["peak_rss_mb"],
            "steps": count,
        }
        print(f"batch {batch_size}: seed {seed['img_s']:.1f} img/s, ours {ours['images_per_s']:.1f} img/s "
              f"({figures[f'batch_{batch_size}']['ratio']:.2f}x); peak RSS seed {seed['peak_rss_mb']:.0f} MB, "
              f"ours {ours['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    figures.update(loader_throughput())
    largest = max(args.batch_sizes)
    figures["loader_compared_at_batch"] = largest
    figures["loader_vs_train_ratio"] = round(figures["loader_img_s"] / figures[f"batch_{largest}"]["ours_img_s"])
    print(f"data: cached load {figures['load_cached_s']} s, loader {figures['loader_img_s']} img/s = "
          f"{figures['loader_vs_train_ratio']}x our training speed at batch {largest}")  # fmt: skip
    row = {"name": args.name, "provenance": provenance, "quick": args.quick, "extra": args.extra, **figures}
    append_row(args.results, row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
