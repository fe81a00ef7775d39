"""Never lose a run: stop signals, SIGKILL at random moments (inside checkpoint and pipeline writes too), bad input.

The kill test is bounded for CI (a few kills of a tiny run); set FAULT_INJECTION_KILLS=N for a longer soak.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import config, sampling
from pipeline.checkpointing import find_checkpoint, pipeline_at_checkpoint
from tests.conftest import (
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    CreatesMarker,
    accelerate_command,
    cli_env,
    exit_code_and_stderr,
    train_here,
)

RUN = [*TINY_TRAIN_FLAGS, "--train_batch_size", "8", "--max_train_samples", "48", "--use_ema",
       "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--logging_steps", "1"]  # fmt: skip
TRAIN = [sys.executable, str(REPO_ROOT / "train_conditional.py")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step run with its checkpoint: tests copy it and try to reuse or damage it."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    train_here(["--output_dir", str(output_dir), "--max_train_steps", "2", "--checkpointing_steps", "2", *RUN])
    return output_dir


def refused(argv: list[str], capsys) -> tuple[int, str]:
    """The exit code and stderr of a training run that must stop with one line (in this process; an unexpected
    exception, a traceback on the command line, fails the test)."""
    return exit_code_and_stderr(train_here, argv, capsys)


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll every millisecond until `condition()` holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError("the training process neither reached the kill point nor ended")


def assert_resumable(output_dir: Path) -> None:
    """Whatever moment the kill hit, `latest` is a complete checkpoint and a visible pipeline is a whole one."""
    latest = find_checkpoint(str(output_dir), "latest")
    if latest is not None:
        state = json.loads((Path(latest) / "training_state.json").read_text())
        assert latest.endswith(f"checkpoint-{state['global_step']}")
        load_file(Path(latest) / "model.safetensors")  # complete, not truncated
    if (output_dir / "model_index.json").exists():
        load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    steps = 8
    flags = [*RUN, "--max_train_steps", str(steps), "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    train_here(["--output_dir", str(tmp_path / "reference"), *flags])  # the same bits as a fresh process trains
    reference = weights(tmp_path / "reference")

    output_dir = tmp_path / "killed"
    checkpoints = output_dir / "checkpoints"
    rng = random.Random(int(os.environ.get("FAULT_INJECTION_SEED", "0")))
    kills = int(os.environ.get("FAULT_INJECTION_KILLS", "4"))
    # Kill points: while checkpoint k is being written, at a random moment of training, while the final pipeline
    # is being written. Each run resumes from whatever the previous kill left.
    plan = [("inside checkpoint write", lambda k=k: (checkpoints / f"checkpoint-{k}.tmp").exists())
            for k in rng.sample(range(2, steps), 2)]  # fmt: skip
    plan += [("random moment", None) for _ in range(max(0, kills - 3))]
    plan.append(("inside final pipeline write", lambda: (output_dir / ".pipeline.tmp").exists()))
    outcomes = []
    for name, condition in plan:
        command = [*TRAIN, "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest", *flags]
        process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if condition is None:
            reached = wait_for(lambda: checkpoints.exists(), process)
            time.sleep(rng.uniform(0.0, 1.5))
            reached = reached and process.poll() is None
        else:
            reached = wait_for(condition, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcomes.append((name, reached))
        assert_resumable(output_dir)
    print(f"kills: {outcomes}")
    assert sum(reached for _, reached in outcomes) >= 3, outcomes  # the kills really hit running training

    train_here(["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest", *flags])
    resumed = weights(output_dir)
    assert all(torch.equal(resumed[name], tensor) for name, tensor in reference.items())


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(tmp_path):
    process = subprocess.Popen([*TRAIN, "--output_dir", str(tmp_path), "--max_train_steps", "100000", *RUN],
                               env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = []
    for line in process.stdout:  # wait until training has taken a few steps
        output.append(line)
        if "'loss':" in line or "Running training" in line:
            break
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output.append(process.communicate(timeout=120)[0])
    text = "".join(output)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM after step" in text and "--resume_from_checkpoint latest" in text
    assert "Traceback" not in text
    latest = find_checkpoint(str(tmp_path), "latest")
    assert latest is not None and not (tmp_path / "model_index.json").exists()


def test_sigterm_stops_all_processes_together(tmp_path):
    command = [*accelerate_command("multi_cpu.yaml"), "--output_dir", str(tmp_path), "--max_train_steps", "100000",
               *RUN, "--train_batch_size", "4"]  # fmt: skip
    # A new session, so that the signal goes to the whole group, as a scheduler or a terminal sends it.
    launcher = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
    for line in launcher.stdout:
        if "Running training" in line:
            break
    time.sleep(3)
    os.killpg(launcher.pid, signal.SIGTERM)
    text = launcher.communicate(timeout=120)[0]  # no hung collective: both ranks exit
    assert launcher.returncode != 0
    assert "Stopped by SIGTERM after step" in text
    latest = find_checkpoint(str(tmp_path), "latest")
    state = json.loads((Path(latest) / "training_state.json").read_text())
    assert state["global_batch_size"] == 8


def test_a_disk_too_small_for_a_checkpoint_is_refused_before_training(tiny_disk, capsys):
    """The tiny model's checkpoint (weights, Adam, EMA) and pipeline need about 4 MiB by our estimate; the disk: 2."""
    output_dir = tiny_disk / "run"
    code, stderr = refused(["--output_dir", str(output_dir), "--max_train_steps", "2", "--checkpointing_steps", "1",
                            *RUN], capsys)  # fmt: skip
    assert code == 1 and f"The disk holding {output_dir} has" in stderr and "MiB free, but a checkpoint" in stderr
    assert not (output_dir / "checkpoints").exists()  # before step 1


