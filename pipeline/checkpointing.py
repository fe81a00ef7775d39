"""Resume checkpoints: `output_dir/checkpoints/checkpoint-{step}`, written atomically and pruned to a limit.

A checkpoint is what `accelerator.save_state` writes (model as safetensors, optimizer and per-process RNG states)
plus what is ours, in formats that cannot run code when read: `training_state.json` (the step, what the data
position means — seed, global batch size —, the LR scheduler's state and the EMA's counters) and
`ema_shadow_params.safetensors`. Nothing is registered with `register_for_checkpointing`, because accelerate
unpickles those objects (`custom_checkpoint_*.pkl`) with full pickle; its own files it reads with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

A checkpoint is written to `checkpoint-{step}.tmp` and renamed when complete, so a crash while saving never leaves a
half checkpoint that `--resume_from_checkpoint latest` would pick; a full disk is found before writing where
possible, and the staging folder is removed when a write fails anyway.
"""

import json
import os
import pickle
import re
import shutil

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import TrainingError, UsageError
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
EMA_FILE = "ema_shadow_params.safetensors"
PIPELINE_STAGING = ".pipeline.tmp"
# The flags that define a run, recorded under "recipe" in every checkpoint and compared on resume (besides the seed,
# the global batch and the number of training images, which fix the data order and every step's noise). The
# architecture is compared as the built model's config, so a --model_config counts too.
RECIPE_FLAGS = (
    "dataset", "image_column", "label_column", "resolution",
    "prediction_type", "beta_schedule", "num_train_timesteps", "snr_gamma", "class_dropout_prob",
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "max_grad_norm",
    "use_ema", "ema_max_decay", "ema_inv_gamma", "ema_power",
    "teacher", "teacher_guidance", "teacher_guidance_scale", "num_ddim_timesteps", "huber_c", "guide_step",
)  # fmt: skip
ARCHITECTURE_FLAGS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                      "attention_head_dim", "class_emb_size", "norm_num_groups", "time_class_embedding")  # fmt: skip
SAFE_TO_CHANGE = ("--max_train_steps", "--num_epochs", "--mixed_precision", "--micro_batch_size",
                  "--train_batch_size and the process count (at the same global batch)",
                  "the saved sampling defaults")  # fmt: skip
# Beyond the weights: configs, code files, RNG states, the sample grid and model card (each well under 1 MiB here).
SLACK_BYTES = 2**20


def guide_dir(output_dir: str) -> str:
    """Where a run keeps its autoguidance guide (`--guide_step`) until the final pipeline takes it in: with the
    checkpoints, which a resumed run needs it beside (pruning removes only `checkpoint-STEP` folders)."""
    return os.path.join(checkpoints_dir(output_dir), "guide")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not os.path.isdir(folder):
        return []
    steps = [int(match[1]) for name in os.listdir(folder) if (match := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(folder, f"checkpoint-{step}") for step in sorted(steps)]


def find_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names: `latest` (None when there is none yet) or a path."""
    if resume_from_checkpoint == "latest":
        # Only complete checkpoints count: `.tmp` (being written) and `.deleting` folders never match the pattern.
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint.rstrip("/")
    if not os.path.isdir(path) or not CHECKPOINT_PATTERN.match(os.path.basename(path)):
        raise UsageError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder "
            f"(expected .../checkpoint-STEP); use 'latest' or one of {list_checkpoints(output_dir)}."
        )
    return path


def staging_leftovers(output_dir: str) -> list[str]:
    """Folders only an interrupted save leaves: the pipeline's staging folder, `checkpoint-N.tmp`, `*.deleting`."""
    checkpoints = checkpoints_dir(output_dir)
    candidates = [os.path.join(output_dir, PIPELINE_STAGING)]
    for folder in (output_dir, checkpoints):
        if os.path.isdir(folder):
            candidates += [os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".deleting")]
    if os.path.isdir(checkpoints):
        candidates += [os.path.join(checkpoints, name) for name in os.listdir(checkpoints)
                       if name.endswith(".tmp") and CHECKPOINT_PATTERN.match(name.removesuffix(".tmp"))]  # fmt: skip
    return sorted(path for path in candidates if os.path.isdir(path))


