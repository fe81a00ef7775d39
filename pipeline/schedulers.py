"""The samplers a trained pipeline can switch to, by short name (for the CLIs and the evaluation)."""

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++ (2nd order multistep), diffusers' default algorithm_type
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Replace `pipe.scheduler` by the sampler `name`, built from the same noise schedule (its config)."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
