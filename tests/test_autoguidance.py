"""Autoguidance in the pipeline (Karras et al. 2024): a saved guide network, a weaker model of the same classes, that a
guided step moves away from instead of the unconditional prediction. A pipeline without one samples as it always did.
"""

import json

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet
from tests.conftest import TINY_UNET_CONFIG

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
