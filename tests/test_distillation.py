"""Distillation (distill.py, pipeline/distillation.py): the consistency loss matches diffusers' LCM pieces, it falls,
the student folder loads the three ways and samples with its saved few steps, and resuming is bit-exact."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet, config, sampling
from pipeline.distillation import ConsistencyDistillation, boundary_scalings
from tests.conftest import (
    REPO_ROOT,
    TINY_TRAIN_FLAGS,
    TINY_UNET_CONFIG,
    exit_code_and_stderr,
    run_cli,
    train_here,
    weights_fingerprint,
)

DISTILL = [sys.executable, str(REPO_ROOT / "distill.py")]


def cosine_v_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                         set_alpha_to_one=False)  # fmt: skip


def tiny_distillation(guidance_scale: float = 2.0) -> tuple[ConsistencyDistillation, ClassConditionedUNet]:
    torch.manual_seed(0)
    teacher = ClassConditionedUNet(**TINY_UNET_CONFIG, class_dropout_prob=0.1)
    return ConsistencyDistillation(teacher, cosine_v_scheduler(), guidance_scale), teacher


def test_boundary_scalings_are_lcm_schedulers():
    """The student is sampled by LCMScheduler: trained with other scalings, its one-step output would be wrong."""
    scheduler = LCMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    timesteps = torch.tensor([0, 19, 259, 499, 999])
    c_skip, c_out = boundary_scalings(timesteps)
    for index, timestep in enumerate(timesteps.tolist()):
        expected_skip, expected_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        assert c_skip[index].item() == pytest.approx(expected_skip, rel=1e-6)
        assert c_out[index].item() == pytest.approx(expected_out, rel=1e-6)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, 0) = x


def test_teacher_step_is_a_guided_ddim_step():
    """One teacher step equals diffusers' DDIMScheduler.step on the guided prediction, to the grid's previous step."""
    distillation, teacher = tiny_distillation(guidance_scale=2.0)
    scheduler = cosine_v_scheduler()
    scheduler.set_timesteps(50)  # DDIM's step goes back num_train_timesteps // 50 = 20 timesteps, like the grid
    noisy, labels = torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7])
    for start in (19, 499, 999):
        starts = torch.full((3,), start)
        ours = distillation.teacher_step(noisy, starts, (starts - 20).clamp(min=0), labels)
        with torch.no_grad():
            conditional = teacher(noisy, starts, labels).sample
            unconditional = teacher(noisy, starts, torch.full_like(labels, teacher.null_class_id)).sample
        guided = unconditional + 2.0 * (conditional - unconditional)
        expected = scheduler.step(guided, start, noisy).prev_sample
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_distillation_loss_falls():
    """A few Adam steps on one batch lower the consistency loss (student and EMA target both start as the teacher)."""
    distillation, teacher = tiny_distillation()
    student = ClassConditionedUNet.from_config(teacher.config)
    student.load_state_dict(teacher.state_dict())
    target = ClassConditionedUNet.from_config(teacher.config).eval().requires_grad_(False)
    ema = EMAModel(student.parameters(), decay=0.95, use_ema_warmup=False)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(16, 1, 28, 28, generator=generator) * 2 - 1
    labels, noise = torch.arange(16) % 10, torch.randn(16, 1, 28, 28, generator=generator)
    timesteps = torch.randint(0, 1000, (16,), generator=generator)
    losses = []
    for _ in range(30):
        ema.copy_to(target.parameters())
        loss = distillation(student, target, clean, labels, noise, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(student.parameters())
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# The `quick` preset at the tiny size, for 4 steps of 8 images: v-prediction on the cosine schedule, class dropout,
# the class in the timestep embedding, EMA, a cosine LR schedule; with the min-SNR-5 weighting and the saved guidance
# 1.75 that `quick` had when the fingerprints below were taken (it now trains the plain v-loss and saves 1.375).
QUICK_LIKE_FLAGS = ["--preset", "quick", *TINY_TRAIN_FLAGS, "--attention_head_dim", "8", "--max_train_steps", "4",
                    "--train_batch_size", "8", "--lr_warmup_steps", "1", "--snr_gamma", "5",
                    "--default_guidance_scale", "1.75"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny guided teacher, trained as `quick` trains."""
    output_dir = tmp_path_factory.mktemp("teacher") / "run"
    train_here(["--output_dir", str(output_dir), *QUICK_LIKE_FLAGS])
    return output_dir


