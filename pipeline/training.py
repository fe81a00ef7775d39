"""The training loop: `train(args)` reads top to bottom, in the order of diffusers' `train_unconditional.py`.

Randomness is a function of the run, not of the machine (`pipeline/batches.py`), so any split of the global batch
over processes and accumulation steps trains the same model, and a resumed run continues exactly where it stopped.
The helpers beside `train` keep the loop short: stop signals, the divergence check, the logging window, and the end
of the run (final pipeline, summary, model card).
"""

import argparse
import functools
import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils.torch_utils import is_compiled_module
from tqdm.auto import tqdm

from .batches import draw_global_batch_noise, epoch_permutation, local_chunk
from .checkpointing import (
    ARCHITECTURE_FLAGS,
    RECIPE_FLAGS,
    checkpoint_bytes,
    ensure_free_space,
    find_checkpoint,
    guide_dir,
    list_checkpoints,
    load_checkpoint,
    pipeline_bytes,
    save_checkpoint,
    save_pipeline,
)
from .config import check_resolution
from .data import DataFormat, ImageClassData, load_split
from .errors import TrainingError, UsageError, one_line_errors
from .evaluate import EvaluationSet, load_evaluation_set
from .hub import push_folder, write_model_card
from .modeling_class_conditioned_unet import ClassConditionedUNet
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline, bytes_per_image, free_memory_bytes
from .run_folder import claim_output_dir, on_main_process, release_lock, remove_if_empty
from .schedulers import set_scheduler
from .validation import (
    log_model_artifact,
    log_validation,
    save_loss_curve,
    tracker_init_kwargs,
    tracker_names,
    wandb_run_id,
)

logger = get_logger(__name__)

CPU_MICRO_BATCH_SIZE = 128  # the fastest micro-batch for the seed model on a 2-core AVX2 CPU (bench/)


def build_model(args: argparse.Namespace, train_data: ImageClassData) -> ClassConditionedUNet:
    """The model from `--model_config` (a `config.json`) or from the architecture flags, for the data's image shape
    and classes."""
    channels, resolution, _ = train_data.image_shape
    label_names = train_data.label_names
    if args.model_config:
        config = ClassConditionedUNet.load_config(args.model_config)
    else:
        config = {
            "block_out_channels": tuple(args.block_out_channels),
            "layers_per_block": args.layers_per_block,
            "down_block_types": tuple(args.down_block_types),
            "up_block_types": tuple(args.up_block_types),
            "attention_head_dim": args.attention_head_dim,
            "class_emb_size": args.class_emb_size,
            "norm_num_groups": args.norm_num_groups,
            "time_class_embedding": args.time_class_embedding,
        }
    # The data decides the image shape and the classes; the names travel with the model so pipelines accept them.
    if args.model_config and (config.get("in_channels", 1), config.get("sample_size", 28)) != (channels, resolution):
        raise UsageError(
            f"--model_config {args.model_config} is for {config.get('in_channels', 1)}-channel images of "
            f"{config.get('sample_size', 28)} pixels, but the data is {channels}-channel at {resolution}; pass "
            f"--resolution {config.get('sample_size', 28)} or another config."
        )
    config.update(
        in_channels=channels,
        out_channels=channels,
        sample_size=resolution,
        num_classes=len(label_names),
        id2label=dict(enumerate(label_names)),
        class_dropout_prob=args.class_dropout_prob,
    )
    try:
        model = ClassConditionedUNet.from_config(config)
    except (TypeError, ValueError) as error:  # e.g. "layers_per_block": "two" in a hand-written config
        raise UsageError(f"Cannot build the model from {args.model_config or 'the model flags'}: {error}") from error
    # The data's own size, found before training (a --resolution flag was checked when parsed)
    check_resolution(resolution, model.config.block_out_channels, f"The images' size, {resolution} pixels,",
                     "--resolution with ")  # fmt: skip
    return model


def diffusion_loss(
    model_output: torch.Tensor,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDIMScheduler,
    snr_gamma: float | None,
) -> torch.Tensor:
    """MSE against the scheduler's prediction target, optionally weighted by min-SNR-gamma (Hang et al., 2023).

    Min-SNR caps the weight of the nearly clean timesteps, whose easy targets otherwise dominate the gradient.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    else:
        raise UsageError(f"Unknown prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'.")
    if snr_gamma is None:
        return F.mse_loss(model_output.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    # For epsilon the per-sample loss is in units of 1/SNR of the x0 error, for v in units of 1/(SNR + 1).
    weights = snr.clamp(max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def denoising_loss(
    model: torch.nn.Module,
    clean_images: torch.Tensor,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDIMScheduler,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Training's objective: noise the images to their timesteps and score the model's prediction."""
    # forward diffusion process: add noise to the clean images according to each timestep
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    model_output = model(noisy_images, timesteps, class_labels).sample
    return diffusion_loss(model_output, clean_images, noise, timesteps, noise_scheduler, snr_gamma)


