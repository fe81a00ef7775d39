"""The pipeline against diffusers' conventions: step callbacks, `output_type="latent"`, guidance as a pipeline
property, numpy class labels, and `save_pretrained(..., push_to_hub=True)`."""

import inspect
import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.callbacks import PipelineCallback

import pipeline.pipeline_class_conditioned_ddim as pipeline_module
from pipeline import ClassConditionedDDIMPipeline


def count_unet_calls(pipe: ClassConditionedDDIMPipeline) -> list[int]:
    """The batch size of every UNet call from now on."""
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


# diffusers' PipelineTesterMixin.test_callback_inputs, on our tiny pipeline.
def test_callback_inputs(tiny_pipe):
    parameters = inspect.signature(ClassConditionedDDIMPipeline.__call__).parameters
    assert "callback_on_step_end" in parameters and "callback_on_step_end_tensor_inputs" in parameters
    assert "latents" in tiny_pipe._callback_tensor_inputs  # the name diffusers' tests and users pass
    inputs = dict(class_labels=[1, 2], num_inference_steps=3, output_type="latent")

    received = []

    def callback_inputs(pipe, i, t, callback_kwargs):
        received.append(set(callback_kwargs))
        return callback_kwargs

    for subset in (["latents"], ["images"], tiny_pipe._callback_tensor_inputs):
        received.clear()
        tiny_pipe(**inputs, callback_on_step_end=callback_inputs, callback_on_step_end_tensor_inputs=subset)
        assert received == [set(subset)] * 3  # exactly the names asked for, at every step

    def callback_inputs_change_tensor(pipe, i, t, callback_kwargs):
        if i == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    # Handed both names, the callback replaces one; the other still holds the old tensor and must not win.
    output = tiny_pipe(
        **inputs,
        callback_on_step_end=callback_inputs_change_tensor,
        callback_on_step_end_tensor_inputs=tiny_pipe._callback_tensor_inputs,
    ).images
    assert output.abs().sum() == 0

    def replace_both(pipe, i, t, callback_kwargs):
        return {
            "latents": torch.zeros_like(callback_kwargs["latents"]),
            "images": torch.ones_like(callback_kwargs["images"]),
        }

    output = tiny_pipe(
        **inputs, callback_on_step_end=replace_both, callback_on_step_end_tensor_inputs=["latents", "images"]
    )
    assert output.images.abs().sum() == 0  # "latents" wins, as documented


# diffusers' PipelineTesterMixin.test_callback_cfg.
def test_callback_cfg(tiny_pipe):
    def callback_increase_guidance(pipe, i, t, callback_kwargs):
        pipe._guidance_scale += 1.0
        return callback_kwargs

    tiny_pipe(
        [1, 2],
        num_inference_steps=3,
        guidance_scale=2.0,
        callback_on_step_end=callback_increase_guidance,
        callback_on_step_end_tensor_inputs=tiny_pipe._callback_tensor_inputs,
    )
    assert tiny_pipe.num_timesteps == 3
    assert tiny_pipe.guidance_scale == 2.0 + tiny_pipe.num_timesteps


def test_a_guidance_scale_set_by_a_callback_is_used_from_the_next_step(tiny_pipe):
    def run(guidance_scale, callback=None):
        return tiny_pipe([1, 2], num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent",
                         generator=torch.Generator().manual_seed(0), callback_on_step_end=callback).images  # fmt: skip

    after_first_step = {}

    def record(pipe, i, t, callback_kwargs):
        after_first_step.setdefault("images", callback_kwargs["images"].clone())
        return callback_kwargs

    def restart_from_recorded(pipe, i, t, callback_kwargs):
        return {"images": after_first_step["images"]} if i == 0 else callback_kwargs

    def raise_guidance(pipe, i, t, callback_kwargs):
        pipe._guidance_scale = 4.0
        return callback_kwargs

    run(2.0, record)
    expected = run(4.0, restart_from_recorded)  # step 0 at 2.0 (recorded), step 1 at 4.0
    torch.testing.assert_close(run(2.0, raise_guidance), expected)
    assert not torch.allclose(run(2.0), expected)  # so the scale does matter for this model


