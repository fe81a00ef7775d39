"""Data parallelism, gradient accumulation, multi-node, precision and exact resume, with the real launcher.

Every run uses the same seed and the same global batch of 8 images; the saved weights are compared.
"""

import json
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline import ClassConditionedUNet
from tests.conftest import (
    TINY_TRAIN_FLAGS,
    TINY_UNET_CONFIG,
    accelerate_command,
    accelerate_launch,
    cli_env,
    exit_code_and_stderr,
    train_here,
)

# A short run that touches every stateful part: LR warmup + cosine decay, EMA, class dropout, several epochs.
RUN_FLAGS = [
    *TINY_TRAIN_FLAGS,
    "--max_train_samples",
    "48",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "2",
    "--use_ema",
    "--class_dropout_prob",
    "0.2",
    "--logging_steps",
    "1",
]

# float32 with another reduction order (DDP all-reduce, accumulation) agrees to ~1e-7 here after 8 steps (measured:
# 1.2e-7). One kind of parameter is left out: attention key biases. Adding a constant to every key shifts all
# logits of a query equally, which softmax ignores, so their true gradient is 0; Adam divides the rounding noise
# that stands in for it by its own magnitude and turns it into lr-sized random steps (measured: up to 3e-5).
# They do not change the model's output, which is compared too.
EQUIVALENCE_ATOL = 1e-6
GRADIENT_FREE = ("to_k.bias",)


def validation_flags(classifier_cache: str) -> list[str]:
    """The validation metrics at the end of a run: 5 images per class (50, so 25 per process on two)."""
    return ["--validation_images_per_label", "5", "--classifier_cache_dir", classifier_cache,
            "--classifier_train_samples", "3000"]  # fmt: skip


def unet_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


def max_difference(first: dict, second: dict, config: dict = TINY_UNET_CONFIG) -> float:
    """Largest weight difference, and (in the assert) the largest difference of the two models' outputs."""
    assert first.keys() == second.keys()
    outputs = [model_output(weights, config) for weights in (first, second)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)
    return max((first[name] - second[name]).abs().max().item() for name in first if not name.endswith(GRADIENT_FREE))


def model_output(weights: dict, config: dict) -> torch.Tensor:
    model = ClassConditionedUNet(**config)
    model.load_state_dict(weights)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 1, 28, 28, generator=generator)
    with torch.no_grad():
        return model(sample, torch.tensor([10, 300, 600, 900]), torch.tensor([0, 3, 7, 10])).sample


def summary(output_dir) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, classifier_cache):
    """The reference run. It checkpoints every 2 steps so that the resume tests restart a copy of it from step 4
    (mid-epoch: 48 samples / 8 = 6 steps per epoch) instead of training the first half again. Checkpointing must not
    change the result: test_lazy_data_trains_the_identical_model compares a run without checkpoints bit for bit."""
    output_dir = tmp_path_factory.mktemp("one_process")
    train_here(["--output_dir", str(output_dir), "--train_batch_size", "8", "--max_train_steps", "8",
                "--checkpointing_steps", "2", *RUN_FLAGS, *validation_flags(classifier_cache)])  # fmt: skip
    return output_dir