def build_pipeline(
    accelerator: Accelerator,
    model: torch.nn.Module,
    ema_model: EMAModel | None,
    noise_scheduler: DDIMScheduler,
    args: argparse.Namespace,
    task: "Task",
    step: int,
) -> ClassConditionedDDIMPipeline:
    """A pipeline around a float32 copy of the trained weights (EMA weights when EMA is on), on the accelerator's
    device so that validation samples there. Call on every process.

    It carries the run's sampling defaults (`--default_scheduler`, `--default_num_inference_steps`,
    `--default_guidance_scale`, `--default_guidance_interval`), so that `pipe(class_labels)` uses the recipe's best
    measured setting.

    `get_state_dict` strips the DDP wrapper; the copy leaves the model being trained untouched.
    """
    state_dict = accelerator.get_state_dict(model)
    # torch.compile's wrapper prefixes every key; the saved model is the plain module.
    state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in state_dict.items()}
    unet = ClassConditionedUNet.from_config(accelerator.unwrap_model(model).config).to(accelerator.device)
    unet.load_state_dict(state_dict)
    if ema_model is not None:
        ema_model.copy_to(unet.parameters())
    guide_unet = None
    if args.guide_step and step > args.guide_step:  # after --guide_step: the guide `save_guide` kept then
        guide_unet = ClassConditionedUNet.from_pretrained(guide_dir(args.output_dir), use_safetensors=True)
        guide_unet = guide_unet.to(accelerator.device).eval()
    pipeline = ClassConditionedDDIMPipeline(
        unet=unet.float().eval(),
        scheduler=noise_scheduler,
        default_num_inference_steps=args.default_num_inference_steps,
        default_guidance_scale=args.default_guidance_scale,
        default_guidance_interval=list(args.default_guidance_interval),
        guide_unet=guide_unet,
        default_guidance="autoguidance" if guide_unet is not None else "cfg",
    )
    check_devices(accelerator.device, {"validation pipeline": pipeline.unet, "guide": guide_unet})
    set_scheduler(pipeline, args.default_scheduler)
    task.finish_pipeline(pipeline)
    return pipeline


def check_step_memory(args: argparse.Namespace, resolution: int, micro_batch_size: int, device: torch.device) -> None:
    """Refuse a resolution whose training pass cannot fit in free memory, before data is decoded at that size.

    A lower bound per image: the sampling estimate (`bytes_per_image`) three times over (the activations kept for the
    backward pass, their gradients, the forward itself).
    """
    needed = micro_batch_size * 3 * bytes_per_image(1, resolution, args.block_out_channels)
    free = free_memory_bytes(device)
    if free is not None and needed > free:
        raise UsageError(
            f"At --resolution {resolution}, one training pass of {micro_batch_size} images needs at least "
            f"{needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on {device}; lower --resolution or "
            "--micro_batch_size."
        )


def micro_batch_size_for(args: argparse.Namespace, on_cpu: bool) -> int:
    """Images per forward/backward pass. On a CPU, large batches run slower per image (measured here: 28 img/s at 512
    against 58 img/s as 4 x 128), so by default a CPU splits each batch into the largest divisor up to 128."""
    if args.micro_batch_size:
        if args.train_batch_size % args.micro_batch_size:
            raise UsageError(
                f"--micro_batch_size {args.micro_batch_size} must divide --train_batch_size {args.train_batch_size}."
            )
        return args.micro_batch_size
    if not on_cpu:
        return args.train_batch_size
    return max(size for size in range(1, CPU_MICRO_BATCH_SIZE + 1) if args.train_batch_size % size == 0)


class Denoising:
    """Plain training's task (train_conditional.py): the diffusion loss from the seeded initialisation. The loop asks
    its task four things; `pipeline.distillation.Distillation` (distill.py) answers them for a student."""

    description = "training"
    ema_warmup = True  # the EMA decay warms up (diffusers' default), so the random initial weights fade quickly

    def __init__(self) -> None:
        self.modules: dict[str, torch.nn.Module] = {}  # the networks besides the model and its EMA

    def start(self, model: ClassConditionedUNet, label_names: list[str], device: torch.device) -> None:
        """Set the freshly built model's starting weights (plain training keeps the seeded initialisation)."""

    def objective(
        self, accelerator: Accelerator, model: torch.nn.Module, ema_model: EMAModel | None,
        noise_scheduler: DDIMScheduler, args: argparse.Namespace,
    ) -> Callable[..., torch.Tensor]:  # fmt: skip
        """The loss of one micro-batch: objective(model, clean_images, class_labels, noise, timesteps)."""
        return functools.partial(denoising_loss, noise_scheduler=noise_scheduler, snr_gamma=args.snr_gamma)

    def finish_pipeline(self, pipeline: ClassConditionedDDIMPipeline) -> None:
        """Anything the saved pipeline needs beyond the run's sampling defaults (nothing here)."""


