import inspect
import logging
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, ImagePipelineOutput
from PIL import Image
from safetensors.torch import load_file

from pipeline import ClassConditionedDDIMPipeline
from pipeline.errors import UsageError
from pipeline.pipeline_class_conditioned_ddim import EXAMPLE_DOC_STRING
from pipeline.schedulers import SCHEDULERS, set_scheduler
from tests.conftest import CreatesMarker


def test_labels_to_pil_images(tiny_pipe):
    output = tiny_pipe(class_labels=[3, 7], num_images_per_label=2, num_inference_steps=2)
    assert isinstance(output, ImagePipelineOutput)
    assert len(output.images) == 4
    assert all(
        isinstance(image, Image.Image) and image.size == (28, 28) and image.mode == "L" for image in output.images
    )


@pytest.mark.parametrize(
    "output_type, expected_type, shape",
    [
        ("np", np.ndarray, (2, 28, 28, 1)),
        ("pt", torch.Tensor, (2, 1, 28, 28)),
    ],
)
def test_array_outputs_are_in_unit_range(tiny_pipe, output_type, expected_type, shape):
    images = tiny_pipe(class_labels=[0, 9], num_inference_steps=2, output_type=output_type).images
    assert isinstance(images, expected_type) and tuple(images.shape) == shape
    assert images.min() >= 0 and images.max() <= 1


