"""Sharing a trained pipeline: its model card (README.md) and the upload to the Hugging Face Hub."""

import json
import os

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from .errors import TrainingError

# Run-time folders beside the pipeline that do not belong in a shared model repository or artifact.
RUN_LEFTOVERS = ("checkpoints", "logs", "wandb")
UPLOAD_IGNORE = [f"{folder}/**" for folder in RUN_LEFTOVERS] + [".*", ".*/**", "*.tmp*", "**/*.tmp*"]

CARD_TEMPLATE = """---
{metadata}
---

# {title}

A class-conditioned diffusion model: give it class labels, get images of those classes. A
`ClassConditionedUNet` (a diffusers `UNet2DModel` that receives a learned class embedding as extra input
channels) predicts the noise; the pipeline denoises with a `{scheduler}`.

![One row per class, from fixed noise](samples.png)

## Use it

With this project's `pipeline` package installed (`pip install -e .` in the project's repository):

```python
from pipeline import ClassConditionedDDIMPipeline

pipe = ClassConditionedDDIMPipeline.from_pretrained("{repo}")
images = pipe(class_labels=[{first}, {second}], num_images_per_label=4).images  # 4 of class {first}, then 4 of {second}
```

With diffusers alone: this folder carries the pipeline and model code, so no package is needed. It runs that code,
so pass `trust_remote_code=True` only for folders you trust:

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)
images = pipe(class_labels=[{first}, {second}]).images
```

From the command line: `python sample.py --model {repo} --class_labels {first} {second} --output grid.png`.

Classes: {classes}.

## Demo

In the project's repository, `pip install -e ".[demo]" && python app.py --model {repo}` serves a page on
http://127.0.0.1:7860: pick classes, watch them being denoised, download the grid.

As a Hugging Face Space: create a Space with the Gradio SDK holding the project's `app.py` and `pipeline/` folder
and a `requirements.txt` with `torch`, `torchvision`, `diffusers` and `safetensors`, then set the Space variable
`MODEL` to this model's id. The app reads `MODEL`, and listens where the Space tells it (`GRADIO_SERVER_NAME`,
`GRADIO_SERVER_PORT`).

## Training

Dataset: {dataset}. {training_line}

| setting | value |
| --- | --- |
{config_rows}

## Evaluation

{metrics_text}
"""

GUIDANCE_NAMES = {"cfg": "classifier-free guidance", "autoguidance": "autoguidance (away from its guide network)"}
CONFIG_KEYS = [
    "image_column", "label_column", "resolution", "global_batch_size",
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "num_epochs", "max_train_steps", "use_ema", "class_dropout_prob", "num_train_timesteps", "beta_schedule",
    "prediction_type", "snr_gamma", "block_out_channels", "layers_per_block", "down_block_types", "class_emb_size",
    "time_class_embedding", "mixed_precision", "seed", "default_scheduler", "default_num_inference_steps",
    "default_timestep_spacing", "default_guidance_scale", "default_guidance_interval", "guide_step", "teacher_guidance",
    "teacher_guidance_scale", "num_ddim_timesteps", "huber_c",
]  # fmt: skip


