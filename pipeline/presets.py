"""Named training recipes for `train_conditional.py --preset NAME`: defaults that explicit flags still override.

Every value was chosen by measurement; bench/quality.py reproduces the rows in README's quality table.
"""

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
        "train_batch_size": 512,
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
}