def test_same_seed_same_images_and_return_dict_false(tiny_pipe):
    first = tiny_pipe([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    (second,) = tiny_pipe(
        [1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False
    )
    other = tiny_pipe([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt")
    assert torch.equal(first.images, second)
    assert not torch.allclose(first.images, other.images)


def test_label_forms_agree(tiny_pipe):
    def images(labels):
        return tiny_pipe(
            labels, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images

    reference = images([7])
    for same in (7, "7", ["7"], torch.tensor([7])):
        torch.testing.assert_close(images(same), reference)


def test_get_label_ids_treats_a_string_as_one_name(tiny_pipe):
    assert tiny_pipe.get_label_ids("7") == [7]
    assert tiny_pipe.get_label_ids(["3", 5]) == [3, 5]
    assert tiny_pipe.labels == {str(i): i for i in range(10)}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"class_labels": [10]}, ValueError, "ids 0 to 9"),
        ({"class_labels": [-1]}, ValueError, "ids 0 to 9"),
        ({"class_labels": []}, ValueError, "class_labels is empty"),
        ({"class_labels": ["seven"]}, ValueError, r"valid names are \['0', '1'"),
        ({"class_labels": [1.5]}, ValueError, "class_labels must be integer class ids or label names"),
        ({"class_labels": [1], "num_inference_steps": 0}, ValueError, "num_inference_steps must be at least 1"),
        ({"class_labels": [1], "num_images_per_label": 0}, ValueError, "num_images_per_label must be at least 1"),
        ({"class_labels": [1], "output_type": "jpg"}, ValueError, r"choose one of \['pil', 'np', 'pt', 'latent'\]"),
        ({"class_labels": [1, 2], "generator": [torch.Generator()]}, ValueError, "1 generators for 2 images"),
        # nan guidance used to sample unguided without a word, inf guidance and nan eta to return nan images
        ({"class_labels": [1], "guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number"),
        ({"class_labels": [1], "guidance_scale": float("inf")}, ValueError, "guidance_scale must be a finite number"),
        ({"class_labels": [1], "eta": float("nan")}, ValueError, "eta must be a finite number"),
        ({"class_labels": [1], "num_images_per_label": 2.5}, ValueError, "num_images_per_label must be an integer"),
        ({"class_labels": [1], "num_inference_steps": 2.0}, ValueError, "num_inference_steps must be an integer"),
        ({"class_labels": torch.tensor([1], device="meta")}, ValueError, "meta device"),
        ({"class_labels": [1], "num_images_per_label": 10**9}, ValueError, "images at once need at least"),
    ],
)
def test_bad_input_names_the_fix(tiny_pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_pipe(**{"num_inference_steps": 1, **kwargs})


def test_documented_defaults_match_the_signature():
    doc = ClassConditionedDDIMPipeline.__call__.__doc__
    parameters = inspect.signature(ClassConditionedDDIMPipeline.__call__).parameters
    entries = dict(re.findall(r"^ {12}(\w+) \((.*)\):$", doc, flags=re.M))  # Args: name -> "(`type`, ...)"
    assert set(entries) == set(parameters) - {"self"}
    for name, entry in entries.items():
        default = parameters[name].default
        documented = re.search(r"defaults to `?(.+?)`?$", entry)
        if documented:
            assert documented[1] == repr(default).replace("'", '"'), name
        elif "*optional*" in entry:
            assert default is None, name
        else:
            assert default is inspect.Parameter.empty, name


def test_docstring_example_runs(tmp_path, tiny_pipe, monkeypatch):
    tiny_pipe.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    code_lines = [line.strip()[4:] for line in EXAMPLE_DOC_STRING.splitlines() if line.strip().startswith(">>> ")]
    code = "\n".join(code_lines).replace('"output/mnist-quick"', repr(str(tmp_path / "model")))
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 (running our own docstring is the point)
    assert len(namespace["images"]) == 4 and namespace["images"][0].size == (28, 28)
    assert (tmp_path / "three.png").exists()
    assert "(4, (28, 28))" in EXAMPLE_DOC_STRING


def test_guidance_runs_one_batched_unet_call_per_step(tiny_pipe):
    calls = []
    tiny_pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    tiny_pipe([1, 2, 3], num_inference_steps=4, guidance_scale=3.0)
    assert calls == [6] * 4


def test_a_generator_per_image_reproduces_each_image_alone(tiny_pipe):
    def generators(*seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    both = tiny_pipe([3, 7], num_inference_steps=3, generator=generators(10, 11), output_type="pt").images
    second_alone = tiny_pipe([7], num_inference_steps=3, generator=generators(11), output_type="pt").images
    torch.testing.assert_close(both[1:], second_alone, atol=1e-5, rtol=0)  # batch size may change conv kernels


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_listed_scheduler_samples(tiny_pipe, name):
    set_scheduler(tiny_pipe, name)
    assert type(tiny_pipe.scheduler) is SCHEDULERS[name]
    # eta goes only to schedulers whose step() takes it; the others must not choke on it.
    images = tiny_pipe([1, 2], num_inference_steps=4, eta=0.5, guidance_scale=2.0, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


# lcm is left out: it samples a distilled student on the grid it was distilled on, which starts at t=999 by design
@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"lcm"}))
def test_switching_sampler_keeps_the_timestep_spacing(tiny_unet, name):
    # Regression: DPMSolverMultistepScheduler.from_config(DDIMScheduler(...).config) silently took "linspace", whose
    # first step is t=999, where the cosine schedule's signal is ~0 and an epsilon model's estimate explodes (the
    # quick preset's saved pipeline drew noise: 28 % conditional accuracy instead of 96 %).
    pipe = ClassConditionedDDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    set_scheduler(pipe, name)
    assert pipe.scheduler.config.timestep_spacing == "leading"
    pipe.scheduler.set_timesteps(20)
    assert pipe.scheduler.timesteps.max() <= 950


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"lcm"}))
def test_a_saved_trailing_spacing_starts_every_sampler_at_pure_noise(tiny_unet, name):
    # A model saved with --default_timestep_spacing trailing starts sampling at t=999, pure noise, as the starting
    # noise is, whichever sampler a caller switches to. Broken if switching sampler drops the saved spacing.
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    pipe = ClassConditionedDDIMPipeline(unet=tiny_unet, scheduler=scheduler)
    set_scheduler(pipe, name)
    pipe.scheduler.set_timesteps(20)
    assert pipe.scheduler.timesteps.max() == 999
    # the CLIs' --timestep_spacing alone changes the spacing and keeps the sampler
    set_scheduler(pipe, timestep_spacing="leading")
    assert type(pipe.scheduler) is SCHEDULERS[name] and pipe.scheduler.config.timestep_spacing == "leading"
    with pytest.raises(UsageError, match="Unknown timestep spacing 'last'; choose one of"):
        set_scheduler(pipe, timestep_spacing="last")


def test_unknown_scheduler_name_lists_the_choices(tiny_pipe):
    with pytest.raises(ValueError, match=r"choose one of \['ddim', 'ddpm', 'dpm\+\+', 'euler', 'lcm', 'unipc'\]"):
        set_scheduler(tiny_pipe, "heun")


