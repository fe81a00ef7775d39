"""One run owns its output folder: a lock, a record of the names the run writes, and the checks before the first write.

- The lock: `OUTPUT_DIR/.run.lock`, held with the operating system's file lock (filelock) by the main process of the
  run from before anything is written there until the run ends. The kernel lets go of it when that process dies,
  however it dies, so a crash never leaves a lock behind. `OUTPUT_DIR/.run.owner.json` names the holder (host, pid,
  start time, command) and carries a random token: a second run on the folder stops at once with one line naming
  the running one, and every process of the run reads the token back, so machines that do not share the folder stop
  too (`claim_output_dir`).
- The record: `OUTPUT_DIR/.run_files.json` lists the names this project writes in the folder. Anything else found
  there is the user's: a run refuses to start beside such files unless told to (`--overwrite_output_dir`, which still
  never replaces them), and never starts where it would have to replace one. A folder written before the record
  existed is recognised by its contents (a `ClassConditionedUNet` pipeline, or checkpoints of this project).
"""

import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from .checkpointing import (
    PIPELINE_STAGING,
    STATE_FILE,
    checkpoints_dir,
    list_checkpoints,
    processes_where,
    staging_leftovers,
)
from .errors import TrainingError, UsageError

logger = get_logger(__name__)

LOCK_FILE = ".run.lock"
OWNER_FILE = ".run.owner.json"
RECORD_FILE = ".run_files.json"
# What a training run writes at the top of its folder: the pipeline (save_pretrained plus the code files), the model
# card, the grid, the summary, the loss curve, checkpoints, trackers' logs.
RUN_NAMES = ("model_index.json", "unet", "guide_unet", "scheduler", "modeling_class_conditioned_unet.py",
             "pipeline_class_conditioned_ddim.py", "README.md", "samples.png", "training_summary.json",
             "loss_curve.png", "checkpoints", "logs", "wandb")  # fmt: skip
HIDDEN_NAMES = (LOCK_FILE, OWNER_FILE, RECORD_FILE, PIPELINE_STAGING)
HELD: dict[str, tuple[FileLock, str]] = {}  # this process's locks: folder -> (lock, token)


def describe(owner: dict) -> str:
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command', '?')}")  # fmt: skip


def command_line() -> str:
    """This process's command line, with the value of --hub_token hidden (the owner file is readable by others)."""
    words = list(sys.argv)
    for index, word in enumerate(words):
        if word == "--hub_token" and index + 1 < len(words):
            words[index + 1] = "***"
        elif word.startswith("--hub_token="):
            words[index] = "--hub_token=***"
    return " ".join(words)


