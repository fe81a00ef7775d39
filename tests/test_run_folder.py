"""An output folder belongs to one run: the lock, files the run did not write, and the writers outside training."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from accelerate import Accelerator
from PIL import Image

from pipeline import sampling
from pipeline.errors import UsageError
from pipeline.run_folder import OWNER_FILE, RECORD_FILE, acquire_lock, claim_output_dir, read_owner, release_lock
from tests.conftest import REPO_ROOT, TINY_TRAIN_FLAGS, cli_env, exit_code_and_stderr, run_cli, train_here

TRAIN = [sys.executable, str(REPO_ROOT / "train_conditional.py")]
RUN = [*TINY_TRAIN_FLAGS, "--train_batch_size", "8", "--max_train_samples", "48"]


def hold_the_lock_elsewhere(folder) -> subprocess.Popen:
    """Another process that takes `folder`'s lock and sleeps: a run in progress."""
    code = (f"import time; from pipeline.run_folder import acquire_lock; acquire_lock({str(folder)!r}); "
            "print('locked', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path, monkeypatch):
    holder = hold_the_lock_elsewhere(tmp_path)
    try:
        with pytest.raises(UsageError, match=rf"in use by another run \(pid {holder.pid} on {socket.gethostname()}"):
            acquire_lock(str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own ran; the kernel let go of the lock
        holder.wait()
    monkeypatch.setattr(sys, "argv", ["train_conditional.py", "--push_to_hub", "--hub_token", "hf_secret"])
    acquire_lock(str(tmp_path))
    owner = read_owner(str(tmp_path))
    assert owner["pid"] == os.getpid() and "hf_secret" not in owner["command"] and "--hub_token ***" in owner["command"]
    assert release_lock(str(tmp_path)) and not release_lock(str(tmp_path))  # only the holder gives it back
    assert not (tmp_path / OWNER_FILE).exists()


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
    assert not release_lock(str(tmp_path))  # refused before the lock was even taken
    assert sorted(os.listdir(tmp_path)) == sorted(mine)  # untouched: not even a lock file
    assert {name: (tmp_path / name).read_text() for name in mine} == mine


def test_other_files_need_overwrite_and_are_kept(tmp_path, accelerator):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"did not write \(notes.txt\).*--overwrite_output_dir to write beside them"):
        claim_output_dir(accelerator, str(tmp_path), None, overwrite_output_dir=False)
    claim_output_dir(accelerator, str(tmp_path), None, overwrite_output_dir=True)
    release_lock(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_folder_written_before_the_record_existed_is_still_the_projects(trained_dir, tmp_path, accelerator):
    folder = Path(shutil.copytree(trained_dir, tmp_path / "run"))
    (folder / RECORD_FILE).unlink()
    claim_output_dir(accelerator, str(folder), None, overwrite_output_dir=True)  # its model_index.json names our UNet
    release_lock(str(folder))


def test_a_run_refuses_a_folder_of_user_files_before_writing_anything(tmp_path, capsys):
    (tmp_path / "README.md").write_text("my project")
    argv = ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--overwrite_output_dir", *RUN]
    code, stderr = exit_code_and_stderr(train_here, argv, capsys)
    assert code == 2 and "README.md" in stderr and "choose another --output_dir" in stderr
    assert os.listdir(tmp_path) == ["README.md"] and (tmp_path / "README.md").read_text() == "my project"


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_first(tmp_path):
    output_dir = tmp_path / "run"
    first = subprocess.Popen([*TRAIN, "--output_dir", str(output_dir), "--max_train_steps", "4", *RUN],
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (output_dir / OWNER_FILE).exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGSTOP)  # the first run holds the folder, paused mid-run, whatever the timing
        second = run_cli([*TRAIN, "--output_dir", str(output_dir), "--max_train_steps", "2", "--overwrite_output_dir",
                          *RUN], check=False)  # fmt: skip
        os.kill(first.pid, signal.SIGCONT)
        first_stderr = first.communicate(timeout=300)[1]
    finally:
        first.kill()
    assert first.returncode == 0, first_stderr[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by another run (pid {first.pid} on" in second.stderr
    assert json.loads((output_dir / "training_summary.json").read_text())["global_step"] == 4  # the first run, whole
    assert not (output_dir / OWNER_FILE).exists()  # given back at its end


def test_sample_output_dir_has_one_writer_and_ctrl_c_leaves_only_whole_images(trained_dir, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    folder = tmp_path / "digits"
    folder.mkdir()
    acquire_lock(str(folder))  # another writer (this process stands in for it)
    argv = ["--model", str(trained_dir), "--class_labels", "1", "--num_images_per_label", "4", "--output",
            str(tmp_path / "grid.png"), "--output_dir", str(folder), "--num_inference_steps", "2"]  # fmt: skip
    code, stderr = exit_code_and_stderr(sampling.cli, argv, capsys)
    assert code == 2 and "is in use by another run" in stderr
    release_lock(str(folder))

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
    code, stderr = exit_code_and_stderr(sampling.cli, argv, capsys)
    assert code == 130  # one line after the progress bars:
    assert stderr.strip().splitlines()[-1] == "error: interrupted; the images written so far are complete"
    assert sorted(name for name in os.listdir(folder) if not name.startswith(".run.lock")) == [
        "0000_1.png", "0001_1.png"]  # no half image, no owner file left  # fmt: skip
    for name in ("0000_1.png", "0001_1.png"):
        Image.open(folder / name).load()