class GuidanceCutoff(PipelineCallback):
    """Like diffusers' `SDCFGCutoffCallback`: guidance off after a given step (there are no embeddings to slice)."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        latents = callback_kwargs[self.tensor_inputs[0]]  # there because the pipeline reads `tensor_inputs`
        if step_index == self.config.cutoff_step_index:
            pipeline._guidance_scale = 0.0
        return {self.tensor_inputs[0]: latents}


def test_a_pipeline_callback_can_switch_guidance_off_mid_run(tiny_pipe):
    calls = count_unet_calls(tiny_pipe)
    images = tiny_pipe(
        [1, 2, 3],
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="pt",
        callback_on_step_end=GuidanceCutoff(cutoff_step_ratio=None, cutoff_step_index=0),
    ).images
    assert calls == [6, 3, 3]  # the doubled batch (and its labels) only while guidance is on
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()


def test_interrupt_skips_the_remaining_steps(tiny_pipe):
    calls = count_unet_calls(tiny_pipe)
    seen = []

    def stop_after_second_step(pipe, i, t, callback_kwargs):
        seen.append(callback_kwargs["latents"])
        pipe._interrupt = i == 1
        return callback_kwargs

    images = tiny_pipe([3], num_inference_steps=4, output_type="latent", callback_on_step_end=stop_after_second_step,
                       callback_on_step_end_tensor_inputs=["latents"]).images  # fmt: skip
    assert calls == [1, 1] and len(seen) == 2 and tiny_pipe.interrupt
    assert torch.equal(images, seen[-1])
    tiny_pipe([3], num_inference_steps=4)  # a new call starts uninterrupted
    assert len(calls) == 6 and not tiny_pipe.interrupt


def test_latent_output_is_the_batch_before_mapping_to_unit_range(tiny_pipe):
    def run(output_type):
        return tiny_pipe([1, 2], num_inference_steps=2, output_type=output_type,
                         generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    latent = run("latent")
    assert isinstance(latent, torch.Tensor) and latent.shape == (2, 1, 28, 28)
    assert latent.min() < 0  # not mapped to [0, 1]
    torch.testing.assert_close(run("pt"), (latent / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize(
    "labels, ids",
    [
        (np.int64(7), [7]),
        (np.array(7), [7]),
        (np.array([3, 7]), [3, 7]),
        (np.array([3, 7], dtype=np.uint8), [3, 7]),
        ([np.int32(3), "7"], [3, 7]),
    ],
)
def test_numpy_integer_labels_are_class_ids(tiny_pipe, labels, ids):
    class_ids = tiny_pipe.get_label_ids(labels)
    assert class_ids == ids and all(type(class_id) is int for class_id in class_ids)


def test_numpy_labels_sample_like_python_ints(tiny_pipe):
    def images(labels):
        return tiny_pipe(labels, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         output_type="pt").images  # fmt: skip

    torch.testing.assert_close(images(np.array([3, 7])), images([3, 7]))


@pytest.mark.parametrize(
    "labels",
    [3.5, [3.5], [3.0], np.float64(3.0), np.array([3.5]), torch.tensor([3.0]), True, [False], torch.tensor([True])],
    ids=repr,
)
def test_non_integer_labels_are_refused_with_the_fix(tiny_pipe, labels):
    with pytest.raises(ValueError, match="class_labels must be integer class ids or label names"):
        tiny_pipe(labels, num_inference_steps=1)


@pytest.mark.parametrize(
    "default, guidance_scale, expected",
    [
        (2.0, 1.0, ["turns classifier-free guidance off; this model's default is 2.0"]),
        (2.0, 0.0, ["off; values below 1 sample exactly as 1.0 does; this model's default is 2.0"]),
        (
            1.0,
            0.5,
            ["guidance_scale=0.5 turns classifier-free guidance off; values below 1 sample exactly as 1.0 does."],
        ),
        (1.0, 1.0, []),
        (2.0, None, []),  # the model's own default
        (2.0, 3.0, []),
    ],
)
def test_turning_off_the_saved_guidance_warns_once(tiny_unet, caplog, default, guidance_scale, expected):
    tiny_unet.register_to_config(class_dropout_prob=0.1)  # no warning about untrained guidance either
    pipe = ClassConditionedDDIMPipeline(tiny_unet, DDIMScheduler(), default_guidance_scale=default)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger=pipeline_module.__name__):
        pipe([1], num_inference_steps=2, guidance_scale=guidance_scale)
    warnings = [record.getMessage() for record in caplog.records if record.name == pipeline_module.__name__]
    assert len(warnings) == len(expected)
    for warning, text in zip(warnings, expected, strict=True):
        assert text in warning


def test_push_to_hub_uploads_the_complete_folder(tmp_path, tiny_pipe, monkeypatch):
    """No network: the two Hub calls are captured, and the upload records what the folder holds at that moment."""
    created, uploads = [], []

    def fake_create_repo(repo_id, **kwargs):
        created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")  # as the Hub resolves it

    def fake_upload_folder(folder_path, **kwargs):
        files = {os.path.relpath(os.path.join(root, name), folder_path) for root, _, names in os.walk(folder_path)
                 for name in names}  # fmt: skip
        with open(os.path.join(folder_path, "model_index.json")) as f:
            uploads.append(dict(kwargs, files=files, index=json.load(f)))

    monkeypatch.setattr(pipeline_module, "create_repo", fake_create_repo)
    # What diffusers' `PushToHubMixin._upload_folder` calls.
    monkeypatch.setattr("diffusers.utils.hub_utils.upload_folder", fake_upload_folder)

    tiny_pipe.save_pretrained(tmp_path / "mnist-model", push_to_hub=True)
    assert created == [("mnist-model", {"exist_ok": True, "private": None, "token": None})]  # the folder's name
    (upload,) = uploads
    assert upload["repo_id"] == "someone/mnist-model" and upload["create_pr"] is False
    assert upload["commit_message"] == "Upload ClassConditionedDDIMPipeline"
    assert {
        "model_index.json",
        "pipeline_class_conditioned_ddim.py",
        "modeling_class_conditioned_unet.py",
        "unet/modeling_class_conditioned_unet.py",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "scheduler/scheduler_config.json",
    } <= upload["files"]
    assert upload["index"]["_class_name"] == ["pipeline_class_conditioned_ddim", "ClassConditionedDDIMPipeline"]
    assert upload["index"]["unet"] == ["modeling_class_conditioned_unet", "ClassConditionedUNet"]

    uploads.clear()
    tiny_pipe.save_pretrained(tmp_path / "other", push_to_hub=True, repo_id="org/name", token="hf_x", private=True,
                              commit_message="v2", create_pr=True)  # fmt: skip
    assert created[-1] == ("org/name", {"exist_ok": True, "private": True, "token": "hf_x"})
    assert uploads[0]["token"] == "hf_x" and uploads[0]["commit_message"] == "v2" and uploads[0]["create_pr"] is True


def test_guidance_interval_guides_only_its_steps_like_diffusers_guider(tiny_unet):
    """`guidance_interval=(start, stop)` guides the same steps as diffusers' ClassifierFreeGuidance(start, stop), and
    an unguided step predicts exactly as a call without guidance."""
    from diffusers.guiders import ClassifierFreeGuidance

    tiny_unet.register_to_config(class_dropout_prob=0.1)
    pipe = ClassConditionedDDIMPipeline(tiny_unet, DDIMScheduler(), default_guidance_scale=3.0)
    pipe.set_progress_bar_config(disable=True)
    calls = count_unet_calls(pipe)
    for start, stop in [(0.0, 1.0), (0.2, 0.8), (0.5, 1.0), (0.0, 0.3)]:
        calls.clear()
        pipe([1], num_inference_steps=10, guidance_interval=(start, stop), output_type="latent")
        guider = ClassifierFreeGuidance(guidance_scale=3.0, start=start, stop=stop)
        expected = []
        for step in range(10):
            guider.set_state(step=step, num_inference_steps=10, timestep=0)
            expected.append(2 if guider._is_cfg_enabled() else 1)
        assert calls == expected, (start, stop)

    # Guiding no step is sampling without guidance, bit for bit.
    unguided = pipe([1, 2], num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images  # fmt: skip
    outside = pipe([1, 2], num_inference_steps=4, guidance_interval=(0.0, 0.2),
                   generator=torch.Generator().manual_seed(0), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(outside, unguided, rtol=0, atol=0)
    with pytest.raises(ValueError, match="guidance_interval must be"):
        pipe([1], guidance_interval=(0.8, 0.2))
