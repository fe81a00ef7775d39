"""Resume checkpoints: `output_dir/checkpoints/checkpoint-{step}`, written atomically and pruned to a limit.

A checkpoint is what `accelerator.save_state` writes (model, optimizer, and every object registered for
checkpointing: LR scheduler, EMA) plus `training_state.json`, which records the step and what the data position
means (seed, global batch size). It is written to `checkpoint-{step}.tmp` and renamed when complete, so a crash
while saving never leaves a half checkpoint that `--resume_from_checkpoint latest` would pick.
"""

import json
import os
import re
import shutil

from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


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
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder "
            f"(expected .../checkpoint-STEP); use 'latest' or one of {list_checkpoints(output_dir)}."
        )
    return path


def prepare_output_dir(
    accelerator: Accelerator, output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool
) -> None:
    """Create `output_dir`, refusing to mix a new run into a folder that holds another run's pipeline or checkpoints.

    With `--overwrite_output_dir` the earlier run's checkpoints are removed (with a warning): left in place, they
    would be taken for this run's `latest`. Nothing is removed without that flag.
    """
    has_pipeline = os.path.isfile(os.path.join(output_dir, "model_index.json"))
    has_checkpoints = bool(list_checkpoints(output_dir))
    if has_pipeline and not has_checkpoints and resume_from_checkpoint and not overwrite_output_dir:
        # Resuming would start from scratch and, at the end, replace the finished pipeline.
        raise ValueError(
            f"--output_dir {output_dir!r} holds a finished run's pipeline and no checkpoints, so there is nothing to "
            "resume. Pass --overwrite_output_dir to train a new model in its place, or choose another --output_dir."
        )
    held = [name for name, present in (("a saved pipeline", has_pipeline), ("checkpoints", has_checkpoints)) if present]
    if held and not (resume_from_checkpoint or overwrite_output_dir):
        resume = "--resume_from_checkpoint latest to continue it, " if has_checkpoints else ""
        raise ValueError(
            f"--output_dir {output_dir!r} already holds {' and '.join(held)} of an earlier run. Pass {resume}"
            "--overwrite_output_dir to replace it, or choose another --output_dir."
        )
    accelerator.wait_for_everyone()  # every process has checked before the main one changes anything
    if accelerator.is_main_process:
        folder = checkpoints_dir(output_dir)
        if overwrite_output_dir and not resume_from_checkpoint and os.path.isdir(folder):
            logger.warning(f"--overwrite_output_dir: removing the earlier run's {folder}")
            shutil.rmtree(folder)
        os.makedirs(output_dir, exist_ok=True)
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None, run_state: dict
) -> str:
    """Save the full training state for `step`; every process must call this (each writes its RNG state).

    `run_state` (seed, global batch size, ...) is stored beside it and checked on resume by `load_checkpoint`.
    """
    final_path = os.path.join(checkpoints_dir(output_dir), f"checkpoint-{step}")
    temporary_path = final_path + ".tmp"
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)  # left over from a crash during an earlier save of this step
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary_path)
    accelerator.wait_for_everyone()  # every rank has written its part before the rename makes it visible
    if accelerator.is_main_process:
        with open(os.path.join(temporary_path, STATE_FILE), "w") as file:
            json.dump({"global_step": step, **run_state}, file, indent=2)
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


def remove_folder(path: str) -> None:
    """Delete a folder so that a crash half-way never leaves a partial folder under its own name."""
    doomed = f"{path}.deleting"
    os.replace(path, doomed)  # atomic: from here on `latest` no longer sees it
    shutil.rmtree(doomed)


def save_pipeline(pipeline: DiffusionPipeline, output_dir: str) -> None:
    """`pipeline.save_pretrained(output_dir)` such that a reader never sees half a pipeline.

    The pipeline shares `output_dir` with checkpoints/ and logs, so the folder itself cannot be swapped: the new one is
    written beside it, `model_index.json` (what loaders read first) is removed, each component folder and code file is
    swapped in with an atomic rename, and the new `model_index.json` comes last. A crash at any point leaves either no
    `model_index.json` (no pipeline, not half of one) or a complete pipeline.
    """
    staging = os.path.join(output_dir, ".pipeline.tmp")
    if os.path.exists(staging):
        shutil.rmtree(staging)  # a crash during an earlier save
    pipeline.save_pretrained(staging)
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
    os.replace(os.path.join(staging, "model_index.json"), index)
    os.rmdir(staging)


def load_checkpoint(accelerator: Accelerator, path: str, run_state: dict) -> dict:
    """Restore a checkpoint written by `save_checkpoint` and return its `training_state.json` (global step, run state,
    and the training time of the segments before it).

    The data order and every step's noise are functions of the seed and of the global batch, so a checkpoint only
    continues exactly under the same values; anything else stops with the flags that would match.
    """
    with open(os.path.join(path, STATE_FILE)) as file:
        saved_state = json.load(file)
    mismatches = {
        key: (saved_state.get(key), value) for key, value in run_state.items() if saved_state.get(key) != value
    }
    if mismatches:
        details = ", ".join(f"{key} was {saved} and is now {now}" for key, (saved, now) in mismatches.items())
        raise ValueError(
            f"Cannot resume exactly from {path}: {details}. Resume with the same --seed and the same global batch "
            "(--train_batch_size x processes x --gradient_accumulation_steps), or start a new --output_dir."
        )
    try:
        accelerator.load_state(path)
    except Exception as error:  # truncated or foreign files: torch, safetensors and accelerate raise their own types
        raise ValueError(
            f"Cannot resume from {path}: it is damaged or belongs to another model ({type(error).__name__}: "
            f"{error}). Resume from an older one with --resume_from_checkpoint PATH, or start a new --output_dir."
        ) from error
    return saved_state