Task = Denoising  # the interface; Distillation has the same attributes and methods


@dataclass
class StepPlan:
    """The step arithmetic: one optimizer step always consumes one global batch, whatever the launch set-up."""

    global_batch_size: int
    micro_batch_size: int
    micro_steps: int  # micro-batches per process per optimizer step (each one an accelerate accumulation step)
    steps_per_epoch: int
    max_train_steps: int


@dataclass
class TrainingImages:
    """The training split's first `num_samples` images and labels: on the training device, or (for a split too large
    for memory) read per batch from the memory-mapped datasets cache."""

    data: ImageClassData
    num_samples: int
    labels: torch.Tensor
    images: torch.Tensor | None

    def batch(self, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[indices] if self.images is not None else self.data.take(indices.cpu()).to(device)
        return images, self.labels[indices]


def start_accelerator(args: argparse.Namespace) -> tuple[Accelerator, int, int]:
    """The accelerator for the launch, with the micro-batch size and the micro-batches per optimizer step; refuses
    set-ups that would train something else than asked."""
    on_cpu = on_cpu_machine()
    micro_batch_size = micro_batch_size_for(args, on_cpu)
    # Every micro-batch is one accelerate accumulation step; gradients are synced once per optimizer step.
    micro_steps = args.gradient_accumulation_steps * (args.train_batch_size // micro_batch_size)
    trackers = tracker_names(args.report_to)
    refuse_sharding()
    accelerator = Accelerator(
        # Validation and the first run's evaluation-classifier training keep the other processes waiting in a
        # collective for minutes; torch's default timeout (10 minutes for NCCL) would kill the run (diffusers' examples
        # pass 7200 s the same way).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=micro_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
        # Without a GPU, accelerate only sets up gloo data parallelism when told to use the CPU: otherwise
        # `--multi_gpu --num_processes 2` silently starts two unconnected single-process runs.
        cpu=on_cpu,
    )
    if args.allow_tf32:  # Ampere+ GPUs: TF32 matmuls and convolutions, ~2x faster than fp32 at ~fp16 precision
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    check_launch(accelerator, args)
    return accelerator, micro_batch_size, micro_steps


def on_cpu_machine() -> bool:
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def load_training_images(accelerator: Accelerator, args: argparse.Namespace, micro_batch_size: int) -> TrainingImages:
    """The training split, decoded once into uint8 at the data's own size (or `--resolution`)."""
    if args.resolution:  # before decoding the data at that size
        check_step_memory(args, args.resolution, micro_batch_size, accelerator.device)
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others reuse it
        data_format = DataFormat(args.image_column, args.label_column, args.resolution)
        data = load_split(args.dataset, "train", data_format, in_memory=False if args.lazy_data else None)
    num_samples = min(len(data), args.max_train_samples or len(data))
    images = data.images[:num_samples].to(accelerator.device) if data.in_memory else None
    return TrainingImages(data, num_samples, data.labels[:num_samples].to(accelerator.device), images)


def check_labels(dataset: str, labels: torch.Tensor, num_classes: int) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise UsageError(
            f"Dataset {dataset!r} has labels outside 0..{num_classes - 1} (from {low} to {high}; -1 marks unlabelled "
            "rows): every training image needs one of its classes."
        )


def build_ema(
    args: argparse.Namespace, model: ClassConditionedUNet, task: Task, device: torch.device
) -> EMAModel | None:
    if not args.use_ema:
        return None
    ema_model = EMAModel(
        model.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=task.ema_warmup,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        model_cls=ClassConditionedUNet,
        model_config=model.config,
        foreach=True,  # one fused update instead of a kernel per parameter tensor
    )
    ema_model.to(device)
    return ema_model


def plan_steps(
    args: argparse.Namespace, num_processes: int, num_samples: int, micro_batch_size: int, micro_steps: int
) -> StepPlan:
    global_batch_size = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    steps_per_epoch = num_samples // global_batch_size  # the incomplete last batch is dropped
    if steps_per_epoch == 0:
        raise UsageError(
            f"The global batch ({global_batch_size} = {args.train_batch_size} per process x {num_processes} processes "
            f"x {args.gradient_accumulation_steps} accumulation steps) is larger than the dataset ({num_samples} "
            "images); lower --train_batch_size."
        )
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    return StepPlan(global_batch_size, micro_batch_size, micro_steps, steps_per_epoch, max_train_steps)


def run_recipe(args: argparse.Namespace, unet_config: dict) -> dict:
    """What defines the run: a checkpoint only continues it under the same values (checked on resume). The image
    size is the model's (the data's own unless --resolution), the architecture the built model's config."""
    recipe = {**{flag: getattr(args, flag, None) for flag in RECIPE_FLAGS},
              **{flag: unet_config[flag] for flag in ARCHITECTURE_FLAGS},
              "resolution": unet_config["sample_size"]}  # fmt: skip
    for flag in ("dataset", "teacher"):  # a folder however it is spelled; a Hub id as it is
        if recipe[flag] and os.path.isdir(os.path.expanduser(recipe[flag])):
            recipe[flag] = os.path.realpath(os.path.expanduser(recipe[flag]))
    return json.loads(json.dumps(recipe))  # as training_state.json holds it (tuples become lists)


def train(args: argparse.Namespace, task: Task | None = None) -> None:
    task = task or Denoising()
    run_time = RunTime(started=time.perf_counter())
    # 1. accelerator: processes, device, precision and torch.compile (`--dynamo_backend`) come from `accelerate launch`
    accelerator, micro_batch_size, micro_steps = start_accelerator(args)
    # Locked for this run, shared by every machine, holding nothing this run would wrongly replace.
    claim_output_dir(accelerator, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)

    # 2. data: decoded once into a uint8 tensor that lives on the training device
    images = load_training_images(accelerator, args, micro_batch_size)

    # 3. model (built after set_seed so the seed also fixes the initial weights), EMA, noise scheduler, optimizer
    set_seed(args.seed)
    model = build_model(args, images.data)
    check_labels(args.dataset, images.data.labels, model.config.num_classes)
    task.start(model, images.data.label_names, accelerator.device)  # a student starts as a copy of its teacher
    ema_model = build_ema(args, model, task, accelerator.device)
    noise_scheduler = DDIMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
        timestep_spacing=args.default_timestep_spacing,  # in the saved config, so every sampler keeps it
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    # Found now rather than after hours of training: room for a checkpoint and the final pipeline.
    checkpoint_size, pipeline_size = checkpoint_bytes(model, ema_model), pipeline_bytes(model)
    pipeline_size *= 2 if args.guide_step else 1  # the guide is a second network of the same size
    needed = pipeline_size + checkpoint_size * bool(args.checkpointing_steps)
    ensure_free_space(accelerator, args.output_dir, needed, "a checkpoint and the final pipeline")

    # 4. the step arithmetic, the LR schedule (stepped once per optimizer step by us, not by accelerate, whose prepared
    # scheduler steps once per process, so warmup and decay count optimizer steps whatever the launch set-up)
    steps = plan_steps(args, accelerator.num_processes, images.num_samples, micro_batch_size, micro_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=steps.max_train_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = task.objective(accelerator, model, ema_model, noise_scheduler, args)
    modules = {"model": model, "EMA": ema_model, **task.modules}
    check_devices(accelerator.device, modules)
    logger.info(f"On {accelerator.device}: {', '.join(name for name, module in modules.items() if module is not None)}")
    unet_config = accelerator.unwrap_model(model).config
    run_state = {"seed": args.seed, "global_batch_size": steps.global_batch_size,
                 "max_train_samples": images.num_samples, "recipe": run_recipe(args, unet_config)}  # fmt: skip

    # 5. resume: the data position and the noise follow from the global step alone
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    saved_state = {}
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")
        saved_state = load_checkpoint(accelerator, checkpoint, run_state, lr_scheduler, ema_model)
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint found in {args.output_dir}; starting a new run.")
    first_step = saved_state.get("global_step", 0)
    check_guide(args, first_step, steps.max_train_steps)
    run_time.resumed(saved_state)

    # 6. trackers (a resumed run continues its W&B run) and the evaluation set for the validation metrics
    settings = run_settings(args, unet_config)
    if accelerator.is_main_process:
        project, init_kwargs = tracker_init_kwargs(args, tracker_names(args.report_to), saved_state.get("wandb_run_id"))
        accelerator.init_trackers(project, config=tracker_config(settings), init_kwargs=init_kwargs)
    evaluation = load_validation_evaluation(accelerator, args, unet_config["sample_size"])
    check_devices(accelerator.device, {"evaluation classifier": evaluation and evaluation.classifier})
    log_banner(args, task, settings, images.num_samples, steps)

    # Train!
    training = Training(accelerator, args, task, model, ema_model, noise_scheduler, optimizer, lr_scheduler, objective,
                        images, steps, run_state, checkpoint_size, run_time, evaluation)  # fmt: skip
    global_step, window, divergence = train_loop(training, first_step)

    # 7. the final pipeline: exactly what `ClassConditionedDDIMPipeline.from_pretrained(output_dir)` loads
    accelerator.wait_for_everyone()
    divergence.raise_if_diverged(args.output_dir)
    pipeline = training.pipeline(global_step)
    # Saved before the final validation, so that nothing after it can cost the trained weights.
    on_main_process(accelerator, lambda: save_pipeline(pipeline, args.output_dir, needed_bytes=pipeline_size))
    logger.info(f"Saved the pipeline to {args.output_dir}")
    final_metrics = log_validation(accelerator, pipeline, args, global_step, evaluation)
    if accelerator.is_main_process:
        write_run_summary(accelerator, model, settings, pipeline, window, run_time, final_metrics,
                          global_step=global_step, steps_this_run=global_step - first_step)  # fmt: skip
        if args.wandb_log_model and wandb_run_id(accelerator):
            log_model_artifact(accelerator, args.output_dir)
    accelerator.end_training()

    if args.push_to_hub and accelerator.is_main_process:
        hub_model_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        logger.info(f"Pushed the pipeline to {push_folder(args.output_dir, hub_model_id, args.hub_token)}")
    release_lock(args.output_dir)  # the main process's, after the trackers' last writes and the upload


def save_guide(training: "Training") -> None:
    """Autoguidance's guide: the model as it stands now (its EMA weights when the run keeps one), kept with the
    checkpoints (`guide_dir`) so that a resumed run has it, and taken into the final pipeline as `guide_unet`."""
    guide = training.pipeline(training.args.guide_step).unet  # the model alone, as every process has it
    folder = guide_dir(training.args.output_dir)

    def write() -> None:  # whole, then renamed: a crash never leaves half a guide
        partial = f"{folder}.tmp"
        shutil.rmtree(partial, ignore_errors=True)
        guide.save_pretrained(partial, safe_serialization=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)

    on_main_process(training.accelerator, write)
    logger.info(f"Saved the autoguidance guide (step {training.args.guide_step}) to {folder}")


def check_guide(args: argparse.Namespace, first_step: int, max_train_steps: int) -> None:
    """--guide_step names a step this run passes, and a run resumed after it still has the guide it saved."""
    if not args.guide_step:
        return
    if args.guide_step >= max_train_steps:
        raise UsageError(f"--guide_step {args.guide_step} must come before the last step ({max_train_steps}).")
    if first_step >= args.guide_step and not os.path.isdir(guide_dir(args.output_dir)):
        raise UsageError(
            f"This run resumes at step {first_step}, after --guide_step {args.guide_step}, but its guide "
            f"({guide_dir(args.output_dir)}) is gone; resume from a checkpoint before step {args.guide_step}."
        )


@dataclass
class Training:
    """What the loop works on, built once by `train`."""

    accelerator: Accelerator
    args: argparse.Namespace
    task: Task
    model: torch.nn.Module
    ema_model: EMAModel | None
    noise_scheduler: DDIMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Callable[..., torch.Tensor]
    images: TrainingImages
    steps: StepPlan
    run_state: dict  # what every checkpoint records and a resume must match
    checkpoint_size: int
    run_time: "RunTime"
    evaluation: EvaluationSet | None

    def pipeline(self, step: int) -> ClassConditionedDDIMPipeline:
        """The pipeline of the model after `step` (with the guide once past --guide_step)."""
        return build_pipeline(self.accelerator, self.model, self.ema_model, self.noise_scheduler, self.args, self.task,
                              step)  # fmt: skip


def train_loop(training: Training, first_step: int) -> tuple[int, "LoggingWindow", "DivergenceCheck"]:
    """From `first_step` to the last: every optimizer step, its logging, checkpoints, stop signals and validation.
    Returns the last step, the logging window and the divergence check for the end of the run."""
    accelerator, args, model, steps, images = (training.accelerator, training.args, training.model, training.steps,
                                               training.images)  # fmt: skip
    null_class_id = accelerator.unwrap_model(model).null_class_id
    on_cpu = on_cpu_machine()
    stop_signals = StopSignals(accelerator)
    divergence = DivergenceCheck(accelerator)
    window = LoggingWindow(accelerator, steps.global_batch_size, first_step)
    progress_bar = tqdm(range(steps.max_train_steps), initial=first_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)  # fmt: skip
    model.train()
    global_step = first_step
    permutation_epoch, permutation = None, None
    while global_step < steps.max_train_steps:
        epoch, batch_in_epoch = divmod(global_step, steps.steps_per_epoch)
        if epoch != permutation_epoch:
            permutation_epoch = epoch
            permutation = epoch_permutation(args.seed, epoch, images.num_samples).to(accelerator.device)
        batch_slice = slice(batch_in_epoch * steps.global_batch_size, (batch_in_epoch + 1) * steps.global_batch_size)
        global_images, global_labels = images.batch(permutation[batch_slice], accelerator.device)
        # Noise, timesteps and class dropout for the whole global batch; each process slices its own part.
        draw = draw_global_batch_noise(args.seed, global_step, global_images.shape, args.num_train_timesteps,
                                       args.class_dropout_prob, accelerator.device)  # fmt: skip
        log_this_step = (global_step + 1) % args.logging_steps == 0 or global_step + 1 == steps.max_train_steps

        for micro_step in range(steps.micro_steps):
            local = local_chunk(micro_step, accelerator.process_index, accelerator.num_processes,
                                steps.micro_batch_size)  # fmt: skip
            with accelerator.accumulate(model):
                clean_images = global_images[local].float() / 127.5 - 1  # uint8 0..255 -> [-1, 1], as in the seed
                class_labels = torch.where(draw.dropped[local], null_class_id, global_labels[local])
                loss = training.objective(model, clean_images, class_labels, draw.noise[local], draw.timesteps[local])

                accelerator.backward(loss)
                if accelerator.sync_gradients and (args.max_grad_norm or log_this_step):
                    # With max_norm=inf this only measures the norm (grads are multiplied by exactly 1.0).
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                training.optimizer.step()
                training.optimizer.zero_grad(set_to_none=True)
            window.add(loss.detach() / steps.micro_steps)  # the step's loss: the mean over its micro-batches
            divergence.record(loss.detach(), global_step + 1)

        # One optimizer step is done (accelerate synced the gradients on the last micro step).
        training.lr_scheduler.step()
        if training.ema_model is not None:
            training.ema_model.step(model.parameters())
        global_step += 1
        progress_bar.update(1)

        # check_trigger reads a flag back from the device: on a GPU only at steps that sync anyway, so that the host
        # can queue the next step while this one runs (a stop then waits at most --logging_steps steps).
        save_due = bool(args.checkpointing_steps) and global_step % args.checkpointing_steps == 0
        stop_requested = accelerator.check_trigger() if (on_cpu or log_this_step or save_due) else False
        guide_due = global_step == args.guide_step
        if log_this_step or save_due or stop_requested or guide_due:
            divergence.raise_if_diverged(args.output_dir)  # nothing is logged or saved from a diverged run
        if guide_due:  # before this step's checkpoint: a run resumed from it (or a later one) finds its guide
            save_guide(training)
        if log_this_step:
            logs = {**window.close(global_step), "lr": training.lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(), "epoch": global_step / steps.steps_per_epoch}  # fmt: skip
            if training.ema_model is not None:
                logs["ema_decay"] = training.ema_model.cur_decay_value
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_s']:.0f}")
            accelerator.log(logs, step=global_step)
        if save_due or stop_requested:
            run_time = training.run_time
            checkpoint = save_checkpoint(
                accelerator, args.output_dir, global_step, args.checkpoints_total_limit,
                {**training.run_state, "train_time_s": run_time.total_s(), "segment": run_time.segment,
                 "wandb_run_id": wandb_run_id(accelerator)},
                training.lr_scheduler, training.ema_model, needed_bytes=training.checkpoint_size,
            )  # fmt: skip
        if stop_requested:
            raise stop_signals.stopped_error(global_step, steps.max_train_steps, checkpoint)
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < steps.max_train_steps:
            log_validation(accelerator, training.pipeline(global_step), args, global_step,
                           training.evaluation)  # fmt: skip
    progress_bar.close()
    return global_step, window, divergence


def run(args: argparse.Namespace, task: Task | None = None) -> None:
    """What `train_conditional.py` and `distill.py` run: `train(args, task)` behind the one error path (one line and
    the error's exit code); a failed start leaves no folder it created behind."""
    created_output_dir = not os.path.exists(args.output_dir)

    def leave_no_empty_folder() -> None:
        # Only the process that took the lock cleans up: a run refused because another holds the folder leaves it.
        if release_lock(args.output_dir) and created_output_dir:
            remove_if_empty(args.output_dir)

    with one_line_errors(on_error=leave_no_empty_folder):  # bad input, or a run that could not go on
        train(args, task)


def check_launch(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Refuse launch set-ups that would silently train something else than asked."""
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched_processes:
        raise UsageError(
            f"The launcher started {launched_processes} processes but accelerate sees {accelerator.num_processes}: "
            "they would train independently. Launch with a config whose distributed_type is MULTI_GPU (with "
            "use_cpu: true on CPU machines), e.g. accelerate_configs/multi_cpu.yaml."
        )
    if args.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        # accelerate would silently run fp32 here while reporting fp16; say so instead.
        raise UsageError(
            "--mixed_precision fp16 needs a CUDA GPU (it relies on a gradient scaler); on this "
            f"{accelerator.device.type} device use --mixed_precision bf16 or no."
        )


def refuse_sharding() -> None:
    """Stop with one line when the launcher asked for FSDP or DeepSpeed (it says so in its environment variables).

    Checked before the accelerator is built: on a machine without a GPU accelerate fails there with its own traceback
    for FSDP, and quietly falls back to DDP for DeepSpeed.
    """
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "").lower() == "true":
            raise UsageError(
                f"This script trains with DDP; {name} is not supported (the models fit on one device, and accelerate "
                f"1.15 runs {name} on GPUs only, so no test here could check it). Launch with "
                "accelerate_configs/multi_gpu.yaml or multi_node.yaml instead."
            )


def check_devices(device: torch.device, modules: dict[str, torch.nn.Module | EMAModel | None]) -> None:
    """Every module a run uses lives on the accelerator's `device`; raise naming any that does not.

    A module left on the CPU of a GPU run fails at its first call with a device-mismatch error (or, for evaluation,
    runs on one CPU thread while the GPUs idle). A bug, not bad input: a plain RuntimeError with its traceback.
    """
    misplaced = []
    for name, module in modules.items():
        if module is None:
            continue
        tensors = module.shadow_params if isinstance(module, EMAModel) else [*module.parameters(), *module.buffers()]
        # "cpu" and "cpu:0" are one device; so are "cuda:0" and the accelerator's "cuda" of process 0
        elsewhere = {str(tensor.device) for tensor in tensors
                     if (tensor.device.type, tensor.device.index or 0) != (device.type, device.index or 0)}  # fmt: skip
        if elsewhere:
            misplaced.append(f"{name} on {', '.join(sorted(elsewhere))}")
    if misplaced:
        raise RuntimeError(f"Not on the accelerator's device {device}: {'; '.join(misplaced)}.")


def load_validation_evaluation(
    accelerator: Accelerator, args: argparse.Namespace, resolution: int
) -> EvaluationSet | None:
    """The main process's evaluation set for the validation metrics (None when they are off or on other processes).

    It scores against the validation reference: what training shows may steer choices, so it never scores the model
    against the test split. The classifier is trained once per dataset and cached.
    """
    if not args.validation_images_per_label:
        return None

    def load() -> EvaluationSet:
        data_format = DataFormat(args.image_column, args.label_column, resolution)
        evaluation = load_evaluation_set(
            args.dataset, "validation", args.classifier_cache_dir, args.classifier_train_samples, data_format
        )
        smallest_class = int(evaluation.floor_pool.labels.bincount().min())
        if args.validation_images_per_label > smallest_class:  # found now, not after training
            raise UsageError(
                f"--validation_images_per_label {args.validation_images_per_label} is more than the real-data floor's "
                f"pool holds for its smallest class ({smallest_class}); lower it."
            )
        return evaluation.to(accelerator.device)  # scored where the images are drawn

    return on_main_process(accelerator, load)


def log_banner(args: argparse.Namespace, task: Task, settings: dict, num_samples: int, steps: StepPlan) -> None:
    if args.preset:
        logger.info(f"Preset {args.preset!r}; the run's settings: {json.dumps(tracker_config(settings))}")
    logger.info(f"***** Running {task.description} *****")
    logger.info(f"  Num examples = {num_samples}")
    logger.info(f"  Num epochs = {math.ceil(steps.max_train_steps / steps.steps_per_epoch)}")
    logger.info(f"  Batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {steps.global_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Micro-batch size = {steps.micro_batch_size} ({steps.micro_steps} passes per process per optimizer "
                "step)")  # fmt: skip
    logger.info(f"  Total optimization steps = {steps.max_train_steps}")


@dataclass
class RunTime:
    """A run's wall time across resumes: the earlier segments' time, as their checkpoint recorded it, plus this one's
    (from process start)."""

    started: float
    earlier_segments_s: float = 0.0
    segment: int = 1

    def resumed(self, saved_state: dict) -> None:
        if saved_state:
            self.earlier_segments_s = saved_state.get("train_time_s", 0.0)
            self.segment = saved_state.get("segment", 1) + 1

    def segment_s(self) -> float:
        return time.perf_counter() - self.started

    def total_s(self) -> float:
        return round(self.earlier_segments_s + self.segment_s(), 2)


class StopSignals:
    """SIGTERM (what schedulers send before preemption) or Ctrl-C: finish the step, checkpoint, exit.

    accelerate's trigger is an all-reduced flag, so every process stops after the same step even if only one got the
    signal. A second signal stops at once.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)

    def request_stop(self, signum: int, frame) -> None:
        self.received.append(signum)
        self.accelerator.set_trigger()
        signal.signal(signum, signal.SIG_DFL)

    def stopped_error(self, global_step: int, max_train_steps: int, checkpoint: str) -> TrainingError:
        name = signal.Signals(self.received[0]).name if self.received else "a signal on another process"
        return TrainingError(
            f"Stopped by {name} after step {global_step} of {max_train_steps}; saved {checkpoint}. Resume with the "
            "same command plus --resume_from_checkpoint latest.",
            exit_code=128 + (self.received[0] if self.received else signal.SIGTERM),
        )


class DivergenceCheck:
    """The first step whose loss was not finite, kept on the device (no per-step sync) and checked before anything
    is logged or saved, so a diverged run never writes a checkpoint or pipeline of garbage."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad_step = torch.where((self.first_bad_step == 0) & ~torch.isfinite(loss), step, self.first_bad_step)

    def raise_if_diverged(self, output_dir: str) -> None:
        bad_step = int(self.accelerator.reduce(self.first_bad_step, reduction="max").item())  # 0: every loss finite
        if bad_step:
            checkpoints = list_checkpoints(output_dir)
            raise TrainingError(
                f"The loss became NaN or infinite at step {bad_step}; stopping instead of training on garbage. Last "
                f"good checkpoint: {checkpoints[-1] if checkpoints else 'none'}. Lower --learning_rate or set "
                "--max_grad_norm."
            )


class LoggingWindow:
    """The mean loss and the throughput over the steps since the last log: the loss is summed on the device and read
    back (a sync) once per log, not once per step."""

    def __init__(self, accelerator: Accelerator, global_batch_size: int, first_step: int):
        self.accelerator = accelerator
        self.global_batch_size = global_batch_size
        self.running_loss = torch.zeros((), device=accelerator.device)
        self.last_step, self.started = first_step, time.perf_counter()
        self.loop_started = self.started
        self.loss_history: list[tuple[int, float]] = []  # (step, mean loss of the window) of this segment
        self.mean_loss = self.last_images_per_s = float("nan")  # the last window's: steady state, after warm-up

    def add(self, loss: torch.Tensor) -> None:
        self.running_loss += loss

    def close(self, global_step: int) -> dict:
        """The window's mean loss (over processes too) and images/s; the next window starts now."""
        now, steps = time.perf_counter(), global_step - self.last_step
        self.mean_loss = self.accelerator.reduce(self.running_loss, reduction="mean").item() / steps
        self.last_images_per_s = steps * self.global_batch_size / (now - self.started)
        self.loss_history.append((global_step, self.mean_loss))
        self.running_loss.zero_()
        self.last_step, self.started = global_step, now
        return {"loss": self.mean_loss, "images_per_s": self.last_images_per_s}


def write_run_summary(
    accelerator: Accelerator,
    model: torch.nn.Module,
    settings: dict,
    pipeline: ClassConditionedDDIMPipeline,
    window: LoggingWindow,
    run_time: RunTime,
    final_metrics: dict,
    global_step: int,
    steps_this_run: int,
) -> None:
    """Main process: `training_summary.json`, the loss curve and the model card (README.md) of a finished run."""
    loop_time = time.perf_counter() - window.loop_started
    if window.loss_history:
        save_loss_curve(window.loss_history, os.path.join(settings["output_dir"], "loss_curve.png"))
    global_batch_size = window.global_batch_size
    summary = {
        "global_step": global_step,
        "steps_this_run": steps_this_run,
        "final_loss": window.mean_loss,
        "global_batch_size": global_batch_size,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
        "compiled": is_compiled_module(model),  # what prepare() returned, not just what was asked for
        "process_group_timeout_s": process_group_timeout_s(),
        "wall_time_s": round(run_time.segment_s(), 2),  # this segment (process start to summary)
        "total_train_time_s": run_time.total_s(),
        "segments": run_time.segment,
        "train_loop_s": round(loop_time, 2),
        "images_per_s": round(steps_this_run * global_batch_size / loop_time, 2),
        "images_per_s_last_window": round(window.last_images_per_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "final_metrics": final_metrics,
        "loss_history": window.loss_history,
    }
    with open(os.path.join(settings["output_dir"], "training_summary.json"), "w") as file:
        json.dump(summary, file, indent=2)
    write_model_card(settings["output_dir"], settings, summary, pipeline.unet.config.id2label,
                     type(pipeline.scheduler).__name__)  # fmt: skip


def process_group_timeout_s() -> float | None:
    """The collective timeout the default process group really has (None in a single-process run)."""
    if not torch.distributed.is_initialized():
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # private in torch 2.14: a diagnostic for the summary, never a reason to fail a finished run
        return torch.distributed.group.WORLD._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None


def run_settings(args: argparse.Namespace, unet_config: dict) -> dict:
    """The run's settings as the trackers, the banner and the model card record them: the flags, with the image size
    the model was built for (the data's own unless --resolution)."""
    return {**vars(args), "resolution": unet_config["sample_size"]}


def tracker_config(settings: dict) -> dict:
    """The settings with lists turned into strings, since TensorBoard's hparams take scalars only."""
    return {
        key: json.dumps(value) if isinstance(value, (list, tuple)) else value
        for key, value in settings.items()
        if value is not None
    }
