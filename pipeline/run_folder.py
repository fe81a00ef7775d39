"""One run owns its output folder: a lock, a record of the names the run writes, and the checks before the first write.

- The lock, `OUTPUT_DIR/.run.lock` (JSON: host, pid, start time, command, a random token), is created atomically by
  the main process of the run before anything else is written there, and removed when that process exits. A second
  run on the folder stops at once with one line naming the running one. A lock left by a crash is stale when its
  process is gone from this machine: it is replaced, with a warning. Every process of the run reads the token back,
  so machines that do not share the folder stop too (`claim_output_dir`).
- The record, `OUTPUT_DIR/.run_files.json`, lists the names this project writes in the folder. Anything else found
  there is the user's: a run refuses to start beside such files unless told to (`--overwrite_output_dir`, which still
  never replaces them), and never starts where it would have to replace one.
"""

import atexit
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from .checkpointing import PIPELINE_STAGING, checkpoints_dir, list_checkpoints, processes_where, staging_leftovers
from .errors import TrainingError, UsageError

logger = get_logger(__name__)

LOCK_FILE = ".run.lock"
RECORD_FILE = ".run_files.json"
# What a training run writes at the top of its folder: the pipeline (save_pretrained plus the code files), the model
# card, the grid, the summary, the loss curve, checkpoints, trackers' logs.
RUN_NAMES = ("model_index.json", "unet", "scheduler", "modeling_class_conditioned_unet.py",
             "pipeline_class_conditioned_ddim.py", "README.md", "samples.png", "training_summary.json",
             "loss_curve.png", "checkpoints", "logs", "wandb")  # fmt: skip
HIDDEN_NAMES = (LOCK_FILE, RECORD_FILE, PIPELINE_STAGING)


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command', '?')}")  # fmt: skip


def is_running(holder: dict) -> bool:
    """Whether the lock's process may still run: always, unless it was on this machine and is gone."""
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def acquire_lock(folder: str, purpose: str = "--output_dir") -> str:
    """Take `folder`'s lock for this process and return its token; raise `UsageError` naming the run that holds it.

    The lock is written whole to a private file and then hard-linked into place, an atomic create that fails if the
    lock exists: two runs started together never both get it, and a reader never sees half a lock.
    """
    path = os.path.join(folder, LOCK_FILE)
    token = uuid.uuid4().hex
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv), "token": token,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    private = f"{path}.{token}"
    with open(private, "w") as file:
        json.dump(holder, file)
    try:
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                os.link(private, path)
                return token
            except FileExistsError:
                other = read_lock(folder)
                if other is not None and is_running(other):
                    raise UsageError(
                        f"{purpose} {folder!r} is in use by another run ({describe(other)}). Wait for it to end or "
                        f"choose another {purpose}; if that run is gone (its machine crashed), delete {path}."
                    ) from None
                logging.getLogger(__name__).warning(
                    f"Replacing the stale lock {path} ({describe(other or {})}): that process is gone."
                )
                try:
                    os.remove(path)
                except FileNotFoundError:  # another run replaced it first: the next try sees that run's lock
                    pass
        raise UsageError(f"Could not lock {purpose} {folder!r}: another run took it meanwhile; choose another one.")
    finally:
        os.remove(private)


def read_lock(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, LOCK_FILE)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def sees_lock(folder: str, token: str, patience_s: float = 15.0) -> bool:
    """Whether `folder` holds the lock `token` names, waiting up to `patience_s` for a network file system to show a
    file another machine just wrote."""
    deadline = time.monotonic() + patience_s
    while (read_lock(folder) or {}).get("token") != token:
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def release_lock(folder: str, token: str) -> None:
    """Remove `folder`'s lock if it is still the one `token` took."""
    holder = read_lock(folder)
    if holder is not None and holder.get("token") == token:
        os.remove(os.path.join(folder, LOCK_FILE))


@contextmanager
def locked_folder(folder: str, purpose: str):
    """Hold `folder`'s lock (created if missing) for the `with` block: for single-process writers like sample.py."""
    os.makedirs(folder, exist_ok=True)
    token = acquire_lock(folder, purpose)
    try:
        yield
    finally:
        release_lock(folder, token)


