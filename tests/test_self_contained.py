"""A saved pipeline folder carries its code: it loads with `DiffusionPipeline` where this package is not installed."""

import json
import shutil
import sys

import torch
from diffusers import DDIMScheduler

from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet
from tests.conftest import TINY_UNET_CONFIG, cli_env, run_cli

# Runs where `pipeline` cannot be imported: load the folder as remote code, sample, save it again (a folder with a
# guide network samples with autoguidance, its saved default).
WITHOUT_PACKAGE = """
import sys
sys.modules["pipeline"] = None  # `import pipeline` raises ImportError
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
if pipe.guide_unet is not None:
    assert type(pipe.guide_unet).__module__.startswith("diffusers_modules."), type(pipe.guide_unet).__module__
    assert pipe.sampling_settings()["guidance"] == "autoguidance"
calls = []
pipe.unet.register_forward_hook(lambda *args: calls.append("unet"))
if pipe.guide_unet is not None:
    pipe.guide_unet.register_forward_hook(lambda *args: calls.append("guide"))
assert len(pipe([3, 7], num_inference_steps=2).images) == 2
print("calls", *calls)
if len(sys.argv) > 2:
    pipe.save_pretrained(sys.argv[2])
"""

# Runs with the package installed: our own classes, without trust_remote_code, for every folder given.
WITH_PACKAGE = """
import sys
from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet
for folder in sys.argv[1:]:
    pipe = ClassConditionedDDIMPipeline.from_pretrained(folder)
    assert type(pipe) is ClassConditionedDDIMPipeline and type(pipe.unet) is ClassConditionedUNet
    assert len(pipe([3, 7], num_inference_steps=2).images) == 2
"""


def test_saved_folder_loads_with_and_without_the_package(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_class_conditioned_ddim", "ClassConditionedDDIMPipeline"]
    assert index["unet"] == ["modeling_class_conditioned_unet", "ClassConditionedUNet"]

    # Without the package, in a clean working directory and a private modules cache.
    shutil.copytree(tmp_path / "model", tmp_path / "elsewhere" / "model")
    script = tmp_path / "without_package.py"
    script.write_text(WITHOUT_PACKAGE)
    env = cli_env(HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    run_cli([sys.executable, str(script), "model", str(tmp_path / "resaved")], cwd=tmp_path / "elsewhere", env=env)
    result = run_cli([sys.executable, str(script), str(tmp_path / "resaved")], cwd=tmp_path / "elsewhere", env=env)
    assert "Expected types" not in result.stderr

    # With the package: our own classes, no trust_remote_code, from both folders.
    result = run_cli([sys.executable, "-c", WITH_PACKAGE, str(tmp_path / "model"), str(tmp_path / "resaved")], env=env)
    assert "Expected types" not in result.stderr


def test_a_folder_with_a_guide_network_loads_and_autoguides_without_the_package(tmp_path, tiny_unet):
    torch.manual_seed(1)
    guide = ClassConditionedUNet(**TINY_UNET_CONFIG, id2label={i: str(i) for i in range(10)})
    pipe = ClassConditionedDDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(), guide_unet=guide,
                                        default_guidance_scale=2.0, default_guidance="autoguidance")  # fmt: skip
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "guide_unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list((tmp_path / "model").rglob("*.bin"))
    script = tmp_path / "without_package.py"
    script.write_text(WITHOUT_PACKAGE)
    env = cli_env(HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    result = run_cli([sys.executable, str(script), str(tmp_path / "model")], cwd=tmp_path, env=env)
    # guided steps: one call of each network, of the 2 images (not one doubled batch of the unet)
    assert result.stdout.split("calls")[-1].split() == ["unet", "guide"] * 2
    assert "Expected types" not in result.stderr
