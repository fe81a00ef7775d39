"""bench/average_checkpoints.py: a run's checkpoints averaged into a new pipeline folder (an EMA length chosen after
training), run as the real script in a fresh process."""

import json
import sys
from pathlib import Path

import torch
from conftest import REPO_ROOT, TINY_TRAIN_FLAGS, run_cli, train_here
from safetensors.torch import load_file

from pipeline import ClassConditionedDDIMPipeline
from pipeline.checkpointing import read_shadow_params

SCRIPT = str(REPO_ROOT / "bench" / "average_checkpoints.py")


def test_the_folder_holds_the_mean_of_the_checkpoints_ema_weights(tmp_path):
    run_dir = tmp_path / "run"
    train_here(["--output_dir", str(run_dir), *TINY_TRAIN_FLAGS, "--train_batch_size", "8", "--max_train_samples", "48",
                "--use_ema", "--max_train_steps", "4", "--checkpointing_steps", "2"])  # fmt: skip
    checkpoints = [run_dir / "checkpoints" / f"checkpoint-{step}" for step in (2, 4)]
    averaged_dir = tmp_path / "averaged"
    run_cli([sys.executable, SCRIPT, "--model_dir", str(run_dir), "--steps", "2", "4", "--to", str(averaged_dir)])

    averaged = ClassConditionedDDIMPipeline.from_pretrained(averaged_dir)
    expected = [(first + second) / 2 for first, second in zip(*map(read_shadow_params, checkpoints), strict=True)]
    for parameter, mean in zip(averaged.unet.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.data, mean)
    # the EMA's weights, not the raw ones: the two differ after 4 steps
    raw = load_file(checkpoints[1] / "model.safetensors")
    assert not torch.allclose(averaged.unet.state_dict()["unet.conv_in.weight"], raw["unet.conv_in.weight"])
    saved, run = (json.loads((folder / "model_index.json").read_text()) for folder in (averaged_dir, run_dir))
    assert {key: saved[key] for key in run} == run  # the run's components and sampling defaults
    assert json.loads((averaged_dir / "averaging.json").read_text())["steps"] == [2, 4]

    # nothing is written over, and a step the run did not keep is named
    again = run_cli([sys.executable, SCRIPT, "--model_dir", str(run_dir), "--steps", "2", "--to", str(averaged_dir)],
                    check=False)  # fmt: skip
    assert again.returncode == 1 and "exists" in again.stderr
    assert json.loads((averaged_dir / "averaging.json").read_text())["steps"] == [2, 4]
    missing = [sys.executable, SCRIPT, "--model_dir", str(run_dir), "--steps", "3", "--to", str(tmp_path / "x")]
    refused = run_cli(missing, check=False)
    assert refused.returncode == 1 and "lacks" in refused.stderr and "checkpoint-3" in refused.stderr
    assert not Path(tmp_path / "x").exists()
