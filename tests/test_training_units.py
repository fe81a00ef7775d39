"""The training maths against hand-computed references: the loss, gradient clipping and the EMA weights saved.

The loss is checked in-process on small tensors. Clipping and EMA are checked on the real `accelerate launch`: two
short runs with the same seed (one with EMA and a checkpoint after every step, one clipped), whose weights are
compared with the initial weights and with each other.
"""

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from pipeline import ClassConditionedUNet
from pipeline.training import diffusion_loss
from tests.conftest import TINY_TRAIN_FLAGS, train_here

# Timesteps over the whole schedule, ends included: min-SNR-5 caps the weights of the low-noise ones (SNR > 5) only.
TIMESTEPS = [0, 1, 250, 500, 998, 999]

LEARNING_RATE = 1e-3  # the default --learning_rate: Adam moves each weight by about this much per step
RUN_FLAGS = [*TINY_TRAIN_FLAGS, "--train_batch_size", "8", "--learning_rate", str(LEARNING_RATE)]
# EMA warmup decays: 0 at step 1 (diffusers' EMAModel), then 1 - (1 + k / 2) ** -0.5 for k = 1, 2 (0.18 and 0.29),
# capped by --ema_max_decay 0.25 at step 3. So the formula, its two flags and the cap all show in the result.
EMA_INV_GAMMA, EMA_POWER, EMA_MAX_DECAY = 2.0, 0.5, 0.25
EMA_FLAGS = ["--use_ema", "--ema_inv_gamma", str(EMA_INV_GAMMA), "--ema_power", str(EMA_POWER)]
EMA_FLAGS += ["--ema_max_decay", str(EMA_MAX_DECAY)]
# Adam divides each gradient by its own size (+ eps 1e-8): gradients clipped to a total norm of 1e-12 move a
# weight by at most lr * 1e-12 / 1e-8 = 1e-7 per step, where unclipped ones move it by about lr.
TINY_GRAD_NORM = "1e-12"
UNMOVED_ATOL = 1e-6


def reference_loss(
    model_output: torch.Tensor,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None,
) -> torch.Tensor:
    """The loss written out from the papers, in float64: per-sample MSE over C, H, W, weighted, then the mean."""
    alpha = alphas_cumprod.double()[timesteps]  # alpha_bar_t
    a = alpha.view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = noise.double()
    else:  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (Salimans & Ho, 2022)
        target = a.sqrt() * noise.double() - (1 - a).sqrt() * clean_images.double()
    per_sample = ((model_output.double() - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = alpha / (1 - alpha)
    capped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    weights = capped / snr if prediction_type == "epsilon" else capped / (snr + 1)
    return (per_sample * weights).mean()


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0], ids=["unweighted", "min_snr_5"])
def test_diffusion_loss_matches_the_hand_computed_reference(
    beta_schedule: str, prediction_type: str, snr_gamma: float | None
) -> None:
    """Guards the prediction target (noise or v) and the min-SNR weights (1/SNR for epsilon, 1/(SNR+1) for v)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    shape = (len(TIMESTEPS), 2, 4, 4)  # two channels, so a mean over the wrong dimensions changes the result
    model_output, clean_images, noise = (torch.randn(shape, generator=generator) for _ in range(3))
    timesteps = torch.tensor(TIMESTEPS)

    loss = diffusion_loss(model_output, clean_images, noise, timesteps, scheduler, snr_gamma)

    expected = reference_loss(
        model_output, clean_images, noise, timesteps, scheduler.alphas_cumprod, prediction_type, snr_gamma
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_diffusion_loss_refuses_a_prediction_type_it_does_not_train() -> None:
    """Guards against silently training a 'sample'-predicting scheduler on the noise target."""
    scheduler = DDIMScheduler(prediction_type="sample")
    images = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="Unknown prediction_type 'sample'"):
        diffusion_loss(images, images, images, torch.tensor([0, 999]), scheduler, None)


def saved_pipeline_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The weights in the pipeline folder a run saved (what `from_pretrained` loads)."""
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


def checkpoint_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The trained model's own weights after `step` (accelerate's save_state; EMA weights are stored apart)."""
    return load_file(output_dir / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name].double() - second[name].double()).abs().max().item() for name in first)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real runs with the same seed: EMA with a checkpoint per step, and clipped."""
    root = tmp_path_factory.mktemp("training_units")
    script_args = {
        "ema": [*RUN_FLAGS, "--max_train_steps", "3", "--checkpointing_steps", "1", *EMA_FLAGS],
        "clipped": [*RUN_FLAGS, "--max_train_steps", "2", "--max_grad_norm", TINY_GRAD_NORM],
    }
    for name, args in script_args.items():
        train_here(["--output_dir", str(root / name), *args])
    return {name: root / name for name in script_args}


def initial_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a run started from, built the way `train` builds them: `set_seed(--seed)`, then the model from
    its config (the one the run saved; the default --seed is 0)."""
    set_seed(0)
    model = ClassConditionedUNet.from_config(ClassConditionedUNet.load_config(output_dir / "unet"))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_max_grad_norm_clips_the_gradients(runs: dict[str, Path]) -> None:
    """Guards that --max_grad_norm reaches clip_grad_norm_ before the optimizer step.

    Adam is scale-invariant, so clipping to a normal norm barely changes an update; clipped to 1e-12, the update
    falls below Adam's eps and the weights stay where they started, while the same two steps unclipped move them.
    """
    start = initial_weights(runs["clipped"])
    clipped = saved_pipeline_weights(runs["clipped"])
    unclipped = checkpoint_weights(runs["ema"], step=2)  # same seed, data and noise; --max_grad_norm off

    unclipped_moved, clipped_moved = max_difference(unclipped, start), max_difference(clipped, start)
    assert unclipped_moved > LEARNING_RATE, f"unclipped: {unclipped_moved:.2e}"  # 2 steps of ~lr: the init is right
    assert clipped_moved < UNMOVED_ATOL, f"--max_grad_norm {TINY_GRAD_NORM} still moved a weight by {clipped_moved:.2e}"


def test_saved_pipeline_holds_the_ema_weights(runs: dict[str, Path]) -> None:
    """Guards that --use_ema saves the EMA weights, with the decays the --ema_* flags ask for.

    diffusers' EMAModel with warmup uses decay 0 at the first optimizer step (the average starts at the weights after
    step 1), then d_k = min(1 - (1 + (k - 1) / inv_gamma) ** -power, max_decay) at step k.
    """
    weights = {step: checkpoint_weights(runs["ema"], step) for step in (1, 2, 3)}
    decays = {2: 1 - (1 + 1 / EMA_INV_GAMMA) ** -EMA_POWER, 3: EMA_MAX_DECAY}
    assert decays[2] < EMA_MAX_DECAY < 1 - (1 + 2 / EMA_INV_GAMMA) ** -EMA_POWER  # the cap acts at step 3 only
    expected = {name: tensor.double() for name, tensor in weights[1].items()}
    for step in (2, 3):
        expected = {
            name: decays[step] * average + (1 - decays[step]) * weights[step][name].double()
            for name, average in expected.items()
        }
    saved = saved_pipeline_weights(runs["ema"])

    error = max_difference(saved, expected)
    assert error < UNMOVED_ATOL, f"saved weights are {error:.2e} from the EMA"  # float32 rounding; steps are ~1e-3
    for step in (1, 2, 3):  # not the raw weights of any step, in particular not the last
        distance = max_difference(saved, weights[step])
        assert distance > 50 * UNMOVED_ATOL, f"saved weights are {distance:.2e} from the raw ones of step {step}"
