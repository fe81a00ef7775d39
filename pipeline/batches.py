"""What one optimizer step trains on: a function of the run, not of the machine.

The data order depends only on (seed, epoch), and a step's noise, timesteps and class dropout only on (seed, global
step), drawn for the whole global batch and then sliced. So 1 process x B, 2 processes x B/2 and 1 process x B/2 with
2 accumulation steps train the same model, and a run resumed from a checkpoint continues exactly where it stopped.
"""

from dataclasses import dataclass

import torch


@dataclass
class GlobalBatchNoise:
    """Everything random in one optimizer step, for the whole global batch (every process draws the same values)."""

    noise: torch.Tensor  # (global batch, C, H, W), standard normal
    timesteps: torch.Tensor  # (global batch,), uniform over 0..num_train_timesteps - 1
    dropped: torch.Tensor  # (global batch,), True where the class label is replaced by the "no class" id


# Odd, and about 2**32 / golden ratio: run seeds that differ a little land far apart in the 32-bit seed space.
SEED_MULTIPLIER = 0x9E3779B1


def mixed_seed(seed: int, index: int) -> int:
    """One generator seed for (run seed, epoch or step).

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so `seed * 2**32 + index` would make every
    run seed draw the same data order and noise (it did, until a test compared two seeds). The run seed is mixed into
    those 32 bits instead; seed 0 gives `index` itself, so seed-0 runs are unchanged.
    """
    return (index + seed * SEED_MULTIPLIER) % 2**32


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The order in which one epoch visits the samples: a function of (seed, epoch) alone."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(mixed_seed(seed, epoch)))


def global_step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for everything random in one optimizer step: a function of (seed, step) alone."""
    return torch.Generator(device=device).manual_seed(mixed_seed(seed, step))


def draw_global_batch_noise(
    seed: int,
    step: int,
    image_shape: tuple[int, ...],
    num_train_timesteps: int,
    class_dropout_prob: float,
    device: torch.device,
) -> GlobalBatchNoise:
    """The noise, timesteps and class dropout of optimizer step `step` for a global batch of `image_shape`."""
    generator = global_step_generator(seed, step, device)
    global_batch_size = image_shape[0]
    noise = torch.randn(image_shape, generator=generator, device=device)
    timesteps = torch.randint(0, num_train_timesteps, (global_batch_size,), generator=generator, device=device)
    dropped = torch.rand(global_batch_size, generator=generator, device=device) < class_dropout_prob
    return GlobalBatchNoise(noise=noise, timesteps=timesteps, dropped=dropped)


def local_chunk(micro_step: int, process_index: int, num_processes: int, micro_batch_size: int) -> slice:
    """The rows of the global batch that process `process_index` trains on in micro step `micro_step`.

    Chunks go micro step first, then process, the order in which accelerate shards a dataloader's batches, so that
    any split of the global batch covers each row exactly once per optimizer step.
    """
    chunk = micro_step * num_processes + process_index
    return slice(chunk * micro_batch_size, (chunk + 1) * micro_batch_size)
