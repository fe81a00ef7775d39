"""What training shows while it runs: tracker set-up, a sample grid from fixed noise, quick metrics, the loss curve."""

import argparse
import logging
import math
import os

import numpy as np
from accelerate import Accelerator
from accelerate.logging import get_logger

from .evaluate import EvaluationSet, generate_for_evaluation, score_images
from .grid import labelled_grid
from .hub import RUN_LEFTOVERS
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline

logger = get_logger(__name__)


DEFAULT_PROJECT = "class-conditioned-mnist"


def tracker_names(report_to: str) -> list[str]:
    """The accelerate trackers for `--report_to`, failing at start-up when one is not installed."""
    trackers = {"none": [], "all": ["wandb", "tensorboard"]}.get(report_to, [report_to])
    if "tensorboard" in trackers:
        try:
            import tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError("--report_to tensorboard needs TensorBoard: pip install tensorboard") from error
    if "wandb" in trackers:
        try:
            import wandb  # noqa: F401
        except ImportError as error:
            raise ImportError("--report_to wandb needs Weights & Biases: pip install wandb") from error
    return trackers


def tracker_init_kwargs(
    args: argparse.Namespace, trackers: list[str], resumed_wandb_run_id: str | None = None
) -> tuple[str, dict]:
    """The project name and the trackers' `init_kwargs` for `accelerator.init_trackers`.

    W&B's own variables win over our defaults, flags over both: the project is `--tracker_project_name`, else
    `WANDB_PROJECT`, else "class-conditioned-mnist"; the run name `--run_name`, else `WANDB_NAME`; the folder
    `WANDB_DIR`, else `OUTPUT_DIR/wandb`. A resumed run continues the W&B run its checkpoint recorded (same id,
    `resume="allow"`), so its charts are one line. Without a W&B login (and with WANDB_MODE unset) W&B would stop at
    a login prompt; it logs offline instead, with a one-line notice on how to upload the run later.
    """
    project = args.tracker_project_name or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    wandb_kwargs = {}
    if args.run_name:
        wandb_kwargs["name"] = args.run_name
    if not os.environ.get("WANDB_DIR"):
        wandb_kwargs["dir"] = args.output_dir
    if resumed_wandb_run_id:
        wandb_kwargs.update(id=resumed_wandb_run_id, resume="allow")
    if "wandb" in trackers:
        import wandb

        if not os.environ.get("WANDB_MODE") and not wandb.login(prompt=False, verify=False):
            wandb_kwargs["mode"] = "offline"
            logging.getLogger(__name__).warning(
                "W&B: no login found, so this run is logged offline under OUTPUT_DIR/wandb/. Upload it later with "
                "`wandb sync OUTPUT_DIR/wandb/offline-run-*` (after `wandb login`), or set WANDB_MODE to choose."
            )
    return project, {"wandb": wandb_kwargs}


def wandb_run_id(accelerator: Accelerator) -> str | None:
    """The id of this process's W&B run (main process with --report_to wandb), else None."""
    if not any(tracker.name == "wandb" for tracker in accelerator.trackers):
        return None
    return accelerator.get_tracker("wandb", unwrap=True).id


def log_model_artifact(accelerator: Accelerator, output_dir: str) -> None:
    """Main process: the saved pipeline folder as a W&B model artifact named `model-RUN_ID`, as transformers'
    Trainer does with WANDB_LOG_MODEL: weights, configs, code, model card and grid; not checkpoints or logs."""
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    artifact = wandb.Artifact(name=f"model-{run.id}", type="model", description="ClassConditionedDDIMPipeline folder")
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name in RUN_LEFTOVERS or name.startswith("."):
            continue
        if os.path.isdir(path):
            artifact.add_dir(path, name=name)
        else:
            artifact.add_file(path, name=name)
    run.log_artifact(artifact)
    logger.info(f"Logged {output_dir} to W&B as the model artifact {artifact.name}")


def log_validation(
    accelerator: Accelerator,
    pipe: ClassConditionedDDIMPipeline,
    args: argparse.Namespace,
    step: int,
    evaluation: EvaluationSet | None,
) -> dict:
    """Every process: a grid with one row per class, drawn from the same noise every time so that grids compare across
    steps and runs, and the metrics when `--validation_images_per_label` asks for them (against the validation
    reference: the model is never scored against the test split). Each process samples its share on its device in
    the training precision (`generate_for_evaluation`); the main process, which holds `evaluation`, scores the
    gathered images, saves the grid as samples.png and logs both.

    Returns, on the main process, the metrics and the sampling settings they were measured with (empty without
    metrics, and on the other processes).
    """
    pipe.set_progress_bar_config(disable=True)
    settings = pipe.sampling_settings(args.validation_num_inference_steps, args.validation_guidance_scale)
    num_inference_steps, guidance_scale = settings["num_inference_steps"], settings["guidance_scale"]
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=args.seed,
                    accelerator=accelerator)  # fmt: skip
    grid_images, _ = generate_for_evaluation(pipe, args.validation_grid_columns, **sampling)
    if args.validation_images_per_label:
        images, labels = generate_for_evaluation(pipe, args.validation_images_per_label, **sampling)
    if not accelerator.is_main_process:
        return {}
    class_names = list(pipe.unet.config.id2label.values())
    grid = labelled_grid(grid_images, class_names, columns=args.validation_grid_columns)
    grid.save(os.path.join(args.output_dir, "samples.png"))

    metrics = {}
    if evaluation is not None:
        scores = score_images(images, labels, evaluation, seed=args.seed)
        metrics = {
            "cond_accuracy": scores["cond_accuracy"]["overall"],
            "fid": scores["fid"],
            "fid_real_floor": scores["fid_real_floor"],
        }
        accelerator.log({f"validation/{name}": value for name, value in metrics.items()}, step=step)
        metrics.update(
            reference=evaluation.reference_name,
            images_per_label=args.validation_images_per_label,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance=settings["guidance"],  # classifier-free or autoguidance (a run with --guide_step)
            scheduler=type(pipe.scheduler).__name__,
            # where and how they were drawn: each process's share, on the accelerator's device
            device=accelerator.device.type,
            precision=accelerator.mixed_precision,
            images_per_process=math.ceil(len(labels) / accelerator.num_processes),
        )

    caption = f"step {step}: one row per class, fixed noise, {num_inference_steps} steps, guidance {guidance_scale}"
    if metrics:
        caption += f"; conditional accuracy {metrics['cond_accuracy']:.3f}, FID {metrics['fid']:.2f}"
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"validation/samples": wandb.Image(grid, caption=caption)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image("validation/samples", np.atleast_3d(np.asarray(grid)), step, dataformats="HWC")
    logger.info(f"Validation at step {step}: {metrics or 'grid only'}")
    return metrics


def save_loss_curve(history: list[tuple[int, float]], path: str) -> None:
    """The training loss against the step, as the seed plots it."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*history, strict=True)
    axes.plot(steps, losses)
    axes.set(xlabel="optimizer step", ylabel="MSE loss (noise prediction)", yscale="log", title="Training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
