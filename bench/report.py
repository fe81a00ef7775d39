"""Render README's measured tables from the rows the bench scripts wrote, so that every number there has a source.

    python bench/report.py            # rewrite README.md's blocks in place
    python bench/report.py --check    # exit 1 and print a diff when README.md differs from what the rows render

A block is the text between `<!-- report:NAME -->` and `<!-- /report:NAME -->`; NAME is one of `BLOCKS`, each
rendered from the latest row of each name in its results file (bench/results/NAME.jsonl unless `BLOCKS` says
otherwise), ending with the commit, date and machine of those rows. A README without a block's markers is left as it
is there. tests/test_report.py runs the check.
"""

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
RESULTS = REPO_ROOT / "bench" / "results"
PROVENANCE_KEYS = ("argv", "commit", "dirty", "date", "machine")
SCHEDULER_NAMES = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "DPMSolverMultistepScheduler": "DPM-Solver++",
    "UniPCMultistepScheduler": "UniPC",
    "EulerDiscreteScheduler": "Euler",
}


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines results file (none if it is missing); each must carry its provenance."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for number, row in enumerate(rows, start=1):
        missing = [key for key in PROVENANCE_KEYS if key not in row.get("provenance", {})]
        if missing:
            raise ValueError(f"{path.name} row {number} lacks provenance {missing}: rows come from the bench scripts")
    return rows


def latest_by_name(rows: list[dict], key: Callable[[dict], tuple] = lambda row: (row["name"],)) -> list[dict]:
    """The last row of each name (or of each `key`), in the order the names first appear."""
    latest = {}
    for row in rows:
        latest[key(row)] = row
    return list(latest.values())


def autoguidance_setting(row: dict) -> tuple:
    """A bench/autoguidance.py row's setting: its sweep, the kind of guidance, the guide, the scale, the reference."""
    return (row["name"], row["guidance"], row["guide_step"], row.get("guide_model"), row["guidance_scale"],
            row["reference"], tuple(row["seeds"]))  # fmt: skip


def provenance(row: dict) -> str:
    """`name` at commit (short), date, machine: where one row's figures come from."""
    record, machine = row["provenance"], row["provenance"]["machine"]
    dirty = " + uncommitted changes" if record["dirty"] else ""
    gpu = machine["gpu"] or "no GPU"
    return (f"`{row['name']}`: commit `{record['commit'][:7]}`{dirty}, {record['date'][:10]}, {machine['cpu']} "
            f"({machine['cores']} cores, {machine['arch']}), {gpu}, torch {machine['torch']}")  # fmt: skip


def measured_from(rows: list[dict]) -> str:
    return "_Measured: " + "; ".join(provenance(row) for row in rows) + "._"


def plus_minus(figure: dict, scale: float = 1, unit: str = "") -> str:
    """`{"mean": m, "std": s}` as "m ± s unit" (one decimal; no ± when a single seed gives no spread)."""
    spread = "" if figure.get("std") is None else f" ± {figure['std'] * scale:.1f}"
    return f"{figure['mean'] * scale:.1f}{spread}{unit}"


def guidance(scale: float, kind: str = "cfg") -> str:
    """"guidance 2" (classifier-free), "autoguidance 2", or "no guidance" at scale 1."""
    return "no guidance" if scale == 1 else f"{'autoguidance' if kind == 'autoguidance' else 'guidance'} {scale:g}"


def sampler_text(evaluation: dict) -> str:
    """"DPM-Solver++ 20 steps, guidance 2" (autoguidance named, "20 trailing steps" where the steps are not spaced
    "leading", and the guidance interval when it is not every step)."""
    scheduler = SCHEDULER_NAMES.get(evaluation["scheduler"], evaluation["scheduler"].removesuffix("Scheduler"))
    steps = evaluation["num_inference_steps"]
    kind = evaluation.get("guidance", "cfg")
    # rows from before the key sampled "leading"; None is LCM's own grid
    spacing = evaluation.get("timestep_spacing", "leading")
    steps_text = f"{steps}{'' if spacing in ('leading', None) else ' ' + spacing} step{'s' if steps > 1 else ''}"
    text = f"{scheduler} {steps_text}, {guidance(evaluation['guidance_scale'], kind)}"
    interval = evaluation.get("guidance_interval", [0.0, 1.0])
    if evaluation["guidance_scale"] > 1 and interval != [0.0, 1.0]:
        text += f" on steps {interval[0]:g}–{interval[1]:g}"
    return text