def test_callback_on_step_end_sees_and_replaces_the_images(tiny_pipe):
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, int(timestep), callback_kwargs["images"].shape))
        return {"images": torch.zeros_like(callback_kwargs["images"])}

    images = tiny_pipe([4], num_inference_steps=3, output_type="pt", callback_on_step_end=callback).images
    assert [step for step, _, _ in seen] == [0, 1, 2] and seen[0][2] == (1, 1, 28, 28)
    assert torch.all(images == 0.5)  # zeros in [-1, 1] are 0.5 in [0, 1]
    with pytest.raises(ValueError, match="may only name"):
        tiny_pipe([4], num_inference_steps=1, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["x"])


def test_runs_in_the_dtype_it_was_moved_to(tiny_pipe):
    tiny_pipe.to(torch.bfloat16)
    images = tiny_pipe([5], num_inference_steps=2, output_type="pt").images
    assert images.dtype == torch.bfloat16
    assert tiny_pipe([5], num_inference_steps=2, output_type="np").images.dtype == np.float32


def test_guidance_without_class_dropout_warns(tiny_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        tiny_pipe([1], num_inference_steps=1, guidance_scale=1.0)
    assert "class dropout" not in caplog.text
    with caplog.at_level(logging.WARNING):
        tiny_pipe([1], num_inference_steps=1, guidance_scale=3.0)
    assert "trained without class dropout" in caplog.text


def test_label_names_come_from_the_dataset_and_survive_saving(tmp_path, tiny_unet):
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    tiny_unet.register_to_config(id2label=dict(enumerate(names)))
    ClassConditionedDDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    pipe = ClassConditionedDDIMPipeline.from_pretrained(tmp_path)
    assert pipe.labels["Ankle boot"] == 9 and len(pipe.labels) == 10
    assert pipe.get_label_ids(["Trouser", "Ankle boot", 3]) == [1, 9, 3]
    with pytest.raises(ValueError, match="valid names are"):
        pipe.get_label_ids("trouser")


def test_the_pipeline_class_refuses_pickle_weights_by_default(tmp_path, tiny_pipe):
    """README's first example, `ClassConditionedDDIMPipeline.from_pretrained(dir)`, never unpickles weights."""
    tiny_pipe.save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    weights.unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state_dict, "payload": CreatesMarker(marker)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        ClassConditionedDDIMPipeline.from_pretrained(tmp_path)
    assert not marker.exists()
    # An explicit opt-in for a trusted folder remains (torch's weights_only loading still blocks this payload).
    torch.save(state_dict, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    assert ClassConditionedDDIMPipeline.from_pretrained(tmp_path, use_safetensors=False).unet is not None


def test_saved_sampling_defaults_are_used_after_loading(tmp_path, tiny_unet):
    pipe = ClassConditionedDDIMPipeline(tiny_unet, DDIMScheduler(), default_num_inference_steps=4,
                                        default_guidance_scale=2.0, default_guidance_interval=[0.25, 1.0])  # fmt: skip
    set_scheduler(pipe, "dpm++")
    pipe.save_pretrained(tmp_path)
    loaded = ClassConditionedDDIMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    calls = []
    loaded.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    loaded([1], num_inference_steps=None)
    assert calls == [1, 2, 2, 2]  # 4 steps; the first unguided, each other one batched call of cond + uncond
    calls.clear()
    loaded([1], num_inference_steps=2, guidance_scale=1.0)
    assert calls == [1, 1]  # explicit arguments win
    calls.clear()
    loaded([1], guidance_interval=(0.0, 0.5))
    assert calls == [2, 2, 1, 1]


def test_pickle_serialization_request_still_writes_safetensors_and_round_trips(tmp_path, tiny_pipe, caplog):
    # diffusers' own pipeline tests save with safe_serialization=False and load with from_pretrained: this pipeline
    # reads safetensors only, so it writes them whatever it is asked, and says so.
    with caplog.at_level(logging.WARNING):
        tiny_pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert "writes safetensors weights only" in caplog.text
    assert not list(tmp_path.rglob("*.bin")) and (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = ClassConditionedDDIMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    images = [pipe(class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np").images for pipe in (tiny_pipe, loaded)]  # fmt: skip
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-5)