def write_model_card(output_dir: str, config: dict, summary: dict, id2label: dict, scheduler: str) -> None:
    """Write `output_dir/README.md`: metadata, sample grid, usage for both loading ways, training set-up, metrics."""
    dataset = config["dataset"]
    is_hub_dataset = not os.path.isdir(dataset)
    metadata = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "class-conditional", "image-generation", "pytorch"]
        + (["mnist"] if "mnist" in dataset.lower() else [])
        + (["ddim"] if scheduler == "DDIMScheduler" else [])
        + (["consistency-distillation"] if config.get("teacher") else []),
        datasets=[dataset] if is_hub_dataset else None,
    )
    # --max_train_steps overrides --num_epochs: list only the one that decided the run's length.
    overridden = "num_epochs" if config.get("max_train_steps") else "max_train_steps"
    config_keys = [key for key in CONFIG_KEYS if key in config and key != overridden]
    metrics = summary.get("final_metrics") or {}
    if metrics:
        steps = metrics["num_inference_steps"]
        metrics_text = (
            f"On {metrics['images_per_label']} images per class ({steps} {metrics['scheduler']} "
            f"step{'' if steps == 1 else 's'}, guidance scale {metrics['guidance_scale']}, one sampling seed), judged "
            f"by the evaluation classifier against the {metrics.get('reference', 'validation')} reference (real images "
            "held out from the classifier; see the project's README, \"Evaluation\"):\n\n"
            "| conditional accuracy | classifier FID | real-data FID floor |\n| --- | --- | --- |\n"
            f"| {metrics['cond_accuracy']:.4f} | {metrics['fid']:.2f} | {metrics['fid_real_floor']:.2f} |\n\n"
            "The floor is the FID of as many real held-out images with the same labels: the best score at this "
            "sample size. These are the quick figures logged during training; for reportable ones (test reference, "
            "three seeds) run `python -m pipeline.evaluate --model THIS_FOLDER --seeds 0 1 2`."
        )
    else:
        metrics_text = "Not measured during training; run `python -m pipeline.evaluate --model THIS_FOLDER`."
    training_line = (
        f"{summary['global_step']} optimizer steps of {summary['global_batch_size']} images on "
        f"{summary['num_processes']} {summary['device']} process(es), "
        f"{summary.get('total_train_time_s', summary['wall_time_s']) / 60:.1f} minutes."
    )
    if config.get("teacher"):
        training_line += (
            f" Distilled from the pipeline `{os.path.basename(os.path.normpath(config['teacher']))}` by consistency "
            f"distillation ([Luo et al. 2023](https://huggingface.co/papers/2310.04378)) on its "
            f"{config['num_ddim_timesteps']}-step DDIM grid, with its "
            f"{GUIDANCE_NAMES[config.get('teacher_guidance', 'cfg')]} at scale {config['teacher_guidance_scale']} "
            "built in: sample it unguided, with `LCMScheduler`, in 1 to 4 steps."
        )
    content = CARD_TEMPLATE.format(
        metadata=metadata.to_yaml(),
        title=os.path.basename(os.path.abspath(output_dir)),
        scheduler=scheduler,
        repo=config.get("hub_model_id") or "PATH_TO_THIS_FOLDER",
        classes=", ".join(f"{class_id} = {name!r}" for class_id, name in id2label.items()),
        # the examples ask for two of this model's classes (3 and 7 for digits), by id
        first=3 if len(id2label) > 7 else 0,
        second=7 if len(id2label) > 7 else 1,
        dataset=f"[{dataset}](https://huggingface.co/datasets/{dataset})"
        if is_hub_dataset
        else f"the local folder `{local_dataset_name(dataset)}`",
        training_line=training_line,
        config_rows="\n".join(f"| `{key}` | {json.dumps(config[key])} |" for key in config_keys),
        metrics_text=metrics_text,
    )
    ModelCard(content).save(os.path.join(output_dir, "README.md"))


def local_dataset_name(folder: str) -> str:
    """A local dataset folder as people know it: relative to the working directory when inside it (`data/mnist`),
    else its name alone (a model card is shared: no absolute paths of this machine)."""
    relative = os.path.relpath(os.path.abspath(folder))
    return os.path.basename(os.path.normpath(folder)) if relative.startswith("..") else relative


def push_folder(output_dir: str, hub_model_id: str, hub_token: str | None) -> str:
    """Upload the saved pipeline folder (not checkpoints or logs) to `hub_model_id`; return the repo URL.

    Raises:
        [`TrainingError`]: when the upload fails (network, auth, offline mode, a bad id); the message says that the
        local folder is complete and how to upload it later.
    """
    try:
        repo_id = create_repo(hub_model_id, token=hub_token, exist_ok=True).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, token=hub_token, ignore_patterns=UPLOAD_IGNORE)
    # huggingface_hub's network, auth and offline-mode errors are OSErrors; a malformed id is a ValueError.
    except (OSError, ValueError) as error:
        raise TrainingError(
            f"The pipeline is saved in {output_dir}, but pushing it to the Hub as {hub_model_id!r} failed: "
            f"{type(error).__name__}: {error}. Upload it later with `hf upload {hub_model_id} {output_dir}`."
        ) from error
    return f"https://huggingface.co/{repo_id}"
