"""Checkpoints: atomic saves, pruning, exact restore of every part, no unsafe pickle, and a full disk."""

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from pipeline.checkpointing import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_pipeline,
)
from pipeline.errors import TrainingError, UsageError
from pipeline.run_folder import RECORD_FILE, RUN_NAMES, claim_output_dir
from tests.conftest import CreatesMarker

RUN_STATE = {"seed": 0, "global_batch_size": 8}


class Training:
    """What `train` checkpoints: a prepared model and optimizer, an LR schedule and an EMA."""

    def __init__(self, width: int = 2):
        self.accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(width, width)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        self.lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
        self.ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def step(self) -> None:
        self.model(torch.ones(4, self.model.in_features)).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        self.ema.step(self.model.parameters())

    def save(self, output_dir: Path, step: int, total_limit: int | None = None, **kwargs) -> str:
        return save_checkpoint(self.accelerator, str(output_dir), step, total_limit, RUN_STATE, self.lr_scheduler,
                               self.ema, **kwargs)  # fmt: skip

    def load(self, path: str, run_state: dict = RUN_STATE) -> dict:
        return load_checkpoint(self.accelerator, path, run_state, self.lr_scheduler, self.ema)


@pytest.fixture
def training() -> Training:
    torch.manual_seed(0)
    return Training()


def test_saves_atomically_and_prunes_oldest(tmp_path, training):
    for step in (2, 4, 6):
        training.save(tmp_path, step, total_limit=2)
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((folder / "checkpoint-6" / "training_state.json").read_text())
    assert {"global_step": 6, **RUN_STATE}.items() <= state.items()


def test_latest_ignores_a_checkpoint_that_was_being_written(tmp_path, training):
    training.save(tmp_path, 2)
    (tmp_path / "checkpoints" / "checkpoint-4.tmp").mkdir()  # a crash while saving step 4
    assert find_checkpoint(str(tmp_path), "latest").endswith("checkpoint-2")
    assert find_checkpoint(str(tmp_path / "elsewhere"), "latest") is None
    # Saving step 4 again replaces the leftover.
    training.save(tmp_path, 4)
    assert [path.rsplit("/", 1)[1] for path in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-4"]


def test_load_restores_weights_optimizer_lr_schedule_and_ema(tmp_path, training):
    """Guards the parts stored outside accelerate's own files: a checkpoint that dropped the LR schedule or the EMA
    would resume with a fresh warm-up or a fresh average."""
    for _ in range(3):
        training.step()
    saved = {
        "weights": {name: tensor.clone() for name, tensor in training.model.state_dict().items()},
        "lr": training.lr_scheduler.get_last_lr(),
        "ema": [tensor.clone() for tensor in training.ema.shadow_params],
        "ema_step": training.ema.optimization_step,
    }
    path = training.save(tmp_path, 3)
    assert not [name for name in os.listdir(path) if name.startswith("custom_checkpoint_")]  # no pickle of ours
    for _ in range(2):
        training.step()
    assert training.load(path)["global_step"] == 3
    assert all(torch.equal(training.model.state_dict()[name], tensor) for name, tensor in saved["weights"].items())
    assert training.lr_scheduler.get_last_lr() == saved["lr"]
    assert all(torch.equal(now, then) for now, then in zip(training.ema.shadow_params, saved["ema"], strict=True))
    assert training.ema.optimization_step == saved["ema_step"]


def test_a_path_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is not a checkpoint folder"):
        find_checkpoint(str(tmp_path), str(tmp_path))


def test_resume_under_another_seed_is_refused(tmp_path, training):
    path = training.save(tmp_path, 1)
    with pytest.raises(UsageError, match=r"trained with --seed 0 \(now 1\)"):
        training.load(path, {**RUN_STATE, "seed": 1})


def test_a_pickle_in_a_checkpoint_never_runs(tmp_path, training):
    """Guards against resuming through accelerate's full-pickle path: `load_state` unpickles every
    `custom_checkpoint_N.pkl` for objects registered with `register_for_checkpointing` (weights_only=False)."""
    path = training.save(tmp_path, 1)
    marker = tmp_path / "code_ran"
    torch.save(CreatesMarker(marker), os.path.join(path, "custom_checkpoint_0.pkl"))
    with pytest.raises(UsageError, match="custom_checkpoint_0.pkl.*can run code"):
        training.load(path)
    assert not marker.exists()


def test_a_crafted_optimizer_file_is_refused_without_running(tmp_path, training):
    """accelerate's own files go through torch.load(weights_only=True): a payload is refused as a damaged file."""
    path = training.save(tmp_path, 1)
    marker = tmp_path / "code_ran"
    torch.save({"state": CreatesMarker(marker)}, os.path.join(path, "optimizer.bin"))
    with pytest.raises(UsageError, match="damaged or belongs to another model"):
        training.load(path)
    assert not marker.exists()


def test_next_start_removes_what_an_interrupted_save_left(tmp_path, training):
    training.save(tmp_path, 2)
    leftovers = [tmp_path / ".pipeline.tmp", tmp_path / "checkpoints" / "checkpoint-4.tmp",
                 tmp_path / "checkpoints" / "checkpoint-1.deleting", tmp_path / "unet.deleting"]  # fmt: skip
    for folder in leftovers:
        folder.mkdir()
    (tmp_path / "notes.tmp").mkdir()  # not ours: kept
    (tmp_path / RECORD_FILE).write_text(json.dumps({"names": list(RUN_NAMES)}))  # what a run's start writes
    claim_output_dir(training.accelerator, str(tmp_path), "latest", overwrite_output_dir=False)
    assert not any(folder.exists() for folder in leftovers)
    assert (tmp_path / "notes.tmp").exists() and list_checkpoints(str(tmp_path))


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_partial_one(tiny_disk):
    training = Training(width=300)  # 0.36 MB of weights; a checkpoint (with Adam and the EMA) takes 1.45 MB
    training.step()
    output_dir = tiny_disk / "run"
    first = training.save(output_dir, 1)
    # Too little room by our own estimate: refused before anything is written.
    with pytest.raises(TrainingError, match=r"MiB free, but checkpoint .* needs about"):
        training.save(output_dir, 2, needed_bytes=10 * 2**20)
    # The estimate passed, the disk filled up while writing: the partial copy is removed.
    with pytest.raises(TrainingError, match="Could not write checkpoint .*checkpoint-2.*last complete checkpoint is"):
        training.save(output_dir, 2)
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["checkpoint-1"]
    assert training.load(first)["global_step"] == 1


def test_a_full_disk_keeps_the_saved_pipeline(tiny_disk, tiny_pipe):
    output_dir = tiny_disk / "run"
    save_pipeline(tiny_pipe, str(output_dir))
    before = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}
    ballast = tiny_disk / "ballast"
    ballast.write_bytes(b"\0" * (os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize - 40_000))
    with pytest.raises(TrainingError, match="Could not write the pipeline"):
        save_pipeline(tiny_pipe, str(output_dir))
    assert not (output_dir / ".pipeline.tmp").exists()
    assert {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()} == before
