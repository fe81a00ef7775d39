"""bench/average_checkpoints.py: a run's checkpoints averaged into a new pipeline folder (an EMA length chosen after
training), run as the real script in a fresh process; its refusals, which come before any loading, in this one."""

import json
import sys

import pytest
import torch
from conftest import REPO_ROOT, TINY_TRAIN_FLAGS, run_cli, train_here
from safetensors.torch import load_file

from pipeline import ClassConditionedDDIMPipeline
from pipeline.checkpointing import read_shadow_params

SCRIPT = str(REPO_ROOT / "bench" / "average_checkpoints.py")
sys.path.insert(0, str(REPO_ROOT / "bench"))  # as `python bench/average_checkpoints.py` finds its sibling modules
import average_checkpoints  # noqa: E402


def refusal(argv: list[str], monkeypatch) -> str:
    """The script's one-line error for `argv`."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    with pytest.raises(SystemExit) as exit_info:
        average_checkpoints.main()
    return str(exit_info.value.code)


def test_the_folder_holds_the_mean_of_the_checkpoints_ema_weights(tmp_path, monkeypatch):
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
    assert "exists" in refusal(["--model_dir", str(run_dir), "--steps", "2", "--to", str(averaged_dir)], monkeypatch)
    assert json.loads((averaged_dir / "averaging.json").read_text())["steps"] == [2, 4]
    error = refusal(["--model_dir", str(run_dir), "--steps", "3", "--to", str(tmp_path / "x")], monkeypatch)
    assert "lacks" in error and "checkpoint-3" in error and not (tmp_path / "x").exists()
