"""The training loop: `train(args)` reads top to bottom, in the order of diffusers' `train_unconditional.py`.

Randomness is a function of the run, not of the machine: the data order depends only on (seed, epoch) and each
step's noise, timesteps and class dropout only on (seed, global step), drawn for the whole global batch and sliced.
So 1 process x B, 2 processes x B/2 and 1 process x B/2 with 2 accumulation steps train the same model, and a run
resumed from a checkpoint continues exactly where it stopped.
"""

import argparse
import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
from .data import load_split
from .modeling_class_conditioned_unet import ClassConditionedUNet
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline

logger = get_logger(__name__)


def build_model(args: argparse.Namespace, label_names: list[str]) -> ClassConditionedUNet:
    """The model from `--model_config` (a `config.json`) or from the architecture flags."""
    if args.model_config:
        config = ClassConditionedUNet.load_config(args.model_config)
    else:
        config = {
            "block_out_channels": tuple(args.block_out_channels),
            "layers_per_block": args.layers_per_block,
            "class_emb_size": args.class_emb_size,
            "norm_num_groups": args.norm_num_groups,
            "sample_size": args.resolution,
        }
    # The dataset decides the classes; the names travel with the model so pipelines accept them.
    config.update(
        num_classes=len(label_names),
        id2label=dict(enumerate(label_names)),
        class_dropout_prob=args.class_dropout_prob,
    )
    return ClassConditionedUNet.from_config(config)


