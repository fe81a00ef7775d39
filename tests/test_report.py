"""README's measured tables are what bench/report.py renders from the rows, and every row says where it comes from."""

import json
import subprocess
import sys
from datetime import datetime

import pytest

from tests.conftest import REPO_ROOT

# As the bench scripts import their sibling modules (`python bench/quality.py` puts bench/ first on the path), so that
# provenance is one module, not two copies under two names.
sys.path.insert(0, str(REPO_ROOT / "bench"))
import report  # noqa: E402
from provenance import append_row, run_record  # noqa: E402

PROVENANCE = {
    "argv": ["bench/quality.py", "--name", "quick", "--", "--preset", "quick"],
    "commit": "0123456789abcdef0123456789abcdef01234567",
    "dirty": False,
    "date": "2026-12-01T10:00:00+00:00",
    "machine": {"cpu": "Test CPU", "cores": 2, "arch": "x86_64", "python": "3.11.0", "torch": "2.5.1",
                "diffusers": "0.42.1", "accelerate": "1.15.0", "gpu": None},
}  # fmt: skip
QUALITY_ROW = {
    "name": "quick",
    "provenance": PROVENANCE,
    "accelerate_config": "cpu.yaml",
    "train_args": ["--preset", "quick"],
    "train_wall_s": 530.1,
    "training_summary": {"total_train_time_s": 512.0, "global_step": 1500, "global_batch_size": 64},
    "evaluations": [
        {"scheduler": "DPMSolverMultistepScheduler", "sampler": "dpm++", "num_inference_steps": 20,
         "guidance_scale": 2.0, "reference": "test", "floor_source": "validation", "seeds": [0, 1, 2],
         "num_images": 1000, "cond_accuracy": {"mean": 0.964, "std": 0.004, "per_class": {"0": 0.99}},
         "fid": {"mean": 49.0, "std": 1.2}, "fid_real_floor": {"mean": 10.1, "std": 0.3},
         "cas": {"images_per_class": 100, "generated": 0.95, "real": 0.97}, "eval_wall_s": 300.0},
        {"scheduler": "DDIMScheduler", "sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 1.0,
         "reference": "test", "seeds": [0], "num_images": 1000, "cond_accuracy": {"mean": 0.722, "std": None},
         "fid": {"mean": 156.0, "std": None}, "fid_real_floor": {"mean": 10.1, "std": None}, "eval_wall_s": 80.0},
    ],
}  # fmt: skip


def test_readme_blocks_are_what_the_rows_render():
    diff = report.readme_diff(REPO_ROOT / "README.md", REPO_ROOT / "bench" / "results")
    assert diff == "", f"README differs from bench/results: run `python bench/report.py`\n{diff}"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "bench" / "results").glob("*.jsonl")), ids=lambda path: path.name)
def test_every_result_row_has_its_provenance(path):
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        provenance = json.loads(line).get("provenance")
        assert provenance, f"{path.name} row {number} has no provenance: rows come from the bench scripts"
        assert set(report.PROVENANCE_KEYS) <= set(provenance), f"{path.name} row {number}"
        assert isinstance(provenance["argv"], list) and provenance["argv"], f"{path.name} row {number}"
        assert len(provenance["commit"]) == 40 and isinstance(provenance["dirty"], bool), f"{path.name} row {number}"
        datetime.fromisoformat(provenance["date"])
        assert {"cpu", "cores", "arch", "torch", "gpu"} <= set(provenance["machine"]), f"{path.name} row {number}"


def test_run_record_describes_this_checkout():
    record = run_record()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert record["commit"] == head.strip()
    assert isinstance(record["dirty"], bool) and record["argv"]
    assert datetime.fromisoformat(record["date"]).tzinfo is not None
    assert record["machine"]["cores"] >= 1 and record["machine"]["torch"]


