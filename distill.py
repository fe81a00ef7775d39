"""Distil a trained pipeline into a few-step student: `accelerate launch distill.py --teacher DIR --output_dir OUT`.

The student is a `ClassConditionedDDIMPipeline` like its teacher, saved with `LCMScheduler`, 4 steps and no guidance
as its sampling defaults, so `pipe(class_labels=[3, 7])`, `sample.py`, `python -m pipeline.evaluate` and `app.py` use
its few steps with no extra flag. The teacher's guidance is distilled in (pipeline/distillation.py). Every training
flag works as in train_conditional.py (data, optimisation, checkpoints and exact resume, trackers, SIGTERM); the
network, the noise schedule and the classes come from the teacher.
"""

import argparse
import json
import os

from train_conditional import build_parser, main, parse_args, positive_float, positive_int

# The student's recipe unless flags say otherwise: diffusers' LCM distillation defaults where they carry over (target
# EMA 0.95, pseudo-Huber c = 0.001, a 50-step DDIM grid), sized for a 2-core CPU.
DISTILLATION_DEFAULTS = {
    "global_batch_size": 64,
    "max_train_steps": 1000,
    "learning_rate": 1e-4,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 50,
    "use_ema": True,  # the EMA is the target network, and the saved student
    "ema_max_decay": 0.95,
    "class_dropout_prob": 0.0,  # the student never predicts without a class
    "default_scheduler": "lcm",
    "default_num_inference_steps": 4,
    "default_guidance_scale": 1.0,
}


def parse_distill_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.split("\n")[0])
    distillation = parser.add_argument_group("distillation")
    distillation.add_argument("--teacher", required=True, help="The trained pipeline folder to distil.")
    distillation.add_argument(
        "--teacher_guidance_scale",
        type=float,
        default=None,
        help="The guidance scale distilled into the student (default: the teacher's saved default_guidance_scale).",
    )
    distillation.add_argument(
        "--num_ddim_timesteps",
        type=positive_int,
        default=50,
        help="Steps of the teacher's DDIM grid the student learns to skip along (LCM's original_inference_steps).",
    )
    distillation.add_argument(
        "--huber_c", type=positive_float, default=0.001, help="The pseudo-Huber loss's c (diffusers' LCM default)."
    )
    parser.set_defaults(**DISTILLATION_DEFAULTS)
    if parser.parse_args(argv).preset:  # checked before parse_args applies it
        parser.error("--preset names training recipes; distill.py takes the teacher's network and its own defaults")
    args = parse_args(argv, parser)
    if args.default_scheduler != "lcm":
        parser.error("a consistency-distilled student samples with --default_scheduler lcm only")
    teacher, output = (os.path.realpath(path) for path in (args.teacher, args.output_dir))
    if os.path.commonpath([teacher, output]) in (teacher, output):  # the same folder, or one inside the other
        parser.error(
            f"--output_dir {args.output_dir!r} and --teacher {args.teacher!r} overlap (the same folder, or one inside "
            "the other): the student would overwrite its teacher. Pass another --output_dir (--overwrite_output_dir "
            "does not change this)"
        )
    adopt_teacher_settings(parser, args)
    return args


def adopt_teacher_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The network, resolution and noise schedule are the teacher's; its saved guidance is the one distilled in."""
    files = {name: os.path.join(args.teacher, name) for name in
             ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json")}  # fmt: skip
    configs = {}
    for name, path in files.items():
        try:
            with open(path) as file:
                configs[name] = json.load(file)
        except (OSError, ValueError) as error:
            parser.error(f"--teacher {args.teacher!r} is not a readable saved pipeline ({path}: {error})")
    unet_config, scheduler_config = configs["unet/config.json"], configs["scheduler/scheduler_config.json"]
    args.model_config = files["unet/config.json"]
    # The architecture flags are overridden by --model_config; set them to the teacher's so that the tracker config,
    # the summary and the model card show the network that was distilled.
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "class_emb_size",
                "attention_head_dim", "norm_num_groups", "time_class_embedding"):  # fmt: skip
        setattr(args, key, unet_config[key])
    args.resolution = unet_config["sample_size"]
    args.num_train_timesteps = scheduler_config["num_train_timesteps"]
    args.beta_schedule = scheduler_config["beta_schedule"]
    args.prediction_type = scheduler_config["prediction_type"]
    if args.teacher_guidance_scale is None:
        args.teacher_guidance_scale = configs["model_index.json"].get("default_guidance_scale") or 1.0
    if args.teacher_guidance_scale > 1.0 and not unet_config.get("class_dropout_prob"):
        parser.error(
            f"--teacher_guidance_scale {args.teacher_guidance_scale} needs a teacher trained with class dropout; "
            f"{args.teacher!r} was not, so distil it unguided (--teacher_guidance_scale 1)"
        )
    if args.num_train_timesteps % args.num_ddim_timesteps:
        parser.error(
            f"--num_ddim_timesteps {args.num_ddim_timesteps} must divide the teacher's {args.num_train_timesteps} "
            "training timesteps"
        )


if __name__ == "__main__":
    main(parse_distill_args())