def interrupted_at_step_4(single_process_run, tmp_path) -> Path:
    """A copy of the reference run as it stood after its checkpoint at step 4: later checkpoints and weights gone."""
    output_dir = Path(shutil.copytree(single_process_run, tmp_path / "run"))
    for step in (6, 8):
        shutil.rmtree(output_dir / "checkpoints" / f"checkpoint-{step}")
    (output_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return output_dir


def test_two_processes_train_and_validate_like_one(single_process_run, classifier_cache, tmp_path):
    result = accelerate_launch(
        "multi_cpu.yaml",
        ["--output_dir", str(tmp_path), "--train_batch_size", "4", "--max_train_steps", "8", *RUN_FLAGS,
         *validation_flags(classifier_cache)],
    )  # fmt: skip
    run = summary(tmp_path)
    # Real data parallelism, not two independent runs that happen to exit 0.
    assert run["num_processes"] == 2 and run["distributed_type"] == "MULTI_CPU"
    assert run["global_batch_size"] == 8
    assert run["process_group_timeout_s"] == 7200  # --ddp_timeout's default reached the process group
    assert (result.stdout + result.stderr).count("Saved the pipeline") == 1
    difference = max_difference(unet_weights(tmp_path), unet_weights(single_process_run))
    print(f"max |w(2 processes x 4) - w(1 process x 8)| = {difference:.3g}")
    assert difference < EQUIVALENCE_ATOL

    # The final validation: each process drew half of the grid and of the metric images on its device, and the main
    # process scored them all; the one process drew them alone. Same noise per image, so the same grid and metrics.
    one_metrics, two_metrics = summary(single_process_run)["final_metrics"], run["final_metrics"]
    assert (one_metrics["images_per_process"], two_metrics["images_per_process"]) == (50, 25)
    assert two_metrics["device"] == "cpu" and two_metrics["precision"] == "no" and two_metrics["guidance"] == "cfg"
    assert two_metrics["cond_accuracy"] == one_metrics["cond_accuracy"]
    assert two_metrics["fid"] == pytest.approx(one_metrics["fid"], rel=1e-3)
    grids = [np.asarray(Image.open(folder / "samples.png"), dtype=int) for folder in (single_process_run, tmp_path)]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1


def test_gradient_accumulation_trains_the_same_model(single_process_run, tmp_path):
    train_here(["--output_dir", str(tmp_path), "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
                "--max_train_steps", "8", *RUN_FLAGS])  # fmt: skip
    assert summary(tmp_path)["global_batch_size"] == 8
    difference = max_difference(unet_weights(tmp_path), unet_weights(single_process_run))
    print(f"max |w(1 x 4, accumulation 2) - w(1 x 8)| = {difference:.3g}")
    assert difference < EQUIVALENCE_ATOL


def test_micro_batches_train_the_same_model(single_process_run, tmp_path):
    # What the CPU default does with large batches: passes of a few images, one optimizer step per batch.
    train_here(["--output_dir", str(tmp_path), "--train_batch_size", "8", "--micro_batch_size", "2",
                "--max_train_steps", "8", *RUN_FLAGS])  # fmt: skip
    assert summary(tmp_path)["global_batch_size"] == 8
    difference = max_difference(unet_weights(tmp_path), unet_weights(single_process_run))
    print(f"max |w(1 x 8 in micro-batches of 2) - w(1 x 8)| = {difference:.3g}")
    assert difference < EQUIVALENCE_ATOL


def test_compiled_model_trains_the_same_model(single_process_run, tmp_path):
    # The GPU speed path: torch.compile as accelerate's launcher sets it (`--dynamo_backend`), and a saved model
    # without the compile wrapper's key prefix. aot_eager traces and runs the same ATen ops as eager, quickly on a
    # CPU; inductor (for GPUs) is measured by bench/gpu_check.sh.
    accelerate_launch("cpu.yaml", ["--output_dir", str(tmp_path), "--train_batch_size", "8", "--max_train_steps", "8",
                                   *RUN_FLAGS], launch_args=["--dynamo_backend", "aot_eager"])  # fmt: skip
    assert summary(tmp_path)["compiled"] and not summary(single_process_run)["compiled"]
    difference = max_difference(unet_weights(tmp_path), unet_weights(single_process_run))
    print(f"max |w(compiled, aot_eager) - w(eager)| = {difference:.3g}")
    assert difference < EQUIVALENCE_ATOL
    assert abs(summary(tmp_path)["final_loss"] - summary(single_process_run)["final_loss"]) < 1e-5


def test_lazy_data_trains_the_identical_model(single_process_run, tmp_path):
    # What a split too large for memory gets: batches read from the memory-mapped cache, same order, same bits. This
    # run saves no checkpoints and the reference run does: saving one must not change the run either (RNG states).
    train_here(["--output_dir", str(tmp_path), "--train_batch_size", "8", "--max_train_steps", "8", "--lazy_data",
                *RUN_FLAGS])  # fmt: skip
    lazy, in_memory = unet_weights(tmp_path), unet_weights(single_process_run)
    assert all(torch.equal(lazy[name], tensor) for name, tensor in in_memory.items())


def test_plain_multi_gpu_flag_on_a_cpu_machine_is_real_data_parallelism(single_process_run, tmp_path):
    # The set-up that silently trains two independent models with a naive script.
    accelerate_launch(
        "cpu.yaml",
        ["--output_dir", str(tmp_path), "--train_batch_size", "4", "--max_train_steps", "8", "--ddp_timeout", "1234",
         *RUN_FLAGS],
        launch_args=["--multi_gpu", "--num_processes", "2"],
    )  # fmt: skip
    assert summary(tmp_path)["num_processes"] == 2
    assert summary(tmp_path)["process_group_timeout_s"] == 1234
    assert max_difference(unet_weights(tmp_path), unet_weights(single_process_run)) < EQUIVALENCE_ATOL


def launch_two_machines(output_dirs: list[Path], script_args: list[str], timeout: int) -> tuple[list[int], list[str]]:
    """Two "machines" on loopback, one process each, machine R writing to output_dirs[R]: exit codes and outputs."""
    port = free_port()
    machines = []
    for rank, output_dir in enumerate(output_dirs):
        launch_args = ["-q", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                       "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]  # fmt: skip
        command = [*accelerate_command("multi_cpu.yaml", launch_args), "--output_dir", str(output_dir), *script_args]
        machines.append(
            subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        outputs = [machine.communicate(timeout=timeout)[0] for machine in machines]
    finally:  # a hang fails the test without leaving launchers behind
        for machine in machines:
            machine.kill()
    return [machine.returncode for machine in machines], outputs


def test_two_simulated_machines_train_once(single_process_run, tmp_path):
    script_args = ["--train_batch_size", "4", "--max_train_steps", "8", *RUN_FLAGS]
    codes, outputs = launch_two_machines([tmp_path, tmp_path], script_args, timeout=300)
    assert codes == [0, 0], outputs
    assert "".join(outputs).count("Saved the pipeline") == 1
    assert summary(tmp_path)["num_processes"] == 2
    assert max_difference(unet_weights(tmp_path), unet_weights(single_process_run)) < EQUIVALENCE_ATOL


def test_machines_that_do_not_share_the_output_dir_stop_at_once(tmp_path):
    # Each machine sees only its own folder: the second would resume from nothing, hang in the first collective,
    # and keep nothing. Both stop before training, with the fix, instead of hanging.
    started = time.monotonic()
    folders = [tmp_path / "machine0", tmp_path / "machine1"]
    codes, outputs = launch_two_machines(folders, ["--train_batch_size", "4", "--max_train_steps", "8", *RUN_FLAGS],
                                         timeout=120)  # fmt: skip
    assert time.monotonic() - started < 60
    assert 0 not in codes, outputs
    for output in outputs:
        assert "is not one folder shared by every machine" in output, output
        assert "Saved the pipeline" not in output
    assert not any(folder.exists() for folder in folders)  # a failed start leaves no empty folder


def test_a_preset_is_one_recipe_on_any_number_of_processes(tmp_path, caplog):
    # `quality` is 512 images per optimizer step: one process takes 512, each of two takes 256, and both launches
    # train the same steps of the same batches (1,024 images: 2 steps per epoch) to the same weights.
    flags = ["--preset", "quality", "--num_epochs", "1", "--max_train_samples", "1024", "--mixed_precision", "no",
             *TINY_TRAIN_FLAGS]  # fmt: skip
    with caplog.at_level(logging.INFO):
        train_here(["--output_dir", str(tmp_path / "cpu.yaml"), *flags])  # one process: WORLD_SIZE is unset here
    result = accelerate_launch("multi_cpu.yaml", ["--output_dir", str(tmp_path / "multi_cpu.yaml"), *flags])
    logs = {1: caplog.text, 2: result.stdout + result.stderr}
    for config, processes in (("cpu.yaml", 1), ("multi_cpu.yaml", 2)):
        run = summary(tmp_path / config)
        assert (run["num_processes"], run["global_batch_size"], run["global_step"]) == (processes, 512, 2)
    assert "Batch size per device = 512" in logs[1] and "Batch size per device = 256" in logs[2]
    weights = [unet_weights(tmp_path / config) for config in ("cpu.yaml", "multi_cpu.yaml")]
    assert max_difference(*weights, config={**TINY_UNET_CONFIG, "time_class_embedding": True}) < EQUIVALENCE_ATOL


def test_fsdp_is_refused_with_one_line_not_a_crash(tmp_path):
    # accelerate 1.15 builds no FSDP set-up without a GPU (it raises in Accelerator()), so the script offers none.
    result = accelerate_launch("cpu.yaml", ["--output_dir", str(tmp_path / "run"), *RUN_FLAGS],
                               launch_args=["-q", "--use_fsdp", "--num_processes", "2"], check=False,
                               timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "FSDP is not supported" in result.stderr and "multi_gpu.yaml" in result.stderr
    assert "There are currently no available devices" not in result.stderr  # accelerate's own crash
    assert not (tmp_path / "run").exists()


def test_resume_mid_epoch_is_bit_exact(single_process_run, tmp_path):
    output_dir = interrupted_at_step_4(single_process_run, tmp_path)
    train_here(["--output_dir", str(output_dir), "--train_batch_size", "8", "--max_train_steps", "8",
                "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", *RUN_FLAGS])  # fmt: skip
    resumed_summary = summary(output_dir)
    assert resumed_summary["steps_this_run"] == 4
    resumed = unet_weights(output_dir)
    assert all(torch.equal(resumed[name], tensor) for name, tensor in unet_weights(single_process_run).items())
    # The run's time is measured, not extrapolated: the first segment's time up to checkpoint-4, as that checkpoint
    # recorded it, plus the whole resumed segment.
    first_segment_s = json.loads((output_dir / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())
    assert resumed_summary["segments"] == 2 and first_segment_s["segment"] == 1
    assert resumed_summary["total_train_time_s"] == pytest.approx(
        first_segment_s["train_time_s"] + resumed_summary["wall_time_s"], abs=0.02
    )


def test_resume_with_more_processes_and_the_same_global_batch(single_process_run, tmp_path):
    output_dir = interrupted_at_step_4(single_process_run, tmp_path)
    accelerate_launch("multi_cpu.yaml", ["--output_dir", str(output_dir), "--train_batch_size", "4",
                                         "--max_train_steps", "8", "--resume_from_checkpoint", "latest",
                                         *RUN_FLAGS])  # fmt: skip
    assert summary(output_dir)["steps_this_run"] == 4 and summary(output_dir)["num_processes"] == 2
    assert max_difference(unet_weights(output_dir), unet_weights(single_process_run)) < EQUIVALENCE_ATOL


def test_bf16_autocast_on_cpu(tmp_path, classifier_cache):
    train_here(["--output_dir", str(tmp_path), "--train_batch_size", "8", "--max_train_steps", "2",
                "--mixed_precision", "bf16", *RUN_FLAGS, *validation_flags(classifier_cache)])  # fmt: skip
    run = summary(tmp_path)
    assert run["mixed_precision"] == "bf16" and 0 < run["final_loss"] < 10
    assert run["final_metrics"]["precision"] == "bf16"  # validation samples in the training precision
    assert {tensor.dtype for tensor in unet_weights(tmp_path).values()} == {torch.float32}


def test_fp16_on_cpu_is_refused(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "run"), "--mixed_precision", "fp16", *RUN_FLAGS]
    code, stderr = exit_code_and_stderr(train_here, argv, capsys)
    assert code == 2 and "--mixed_precision fp16 needs a CUDA GPU" in stderr
    assert not (tmp_path / "run").exists()
