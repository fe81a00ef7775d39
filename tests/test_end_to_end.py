"""The whole product in fresh processes: `accelerate launch` training -> `from_pretrained` -> `sample.py` -> PNG.
Bad-input cases run the scripts' command-line functions in this process (their exit codes and one-line errors; one
case per script stays a real process: the launcher's exit codes below, and sample.py's grid)."""

import sys

import pytest
from PIL import Image

from pipeline import config, sampling
from tests.conftest import (
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    accelerate_launch,
    exit_code_and_stderr,
    run_cli,
    train_here,
)


def test_training_writes_a_loadable_pipeline(trained_dir):
    assert (trained_dir / "model_index.json").exists()
    assert (trained_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    code = (
        "import torch\n"
        "from pipeline import ClassConditionedDDIMPipeline\n"
        f"pipe = ClassConditionedDDIMPipeline.from_pretrained({str(trained_dir)!r})\n"
        "images = pipe(class_labels=[3, 7], num_inference_steps=2, output_type='np').images\n"
        "print(type(pipe.unet).__name__, type(pipe.scheduler).__name__, pipe.scheduler.config.timestep_spacing,\n"
        "      images.shape, pipe.unet.config.id2label['7'])\n"
    )
    result = run_cli([sys.executable, "-c", code])
    # --default_timestep_spacing trailing is saved in the scheduler's config, where every sampler takes it from
    expected = ["ClassConditionedUNet", "DDIMScheduler", "trailing", "(2,", "28,", "28,", "1)", "7"]
    assert result.stdout.split() == expected


def test_sample_cli_writes_one_row_per_label(trained_dir, tmp_path):
    output = tmp_path / "grid.png"
    result = run_cli(
        [
            sys.executable,
            "sample.py",
            "--model",
            str(trained_dir),
            "--class_labels",
            "3",
            "7",
            "1",
            "--num_images_per_label",
            "4",
            "--num_inference_steps",
            "2",
            "--output",
            str(output),
        ]
    )
    # Loading in the requested dtype, not casting afterwards, keeps diffusers quiet (it warned on every run); so do
    # passing it as `dtype` (diffusers 0.42 deprecates `torch_dtype`) and typing every saved default as it can check.
    for warning in ("kept in float32", "torch_dtype", "cannot get type annotation"):
        assert warning not in result.stderr
    # make_grid with padding 2: each 28-pixel cell adds 2 pixels, plus 2 at the far edge; labels on the left.
    width, height = Image.open(output).size
    assert height == 3 * 30 + 2 and 4 * 30 + 2 < width < 4 * 30 + 2 + 40


def test_sample_cli_is_deterministic(trained_dir, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for path in (first, second):
        sampling.cli(["--model", str(trained_dir), "--num_images_per_label", "1", "--num_inference_steps", "2",
                      "--seed", "3", "--output", str(path)])  # fmt: skip
    assert first.read_bytes() == second.read_bytes()
    assert Image.open(first).size[1] == 10 * 30 + 2  # default: all ten classes


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class_labels", "3", "12"], "Class id 12 is out of range"),
        (["--class_labels", "seven"], "Unknown label name 'seven'"),
    ],
)
def test_sample_cli_bad_labels(trained_dir, tmp_path, capsys, args, message):
    code, stderr = exit_code_and_stderr(sampling.cli, ["--model", str(trained_dir), *args, "--output",
                                                     str(tmp_path / "x.png")], capsys)  # fmt: skip
    assert code == 2 and message in stderr, stderr


def test_sample_cli_rejects_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    code, stderr = exit_code_and_stderr(sampling.cli, ["--model", str(tmp_path), "--output", str(tmp_path / "x.png")],
                                        capsys)  # fmt: skip
    assert code == 2 and "is not a saved pipeline (no model_index.json)" in stderr


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("{tmp}/no_label", "lacks ['label']"),  # a missing folder: test_exit_code_through_accelerate_launch_...
    ],
)
def test_train_cli_bad_dataset(tmp_path, capsys, dataset, message):
    import datasets
    from PIL import Image as PILImage

    (tmp_path / "no_label").mkdir()
    datasets.Dataset.from_dict({"image": [PILImage.new("L", (28, 28))]}).to_parquet(
        tmp_path / "no_label" / "train.parquet"
    )
    argv = ["--dataset", dataset.format(tmp=tmp_path), "--output_dir", str(tmp_path / "out"), *TINY_TRAIN_FLAGS]
    code, stderr = exit_code_and_stderr(train_here, argv, capsys)
    assert code == 2 and "error: Dataset " in stderr and message in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_batch_size", "0"], "must be a positive integer"),
        (["--max_train_steps", "-5"], "must be a positive integer"),
        (["--learning_rate", "-1"], "--learning_rate: must be a positive number, got -1"),
        (["--snr_gamma", "0"], "--snr_gamma: must be a positive number or none, got 0"),
        (["--default_guidance_interval", "0.5", "0.2"], "--default_guidance_interval must be START STOP with 0 <="),
        (["--attention_head_dim", "24"], "--attention_head_dim 24 must divide the width of every level with attention"),
    ],
)
def test_train_cli_flag_errors_exit_2(tmp_path, capsys, args, message):
    code, stderr = exit_code_and_stderr(config.parse_args, ["--output_dir", str(tmp_path / "out"), *args],
                                        capsys)  # fmt: skip
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "/no/such/folder"], "Dataset folder '/no/such/folder' does not exist"),
        (["--dataset", str(REPO_ROOT / "data" / "mnist" / "README.md")], "is a file; pass the folder that holds"),
        (["--output_dir", str(REPO_ROOT / "README.md")], "is a file; pass a folder"),
    ],
)
def test_train_cli_usage_errors_exit_2(tmp_path, capsys, args, message):
    code, stderr = exit_code_and_stderr(train_here, ["--output_dir", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "out").exists()  # a failed run leaves no empty output folder behind


@pytest.mark.parametrize("launch_args", [["-q"], []])
def test_exit_code_through_accelerate_launch_is_the_documented_one(tmp_path, launch_args):
    """README: accelerate's launcher turns every failure of the script into exit code 1 and, without -q, adds its own
    traceback after the script's one-line error."""
    result = accelerate_launch("cpu.yaml", ["--output_dir", str(tmp_path / "out"), "--dataset", "/no/such/folder"],
                               launch_args=launch_args, check=False)  # fmt: skip
    assert result.returncode == 1
    assert "error: Dataset folder '/no/such/folder' does not exist" in result.stderr
    assert ("Traceback" in result.stderr) == (launch_args == [])
    assert not (tmp_path / "out" / "model_index.json").exists()
