"""Named training recipes for `train_conditional.py --preset NAME`: defaults that explicit flags still override.

Every value was chosen by measurement; bench/quality.py reproduces the rows in README's quality table. A preset's
batch is global (images per optimizer step over all processes), so it is one recipe on any number of processes:
`resolve_batch_size` derives the per-process batch from the launch.
"""

import argparse

from .errors import UsageError

# `quick`, made for a 2-core CPU (15 minutes): 2,000 steps of 64 images. A fifth of the seed's width, self-attention
# kept at 14x14 and 7x7 (attention at 7x7 only trains 1.4x faster per image but samples far worse: row
# quick-attention-7x7-batch-128) with one head per layer (1.39x more images/s than 4 heads of 8, spent on 2,000 steps
# instead of 1,500: 99.0 % against 98.3 % at the same FID, row quick-head-dim-32-2000-steps), the class also fed through
# the timestep embedding, a cosine noise schedule (the seed's linear one leaves a bright haze at this training length),
# v-prediction (98.3 % / FID 39.8 against epsilon's 96.5 % / 51.3 on the validation reference: row quick-v-prediction)
# with the plain, unweighted v-loss (min-SNR-5 weighting gives the high-noise steps almost no weight; at the same
# guidance, 1.25 or 1.5, the plain loss gave 0.6-1.9 points more accuracy on this preset and on cpu-hour, one run each,
# seed 0 of the validation reference: rows *-plain-v-loss*), class dropout for guidance, EMA, and DPM-Solver++ at 20
# steps on the "trailing" timestep spacing (sampling starts from pure noise, which v-prediction allows) with guidance
# 1.375 on every step saved as the sampling defaults: the lowest scale that kept the accuracy target (98.5 %) on the
# validation reference, 3 seeds (98.9 % / 1.79x the FID floor; 1.25 gave 98.3 % / 1.49x: rows quick-plain-v-loss-*). A
# guidance interval trades accuracy for FID along the same curve (row quick-v-prediction-sampling). Measured: README
# "Quality".
QUICK: dict = {
    "block_out_channels": [16, 32, 32],
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "attention_head_dim": 32,
    "time_class_embedding": True,
    "global_batch_size": 64,
    "max_train_steps": 2000,
    "learning_rate": 2e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "use_ema": True,
    "ema_power": 2 / 3,
    "class_dropout_prob": 0.1,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "snr_gamma": None,
    "default_scheduler": "dpm++",
    "default_num_inference_steps": 20,
    "default_timestep_spacing": "trailing",
    "default_guidance_scale": 1.375,
}

PRESETS: dict[str, dict] = {
    # The seed notebook's recipe exactly (these are also the script's plain defaults): the reproducible baseline.
    "seed": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "class_emb_size": 4,
        "norm_num_groups": 32,
        "time_class_embedding": False,
        "global_batch_size": 512,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "num_epochs": 10,
        "use_ema": False,
        "class_dropout_prob": 0.0,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "snr_gamma": None,
        "default_scheduler": "ddim",
        "default_num_inference_steps": 50,
        "default_guidance_scale": 1.0,
    },
    # 15 minutes on a 2-core CPU: QUICK above.
    "quick": QUICK,
    # An hour on a 2-core CPU: quick's recipe on a wider network (24, 48, 48 channels; one attention head per layer),
    # 4,000 steps of 64 images (4.3 epochs). The width costs 1.43x per image (bench/train_throughput.py rows
    # width-24-48-48-head-dim-48 and quick-attention-head-dim-32); the hour buys it twice quick's steps, sized to stay
    # under 60 minutes in this machine's slow hours (85 images/s; 4,500 steps would have taken 60).
    # Guidance 1.375 on the trailing spacing, by quick's rule: 99.5 % / 1.90x the FID floor on the validation reference,
    # 3 seeds (row cpu-hour-plain-v-loss-trailing-3-seeds); 1.25 gave 99.3 % / 1.28x on seed 0. With min-SNR-5 the same
    # width and steps needed guidance 2 on the leading spacing (1.75 gave 99.4 %, 3 seeds: row cpu-hour-cfg-3-seeds).
    # Measured: README "Quality", row cpu-hour.
    "cpu-hour": {
        **QUICK,
        "block_out_channels": [24, 48, 48],
        "attention_head_dim": 48,
        "max_train_steps": 4000,
        "lr_warmup_steps": 200,
    },
    # A couple of minutes on 2 CPU cores, to show that a set-up learns, not to make good digits: a two-level model
    # without attention (16, 32 channels), the class also in the timestep embedding, v-prediction (in a few tries
    # here its samples looked like digits far sooner than epsilon-prediction's), 300 steps of 64 images, guidance 3.
    # The CI learning test (`pytest -k learns`) trains it; bench/learning.py measures it over seeds to set that
    # test's bar.
    "smoke": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "time_class_embedding": True,
        "global_batch_size": 64,
        "max_train_steps": 300,
        "learning_rate": 5e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 20,
        "class_dropout_prob": 0.1,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "snr_gamma": 5.0,
        "logging_steps": 10,
        "validation_images_per_label": 20,
        "validation_grid_columns": 4,
        "default_scheduler": "dpm++",
        "default_num_inference_steps": 10,
        "default_guidance_scale": 3.0,
    },
    # Made for one GPU: the seed's architecture (channels 32, 64, 64; attention in the two deeper blocks) with the
    # levers that won on the CPU (class in the timestep embedding, cosine schedule, v-prediction with the plain v-loss,
    # class dropout, EMA, trailing timestep spacing), trained 50 epochs at batch 512 with bf16 autocast. Prepared, not
    # yet measured on a GPU (README "Quality"); its guidance scale was not tuned.
    "quality": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "time_class_embedding": True,
        "global_batch_size": 512,
        "num_epochs": 50,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 500,
        "use_ema": True,
        "ema_max_decay": 0.9995,
        "class_dropout_prob": 0.1,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "snr_gamma": None,
        "mixed_precision": "bf16",
        "default_scheduler": "dpm++",
        "default_num_inference_steps": 20,
        "default_timestep_spacing": "trailing",
        "default_guidance_scale": 2.0,
    },
}


def resolve_batch_size(args: argparse.Namespace, num_processes: int) -> None:
    """Settle `args.train_batch_size` (per process, diffusers' convention) and `args.global_batch_size` together.

    An explicit `--train_batch_size` keeps its per-process meaning and the global batch follows from the launch.
    Otherwise the global batch (a preset's, `--global_batch_size`'s or the seed's 512) is the recipe, and each process
    takes its share: 512 is 512 per process on one GPU and 64 per process on eight, so the optimizer steps, the epochs
    and the LR schedule are the same on any number of processes.
    """
    shares = num_processes * args.gradient_accumulation_steps
    if args.train_batch_size is None:
        if args.global_batch_size % shares:
            raise UsageError(
                f"The global batch {args.global_batch_size} does not split evenly over {num_processes} processes x "
                f"{args.gradient_accumulation_steps} accumulation steps; launch a number of processes that divides "
                "it, or pass --global_batch_size or --train_batch_size (per process)."
            )
        args.train_batch_size = args.global_batch_size // shares
    args.global_batch_size = args.train_batch_size * shares