def weight_bytes(model: torch.nn.Module) -> int:
    """The model's weights in float32, as they are saved."""
    return sum(parameter.numel() * 4 for parameter in model.parameters())


def checkpoint_bytes(model: torch.nn.Module, ema_model: EMAModel | None) -> int:
    """About what one checkpoint takes on disk: the weights, Adam's two moments, the EMA's copy (all float32)."""
    return weight_bytes(model) * (3 + (ema_model is not None)) + SLACK_BYTES


def pipeline_bytes(model: torch.nn.Module) -> int:
    """About what the saved pipeline takes on disk: the float32 weights plus configs, code, grid and card."""
    return weight_bytes(model) + SLACK_BYTES


def free_space_error(folder: str, needed_bytes: int, what: str) -> str | None:
    """The message for a disk too full to hold `needed_bytes` more in `folder` (created or not yet), else None."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free_bytes = shutil.disk_usage(existing).free
    if free_bytes >= needed_bytes:
        return None
    return (
        f"The disk holding {folder} has {free_bytes / 2**20:.1f} MiB free, but {what} needs about "
        f"{needed_bytes / 2**20:.1f} MiB. Free some space there or choose another --output_dir."
    )


def processes_where(accelerator: Accelerator, condition: bool) -> list[int]:
    """The indices of the processes where `condition` holds (a collective: every process calls it and gets the same
    list), so that a problem one process finds stops all of them."""
    flags = accelerator.gather(torch.tensor([condition], device=accelerator.device))
    return flags.nonzero().flatten().tolist()


def ensure_free_space(accelerator: Accelerator, folder: str, needed_bytes: int, what: str) -> None:
    """Raise `TrainingError` on every process alike when any of them finds too little space (a collective)."""
    message = free_space_error(folder, needed_bytes, what)
    if processes_where(accelerator, message is not None):
        raise TrainingError(message or f"Another process found too little space to save {what} in {folder}.")


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None,
    run_state: dict,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema_model: EMAModel | None = None,
    needed_bytes: int = 0,
) -> str:
    """Save the full training state for `step`; every process must call this (each writes its RNG state).

    `run_state` (seed, global batch size, ...) is stored beside it and checked on resume by `load_checkpoint`. A
    disk with less than `needed_bytes` free is refused before anything is written, on every process.
    """
    final_path = os.path.join(checkpoints_dir(output_dir), f"checkpoint-{step}")
    temporary_path = final_path + ".tmp"
    ensure_free_space(accelerator, checkpoints_dir(output_dir), needed_bytes, f"checkpoint {final_path}")
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)  # left over from a crash during an earlier save of this step
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temporary_path)
        accelerator.wait_for_everyone()  # every rank has written its part before the rename makes it visible
        if accelerator.is_main_process:
            state = {"global_step": step, **run_state, "lr_scheduler": lr_scheduler.state_dict()}
            if ema_model is not None:
                ema_state = ema_model.state_dict()
                shadow_params = ema_state.pop("shadow_params")
                save_file({str(index): tensor.contiguous() for index, tensor in enumerate(shadow_params)},
                          os.path.join(temporary_path, EMA_FILE))  # fmt: skip
                state["ema"] = ema_state
            with open(os.path.join(temporary_path, STATE_FILE), "w") as file:
                json.dump(state, file, indent=2)
    # A full disk: torch.save (optimizer, RNG) reports it as a RuntimeError ("iostream error") and safetensors as its
    # own type, not as OSError.
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(temporary_path, ignore_errors=True)
        checkpoints = list_checkpoints(output_dir)
        raise TrainingError(
            f"Could not write checkpoint {final_path} ({type(error).__name__}: {error}); removed the partial copy. "
            f"The last complete checkpoint is {checkpoints[-1] if checkpoints else 'none'}: free some space and rerun "
            "with --resume_from_checkpoint latest."
        ) from error
    if accelerator.is_main_process:
        if os.path.exists(final_path):  # saving a step again (after resuming from an older checkpoint)
            remove_folder(final_path)
        os.replace(temporary_path, final_path)
        logger.info(f"Saved checkpoint {final_path}")
        if total_limit:
            # Prune only after the new checkpoint is complete, so the newest good one always survives.
            for old_path in list_checkpoints(output_dir)[:-total_limit]:
                remove_folder(old_path)
                logger.info(f"Removed old checkpoint {old_path} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()
    return final_path


def flag_text(value) -> str:
    """A setting as it would be typed on the command line (lists space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def remove_folder(path: str) -> None:
    """Delete a folder so that a crash half-way never leaves a partial folder under its own name."""
    doomed = f"{path}.deleting"
    os.replace(path, doomed)  # atomic: from here on `latest` no longer sees it
    shutil.rmtree(doomed)


def save_pipeline(pipeline: DiffusionPipeline, output_dir: str, needed_bytes: int = 0) -> None:
    """`pipeline.save_pretrained(output_dir)` such that a reader never sees half a pipeline, and a full disk never
    costs the pipeline saved before.

    The pipeline shares `output_dir` with checkpoints/ and logs, so the folder itself cannot be swapped: the new one is
    written beside it (after checking for `needed_bytes` of free space), `model_index.json` (what loaders read first)
    is removed, each component folder and code file is swapped in with an atomic rename, and the new
    `model_index.json` comes last. A crash at any point leaves either no `model_index.json` (no pipeline, not half of
    one) or a complete pipeline; a failed write removes the staging folder and leaves the earlier pipeline as it was.
    """
    staging = os.path.join(output_dir, PIPELINE_STAGING)
    if os.path.exists(staging):
        shutil.rmtree(staging)  # a crash during an earlier save
    message = free_space_error(output_dir, needed_bytes, "the trained pipeline")
    if message:
        raise TrainingError(message)
    try:
        pipeline.save_pretrained(staging)
    except (OSError, SafetensorError) as error:  # a full disk: safetensors raises its own type, not OSError
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingError(
            f"Could not write the pipeline to {output_dir} ({type(error).__name__}: {error}); removed the partial "
            "copy. Free some space and rerun with --resume_from_checkpoint latest."
        ) from error
    index = os.path.join(output_dir, "model_index.json")
    if os.path.exists(index):
        os.remove(index)
    for name in sorted(os.listdir(staging)):
        if name == "model_index.json":
            continue
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            remove_folder(target)
        os.replace(os.path.join(staging, name), target)
    stale_guide = os.path.join(output_dir, "guide_unet")  # an earlier run's, when this pipeline has no guide
    if not pipeline.config.get("guide_unet", [None])[0] and os.path.isdir(stale_guide):
        remove_folder(stale_guide)
    os.replace(os.path.join(staging, "model_index.json"), index)
    os.rmdir(staging)


def load_checkpoint(
    accelerator: Accelerator,
    path: str,
    run_state: dict,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema_model: EMAModel | None = None,
) -> dict:
    """Restore a checkpoint written by `save_checkpoint` and return its `training_state.json` (global step, run state,
    and the training time of the segments before it).

    `run_state` holds the settings that define the run (see `RECIPE_FLAGS`), as the flags name them: the data order
    and every step's noise are functions of the seed and of the global batch, and the objective, optimisation and
    network must be the ones the weights were trained with. Any of them changed stops the resume, naming each flag
    and its saved value. No file is read
    in a way that can run code: a `custom_checkpoint_*.pkl` (which accelerate would unpickle) is refused.
    """
    pickles = sorted(name for name in os.listdir(path) if name.startswith("custom_checkpoint_"))
    if pickles:
        raise UsageError(
            f"{path} holds {', '.join(pickles)}: pickle files that accelerate would load with full pickle, which can "
            "run code. This version never writes them (an earlier one did, or someone put them there). Resume from a "
            "checkpoint written by this version, or start a new --output_dir."
        )
    try:
        with open(os.path.join(path, STATE_FILE)) as file:
            saved_state = json.load(file)
    except (OSError, ValueError) as error:
        raise UsageError(f"Cannot resume from {path}: its {STATE_FILE} is missing or damaged ({error}).") from error
    # The data position's settings at the top, the rest under "recipe"; what an older version did not record is not
    # compared.
    saved_recipe = saved_state.get("recipe", {})
    pairs = {**{key: (saved_state[key], value) for key, value in run_state.items()
                if key != "recipe" and key in saved_state},
             **{key: (saved_recipe[key], value) for key, value in run_state.get("recipe", {}).items()
                if key in saved_recipe}}  # fmt: skip
    changed = {key: (saved, now) for key, (saved, now) in pairs.items() if saved != now}
    if changed:
        details = ", ".join(f"--{key} {flag_text(saved)} (now {flag_text(now)})"
                            for key, (saved, now) in changed.items())  # fmt: skip
        raise UsageError(
            f"Cannot resume from {path}: it was trained with {details}. Resume with the saved values, or start a new "
            f"--output_dir; only {', '.join(SAFE_TO_CHANGE)} and the logging, validation, checkpointing and tracker "
            "flags may change on resume."
        )
    if (ema_model is not None) != ("ema" in saved_state):
        raise UsageError(
            f"Cannot resume from {path}: it was saved {'with' if 'ema' in saved_state else 'without'} --use_ema; "
            "resume with the same setting."
        )
    try:
        accelerator.load_state(path)  # model from safetensors; optimizer and RNG with weights_only=True
        lr_scheduler.load_state_dict(saved_state["lr_scheduler"])
        if ema_model is not None:
            shadow_params = [tensor.to(accelerator.device) for tensor in read_shadow_params(path)]
            ema_model.load_state_dict({**saved_state["ema"], "shadow_params": shadow_params})
    # Truncated or foreign files: torch raises RuntimeError or UnpicklingError (also for a file holding anything but
    # tensors), safetensors SafetensorError, a missing file OSError, a mismatched state KeyError or ValueError.
    except (OSError, RuntimeError, pickle.UnpicklingError, SafetensorError, KeyError, ValueError) as error:
        raise UsageError(
            f"Cannot resume from {path}: it is damaged or belongs to another model ({type(error).__name__}: "
            f"{error}). Resume from an older one with --resume_from_checkpoint PATH, or start a new --output_dir."
        ) from error
    return saved_state


def pipeline_at_checkpoint(output_dir: str, checkpoint: str) -> ClassConditionedDDIMPipeline:
    """The finished run's pipeline in `output_dir` with the weights of one of its checkpoints (the EMA's when the run
    kept one, as the saved pipeline does): to evaluate a run along the way, e.g. for time-to-quality curves."""
    pipe = ClassConditionedDDIMPipeline.from_pretrained(output_dir)
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    # torch.compile's wrapper prefixes every key; the pipeline's UNet is the plain module.
    pipe.unet.load_state_dict({name.removeprefix("_orig_mod."): tensor for name, tensor in weights.items()})
    if os.path.exists(os.path.join(checkpoint, EMA_FILE)):
        with torch.no_grad():
            for parameter, average in zip(pipe.unet.parameters(), read_shadow_params(checkpoint), strict=True):
                parameter.copy_(average)
    return pipe


def read_shadow_params(checkpoint: str) -> list[torch.Tensor]:
    """The EMA's weights a checkpoint holds, on the CPU, in the order of the model's `parameters()` (EMAModel's).

    Read on the CPU: safetensors refuses device names like "cpu:0" (what multi-process CPU runs use).
    """
    tensors = load_file(os.path.join(checkpoint, EMA_FILE))
    return [tensors[str(index)] for index in range(len(tensors))]