def test_quality_row_renders_mean_and_spread(tmp_path):
    append_row(tmp_path / "results" / "quality.jsonl", {**QUALITY_ROW, "name": "quick", "train_wall_s": 1.0})
    append_row(tmp_path / "results" / "quality.jsonl", QUALITY_ROW)  # the latest row of a name wins
    table = report.render_block("quality", tmp_path / "results")
    assert table.count("`quick`") == 3  # two evaluation lines and the provenance line
    first, second = [line for line in table.splitlines() if line.startswith("| `quick`")]
    assert "8.5 min (1,500 steps × 64 images)" in first and "DPM-Solver++ 20 steps, guidance 2" in first
    assert "test (floor: validation)" in first and "1,000 × 3" in first
    assert "| 96.4 ± 0.4 % | 49.0 ± 1.2 | 10.1 ± 0.3 | 4.9× | 95.0 % / 97.0 % |" in first
    assert "DDIM 50 steps, no guidance" in second and "| 72.2 % | 156.0 | 10.1 | 15.4× | – |" in second
    assert "commit `0123456`, 2026-12-01, Test CPU (2 cores, x86_64), no GPU, torch 2.5.1" in table

    guided_interval = {**QUALITY_ROW["evaluations"][0], "guidance_interval": [0.2, 1.0]}
    append_row(tmp_path / "results" / "quality.jsonl", {**QUALITY_ROW, "evaluations": [guided_interval]})
    assert "guidance 2 on steps 0.2–1 |" in report.render_block("quality", tmp_path / "results")


def test_the_presets_table_has_one_line_per_reported_model(tmp_path):
    tuning = {**QUALITY_ROW, "name": "quick-tuning", "evaluations": [{**QUALITY_ROW["evaluations"][0],
                                                                       "reference": "validation"}]}  # fmt: skip
    for row in (QUALITY_ROW, tuning):
        append_row(tmp_path / "quality.jsonl", row)
    table = report.render_block("presets", tmp_path)  # read from quality.jsonl: no presets.jsonl exists
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    assert lines == ["| `quick` | 8.5 min (1,500 steps × 64 images) | DPM-Solver++ 20 steps, guidance 2 | 96.4 ± 0.4 % "
                     "| 4.9× | 95.0 % / 97.0 % |"]  # fmt: skip
    assert "quick-tuning" not in table  # a tuning row (validation reference) is not a reported figure


def test_every_autoguidance_setting_of_a_sweep_has_its_line(tmp_path):
    def row(guidance: str, scale: float, accuracy: float, **guide) -> dict:
        return {"name": "sweep", "provenance": PROVENANCE, "guidance": guidance, "guide_step": None,
                "guide_model": None, **guide, "guidance_scale": scale, "reference": "validation", "seeds": [0],
                "num_images": 1000, "cond_accuracy": {"mean": accuracy, "std": None},
                "fid": {"mean": 20.0, "std": None}, "fid_real_floor": {"mean": 10.0, "std": None}}  # fmt: skip

    for line in (row("cfg", 2.0, 0.5), row("cfg", 2.0, 0.99), row("cfg", 3.0, 0.995),
                 row("autoguidance", 2.0, 0.96, guide_model="output/bench/guide-quick-500"),
                 row("autoguidance", 2.0, 0.93, guide_step=1000)):  # fmt: skip
        append_row(tmp_path / "autoguidance.jsonl", line)
    lines = [line for line in report.render_block("autoguidance", tmp_path).splitlines() if line.startswith("| `")]
    assert lines == [  # one line per setting of the one sweep; a setting measured again shows its latest row
        "| `sweep` | CFG | unconditional prediction | 2 | validation | 1,000 × 1 | 99.0 % | 2.00× |",
        "| `sweep` | CFG | unconditional prediction | 3 | validation | 1,000 × 1 | 99.5 % | 2.00× |",
        "| `sweep` | autoguidance | `guide-quick-500` | 2 | validation | 1,000 × 1 | 96.0 % | 2.00× |",
        "| `sweep` | autoguidance | own checkpoint, step 1000 | 2 | validation | 1,000 × 1 | 93.0 % | 2.00× |",
    ]


def test_blocks_are_replaced_skipped_or_say_no_rows(tmp_path):
    append_row(tmp_path / "quality.jsonl", QUALITY_ROW)
    readme = ("intro\n<!-- report:quality -->\nold table\n<!-- /report:quality -->\n"
              "<!-- report:sampling --><!-- /report:sampling -->\nend\n")  # fmt: skip
    rendered = report.render_readme(readme, tmp_path)
    assert "old table" not in rendered and "49.0 ± 1.2" in rendered
    assert "_No measured rows yet: run `python bench/sampling.py --model output/mnist-quick`._" in rendered
    assert report.render_readme(rendered, tmp_path) == rendered  # rendering is idempotent
    assert report.render_readme("no markers\n", tmp_path) == "no markers\n"  # a missing block is skipped


