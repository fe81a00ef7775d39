"""Autoguidance (Karras et al. 2024): a saved guide network, a weaker model of the same classes, that a guided step
moves away from instead of the unconditional prediction; training keeps one with --guide_step. A pipeline without a
guide samples as it always did.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet, config
from pipeline.checkpointing import pipeline_at_checkpoint, save_pipeline
from pipeline.distillation import ConsistencyDistillation
from tests.conftest import TINY_TRAIN_FLAGS, TINY_UNET_CONFIG, exit_code_and_stderr, train_here

# `tiny_pipe`'s latents (labels 3 and 7, two each, 4 DDIM steps, seed 0) as the pipeline drew them at 33e8b99, before
# autoguidance: [sum, sum of squares] per guidance scale.
BEFORE_AUTOGUIDANCE = {1.0: [-375.9605288929306, 1747.8321348769437], 2.0: [-228.4204992862019, 1675.8035145576448]}


def latents(pipe: ClassConditionedDDIMPipeline, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": 4, **kwargs}
    return pipe(class_labels=[3, 7], num_images_per_label=2, generator=torch.Generator().manual_seed(0),
                output_type="latent", **kwargs).images  # fmt: skip


@pytest.fixture
def guided_pipe(tiny_unet) -> ClassConditionedDDIMPipeline:
    torch.manual_seed(1)  # another initialisation than tiny_unet's: a different network
    guide = ClassConditionedUNet(**TINY_UNET_CONFIG, id2label={i: str(i) for i in range(10)}).eval()
    pipe = ClassConditionedDDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(), guide_unet=guide,
                                        default_guidance_scale=2.0, default_guidance="autoguidance")  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_pipeline_without_a_guide_samples_as_before(tiny_pipe):
    assert tiny_pipe.guide_unet is None and tiny_pipe.sampling_settings()["guidance"] == "cfg"
    for scale, before in BEFORE_AUTOGUIDANCE.items():
        images = latents(tiny_pipe, guidance_scale=scale).double()
        assert [images.sum().item(), images.square().sum().item()] == pytest.approx(before, rel=1e-6)


def test_a_guided_step_moves_away_from_the_guides_prediction(guided_pipe):
    # One DDIM step by hand: D = guide + w (unet - guide), on the same noise the pipeline draws.
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 3, 7, 7])
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        main, guide = (network(noise, t, labels).sample for network in (guided_pipe.unet, guided_pipe.guide_unet))
    expected = scheduler.step(guide + 2.0 * (main - guide), t, noise).prev_sample
    torch.testing.assert_close(latents(guided_pipe, num_inference_steps=1), expected, rtol=0, atol=1e-6)


def test_the_guide_changes_the_images_and_scale_1_is_no_guidance(guided_pipe, tiny_pipe):
    calls = []
    guided_pipe.unet.register_forward_hook(lambda module, args, output: calls.append(("unet", len(args[0]))))
    guided_pipe.guide_unet.register_forward_hook(lambda module, args, output: calls.append(("guide", len(args[0]))))
    autoguided = latents(guided_pipe)  # the saved default: autoguidance at 2
    assert calls == [("unet", 4), ("guide", 4)] * 4  # two calls of N per step, never a doubled batch
    assert not torch.allclose(autoguided, latents(guided_pipe, guidance="cfg"), atol=1e-3)
    assert not torch.allclose(autoguided, latents(guided_pipe, guidance_scale=1.0), atol=1e-3)
    # Scale 1 is the unet alone, bit for bit, whichever guidance is named; the guide is never called.
    calls.clear()
    unguided = latents(guided_pipe, guidance_scale=1.0)
    assert calls == [("unet", 4)] * 4
    assert torch.equal(unguided, latents(tiny_pipe, guidance_scale=1.0))


def test_autoguidance_needs_a_guide_of_the_same_classes(tiny_pipe, tiny_unet):
    with pytest.raises(ValueError, match="needs a guide_unet"):
        latents(tiny_pipe, guidance="autoguidance")
    with pytest.raises(ValueError, match="Unknown guidance 'auto'"):
        latents(tiny_pipe, guidance="auto")
    other_classes = ClassConditionedUNet(**{**TINY_UNET_CONFIG, "num_classes": 3})
    with pytest.raises(ValueError, match="a guide must be trained on the same classes"):
        ClassConditionedDDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(), guide_unet=other_classes,
                                     default_guidance="autoguidance")  # fmt: skip


def test_the_guide_and_its_defaults_are_saved_and_an_older_folder_still_loads(guided_pipe, tiny_pipe, tmp_path):
    guided_pipe.save_pretrained(tmp_path / "guided")
    loaded = ClassConditionedDDIMPipeline.from_pretrained(tmp_path / "guided")
    assert type(loaded.guide_unet) is ClassConditionedUNet
    assert loaded.sampling_settings()["guidance"] == "autoguidance" and loaded.config.default_guidance_scale == 2.0
    torch.testing.assert_close(latents(loaded), latents(guided_pipe), rtol=0, atol=0)

    # A folder written before autoguidance existed: no guide_unet entry and no default_guidance in model_index.json.
    tiny_pipe.save_pretrained(tmp_path / "older")
    index_file = tmp_path / "older" / "model_index.json"
    index = json.loads(index_file.read_text())
    assert index["guide_unet"] == [None, None]
    del index["guide_unet"], index["default_guidance"]
    index_file.write_text(json.dumps(index))
    older = ClassConditionedDDIMPipeline.from_pretrained(tmp_path / "older")
    assert older.guide_unet is None and older.sampling_settings()["guidance"] == "cfg"
    assert torch.equal(latents(older, guidance_scale=1.0), latents(tiny_pipe, guidance_scale=1.0))


# A tiny run that keeps its model at step 2 of 4 as the guide (with EMA, class dropout and a checkpoint every 2 steps).
GUIDED_RUN = [*TINY_TRAIN_FLAGS, "--train_batch_size", "8", "--max_train_samples", "48", "--use_ema",
              "--class_dropout_prob", "0.1", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--guide_step", "2", "--default_guidance_scale", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("guided") / "run"
    train_here(["--output_dir", str(output_dir), *GUIDED_RUN])
    return output_dir


def test_guide_step_saves_the_model_of_that_step_as_the_guide(guided_run):
    pipe = ClassConditionedDDIMPipeline.from_pretrained(guided_run)
    assert pipe.sampling_settings()["guidance"] == "autoguidance" and pipe.sampling_settings()["guidance_scale"] == 2
    # The guide is the run's EMA model after step 2, as checkpoint-2 holds it; the final model has moved on.
    at_step_2 = pipeline_at_checkpoint(str(guided_run), str(guided_run / "checkpoints" / "checkpoint-2")).unet
    guide, final = pipe.guide_unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(guide[name], tensor) for name, tensor in at_step_2.state_dict().items())
    assert any(not torch.equal(final[name], tensor) for name, tensor in guide.items())
    index = json.loads((guided_run / "model_index.json").read_text())
    assert index["guide_unet"] == ["modeling_class_conditioned_unet", "ClassConditionedUNet"]
    assert len(pipe(class_labels=[1, 2], num_inference_steps=2).images) == 2
    assert "| `guide_step` | 2 |" in (guided_run / "README.md").read_text()


def test_a_run_resumed_after_its_guide_step_needs_the_guide(guided_run, tmp_path, capsys):
    output_dir = Path(shutil.copytree(guided_run, tmp_path / "run"))
    shutil.rmtree(output_dir / "checkpoints" / "guide")
    argv = ["--output_dir", str(output_dir), *GUIDED_RUN, "--max_train_steps", "6", "--resume_from_checkpoint",
            "latest"]  # fmt: skip
    code, stderr = exit_code_and_stderr(train_here, argv, capsys)
    assert code == 2 and "after --guide_step 2, but its guide" in stderr and "resume from a checkpoint before" in stderr


def test_the_guide_step_comes_before_the_last_step(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "run"), *GUIDED_RUN, "--guide_step", "4"]
    code, stderr = exit_code_and_stderr(config.parse_args, argv, capsys)
    assert code == 2 and "--guide_step 4 must come before the last step (4)" in stderr


def test_a_run_resumed_at_its_guide_step_keeps_the_guide_it_saved(guided_run, tmp_path):
    # The guide is written before the checkpoint of its step, so a run stopped right there resumes with it.
    output_dir = Path(shutil.copytree(guided_run, tmp_path / "run"))
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")
    (output_dir / "model_index.json").unlink()
    train_here(["--output_dir", str(output_dir), *GUIDED_RUN, "--resume_from_checkpoint", "latest"])
    resumed, first = (ClassConditionedDDIMPipeline.from_pretrained(run).guide_unet.state_dict()
                      for run in (output_dir, guided_run))  # fmt: skip
    assert all(torch.equal(resumed[name], tensor) for name, tensor in first.items())


def test_a_guide_left_by_an_earlier_run_is_never_used_before_the_guide_step(guided_run, tmp_path):
    # An earlier run of the folder, killed before it saved anything but its guide (of other classes here).
    output_dir = Path(shutil.copytree(guided_run, tmp_path / "run"))
    for name in ("checkpoint-2", "checkpoint-4", "guide"):
        shutil.rmtree(output_dir / "checkpoints" / name)
    for name in ("model_index.json", "unet", "guide_unet", "scheduler"):
        (shutil.rmtree if (output_dir / name).is_dir() else Path.unlink)(output_dir / name)
    ClassConditionedUNet(**{**TINY_UNET_CONFIG, "num_classes": 3}).save_pretrained(output_dir / "checkpoints" / "guide")
    train_here(["--output_dir", str(output_dir), *GUIDED_RUN, "--validation_steps", "1"])  # validates at steps 1-3
    guide = ClassConditionedDDIMPipeline.from_pretrained(output_dir).guide_unet.state_dict()
    expected = ClassConditionedDDIMPipeline.from_pretrained(guided_run).guide_unet.state_dict()
    assert all(torch.equal(guide[name], tensor) for name, tensor in expected.items())


def test_saving_a_pipeline_without_a_guide_removes_an_earlier_one(guided_pipe, tiny_pipe, tmp_path):
    save_pipeline(guided_pipe, str(tmp_path))
    assert (tmp_path / "guide_unet").is_dir()
    save_pipeline(tiny_pipe, str(tmp_path))  # e.g. --overwrite_output_dir over a guided run
    assert not (tmp_path / "guide_unet").exists()
    assert ClassConditionedDDIMPipeline.from_pretrained(tmp_path).guide_unet is None


def test_an_autoguided_teacher_step_moves_away_from_the_guide(tiny_unet):
    torch.manual_seed(1)
    guide = ClassConditionedUNet(**TINY_UNET_CONFIG)
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    distillation = ConsistencyDistillation(tiny_unet, scheduler, guidance_scale=2.0, guide=guide)
    scheduler.set_timesteps(50)  # DDIM's step goes back 1000 // 50 = 20 timesteps, like the distillation grid
    noisy, labels, starts = torch.randn(2, 1, 28, 28), torch.tensor([3, 7]), torch.full((2,), 499)
    with torch.no_grad():
        away = guide(noisy, starts, labels).sample
        guided = away + 2.0 * (tiny_unet(noisy, starts, labels).sample - away)  # never the unconditional prediction
    expected = scheduler.step(guided, 499, noisy).prev_sample
    torch.testing.assert_close(distillation.teacher_step(noisy, starts, starts - 20, labels), expected,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_an_autoguided_teacher_is_distilled_with_its_guide(guided_run, tmp_path):
    output_dir = tmp_path / "student"
    train_here(["--teacher", str(guided_run), "--output_dir", str(output_dir), *TINY_TRAIN_FLAGS, "--train_batch_size",
                "8", "--max_train_samples", "16", "--max_train_steps", "1"], distill=True)  # fmt: skip
    card = (output_dir / "README.md").read_text()
    assert '| `teacher_guidance` | "autoguidance" |' in card and "| `teacher_guidance_scale` | 2.0 |" in card
    assert "autoguidance (away from its guide network) at scale 2.0 built in" in card
    student = ClassConditionedDDIMPipeline.from_pretrained(output_dir)
    assert student.guide_unet is None and student.sampling_settings()["guidance_scale"] == 1.0  # built in


@pytest.mark.parametrize("flags, message", [
    (["--default_guidance_scale", "1"], "at 1 or less the guide is never used"),
])  # fmt: skip
def test_guide_step_flag_errors(tmp_path, capsys, flags, message):
    argv = ["--output_dir", str(tmp_path / "run"), *GUIDED_RUN, *flags]
    code, stderr = exit_code_and_stderr(config.parse_args, argv, capsys)
    assert code == 2 and message in stderr, stderr
