"""Loading a saved pipeline for the CLIs and the demo: safetensors only, and one clear error for any bad folder."""

import json
import os

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError

from .errors import UsageError
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline

PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The model shipped in the repository (written by bench/ship_model.py): what sample.py and app.py draw with when no
# model is named, so that a fresh clone samples before training anything.
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "mnist")


def shipped_model() -> str | None:
    """The shipped model's folder, or None where this package was installed without the repository around it."""
    return SHIPPED_MODEL if os.path.isdir(SHIPPED_MODEL) else None


def load_pipeline(
    model: str, trust_remote_code: bool = False, device: str | None = None, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Load `model` (a folder written by training, or a Hub id) on `device` (default: CUDA when available).

    Weights are read from safetensors only: pickle (`.bin`) weights can run arbitrary code when loaded. The folder's
    own copy of the code runs only with `trust_remote_code`; otherwise this package's classes are used. The weights
    are loaded in `dtype` (diffusers' `dtype`, formerly `torch_dtype`), not cast afterwards.

    Raises:
        [`UsageError`]: naming the folder and the problem (not a pipeline, weights missing, truncated or pickled...).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # found before loading anything: e.g. --device cuda on a machine without CUDA
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"Device {device!r} is not available here ({error}); pass --device cpu.") from error
    if os.path.isdir(model):
        check_folder(model)
    try:
        if trust_remote_code:
            pipe = DiffusionPipeline.from_pretrained(
                model, trust_remote_code=True, use_safetensors=True, dtype=dtype
            )
        else:
            pipe = ClassConditionedDDIMPipeline.from_pretrained(model, use_safetensors=True, dtype=dtype)
    # What diffusers, safetensors and the Hub client raise for a missing, truncated or foreign folder or id (Hub
    # errors are OSErrors, a bad config value a ValueError or TypeError); anything else is a bug and keeps its trace.
    except (OSError, ValueError, TypeError, SafetensorError) as error:
        raise UsageError(f"Could not load a pipeline from {model!r}: {type(error).__name__}: {error}") from error
    return pipe.to(device)


def check_folder(folder: str) -> None:
    """Refuse a folder that is not a saved pipeline, whose `model_index.json` is not JSON, or that holds pickle
    weights, with the file and the fix named."""
    index_file = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_file):
        raise UsageError(
            f"{folder!r} is not a saved pipeline (no model_index.json); pass the --output_dir of a finished "
            "train_conditional.py run."
        )
    try:
        with open(index_file) as file:
            index = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(
            f"{index_file} is not valid JSON ({error}); restore it from the run that wrote it, or retrain."
        ) from error
    if not isinstance(index, dict):
        raise UsageError(f"{index_file} holds a JSON {type(index).__name__}, not a pipeline index (an object).")
    unet_entry = index.get("unet")
    if not (isinstance(unet_entry, list) and unet_entry[-1:] == ["ClassConditionedUNet"]):
        # diffusers would build a randomly initialised network for another class and warn "newly initialized".
        raise UsageError(
            f"{index_file} names {unet_entry!r} as its unet, not ClassConditionedUNet: not a pipeline of this "
            "project; pass the --output_dir of a train_conditional.py run."
        )
    # Only the components model_index.json lists: checkpoints/ and logs a training run leaves beside them do not count.
    components = [name for name in index if not name.startswith("_") and os.path.isdir(os.path.join(folder, name))]
    pickled = [
        os.path.join(component, name)
        for component in components
        for name in os.listdir(os.path.join(folder, component))
        if name.endswith(PICKLE_EXTENSIONS)
    ]
    if pickled:
        raise UsageError(
            f"{folder!r} holds pickle weights ({', '.join(pickled)}), which can run code when loaded; only "
            "safetensors weights are accepted. Convert them with safetensors in a trusted environment."
        )