def test_rows_without_provenance_are_refused(tmp_path):
    (tmp_path / "sampling.jsonl").write_text(json.dumps({"name": "full", "settings": []}) + "\n")
    with pytest.raises(ValueError, match="provenance"):
        report.render_block("sampling", tmp_path)


def test_sampling_and_throughput_rows_render(tmp_path):
    figure = {"mean": 20.0, "std": 0.5}
    setting = {"setting": "dpm++ 10 steps", "unet_calls_per_image": 10, "guidance_scale": 2.0, "img_s": figure,
               "cond_accuracy": {"mean": 0.94, "std": 0.01}, "fid": {"mean": 71.3, "std": 2.0},
               "fid_real_floor": {"mean": 10.1, "std": 0.2}}  # fmt: skip
    seed_loop = {**setting, "setting": "seed loop: ddim 40 steps", "unet_calls_per_image": 40, "guidance_scale": 1.0,
                 "img_s": {"mean": 10.0, "std": 0.1}}  # fmt: skip
    append_row(tmp_path / "sampling.jsonl", {
        "name": "full", "provenance": PROVENANCE, "model": "output/mnist-quick", "reference": "test",
        "floor_source": "validation", "seeds": [0, 1],
        "num_images_per_label": 100, "settings": [seed_loop, setting],
        "fewest_calls_at_seed_quality": {"setting": "dpm++ 10 steps", "guidance_scale": 2.0,
                                         "call_ratio_vs_seed": 0.25, "speedup_vs_seed": 2.03}})  # fmt: skip
    sampling = report.render_block("sampling", tmp_path)
    # a guided call evaluates the network twice; images/s are compared with the seed loop's (the first setting)
    assert "| seed loop: ddim 40 steps | 40 | 40 | 1 | 10.0 ± 0.1 | 1.0× |" in sampling
    assert "| dpm++ 10 steps | 10 | 20 | 2 | 20.0 ± 0.5 | 2.0× | 94.0 ± 1.0 % | 71.3 ± 2.0 | 10.1 ± 0.2 |" in sampling
    assert "dpm++ 10 steps, guidance 2: 0.25× the calls, 2.03× the images/s." in sampling

    batch = {"seed_img_s": 30.3, "ours_img_s": 59.0, "ratio": 1.95, "seed_peak_rss_mb": 8842.9,
             "ours_peak_rss_mb": 3250.9, "steps": 4}  # fmt: skip
    append_row(tmp_path / "train_throughput.jsonl", {
        "name": "default", "provenance": PROVENANCE, "quick": False, "extra": [], "torch_threads": 2, "cpu_count": 2,
        "batch_512": batch, "load_cached_s": 0.17, "loader_img_s": 788230, "loader_vs_train_ratio": 13360,
        "loader_compared_at_batch": 512})  # fmt: skip
    throughput = report.render_block("train_throughput", tmp_path)
    assert "| `default` | 512 | 4 | 30.3 | 59.0 | 1.95× | 8,843 MB | 3,251 MB |" in throughput
    assert "788,230 img/s = 13,360× our training speed" in throughput


def test_an_autoguided_setting_says_so():
    # the quick-autoguided row read "guidance 1.75" in README's tables, like classifier-free guidance
    evaluation = {"scheduler": "DPMSolverMultistepScheduler", "num_inference_steps": 20, "guidance_scale": 1.75,
                  "guidance": "autoguidance"}  # fmt: skip
    assert report.sampler_text(evaluation) == "DPM-Solver++ 20 steps, autoguidance 1.75"
    assert report.sampler_text({**evaluation, "guidance": "cfg"}) == "DPM-Solver++ 20 steps, guidance 1.75"


def test_a_trailing_spacing_is_named_and_old_rows_stay_leading():
    evaluation = {"scheduler": "DPMSolverMultistepScheduler", "num_inference_steps": 20, "guidance_scale": 1.5}
    assert report.sampler_text(evaluation) == "DPM-Solver++ 20 steps, guidance 1.5"  # a row from before the key
    trailing = {**evaluation, "timestep_spacing": "trailing"}
    assert report.sampler_text(trailing) == "DPM-Solver++ 20 trailing steps, guidance 1.5"
    assert report.sampler_text({**trailing, "num_inference_steps": 1}) == "DPM-Solver++ 1 trailing step, guidance 1.5"