def cas_text(cas: dict | None) -> str:
    return f"{cas['generated'] * 100:.1f} % / {cas['real'] * 100:.1f} %" if cas else "–"


def training_time(row: dict) -> str:
    summary = row.get("training_summary") or {}
    if summary.get("total_train_time_s") is None:
        return "–"
    minutes = summary["total_train_time_s"] / 60
    duration = f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
    return f"{duration} ({summary['global_step']:,} steps × {summary['global_batch_size']} images)"


def quality(rows: list[dict]) -> str:
    """bench/quality.py: one line per evaluation of the latest row of each preset."""
    lines = [
        "| preset | training time | sampler | reference | images × seeds | cond. accuracy | FID | real floor "
        "| FID / floor | CAS generated / real |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for index, evaluation in enumerate(row["evaluations"]):
            reference = evaluation["reference"]
            if evaluation.get("floor_source"):
                reference += f" (floor: {evaluation['floor_source']})"
            ratio = evaluation["fid"]["mean"] / evaluation["fid_real_floor"]["mean"]
            cells = [
                f"`{row['name']}`",
                training_time(row) if index == 0 else "",
                sampler_text(evaluation),
                reference,
                f"{evaluation['num_images']:,} × {len(evaluation['seeds'])}",
                plus_minus(evaluation["cond_accuracy"], 100, " %"),
                plus_minus(evaluation["fid"]),
                plus_minus(evaluation["fid_real_floor"]),
                f"{ratio:.1f}×",
                cas_text(evaluation.get("cas")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", measured_from(rows)])


def presets(rows: list[dict]) -> str:
    """bench/quality.py's reporting rows (test reference, with CAS), one line each: what choosing a model needs."""
    lines = [
        "| model | made in | sampler | cond. accuracy | FID / floor | CAS generated / real |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    reported = [row for row in rows if row["evaluations"][0]["reference"] == "test" and "cas" in row["evaluations"][0]]
    for row in reported:
        evaluation = row["evaluations"][0]  # the one bench/quality.py computes the CAS for
        ratio = evaluation["fid"]["mean"] / evaluation["fid_real_floor"]["mean"]
        cells = [f"`{row['name']}`", training_time(row), sampler_text(evaluation),
                 plus_minus(evaluation["cond_accuracy"], 100, " %"), f"{ratio:.1f}×", cas_text(evaluation["cas"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", measured_from(reported)])


def autoguidance(rows: list[dict]) -> str:
    """bench/autoguidance.py: one line per setting, classifier-free and autoguided, at equal network evaluations."""
    lines = [
        "| sweep | guidance | guide | scale | reference | images × seeds | cond. accuracy | FID / floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["guidance"] == "cfg":
            guide = "unconditional prediction"
        elif row["guide_step"] is not None:
            guide = f"own checkpoint, step {row['guide_step']}"
        else:
            guide = f"`{Path(row['guide_model']).name}`"
        cells = [f"`{row['name']}`", "CFG" if row["guidance"] == "cfg" else "autoguidance", guide,
                 f"{row['guidance_scale']:g}", row["reference"], f"{row['num_images']:,} × {len(row['seeds'])}",
                 plus_minus(row["cond_accuracy"], 100, " %"),
                 f"{row['fid']['mean'] / row['fid_real_floor']['mean']:.2f}×"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", measured_from(latest_by_name(rows))])


def train_throughput(rows: list[dict]) -> str:
    """bench/train_throughput.py: seed loop against ours per batch size, then the data loader."""
    lines = [
        "| row | batch | steps timed | seed loop img/s | ours img/s | ours / seed | peak RSS seed | peak RSS ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    loaders = []
    for row in rows:
        label = f"`{row['name']}`" + (f" (`{' '.join(row['extra'])}`)" if row.get("extra") else "")
        for key in sorted((key for key in row if key.startswith("batch_")), key=lambda key: int(key[6:])):
            batch = row[key]
            lines.append(f"| {label} | {key[6:]} | {batch['steps']} | {batch['seed_img_s']:.1f} | "
                         f"{batch['ours_img_s']:.1f} | {batch['ratio']:.2f}× | {batch['seed_peak_rss_mb']:,.0f} MB | "
                         f"{batch['ours_peak_rss_mb']:,.0f} MB |")  # fmt: skip
        compared_at = row.get("loader_compared_at_batch", 512)
        loaders.append(f"`{row['name']}`: {row['loader_img_s']:,} img/s = {row['loader_vs_train_ratio']:,}× our "
                       f"training speed at batch {compared_at} (cached decode {row['load_cached_s']} s)")  # fmt: skip
    return "\n".join([*lines, "", "Data loader, " + "; ".join(loaders) + ".", "", measured_from(rows)])


def sampling(rows: list[dict]) -> str:
    """bench/sampling.py: one table per row name, every setting as mean ± std over the seeds."""
    parts = []
    for row in rows:
        seeds = ", ".join(str(seed) for seed in row["seeds"])
        lines = [
            f"`{row['name']}`: model `{row['model']}`, {row['num_images_per_label']} images per class, seeds {seeds}, "
            f"FID against {row['reference']} (floor: {row['floor_source']}):",
            "",
            "| setting | UNet calls per image | network evaluations per image | guidance | images/s | vs seed loop "
            "| cond. accuracy | FID | real floor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        seed_img_s = row["settings"][0]["img_s"]["mean"]  # bench/sampling.py measures the seed loop first
        for setting in row["settings"]:
            # a guided call evaluates the UNet on a doubled batch
            evaluations = setting["unet_calls_per_image"] * (2 if setting["guidance_scale"] > 1 else 1)
            cells = [setting["setting"], str(setting["unet_calls_per_image"]), str(evaluations),
                     f"{setting['guidance_scale']:g}",
                     plus_minus(setting["img_s"]), f"{setting['img_s']['mean'] / seed_img_s:.1f}×",
                     plus_minus(setting["cond_accuracy"], 100, " %"),
                     plus_minus(setting["fid"]), plus_minus(setting["fid_real_floor"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        best = row["fewest_calls_at_seed_quality"]
        lines += ["", "Fewest UNet calls at the seed loop's quality: " + (
            f"{best['setting']}, {guidance(best['guidance_scale'])}: {best['call_ratio_vs_seed']:g}× the calls, "
            f"{best['speedup_vs_seed']:g}× the images/s." if best else "no setting reaches it.")]  # fmt: skip
        parts.append("\n".join([*lines, "", measured_from([row])]))
    return "\n\n".join(parts)


class Block(NamedTuple):
    renderer: Callable[[list[dict]], str]
    command: str  # what writes its first row
    source: str | None = None  # its results file's stem, when not the block's name
    key: Callable[[dict], tuple] = lambda row: (row["name"],)  # rows with the same key: the latest is shown


BLOCKS: dict[str, Block] = {
    "presets": Block(presets, "python bench/quality.py --name quick --cas 100 -- --preset quick", "quality"),
    "quality": Block(quality, "python bench/quality.py --name quick -- --preset quick"),
    "autoguidance": Block(autoguidance, "python bench/autoguidance.py --model RUN --guide_steps N",
                          key=autoguidance_setting),  # fmt: skip
    "train_throughput": Block(train_throughput, "python bench/train_throughput.py"),
    "sampling": Block(sampling, "python bench/sampling.py --model output/mnist-quick"),
}


def render_block(name: str, results: Path = RESULTS) -> str:
    """A block's text: its table(s) from the latest row of each name, or how to measure the first row."""
    block = BLOCKS[name]
    rows = latest_by_name(read_rows(results / f"{block.source or name}.jsonl"), block.key)
    return block.renderer(rows) if rows else f"_No measured rows yet: run `{block.command}`._"


def render_readme(text: str, results: Path = RESULTS) -> str:
    """`text` with every block whose markers it has replaced by what the rows render."""
    for name in BLOCKS:
        pattern = re.compile(rf"(<!-- report:{name} -->).*?(<!-- /report:{name} -->)", re.DOTALL)
        if pattern.search(text):
            block = render_block(name, results)  # blank lines around it: Markdown tables need them
            text = pattern.sub(lambda match, block=block: f"{match[1]}\n\n{block}\n\n{match[2]}", text)
    return text


def readme_diff(readme: Path = README, results: Path = RESULTS) -> str:
    """Unified diff from README's text to what the rows render; empty when they agree."""
    current = readme.read_text()
    rendered = render_readme(current, results)
    return "".join(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True), str(readme), "rendered"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 with a diff if README differs.")
    parser.add_argument("--readme", type=Path, default=README, help="The file holding the blocks.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Folder of the bench scripts' JSON-lines rows.")
    args = parser.parse_args()
    if args.check:
        diff = readme_diff(args.readme, args.results)
        if diff:
            print(diff, end="")
            print(f"{args.readme} differs from the rows: run `python bench/report.py`.", file=sys.stderr)
            sys.exit(1)
        return
    args.readme.write_text(render_readme(args.readme.read_text(), args.results))


if __name__ == "__main__":
    main()
