"""Loading a saved pipeline for the CLIs and the demo: safetensors only, and one clear error for any bad folder."""

import json
import os

import torch
from diffusers import DiffusionPipeline

from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline


def load_pipeline(
    model: str, trust_remote_code: bool = False, device: str | None = None, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Load `model` (a folder written by training, or a Hub id) on `device` (default: CUDA when available).

    Weights are read from safetensors only: pickle (`.bin`) weights can run arbitrary code when loaded. The folder's
    own copy of the code runs only with `trust_remote_code`; otherwise this package's classes are used.

    Raises:
        `ValueError`: naming the folder and the problem (not a pipeline, weights missing, truncated or pickled...).
    """
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(
            f"{model!r} is not a saved pipeline (no model_index.json); pass the --output_dir of a finished "
            "train_conditional.py run."
        )
    if os.path.isdir(model):
        pickled = [name for name in _component_files(model) if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        if pickled:
            raise ValueError(
                f"{model!r} holds pickle weights ({', '.join(pickled)}), which can run code when loaded; only "
                "safetensors weights are accepted. Convert them with safetensors in a trusted environment."
            )
    try:
        if trust_remote_code:
            pipe = DiffusionPipeline.from_pretrained(model, trust_remote_code=True, use_safetensors=True)
        else:
            pipe = ClassConditionedDDIMPipeline.from_pretrained(model, use_safetensors=True)
    except Exception as error:  # diffusers, safetensors and the Hub client each raise their own types
        raise ValueError(f"Could not load a pipeline from {model!r}: {type(error).__name__}: {error}") from error
    return pipe.to(device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype)


def _component_files(folder: str) -> list[str]:
    """Files of the components model_index.json lists (not checkpoints/ or logs a training run leaves beside them)."""
    with open(os.path.join(folder, "model_index.json")) as file:
        components = [name for name in json.load(file) if not name.startswith("_")]
    return [
        os.path.join(component, name)
        for component in components
        if os.path.isdir(os.path.join(folder, component))
        for name in os.listdir(os.path.join(folder, component))
    ]
