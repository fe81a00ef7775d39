"""What a GPU launch depends on, checked in-process on the CPU: the batch a preset resolves to per process, the
refused sharding back-ends, the device check of every module, validation noise that does not depend on how the
images are shared out, and the GPU check's step list. The launches themselves are in test_distributed.py."""

import contextlib
import json
import subprocess

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel

from pipeline import config
from pipeline.distillation import ConsistencyDistillation, DistillationObjective
from pipeline.errors import TrainingError, UsageError, one_line_errors
from pipeline.evaluate import generate_for_evaluation
from pipeline.training import check_devices, check_step_memory, refuse_sharding
from tests.conftest import REPO_ROOT, exit_code_and_stderr


@pytest.mark.parametrize("processes, per_process", [(1, 512), (2, 256), (8, 64), (16, 32)])
def test_a_preset_keeps_its_global_batch_on_any_number_of_processes(monkeypatch, processes, per_process):
    monkeypatch.setenv("WORLD_SIZE", str(processes))  # what accelerate launch / torchrun set
    args = config.parse_args(["--preset", "quality"])
    assert (args.global_batch_size, args.train_batch_size) == (512, per_process)


def test_an_explicit_per_process_batch_keeps_its_meaning(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = config.parse_args(["--preset", "quality", "--train_batch_size", "100"])
    assert (args.train_batch_size, args.global_batch_size) == (100, 800)
    args = config.parse_args(["--global_batch_size", "64", "--gradient_accumulation_steps", "2"])
    assert (args.train_batch_size, args.global_batch_size) == (4, 64)


def test_both_batch_flags_at_once_are_refused(capsys):
    argv = ["--global_batch_size", "64", "--train_batch_size=8"]
    code, stderr = exit_code_and_stderr(config.parse_args, argv, capsys)
    assert code == 2 and "not both" in stderr, stderr


def test_a_global_batch_that_does_not_split_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, stderr = exit_code_and_stderr(config.parse_args, ["--preset", "quick"], capsys)
    assert code == 2 and "global batch 64 does not split evenly over 3 processes" in stderr, stderr


def test_print_config_shows_the_per_process_batch(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        config.parse_args(["--preset", "quality", "--print_config"])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["global_batch_size"], printed["train_batch_size"]) == (512, 256)


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharding_back_ends_are_refused(monkeypatch, variable, name):
    refuse_sharding()  # a plain launch passes
    monkeypatch.setenv(variable, "true")  # what `accelerate launch` sets for an FSDP or DeepSpeed config
    with pytest.raises(UsageError, match=f"{name} is not supported"):
        refuse_sharding()


def test_the_device_check_names_a_module_left_elsewhere(tiny_unet):
    ema = EMAModel(tiny_unet.parameters())
    check_devices(torch.device("cpu:0"), {"model": tiny_unet, "EMA": ema, "teacher": None})  # "cpu" is "cpu:0"
    with pytest.raises(RuntimeError, match=r"target network on meta") as error:
        check_devices(torch.device("cpu"), {"model": tiny_unet, "target network": tiny_unet.to_empty(device="meta")})
    assert "model on meta" in str(error.value)  # the same module object: both names are reported
    ema.shadow_params = [tensor.to("meta") for tensor in ema.shadow_params]
    with pytest.raises(RuntimeError, match="EMA on meta"):
        check_devices(torch.device("cpu"), {"EMA": ema})


def test_the_target_network_lives_where_the_prepared_student_lives(tiny_unet):
    # On a GPU the student is moved by accelerator.prepare; a target copied before that stayed on the CPU. Here the
    # "prepared" student is on the meta device: the target must follow it there.
    ema = EMAModel(tiny_unet.parameters())
    distillation = ConsistencyDistillation(tiny_unet, DDIMScheduler(), guidance_scale=1.0, num_ddim_timesteps=10)
    objective = DistillationObjective(distillation, tiny_unet.to_empty(device="meta"), ema, torch.autocast("cpu"))
    assert {parameter.device.type for parameter in objective.target_network.parameters()} == {"meta"}


def test_evaluation_images_do_not_depend_on_batching(tiny_pipe):
    # Each image has its own noise, so shares of any size (processes, batches) draw the same images.
    whole, labels = generate_for_evaluation(tiny_pipe, 3, num_inference_steps=2, seed=1)
    batched, same_labels = generate_for_evaluation(tiny_pipe, 3, num_inference_steps=2, seed=1, batch_size=4)
    assert torch.equal(labels, same_labels) and labels.tolist() == [c for c in range(10) for _ in range(3)]
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-5)  # float rounding differs with the batch size
    other_seed, _ = generate_for_evaluation(tiny_pipe, 3, num_inference_steps=2, seed=2)
    assert (other_seed - whole).abs().max() > 0.1