def foreign_names(output_dir: str) -> list[str]:
    """What `output_dir` holds that no run of this project wrote: everything its record does not list."""
    try:
        with open(os.path.join(output_dir, RECORD_FILE)) as file:
            recorded = set(json.load(file)["names"])
    except (OSError, ValueError, KeyError, TypeError):
        recorded = set()
    ours = recorded | set(HIDDEN_NAMES)
    # Also ours: folders being removed (`remove_folder`) and a lock being written (`acquire_lock`).
    return sorted(name for name in os.listdir(output_dir)
                  if name not in ours and not name.endswith(".deleting") and not name.startswith(LOCK_FILE))


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


def claim_output_dir(
    accelerator: Accelerator, output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool
) -> None:
    """Make `output_dir` this run's before anything is written into it; every process calls this.

    1. The main process creates the folder and takes its lock (released when it exits); a running run's lock stops
       every process with one line naming it.
    2. Every process reads the lock's token from its own `output_dir`: one that does not see it is on a machine that
       does not share the folder (its resume would start elsewhere, its collectives hang), and every process stops.
    3. Files no run of this project wrote are never replaced: a run that would have to replace one is refused, and a
       new run beside such files needs `--overwrite_output_dir` (or `--resume_from_checkpoint`).
    4. A new run does not mix into another run's pipeline or checkpoints unless told (`--resume_from_checkpoint`
       continues them, `--overwrite_output_dir` removes the old checkpoints with a warning: left in place they
       would be taken for this run's `latest`). Staging folders that a crash left are removed.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir!r} is a file; pass a folder (it is created if missing).")

    def lock() -> str:
        os.makedirs(output_dir, exist_ok=True)
        token = acquire_lock(output_dir)
        atexit.register(release_lock, output_dir, token)  # also after an error or Ctrl-C; not after SIGKILL
        return token

    token = [on_main_process(accelerator, lock)]
    broadcast_object_list(token)
    try:
        check_output_dir(accelerator, output_dir, token[0], resume_from_checkpoint, overwrite_output_dir)
    except UsageError:
        if accelerator.is_main_process:
            release_lock(output_dir, token[0])  # refused before writing anything: the folder is as it was
        raise
    accelerator.wait_for_everyone()  # every process has checked before the main one changes anything
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, RECORD_FILE), "w") as file:
            json.dump({"names": list(RUN_NAMES)}, file)
        folder = checkpoints_dir(output_dir)
        if overwrite_output_dir and not resume_from_checkpoint and os.path.isdir(folder):
            logger.warning(f"--overwrite_output_dir: removing the earlier run's {folder}")
            shutil.rmtree(folder)
        for leftover in staging_leftovers(output_dir):
            logger.warning(f"Removing {leftover}, left by an interrupted save")
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()


def check_output_dir(
    accelerator: Accelerator,
    output_dir: str,
    token: str,
    resume_from_checkpoint: str | None,
    overwrite_output_dir: bool,
) -> None:
    """Steps 2 to 4 of `claim_output_dir`: the refusals, the same on every process."""
    blind = processes_where(accelerator, not sees_lock(output_dir, token))
    if blind:
        raise UsageError(
            f"--output_dir {output_dir!r} is not one folder shared by every machine: process(es) {blind} do not see "
            "the lock the main process wrote there. Pass a folder on a file system all machines share, under the "
            "same path on each."
        )

    foreign = foreign_names(output_dir)
    replaced = [name for name in foreign if name in RUN_NAMES]
    if replaced:
        raise UsageError(
            f"--output_dir {output_dir!r} holds files this project did not write that a run would replace "
            f"({', '.join(replaced[:5])}); choose another --output_dir (--overwrite_output_dir never replaces them)."
        )
    if foreign and not (resume_from_checkpoint or overwrite_output_dir):
        raise UsageError(
            f"--output_dir {output_dir!r} holds files this project did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); choose another --output_dir, or pass --overwrite_output_dir to "
            "write beside them (only the run's own files are ever replaced)."
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


def release_output_dir(output_dir: str) -> None:
    """Main process, at the end of a run: give the folder's lock back (the process's own, if it still holds it)."""
    holder = read_lock(output_dir)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(os.path.join(output_dir, LOCK_FILE))