def test_diverging_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path, capsys):
    code, stderr = refused(["--output_dir", str(tmp_path), "--max_train_steps", "20", "--checkpointing_steps", "1",
                            *RUN, "--learning_rate", "1e30", "--logging_steps", "10"], capsys)  # fmt: skip
    assert code == 1 and "became NaN or infinite at step" in stderr and "Last good checkpoint:" in stderr
    assert not (tmp_path / "model_index.json").exists()  # no pipeline of garbage


def test_output_dir_of_another_run_is_refused_unless_told(finished_run, tmp_path, capsys):
    output_dir = copy_of(finished_run, tmp_path)
    flags = ["--output_dir", str(output_dir), "--max_train_steps", "2", "--checkpointing_steps", "2", *RUN]
    (output_dir / "notes.txt").write_text("mine")
    code, stderr = refused(flags, capsys)
    assert code == 2 and "already holds a saved pipeline and checkpoints" in stderr
    assert "--overwrite_output_dir" in stderr
    train_here([*flags, "--overwrite_output_dir"])
    assert (output_dir / "notes.txt").read_text() == "mine"  # only the earlier run's own files are replaced


def test_resuming_a_finished_run_without_checkpoints_never_retrains_over_it(finished_run, tmp_path, capsys):
    """Following the refusal's advice must be safe: with no checkpoint to continue, "resume" would start over and
    replace the finished pipeline."""
    output_dir = copy_of(finished_run, tmp_path)
    shutil.rmtree(output_dir / "checkpoints")
    before = weights(output_dir)
    flags = ["--output_dir", str(output_dir), "--max_train_steps", "2", *RUN]
    code, stderr = refused(flags, capsys)
    assert code == 2 and "--resume_from_checkpoint" not in stderr  # no advice that retrains
    code, stderr = refused([*flags, "--resume_from_checkpoint", "latest"], capsys)
    assert code == 2 and "no checkpoints, so there is nothing to resume" in stderr
    assert "--overwrite_output_dir" in stderr
    after = weights(output_dir)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def make_broken_model(trained_dir: Path, tmp_path: Path, breakage: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(trained_dir, model, ignore=shutil.ignore_patterns("checkpoints"))
    weights_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    if breakage == "missing weights":
        weights_file.unlink()
    elif breakage == "truncated weights":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    elif breakage == "pickle weights":
        torch.save(load_file(weights_file), model / "unet" / "diffusion_pytorch_model.bin")
        weights_file.unlink()
    elif breakage == "invalid model_index.json":
        (model / "model_index.json").write_text('{"unet": ["pipeline", ')
    elif breakage == "diffusers' UNet2DModel":  # diffusers would load a randomly initialised network
        index = json.loads((model / "model_index.json").read_text())
        (model / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    elif breakage == "nan weights":
        weights = load_file(weights_file)
        save_file({name: torch.full_like(tensor, float("nan")) for name, tensor in weights.items()}, weights_file)
    elif breakage == "wrong config type":
        config = json.loads((model / "unet" / "config.json").read_text())
        config["layers_per_block"] = "two"
        (model / "unet" / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("breakage, message", [
    ("missing weights", "Could not load a pipeline"),
    ("truncated weights", "Could not load a pipeline"),
    ("pickle weights", "holds pickle weights (unet/diffusion_pytorch_model.bin)"),
    ("wrong config type", "Could not load a pipeline"),
    ("invalid model_index.json", "model_index.json is not valid JSON"),
    ("diffusers' UNet2DModel", "not ClassConditionedUNet"),
    ("nan weights", "produced NaN or infinite images"),
])  # fmt: skip
def test_sample_refuses_broken_model_folders(trained_dir, tmp_path, capsys, breakage, message):
    model = make_broken_model(trained_dir, tmp_path, breakage)
    argv = ["--model", str(model), "--output", str(tmp_path / "x.png"), "--num_inference_steps", "2"]
    code, stderr = exit_code_and_stderr(sampling.cli, argv, capsys)
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "heun"], "invalid choice: 'heun'"),
    (["--num_inference_steps", "0"], "must be at least 1"),
    (["--output", "grid"], "--output 'grid' needs an image file extension; one of"),
    (["--output", "grid.pgnn"], ".png"),
    (["--class_labels", "3.5"], "--class_labels: Unknown label name '3.5'"),
    (["--guidance_interval", "0", "1.5"], "--guidance_interval must be START STOP with 0 <= START < STOP <= 1"),
    (["--output", "/proc/grid.png", "--num_inference_steps", "1"], "Cannot write --output '/proc/grid.png'"),
    (["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], "is not available here"),
])  # fmt: skip
def test_sample_usage_errors_exit_2(trained_dir, tmp_path, capsys, args, message):
    code, stderr = exit_code_and_stderr(sampling.cli, ["--model", str(trained_dir), *args], capsys)
    assert code == 2 and message in stderr, stderr


def test_unlabelled_examples_are_refused(tmp_path, capsys):
    import datasets
    from PIL import Image

    # ClassLabel's -1 means "no label": such rows cannot condition a class-conditional model.
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [Image.new("L", (28, 28))] * 2
    datasets.Dataset.from_dict({"image": images, "label": [0, -1]}, features=features).to_parquet(
        tmp_path / "train.parquet"
    )
    code, stderr = refused(["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--train_batch_size",
                            "1", "--max_train_steps", "1", *TINY_TRAIN_FLAGS], capsys)  # fmt: skip
    assert code == 2 and "labels outside 0..1" in stderr


def test_wrong_type_in_model_config_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"layers_per_block": "two"}))
    code, stderr = refused(["--output_dir", str(tmp_path / "out"), "--model_config", str(config)], capsys)
    assert code == 2 and "Cannot build the model from" in stderr