class ProcessOfMany:
    """What generate_for_evaluation asks of an accelerator, for process `process_index` of `num_processes`: its
    gather returns the process's own share and keeps it, to be put together with the others' by the test."""

    def __init__(self, process_index: int, num_processes: int):
        self.process_index, self.num_processes, self.share = process_index, num_processes, None

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.share = tensor
        return tensor


@pytest.mark.parametrize("num_processes", [2, 3, 4])
def test_each_process_draws_its_share_and_the_gathered_set_is_the_whole_one(tiny_pipe, num_processes):
    # 10 images over 3 processes: shares of 4, 4 and 2 + 2 padding; over 4: 3, 3, 3 and 1 + 2 padding.
    whole, _ = generate_for_evaluation(tiny_pipe, 1, num_inference_steps=2, seed=3)
    processes = [ProcessOfMany(index, num_processes) for index in range(num_processes)]
    for process in processes:
        generate_for_evaluation(tiny_pipe, 1, num_inference_steps=2, seed=3, accelerator=process)
    per_process = -(-10 // num_processes)
    assert [len(process.share) for process in processes] == [per_process] * num_processes  # not 10 each
    gathered = torch.cat([process.share for process in processes])[:10]
    torch.testing.assert_close(gathered, whole, rtol=0, atol=1e-5)


def test_a_resolution_whose_first_step_cannot_fit_is_refused_before_the_data_is_decoded():
    args = config.parse_args(["--resolution", "4096"])  # a multiple of 4: the UNet could take it
    with pytest.raises(UsageError, match=r"At --resolution 4096, one training pass of 128 images needs at least"):
        check_step_memory(args, 4096, micro_batch_size=128, device=torch.device("cpu"))
    check_step_memory(args, 28, micro_batch_size=128, device=torch.device("cpu"))  # MNIST's size fits


def test_gpu_check_dry_run_lists_every_step_with_its_own_timeout():
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    names = [line.split()[1] for line in steps]
    assert names == ["probe", "eager_bf16_512", "eager_fp32_512", "compiled_bf16_4096", "seed_loop_cuda",
                     "quality_200_steps", "quality_resume", "distill", "report"]  # fmt: skip
    assert all(" timeout " in line for line in steps)
    # Within 8 minutes even if every step hangs: its timeout plus the 5 s before it is killed.
    assert sum(int(line.split(" timeout ")[1].split()[0]) + 5 for line in steps) <= 8 * 60
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--nonsense"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize("error, code", [(UsageError("bad flag"), 2), (TrainingError("stopped", exit_code=143), 143)])
def test_one_error_path_prints_one_line_with_the_errors_own_exit_code(capsys, error, code):
    cleaned = []
    with pytest.raises(SystemExit) as exit_info, one_line_errors(on_error=lambda: cleaned.append(True)):
        raise error
    assert exit_info.value.code == code and capsys.readouterr().err == f"error: {error}\n" and cleaned == [True]
    with pytest.raises(SystemExit) as exit_info, one_line_errors(interrupted="interrupted"):
        raise KeyboardInterrupt
    assert exit_info.value.code == 130
    with pytest.raises(KeyboardInterrupt), one_line_errors():  # nothing to say about it: Python's own handling
        raise KeyboardInterrupt


def test_snr_gamma_none_turns_off_a_presets_min_snr_weighting():
    assert config.parse_args(["--preset", "smoke"]).snr_gamma == 5.0
    assert config.parse_args(["--preset", "smoke", "--snr_gamma", "none"]).snr_gamma is None
    assert config.parse_args(["--preset", "quick"]).snr_gamma is None
    assert config.parse_args(["--preset", "quick", "--snr_gamma", "2"]).snr_gamma == 2.0
