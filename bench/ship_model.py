"""Put a trained pipeline into the repository, so that a fresh install samples before training anything.

    python bench/ship_model.py --model output/bench/cpu-hour-lcm --row cpu-hour-lcm-test --to models/mnist

Writes into --to (replacing what an earlier run of this script wrote there): the pipeline as `save_pretrained` writes
it (safetensors weights, configs, its own copy of the model code, so that `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` loads it without this package), the run's sample grid and `training_summary.json`, its model
card with a "Measured" section rendered from the bench/results/quality.jsonl row named --row (the evaluation that
reports this folder: test reference, three seeds), and `provenance.json`: this command, its commit, date and machine,
the source folder, that row, and the sha256 of every weights file.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from provenance import run_record
from report import cas_text, plus_minus, provenance, read_rows, sampler_text

from pipeline.loading import load_pipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
QUALITY_ROWS = REPO_ROOT / "bench" / "results" / "quality.jsonl"
COPIED = ("README.md", "samples.png", "training_summary.json")  # what the run wrote beside the pipeline


def measured_section(row: dict) -> str:
    """The model card's "Measured" section: one line per evaluation in `row` (a bench/quality.py row)."""
    lines = [
        "## Measured",
        "",
        f"By `bench/quality.py` (row `{row['name']}` of bench/results/quality.jsonl): generated images of every class "
        "judged by the project's evaluation classifier, against real images it never saw.",
        "",
        "| sampler | reference | images × seeds | conditional accuracy | FID | real floor | CAS generated / real |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for evaluation in row["evaluations"]:
        cells = [
            sampler_text(evaluation),
            evaluation["reference"],
            f"{evaluation['num_images']:,} × {len(evaluation['seeds'])}",
            plus_minus(evaluation["cond_accuracy"], 100, " %"),
            plus_minus(evaluation["fid"]),
            plus_minus(evaluation["fid_real_floor"]),
            cas_text(evaluation.get("cas")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", f"_Measured: {provenance(row)}._", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="The trained pipeline folder to ship.")
    parser.add_argument("--row", required=True, help="Name of the bench/results/quality.jsonl row that measured it.")
    parser.add_argument("--to", default="models/mnist", help="Where in the repository it goes.")
    args = parser.parse_args()
    record = run_record()
    rows = [row for row in read_rows(QUALITY_ROWS) if row["name"] == args.row]
    if not rows:
        raise SystemExit(f"error: bench/results/quality.jsonl has no row named {args.row!r}; measure the model first")

    missing = [name for name in COPIED if not (Path(args.model) / name).is_file()]
    if missing:
        raise SystemExit(f"error: {args.model} lacks {', '.join(missing)}; pass the folder of a finished run")
    pipe = load_pipeline(args.model, device="cpu")  # before anything is removed: a bad folder costs nothing shipped
    target = REPO_ROOT / args.to
    if target.exists():
        if not (target / "provenance.json").exists():
            raise SystemExit(f"error: {target} exists and was not written by this script; pass another --to")
        shutil.rmtree(target)
    pipe.save_pretrained(target)
    for name in COPIED:
        shutil.copyfile(Path(args.model) / name, target / name)
    card = (target / "README.md").read_text()
    (target / "README.md").write_text(card.rstrip("\n") + "\n\n" + measured_section(rows[-1]))
    weights = {str(path.relative_to(target)): hashlib.sha256(path.read_bytes()).hexdigest()
               for path in sorted(target.rglob("*.safetensors"))}  # fmt: skip
    shipped = {"provenance": record, "source": args.model, "quality_row": rows[-1], "sha256": weights}
    (target / "provenance.json").write_text(json.dumps(shipped, indent=2) + "\n")
    print(f"wrote {target}: {', '.join(sorted(path.name for path in target.iterdir()))}")


if __name__ == "__main__":
    main()