def global_step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for everything random in one optimizer step: a function of (seed, step) alone."""
    return torch.Generator(device=device).manual_seed(seed * 2**32 + step)


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The order in which one epoch visits the samples: a function of (seed, epoch) alone."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 2**32 + epoch))


def build_pipeline(
    accelerator: Accelerator, model: torch.nn.Module, ema_model: EMAModel | None, noise_scheduler: DDIMScheduler
) -> ClassConditionedDDIMPipeline:
    """A pipeline around a float32 copy of the trained weights (EMA weights when EMA is on). Call on every process.

    `get_state_dict` gathers sharded weights under FSDP/DeepSpeed (a collective, hence every process) and strips the
    DDP wrapper; the copy leaves the model being trained untouched.
    """
    state_dict = accelerator.get_state_dict(model)
    unet = ClassConditionedUNet.from_config(accelerator.unwrap_model(model).config)
    unet.load_state_dict(state_dict)
    if ema_model is not None:
        ema_model.copy_to(unet.parameters())
    return ClassConditionedDDIMPipeline(unet=unet.float().eval(), scheduler=noise_scheduler)


def train(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    # 1. accelerator: processes, device and precision come from `accelerate launch` / its config file
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
        # Without a GPU, accelerate only sets up gloo data parallelism when told to use the CPU: otherwise
        # `--multi_gpu --num_processes 2` silently starts two unconnected single-process runs.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched_processes:
        raise ValueError(
            f"The launcher started {launched_processes} processes but accelerate sees {accelerator.num_processes}: "
            "they would train independently. Launch with a config whose distributed_type is MULTI_GPU (with "
            "use_cpu: true on CPU machines), e.g. accelerate_configs/multi_cpu.yaml."
        )
    if args.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        # accelerate would silently run fp32 here while reporting fp16; say so instead.
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (it relies on a gradient scaler); on this "
            f"{accelerator.device.type} device use --mixed_precision bf16 or no."
        )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # 2. data: decoded once into a uint8 tensor that lives on the training device
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others reuse it
        train_data = load_split(args.dataset, "train", args.resolution)
    num_samples = min(len(train_data), args.max_train_samples or len(train_data))
    images = train_data.images[:num_samples].to(accelerator.device)
    class_labels_all = train_data.labels[:num_samples].to(accelerator.device)

    # 3. model (built after set_seed so the seed also fixes the initial weights), EMA, noise scheduler, optimizer
    set_seed(args.seed)
    model = build_model(args, train_data.label_names)
    if int(train_data.labels.max()) >= model.config.num_classes:
        raise ValueError(
            f"Dataset labels go up to {int(train_data.labels.max())} but the model has "
            f"num_classes={model.config.num_classes}; fix --model_config or the dataset."
        )
    null_class_id = model.null_class_id
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=ClassConditionedUNet,
            model_config=model.config,
        )
        ema_model.to(accelerator.device)
    noise_scheduler = DDIMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)

    # 4. the step arithmetic: one optimizer step always consumes one global batch
    local_batch_size = args.train_batch_size
    global_batch_size = local_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch = num_samples // global_batch_size  # the incomplete last batch is dropped
    if steps_per_epoch == 0:
        raise ValueError(
            f"The global batch ({global_batch_size} = {local_batch_size} per process x "
            f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation "
            f"steps) is larger than the dataset ({num_samples} images); lower --train_batch_size."
        )
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    # The LR schedule is stepped once per optimizer step by us, not by accelerate (whose prepared scheduler steps
    # once per process), so warmup and decay count optimizer steps whatever the launch set-up.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema_model is not None:
        accelerator.register_for_checkpointing(ema_model)
    # What a checkpoint's data position and noise mean; resuming under other values would not continue the run.
    run_state = {"seed": args.seed, "global_batch_size": global_batch_size, "max_train_samples": num_samples}

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))

    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_samples}")
    logger.info(f"  Num epochs = {num_epochs}")
    logger.info(f"  Batch size per device = {local_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {global_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")

    # 5. resume: the data position and the noise follow from the global step alone
    global_step = 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info(f"No checkpoint found in {args.output_dir}; starting a new run.")
        else:
            logger.info(f"Resuming from {checkpoint}")
            global_step = load_checkpoint(accelerator, checkpoint, run_state)
    first_step = global_step

    # Train!
    progress_bar = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    model.train()
    permutation_epoch, permutation = None, None
    running_loss, steps_since_log, mean_loss = torch.zeros((), device=accelerator.device), 0, float("nan")
    loop_started = time.perf_counter()
    while global_step < max_train_steps:
        epoch, batch_in_epoch = divmod(global_step, steps_per_epoch)
        if epoch != permutation_epoch:
            permutation_epoch = epoch
            permutation = epoch_permutation(args.seed, epoch, num_samples).to(accelerator.device)
        global_indices = permutation[batch_in_epoch * global_batch_size : (batch_in_epoch + 1) * global_batch_size]

        # Noise, timesteps and class dropout for the whole global batch; each process slices its own part.
        generator = global_step_generator(args.seed, global_step, accelerator.device)
        global_noise = torch.randn(
            (global_batch_size, *images.shape[1:]), generator=generator, device=accelerator.device
        )
        global_timesteps = torch.randint(
            0, args.num_train_timesteps, (global_batch_size,), generator=generator, device=accelerator.device
        )
        global_dropped = torch.rand(global_batch_size, generator=generator, device=accelerator.device)
        global_dropped = global_dropped < args.class_dropout_prob

        for micro_step in range(args.gradient_accumulation_steps):
            # Chunk order (micro step, then process) matches how accelerate shards a dataloader's batches.
            chunk = micro_step * accelerator.num_processes + accelerator.process_index
            local = slice(chunk * local_batch_size, (chunk + 1) * local_batch_size)
            indices = global_indices[local]
            with accelerator.accumulate(model):
                clean_images = images[indices].float() / 127.5 - 1  # uint8 0..255 -> [-1, 1], as in the seed
                class_labels = torch.where(global_dropped[local], null_class_id, class_labels_all[indices])
                noise = global_noise[local]
                timesteps = global_timesteps[local]
                # forward diffusion process: add noise to the clean images according to each timestep
                noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

                model_output = model(noisy_images, timesteps, class_labels).sample
                loss = F.mse_loss(model_output.float(), noise)  # epsilon prediction

                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach() / args.gradient_accumulation_steps

        # One optimizer step is done (accelerate synced the gradients on the last micro step).
        lr_scheduler.step()
        if ema_model is not None:
            ema_model.step(model.parameters())
        global_step += 1
        steps_since_log += 1
        progress_bar.update(1)

        if global_step % args.logging_steps == 0 or global_step == max_train_steps:
            # .item() waits for the device, so it happens every logging_steps, not every step.
            mean_loss = accelerator.reduce(running_loss, reduction="mean").item() / steps_since_log
            running_loss.zero_()
            steps_since_log = 0
            if not math.isfinite(mean_loss):
                raise RuntimeError(
                    f"Loss became {mean_loss} at step {global_step}; stopping instead of training on garbage. "
                    "Lower --learning_rate or set --max_grad_norm."
                )
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
            if ema_model is not None:
                logs["ema_decay"] = ema_model.cur_decay_value
            progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)

        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, run_state)

    # 6. the final pipeline: exactly what `ClassConditionedDDIMPipeline.from_pretrained(output_dir)` loads
    loop_time = time.perf_counter() - loop_started
    progress_bar.close()
    accelerator.wait_for_everyone()
    pipeline = build_pipeline(accelerator, model, ema_model, noise_scheduler)
    if accelerator.is_main_process:
        pipeline.save_pretrained(args.output_dir)
        logger.info(f"Saved the pipeline to {args.output_dir}")
        summary = {
            "global_step": global_step,
            "steps_this_run": global_step - first_step,
            "final_loss": mean_loss,
            "global_batch_size": global_batch_size,
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),
            "mixed_precision": accelerator.mixed_precision,
            "device": accelerator.device.type,
            "wall_time_s": round(time.perf_counter() - started, 2),
            "train_loop_s": round(loop_time, 2),
            "images_per_s": round((global_step - first_step) * global_batch_size / loop_time, 2),
        }
        with open(os.path.join(args.output_dir, "training_summary.json"), "w") as file:
            json.dump(summary, file, indent=2)
    accelerator.end_training()


def tracker_config(args: argparse.Namespace) -> dict:
    """`vars(args)` with lists turned into strings, since TensorBoard's hparams take scalars only."""
    return {
        key: json.dumps(value) if isinstance(value, (list, tuple)) else value
        for key, value in vars(args).items()
        if value is not None
    }