def test_damaged_checkpoint_file_is_refused_clearly(finished_run, tmp_path, capsys):
    output_dir = copy_of(finished_run, tmp_path)
    save_file({"unrelated": torch.zeros(1)}, output_dir / "checkpoints" / "checkpoint-2" / "model.safetensors")
    code, stderr = refused(["--output_dir", str(output_dir), "--max_train_steps", "4", "--resume_from_checkpoint",
                            "latest", *RUN], capsys)  # fmt: skip
    assert code == 2 and "Cannot resume from" in stderr and "checkpoint-2" in stderr


def test_a_checkpoint_gives_the_pipeline_of_its_step(finished_run):
    """Guards time-to-quality curves: the final checkpoint must give exactly the saved pipeline's (EMA) weights, not
    the raw ones or parameters in another order."""
    pipe = pipeline_at_checkpoint(str(finished_run), str(finished_run / "checkpoints" / "checkpoint-2"))
    saved = weights(finished_run)
    assert all(torch.equal(pipe.unet.state_dict()[name], tensor) for name, tensor in saved.items())
    raw = load_file(finished_run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(raw[name], tensor) for name, tensor in saved.items())  # the run kept an EMA


def test_a_pickle_planted_in_a_checkpoint_never_runs_on_resume(finished_run, tmp_path, capsys):
    """Guards against accelerate's full-pickle path: the old code registered the LR scheduler and the EMA with
    `register_for_checkpointing`, so `load_state` unpickled this file (and ran its code) on resume."""
    output_dir = copy_of(finished_run, tmp_path)
    marker = tmp_path / "code_ran"
    torch.save(CreatesMarker(marker), output_dir / "checkpoints" / "checkpoint-2" / "custom_checkpoint_0.pkl")
    code, stderr = refused(["--output_dir", str(output_dir), "--max_train_steps", "4", "--resume_from_checkpoint",
                            "latest", *RUN], capsys)  # fmt: skip
    assert code == 2 and "custom_checkpoint_0.pkl" in stderr and "can run code" in stderr
    assert not marker.exists()


def test_resume_under_a_changed_recipe_names_each_changed_flag(finished_run, tmp_path, capsys):
    # Each used to be ignored (the learning rate), accepted (the objective) or called "damaged" (the network).
    output_dir = copy_of(finished_run, tmp_path)
    code, stderr = refused(["--output_dir", str(output_dir), "--max_train_steps", "4", "--resume_from_checkpoint",
                            "latest", *RUN, "--learning_rate", "0.002", "--prediction_type", "v_prediction",
                            "--block_out_channels", "16", "32", "32"], capsys)  # fmt: skip
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    for change in ("--learning_rate 0.001 (now 0.002)", "--prediction_type epsilon (now v_prediction)",
                   "--block_out_channels 16 16 16 (now 16 32 32)"):  # fmt: skip
        assert change in line, line
    assert "damaged" not in line


def test_resume_with_another_global_batch_is_refused(finished_run, tmp_path, capsys):
    output_dir = copy_of(finished_run, tmp_path)
    code, stderr = refused(["--output_dir", str(output_dir), "--max_train_steps", "4", "--resume_from_checkpoint",
                            "latest", *RUN, "--train_batch_size", "4"], capsys)  # fmt: skip
    assert code == 2 and "--global_batch_size 8 (now 4)" in stderr


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "7"], "--resolution 7 cannot go through the UNet's 3 levels, each of which halves it: pass a "
                            "multiple of 4"),
    (["--num_train_timesteps", "1"], "--default_num_inference_steps 50 is more than --num_train_timesteps 1"),
])  # fmt: skip
def test_settings_the_model_cannot_take_are_refused_before_anything_runs(capsys, flags, message):
    code, stderr = exit_code_and_stderr(config.parse_args, flags, capsys)
    assert code == 2 and message in stderr, stderr
