"""Shared fixtures: tiny models, a tiny saved pipeline, and helpers to run the real CLIs in fresh processes."""

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET = str(REPO_ROOT / "data" / "mnist")

# A model small enough to train a few steps in seconds on 2 cores; same block structure as the seed's.
TINY_UNET_CONFIG = dict(block_out_channels=(16, 16, 16), layers_per_block=1, class_emb_size=2, norm_num_groups=8)
TINY_TRAIN_FLAGS = [
    "--block_out_channels",
    "16",
    "16",
    "16",
    "--layers_per_block",
    "1",
    "--class_emb_size",
    "2",
    "--norm_num_groups",
    "8",
    "--validation_images_per_label",  # metrics need the evaluation classifier: tested on their own
    "0",
    "--validation_grid_columns",
    "2",
    "--validation_num_inference_steps",
    "2",
]


class CreatesMarker:
    """Unpickling this object creates the file `path`: what a crafted pickle could do instead (run any code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def cli_env(**extra: str) -> dict:
    """Environment for CLI subprocesses: no network, no W&B login, quiet progress bars."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str], cwd: Path | str = REPO_ROOT, timeout: int = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit code, fail showing its output."""
    result = subprocess.run(args, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(
            f"{args} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def exit_code_and_stderr(cli: Callable[[list[str]], None], argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's command-line function in this process and return its exit code and what it wrote to stderr.
    For bad-input tests: they skip a fresh interpreter's ~10 s of imports, and an unexpected exception (what would be
    a traceback on the command line) fails the test."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    return exit_info.value.code, capsys.readouterr().err


def train_here(argv: list[str], distill: bool = False) -> None:
    """`python train_conditional.py ARGV` (or `distill.py`) in this process: the scripts' own code path after the
    launcher, without a fresh interpreter's ~8 s of imports. For tests of what a run does, not of how it is launched
    (those use `accelerate_launch`). An error ends it as the script would: `SystemExit` with the error's exit code and
    the one line on stderr (`exit_code_and_stderr` reads both).

    What a run changes in the process is put back: accelerate's process-wide state (so that the next run can take
    another precision) and the signal handlers the run installs for SIGTERM and Ctrl-C."""
    from accelerate.state import AcceleratorState, GradientState

    from pipeline import config, training
    from pipeline.distillation import distil

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if distill:
            distil(config.parse_distill_args(argv))
        else:
            training.run(config.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def accelerate_command(config: str, launch_args: list[str] = ()) -> list[str]:
    """The real `accelerate launch` of this environment, as a user would type it, up to the script's arguments."""
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO_ROOT / "accelerate_configs" / config),
        *launch_args,
        str(REPO_ROOT / "train_conditional.py"),
    ]


def accelerate_launch(
    config: str, script_args: list[str], launch_args: list[str] = (), **kwargs
) -> subprocess.CompletedProcess:
    return run_cli([*accelerate_command(config, launch_args), *script_args], **kwargs)


def weights_fingerprint(run_dir: Path) -> list[float]:
    """Three numbers that move with any change to a saved UNet's weights: their sum, their sum of squares, and their
    projection on a ramp over the (name-sorted) parameters, which also catches weights that trade places."""
    tensors = load_file(run_dir / "unet" / "diffusion_pytorch_model.safetensors")
    flat = torch.cat([tensors[name].flatten().double() for name in sorted(tensors)])
    ramp = torch.linspace(-1, 1, len(flat), dtype=torch.float64)
    return [flat.sum().item(), flat.square().sum().item(), (flat * ramp).sum().item()]


@pytest.fixture
def tiny_unet() -> ClassConditionedUNet:
    torch.manual_seed(0)
    return ClassConditionedUNet(**TINY_UNET_CONFIG, id2label={i: str(i) for i in range(10)}).eval()


@pytest.fixture
def tiny_pipe(tiny_unet) -> ClassConditionedDDIMPipeline:
    pipe = ClassConditionedDDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """A tiny pipeline trained for a few steps by the real `accelerate launch` on the real vendored MNIST."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    accelerate_launch(
        "cpu.yaml",
        ["--output_dir", str(output_dir), "--max_train_steps", "4", "--train_batch_size", "8",
         "--default_timestep_spacing", "trailing", *TINY_TRAIN_FLAGS],  # fmt: skip
    )
    return output_dir


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory) -> str:
    """A classifier cache shared by the tests; they train the evaluation classifier on 3,000 images (~20 s, once)."""
    return str(tmp_path_factory.mktemp("classifier_cache"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs: a real full disk (safetensors then raises SafetensorError, not OSError)."""
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root; the full-disk tests run where the machine allows it")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # lazy: a failed test may hold a file open
