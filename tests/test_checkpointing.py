import json

import pytest
import torch
from accelerate import Accelerator

from pipeline.checkpointing import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

RUN_STATE = {"seed": 0, "global_batch_size": 8}


@pytest.fixture
def accelerator_and_model():
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD([torch.zeros(1)], lr=0.1))
    return accelerator, model


def test_saves_atomically_and_prunes_oldest(tmp_path, accelerator_and_model):
    accelerator, _ = accelerator_and_model
    for step in (2, 4, 6):
        save_checkpoint(accelerator, str(tmp_path), step, total_limit=2, run_state=RUN_STATE)
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((folder / "checkpoint-6" / "training_state.json").read_text()) == {"global_step": 6, **RUN_STATE}


def test_latest_ignores_a_checkpoint_that_was_being_written(tmp_path, accelerator_and_model):
    accelerator, _ = accelerator_and_model
    save_checkpoint(accelerator, str(tmp_path), 2, total_limit=None, run_state=RUN_STATE)
    (tmp_path / "checkpoints" / "checkpoint-4.tmp").mkdir()  # a crash while saving step 4
    assert find_checkpoint(str(tmp_path), "latest").endswith("checkpoint-2")
    assert find_checkpoint(str(tmp_path / "elsewhere"), "latest") is None
    # Saving step 4 again replaces the leftover.
    save_checkpoint(accelerator, str(tmp_path), 4, total_limit=None, run_state=RUN_STATE)
    assert [path.rsplit("/", 1)[1] for path in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-4"]


def test_load_restores_the_weights_and_step(tmp_path, accelerator_and_model):
    accelerator, model = accelerator_and_model
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    path = save_checkpoint(accelerator, str(tmp_path), 3, total_limit=None, run_state=RUN_STATE)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert load_checkpoint(accelerator, path, RUN_STATE)["global_step"] == 3
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())


def test_a_path_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        find_checkpoint(str(tmp_path), str(tmp_path))


def test_resume_under_another_seed_is_refused(tmp_path, accelerator_and_model):
    accelerator, _ = accelerator_and_model
    path = save_checkpoint(accelerator, str(tmp_path), 1, total_limit=None, run_state=RUN_STATE)
    with pytest.raises(ValueError, match="seed was 0 and is now 1"):
        load_checkpoint(accelerator, path, {**RUN_STATE, "seed": 1})