def acquire_lock(folder: str, purpose: str = "--output_dir") -> str:
    """Lock `folder` for this process until `release_lock` (or the process's end) and return the owner token; raise
    `UsageError` naming the run that holds it."""
    lock = FileLock(os.path.join(folder, LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = read_owner(folder)
        raise UsageError(
            f"{purpose} {folder!r} is in use by another run ({describe(owner) if owner else 'unknown'}); wait for it "
            f"to end or choose another {purpose}."
        ) from None
    token = uuid.uuid4().hex
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "command": command_line(), "token": token,
             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    partial = os.path.join(folder, f"{OWNER_FILE}.{token}")
    with open(partial, "w") as file:  # written whole, then renamed: a reader never sees half of it
        json.dump(owner, file)
    os.replace(partial, os.path.join(folder, OWNER_FILE))
    HELD[os.path.realpath(folder)] = (lock, token)
    return token


def read_owner(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, OWNER_FILE)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def release_lock(folder: str) -> bool:
    """Give back `folder`'s lock if this process holds it (its owner file goes too); whether it did."""
    lock, token = HELD.pop(os.path.realpath(folder), (None, None))
    if lock is None:
        return False
    if (read_owner(folder) or {}).get("token") == token:
        os.remove(os.path.join(folder, OWNER_FILE))
    lock.release()
    return True


@contextmanager
def locked_folder(folder: str, purpose: str) -> Iterator[None]:
    """Hold `folder`'s lock (the folder is created if missing) for the `with` block: single-process writers."""
    os.makedirs(folder, exist_ok=True)
    acquire_lock(folder, purpose)
    try:
        yield
    finally:
        release_lock(folder)


def sees_token(folder: str, token: str, patience_s: float = 15.0) -> bool:
    """Whether `folder`'s owner file carries `token`, waiting up to `patience_s` for a network file system to show a
    file another machine just wrote."""
    deadline = time.monotonic() + patience_s
    while (read_owner(folder) or {}).get("token") != token:
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def on_main_process(accelerator: Accelerator, work):
    """`work()` on the main process while the others wait (None there). Whatever it raises stops every process, so
    that none waits in the next collective: the main process raises its own error (a bug keeps its traceback), the
    others a `UsageError` with the same line or a `TrainingError` naming the failure."""
    result, error, failure = None, None, [None]
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as caught:
            error, failure = caught, [(type(caught) is UsageError, f"{type(caught).__name__}: {caught}")]
    broadcast_object_list(failure)  # a collective: also the others' wait for the main process
    if error is not None:
        raise error
    if failure[0] is not None:
        usage, message = failure[0]
        if usage:
            raise UsageError(message.removeprefix("UsageError: "))
        raise TrainingError(f"The main process failed ({message}); see its output.")
    return result


def is_project_folder(output_dir: str) -> bool:
    """Whether `output_dir` was written by this project before the record existed: a pipeline whose unet is a
    `ClassConditionedUNet`, or checkpoints holding this project's training state."""
    try:
        with open(os.path.join(output_dir, "model_index.json")) as file:
            if json.load(file).get("unet", [None])[-1] == "ClassConditionedUNet":
                return True
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        pass
    return any(os.path.isfile(os.path.join(path, STATE_FILE)) for path in list_checkpoints(output_dir))


def recorded_names(output_dir: str) -> set[str]:
    """The names a run of this project writes, if `output_dir` is such a run's folder (its record, or its contents
    for a folder written before the record existed); else none."""
    try:
        with open(os.path.join(output_dir, RECORD_FILE)) as file:
            return set(json.load(file)["names"])
    except (OSError, ValueError, KeyError, TypeError):
        return set(RUN_NAMES) if is_project_folder(output_dir) else set()


def foreign_names(output_dir: str) -> list[str]:
    """What `output_dir` holds that no run of this project wrote: everything its record does not list."""
    ours = recorded_names(output_dir) | set(HIDDEN_NAMES)
    # Also ours: folders being removed (`remove_folder`) and an owner file being written (`acquire_lock`).
    return sorted(name for name in os.listdir(output_dir)
                  if name not in ours and not name.endswith(".deleting") and not name.startswith(OWNER_FILE))


def claim_output_dir(
    accelerator: Accelerator, output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool
) -> None:
    """Make `output_dir` this run's before anything is written into it; every process calls this.

    1. The main process creates the folder and takes its lock (see the module's docstring); a running run's lock
       stops every process with one line naming it.
    2. Every process reads the owner token from its own `output_dir`: one that does not see it is on a machine that
       does not share the folder (its resume would start elsewhere, its collectives hang), and every process stops.
    3. On the main process (its failures stop every process): files no run of this project wrote are never replaced:
       a run that would have to replace one is refused, and a new run beside such files needs
       `--overwrite_output_dir` (or `--resume_from_checkpoint`). A new run does not mix into another run's pipeline
       or checkpoints unless told (`--resume_from_checkpoint` continues them, `--overwrite_output_dir` removes the old
       checkpoints with a warning: left in place they would be taken for this run's `latest`). Staging folders a
       crash left are removed.

    Refused, the run has written nothing but the lock: the caller gives it back (`release_lock`), and removes the
    folder if it created it (train_conditional.py's error path).
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir!r} is a file; pass a folder (it is created if missing).")

    def lock() -> str:
        if os.path.isdir(output_dir) and not recorded_names(output_dir):
            # A folder of the user's files is refused untouched, not even a lock file written; a run's folder is
            # checked under its lock, so that a run in progress there is named first.
            refuse_what_a_run_would_replace(output_dir, resume_from_checkpoint, overwrite_output_dir)
        os.makedirs(output_dir, exist_ok=True)
        return acquire_lock(output_dir)

    token = [on_main_process(accelerator, lock)]
    broadcast_object_list(token)
    blind = processes_where(accelerator, not sees_token(output_dir, token[0]))
    if blind:
        raise UsageError(
            f"--output_dir {output_dir!r} is not one folder shared by every machine: process(es) {blind} do not see "
            "the lock the main process wrote there. Pass a folder on a file system all machines share, under the "
            "same path on each."
        )

    def check_and_prepare() -> None:
        refuse_what_a_run_would_replace(output_dir, resume_from_checkpoint, overwrite_output_dir)
        with open(os.path.join(output_dir, RECORD_FILE), "w") as file:
            json.dump({"names": list(RUN_NAMES)}, file)
        folder = checkpoints_dir(output_dir)
        if overwrite_output_dir and not resume_from_checkpoint and os.path.isdir(folder):
            logger.warning(f"--overwrite_output_dir: removing the earlier run's {folder}")
            shutil.rmtree(folder)
        for leftover in staging_leftovers(output_dir):
            logger.warning(f"Removing {leftover}, left by an interrupted save")
            shutil.rmtree(leftover)

    on_main_process(accelerator, check_and_prepare)


def refuse_what_a_run_would_replace(
    output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool
) -> None:
    """Step 3 of `claim_output_dir`: the refusals, most telling first."""
    foreign = foreign_names(output_dir)
    replaced = [name for name in foreign if name in RUN_NAMES]
    if replaced:
        raise UsageError(
            f"--output_dir {output_dir!r} holds files this project did not write that a run would replace "
            f"({', '.join(replaced[:5])}); choose another --output_dir (--overwrite_output_dir never replaces them)."
        )
    has_pipeline = os.path.isfile(os.path.join(output_dir, "model_index.json"))
    has_checkpoints = bool(list_checkpoints(output_dir))
    if has_pipeline and not has_checkpoints and resume_from_checkpoint and not overwrite_output_dir:
        # Resuming would start from scratch and, at the end, replace the finished pipeline.
        raise UsageError(
            f"--output_dir {output_dir!r} holds a finished run's pipeline and no checkpoints, so there is nothing to "
            "resume. Pass --overwrite_output_dir to train a new model in its place, or choose another --output_dir."
        )
    held = [name for name, present in (("a saved pipeline", has_pipeline), ("checkpoints", has_checkpoints)) if present]
    if held and not (resume_from_checkpoint or overwrite_output_dir):
        resume = "--resume_from_checkpoint latest to continue it, " if has_checkpoints else ""
        raise UsageError(
            f"--output_dir {output_dir!r} already holds {' and '.join(held)} of an earlier run. Pass {resume}"
            "--overwrite_output_dir to replace it, or choose another --output_dir."
        )
    if foreign and not (resume_from_checkpoint or overwrite_output_dir):
        raise UsageError(
            f"--output_dir {output_dir!r} holds files this project did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); choose another --output_dir, or pass --overwrite_output_dir to "
            "write beside them (only the run's own files are ever replaced)."
        )


def remove_if_empty(folder: str) -> None:
    """Remove a folder a run created when the run failed before writing a file into it (empty subfolders only, or the
    lock and record the run takes first)."""
    if not os.path.isdir(folder):
        return
    files = [os.path.join(path, name) for path, _, names in os.walk(folder) for name in names]
    if any(os.path.basename(file) not in HIDDEN_NAMES for file in files):
        return
    for file in files:
        try:
            os.remove(file)
        except OSError:  # another process of the run removed it first
            pass
    for path, _, _ in sorted(os.walk(folder), reverse=True):  # deepest first
        try:
            os.rmdir(path)
        except OSError:  # another process of the run removed it first, or wrote into it
            pass
