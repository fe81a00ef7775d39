"""The determinism claim, unit by unit: what a step trains on depends on (seed, step) alone, never on the machine."""

import pytest
import torch

from pipeline.batches import draw_global_batch_noise, epoch_permutation, local_chunk

SHAPE = (8, 1, 28, 28)


def draw(seed: int = 0, step: int = 0, class_dropout_prob: float = 0.1):
    return draw_global_batch_noise(seed, step, SHAPE, 1000, class_dropout_prob, torch.device("cpu"))


def same(first, second) -> bool:
    return all(torch.equal(getattr(first, name), getattr(second, name)) for name in ("noise", "timesteps", "dropped"))


def test_a_step_draws_the_same_values_whatever_ran_before():
    """Guards against drawing from torch's global RNG, which model init, dropout or another process's history move:
    resumed and re-split runs would then train on other noise."""
    torch.manual_seed(1)
    first = draw(step=5)
    torch.manual_seed(2)
    torch.randn(100)
    assert same(first, draw(step=5))


def test_seed_and_step_each_change_every_draw():
    reference = draw(seed=0, step=5)
    for other in (draw(seed=1, step=5), draw(seed=0, step=6)):
        assert not torch.equal(reference.noise, other.noise)
        assert not torch.equal(reference.timesteps, other.timesteps)


def test_draws_have_the_right_shapes_ranges_and_dropout_rate():
    sample = draw_global_batch_noise(0, 0, (10_000, 1, 2, 2), 1000, 0.1, torch.device("cpu"))
    assert sample.noise.shape == (10_000, 1, 2, 2) and sample.timesteps.shape == sample.dropped.shape == (10_000,)
    assert 0 <= sample.timesteps.min() and sample.timesteps.max() <= 999
    assert 0.09 < sample.dropped.float().mean() < 0.11
    assert not draw(class_dropout_prob=0.0).dropped.any()


@pytest.mark.parametrize("num_processes, micro_steps", [(1, 1), (1, 4), (2, 2), (4, 1), (2, 1)])
def test_any_split_of_the_global_batch_covers_each_row_once(num_processes, micro_steps):
    """Guards the chunk order: an overlap or a gap would train some images twice per step and others never."""
    global_batch_size = 8
    micro_batch_size = global_batch_size // (num_processes * micro_steps)
    rows = [
        row
        for process in range(num_processes)
        for micro_step in range(micro_steps)
        for row in range(global_batch_size)[local_chunk(micro_step, process, num_processes, micro_batch_size)]
    ]
    assert sorted(rows) == list(range(global_batch_size))


def test_chunks_follow_accelerates_sharding_order():
    """Micro step first, then process: process 1's first micro-batch comes right after process 0's."""
    assert local_chunk(0, 1, num_processes=2, micro_batch_size=2) == slice(2, 4)
    assert local_chunk(1, 0, num_processes=2, micro_batch_size=2) == slice(4, 6)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = epoch_permutation(0, 3, 100)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, epoch_permutation(0, 3, 100))
    assert not torch.equal(order, epoch_permutation(0, 4, 100))
    assert not torch.equal(order, epoch_permutation(1, 3, 100))
