"""An output folder belongs to one run: the lock, files the run did not write, and the writers outside training."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from accelerate import Accelerator
from PIL import Image

import sample
from pipeline.errors import UsageError
from pipeline.run_folder import LOCK_FILE, acquire_lock, claim_output_dir, read_lock, release_lock
from tests.conftest import REPO_ROOT, TINY_TRAIN_FLAGS, cli_env, exit_code_and_stderr, run_cli

TRAIN = [sys.executable, str(REPO_ROOT / "train_conditional.py")]
RUN = [*TINY_TRAIN_FLAGS, "--train_batch_size", "8", "--max_train_samples", "48"]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_lock_names_its_holder_and_a_stale_one_is_replaced(tmp_path, caplog):
    token = acquire_lock(str(tmp_path))
    holder = read_lock(str(tmp_path))
    assert (holder["pid"], holder["host"], holder["token"]) == (os.getpid(), socket.gethostname(), token)
    with pytest.raises(UsageError, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}"):
        acquire_lock(str(tmp_path))
    release_lock(str(tmp_path), token)
    assert not (tmp_path / LOCK_FILE).exists()

    # A crash left the lock: its process is gone from this machine, so the next run takes over, with a warning.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "token": "old"}))
    token = acquire_lock(str(tmp_path))
    assert read_lock(str(tmp_path))["token"] == token and "stale lock" in caplog.text
    # Another machine's process cannot be checked from here: refused, with the file to delete if it is gone.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "another-machine", "pid": 1, "token": "other"}))
    with pytest.raises(UsageError, match=f"another-machine.*delete {tmp_path / LOCK_FILE}"):
        acquire_lock(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # no private lock file left behind


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_a_run_would_replace_are_refused_whatever_the_flags(tmp_path, accelerator, overwrite):
    # e.g. --output_dir . in a clone of this repository: its README.md would become a model card.
    mine = {"README.md": "my notes", "samples.png": "my picture", "training_summary.json": "{}"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match="did not write that a run would replace .*README.md, samples.png"):
        claim_output_dir(accelerator, str(tmp_path), None, overwrite_output_dir=overwrite)
    assert {name: (tmp_path / name).read_text() for name in mine} == mine
    assert not (tmp_path / LOCK_FILE).exists()  # refused before writing anything: the lock is given back


def test_other_files_need_overwrite_and_are_kept(tmp_path, accelerator):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"did not write \(notes.txt\).*--overwrite_output_dir to write beside them"):
        claim_output_dir(accelerator, str(tmp_path / ""), None, overwrite_output_dir=False)
    claim_output_dir(accelerator, str(tmp_path), None, overwrite_output_dir=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_refuses_a_folder_of_user_files_before_writing_anything(tmp_path):
    (tmp_path / "README.md").write_text("my project")
    result = run_cli([*TRAIN, "--output_dir", str(tmp_path), "--max_train_steps", "2", "--overwrite_output_dir", *RUN],
                     check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "README.md" in result.stderr and "choose another --output_dir" in result.stderr
    assert os.listdir(tmp_path) == ["README.md"] and (tmp_path / "README.md").read_text() == "my project"


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_first(tmp_path):
    output_dir = tmp_path / "run"
    first = subprocess.Popen([*TRAIN, "--output_dir", str(output_dir), "--max_train_steps", "40", *RUN],
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (output_dir / LOCK_FILE).exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    second = run_cli([*TRAIN, "--output_dir", str(output_dir), "--max_train_steps", "2", "--overwrite_output_dir",
                      *RUN], check=False)  # fmt: skip
    first_stdout, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by another run (pid {first.pid} on" in second.stderr
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["global_step"] == 40  # the folder holds the first run, whole
    assert not (output_dir / LOCK_FILE).exists()  # released at its end


def test_sample_output_dir_has_one_writer_and_ctrl_c_leaves_only_whole_images(trained_dir, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    folder = tmp_path / "digits"
    folder.mkdir()
    token = acquire_lock(str(folder))  # another writer (this process stands in for it)
    argv = ["--model", str(trained_dir), "--class_labels", "1", "--num_images_per_label", "4", "--output",
            str(tmp_path / "grid.png"), "--output_dir", str(folder), "--num_inference_steps", "2"]  # fmt: skip
    code, stderr = exit_code_and_stderr(sample.cli, argv, capsys)
    assert code == 2 and "is in use by another run" in stderr
    release_lock(str(folder), token)

    calls = []
    real_save_image = torchvision.utils.save_image

    def interrupted_on_the_third(tensor: torch.Tensor, path: str, **kwargs) -> None:
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as file:
                file.write(b"\x89PNG half")  # half an image, then Ctrl-C
            raise KeyboardInterrupt
        real_save_image(tensor, path, **kwargs)

    monkeypatch.setattr(torchvision.utils, "save_image", interrupted_on_the_third)
    code, stderr = exit_code_and_stderr(sample.cli, argv, capsys)
    assert code == 130 and stderr.strip() == "error: interrupted; the images written so far are complete"
    assert sorted(os.listdir(folder)) == ["0000_1.png", "0001_1.png"]  # no half image, no lock left
    for name in os.listdir(folder):
        Image.open(folder / name).load()
