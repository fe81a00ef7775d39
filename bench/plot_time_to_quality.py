"""Draw docs/time_to_quality.png from bench/results/time_to_quality.jsonl (the latest curve of each name).

    python bench/plot_time_to_quality.py

Left: conditional accuracy against training minutes; right: FID as a multiple of the real-data floor (log scale).
Only curves measured against --reference (default: test, the reporting split) are drawn; validation curves are for
tuning.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
from matplotlib import pyplot as plt  # noqa: E402


def latest_curves(results: Path) -> dict[str, dict]:
    """The last row of each name: a rerun replaces the curve, the file keeps the history."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {row["name"]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="bench/results/time_to_quality.jsonl", help="Rows of the curves.")
    parser.add_argument("--output", default="docs/time_to_quality.png", help="Where to write the figure.")
    parser.add_argument("--reference", default="test", help="Draw the curves measured against this reference.")
    args = parser.parse_args()

    curves = latest_curves(Path(args.results))
    curves = {name: row for name, row in curves.items() if row["reference"] == args.reference}
    figure, (accuracy_axes, fid_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in curves.items():
        minutes = [point["train_time_s"] / 60 for point in row["points"]]
        accuracy_axes.plot(minutes, [100 * point["cond_accuracy"] for point in row["points"]], "o-", label=name)
        fid_axes.plot(minutes, [point["fid"] / point["fid_real_floor"] for point in row["points"]], "o-", label=name)
    accuracy_axes.set(xlabel="training minutes (2-core CPU)", ylabel="conditional accuracy (%)",
                      title="Is it the requested digit?")  # fmt: skip
    fid_axes.set(xlabel="training minutes (2-core CPU)", ylabel="FID / real-data floor", yscale="log",
                 title="How real does it look? (1 = real digits)")  # fmt: skip
    for axes in (accuracy_axes, fid_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"Quality along training ({args.reference} reference; bench/results/time_to_quality.jsonl)")
    figure.tight_layout()
    figure.savefig(args.output, dpi=100)
    print(f"Wrote {args.output} ({len(curves)} curves)")


if __name__ == "__main__":
    main()
