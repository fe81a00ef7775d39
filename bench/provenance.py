"""Where a measured row comes from: the command, the code, the date and the machine.

Every bench script appends its result as one JSON line with `"provenance": run_record()`, taken when the run starts
(the code that ran is the code at that moment), and bench/report.py renders README's tables from those rows only.

    from provenance import append_row, run_record    # bench scripts import their sibling module
"""

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Changes here are measurements, not code: appending a row must not make the next run count as "dirty".
NOT_CODE = ("bench/results/", "output/")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else whatever `platform.processor()` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu() -> str | None:
    """Name of CUDA device 0, or None without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def is_dirty() -> bool:
    """Whether the working tree differs from HEAD, ignoring results and outputs (see `NOT_CODE`)."""
    # Porcelain v1 lines are "XY path" (renames: "XY old -> new"); the path starts at column 3.
    paths = [line[3:].strip('"') for line in _git("status", "--porcelain").splitlines()]
    return any(not path.startswith(NOT_CODE) for path in paths)


def run_record() -> dict:
    """The provenance of a measurement made by this process.

    Returns:
        `dict` with `argv` (`sys.argv` exactly as given: the script path and its arguments, so `python` followed by
        them reruns the measurement from the repository root), `commit` (`git rev-parse HEAD`; `$GIT_COMMIT` where
        the tree has no .git), `dirty` (uncommitted code changes, see `is_dirty`; without .git, unless `$GIT_DIRTY`
        is 0, True), `date` (UTC,
        ISO 8601, seconds) and `machine` (CPU model, cores, architecture, Python / torch / diffusers / accelerate
        versions and the CUDA device's name or None).
    """
    try:
        commit, dirty = _git("rev-parse", "HEAD").strip(), is_dirty()
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git (the GPU machine's)
        commit, dirty = os.environ.get("GIT_COMMIT", "unknown"), os.environ.get("GIT_DIRTY", "1") != "0"
    return {
        "argv": list(sys.argv),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "torch": _version("torch"),
            "diffusers": _version("diffusers"),
            "accelerate": _version("accelerate"),
            "gpu": _gpu(),
        },
    }


def append_row(path: str | Path, row: dict) -> None:
    """Append `row` to the JSON-lines file `path` as one line, creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(row) + "\n")