def distill_flags(teacher_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--teacher", str(teacher_dir), "--output_dir", str(output_dir), "--train_batch_size", "8",
            "--max_train_samples", "48", "--logging_steps", "1", "--lr_warmup_steps", "1", *TINY_TRAIN_FLAGS,
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("student") / "run"
    result = run_cli([*DISTILL, *distill_flags(teacher_dir, output_dir, "--max_train_steps", "6",
                                               "--checkpointing_steps", "3")])  # fmt: skip
    (output_dir.parent / "distill.log").write_text(result.stdout + result.stderr)
    return output_dir


# `weights_fingerprint` of the teacher and the student above: the teacher as trained at 33e8b99, before the settings
# and the distillation task moved into the package (the same weights to the bit, sha256 5f25fa1c...); the student as
# distilled at 7044a3d, where the recipe changed on purpose (learning rate 3e-4, quick's saved guidance 1.75).
TEACHER_FINGERPRINT = [600.6157745025304, 1781.4825524721816, -16.11778937730432]
STUDENT_FINGERPRINT = [600.6594765590405, 1781.5730349697837, -15.935177072200105]


def test_the_same_flags_train_the_same_weights_as_before(teacher_dir, student_dir):
    # A refactoring of training or distillation must not move a weight: a changed loss, EMA, schedule or seed order
    # moves these sums by far more than 1e-6 (the student differs from its teacher by 4e-5); other CPUs' rounding
    # moves them by far less.
    assert weights_fingerprint(teacher_dir) == pytest.approx(TEACHER_FINGERPRINT, rel=1e-6)
    assert weights_fingerprint(student_dir) == pytest.approx(STUDENT_FINGERPRINT, rel=1e-6)


def test_every_module_of_distillation_is_on_the_accelerators_device(student_dir):
    # The set-up's device check ran over all four (it raises otherwise; tests/test_launch_setup.py shows it catching
    # a module left elsewhere, and the target network following the prepared student).
    log = (student_dir.parent / "distill.log").read_text()
    assert "On cpu: model, EMA, teacher, target network" in log


def test_student_loads_three_ways_and_samples_with_its_saved_steps(student_dir, tmp_path):
    index = json.loads((student_dir / "model_index.json").read_text())
    assert index["default_num_inference_steps"] == 4 and index["default_guidance_scale"] == 1.0
    scheduler_config = json.loads((student_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "LCMScheduler" and scheduler_config["original_inference_steps"] == 50
    unet_calls = []
    for pipe in (ClassConditionedDDIMPipeline.from_pretrained(student_dir),
                 DiffusionPipeline.from_pretrained(student_dir, trust_remote_code=True)):  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.register_forward_hook(lambda module, args, output: unet_calls.append(args[0].shape[0]))
        images = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0)).images
        assert len(images) == 2 and images[0].size == (28, 28)
    assert unet_calls == [2] * 8  # 4 steps each, unguided: one batch of 2 per step, never a doubled one
    sampling.cli(["--model", str(student_dir), "--class_labels", "3", "7", "--output", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").exists()
    card = (student_dir / "README.md").read_text()
    assert "Distilled from the pipeline `run`" in card and "consistency-distillation" in card
    assert "| `block_out_channels` | [16, 16, 16] |" in card  # the teacher's network, not the flags' defaults


def test_resumed_distillation_is_bit_exact(teacher_dir, student_dir, tmp_path):
    output_dir = Path(shutil.copytree(student_dir, tmp_path / "run"))
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-6")
    (output_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    train_here(distill_flags(teacher_dir, output_dir, "--max_train_steps", "6", "--checkpointing_steps", "3",
                             "--resume_from_checkpoint", "latest"), distill=True)  # fmt: skip
    resumed = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    uninterrupted = load_file(student_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(resumed[name], tensor) for name, tensor in uninterrupted.items())


@pytest.mark.parametrize("output", ["same", "same spelled differently", "inside", "around"])
def test_the_student_never_overwrites_its_teacher(teacher_dir, capsys, monkeypatch, output):
    monkeypatch.chdir(teacher_dir.parent)
    folder = {"same": str(teacher_dir), "same spelled differently": f"./{teacher_dir.name}/",
              "inside": str(teacher_dir / "student"), "around": str(teacher_dir.parent)}[output]  # fmt: skip
    before = sorted(path.relative_to(teacher_dir) for path in teacher_dir.rglob("*"))
    argv = [*distill_flags(teacher_dir, folder), "--overwrite_output_dir"]
    code, stderr = exit_code_and_stderr(config.parse_distill_args, argv, capsys)
    assert code == 2 and "the student would overwrite its teacher" in stderr, stderr
    assert sorted(path.relative_to(teacher_dir) for path in teacher_dir.rglob("*")) == before


@pytest.mark.parametrize("flags, message", [
    (["--preset", "quick"], "--preset names training recipes"),
    (["--guide_step", "2"], "a distilled student has none"),
    (["--default_scheduler", "ddim"], "samples with --default_scheduler lcm only"),
    (["--num_ddim_timesteps", "30"], "must divide the teacher's 1000 training timesteps"),
    (["--teacher_guidance", "autoguidance"], "needs a teacher with a guide network"),
])  # fmt: skip
def test_distill_usage_errors_exit_2(teacher_dir, tmp_path, capsys, flags, message):
    argv = distill_flags(teacher_dir, tmp_path / "out", *flags)
    code, stderr = exit_code_and_stderr(config.parse_distill_args, argv, capsys)
    assert code == 2 and message in stderr, stderr
