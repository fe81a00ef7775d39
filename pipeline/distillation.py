"""Consistency distillation of a trained, guided pipeline into a few-step student (`distill.py`).

Latent consistency distillation (Luo et al. 2023, https://huggingface.co/papers/2310.04378; consistency models, Song
et al. 2023) as diffusers' `examples/consistency_distillation/train_lcm_distill_sd_wds.py` does it, without the
latent space: the student learns to map any point of the teacher's guided DDIM trajectory straight to the
trajectory's end, so that diffusers' `LCMScheduler` samples it in 1 to 4 network evaluations, unguided. The kind of
guidance and its scale are the teacher's saved defaults, fixed (the student has no guidance input), so the student's
unguided output is the teacher's guided one: classifier-free (away from the teacher's unconditional prediction) or
autoguidance (away from the prediction of the teacher folder's guide network, Karras et al. 2024).

One loss evaluation, for a batch of clean images x0 and a DDIM grid of N steps of k = T / N training timesteps:
1. pick a grid timestep t_n and noise x0 to it;
2. the student's consistency output f(x_tn, t_n) = c_skip(t_n) x_tn + c_out(t_n) x0_student(x_tn, t_n);
3. one guided DDIM step of the teacher from t_n to t_n - k gives x_(tn-k) (2 network evaluations per image);
4. the target network (an EMA of the student) gives f(x_(tn-k), t_n - k), the target;
5. pseudo-Huber distance between the two (diffusers' default `huber_c` 0.001).
"""

import argparse
import copy
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel

from .errors import UsageError
from .loading import check_folder
from .modeling_class_conditioned_unet import ClassConditionedUNet
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline
from .training import run

# LCMScheduler's defaults: the student is sampled with the same boundary scalings it is trained with.
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of the consistency function (LCMScheduler.get_scalings_for_boundary_condition_discrete):
    at timestep 0, c_skip = 1 and c_out = 0, so f(x, 0) = x."""
    scaled = TIMESTEP_SCALING * timesteps.float()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


class ConsistencyDistillation:
    """The consistency-distillation loss of a student against a frozen, guided teacher and a target network."""

    def __init__(
        self,
        teacher: ClassConditionedUNet,
        noise_scheduler: DDIMScheduler,
        guidance_scale: float,
        num_ddim_timesteps: int = 50,
        huber_c: float = 0.001,
        guide: ClassConditionedUNet | None = None,
    ):
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        if num_train_timesteps % num_ddim_timesteps:
            raise ValueError(
                f"num_ddim_timesteps {num_ddim_timesteps} must divide the {num_train_timesteps} training timesteps."
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.guide = guide.eval().requires_grad_(False) if guide is not None else None  # None: classifier-free
        self.prediction_type = noise_scheduler.config.prediction_type
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(next(teacher.parameters()).device)
        self.skip = num_train_timesteps // num_ddim_timesteps  # k: training timesteps per DDIM step
        self.guidance_scale = guidance_scale
        self.huber_c = huber_c

    def clean_and_noise(
        self, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and noise estimates a model output stands for, given the noisy input at `timesteps`."""
        alpha = self.alphas_cumprod[timesteps][:, None, None, None]
        signal, noise_level = alpha.sqrt(), (1 - alpha).sqrt()
        if self.prediction_type == "epsilon":
            return (noisy - noise_level * model_output) / signal, model_output
        if self.prediction_type == "v_prediction":
            return signal * noisy - noise_level * model_output, signal * model_output + noise_level * noisy
        raise ValueError(f"Cannot distil a {self.prediction_type!r}-predicting teacher; use epsilon or v_prediction.")

    def consistency_output(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """f(x_t, t): the model's image estimate, blended with x_t so that f(x, 0) = x."""
        clean, _ = self.clean_and_noise(model(noisy, timesteps, class_labels).sample.float(), noisy, timesteps)
        c_skip, c_out = boundary_scalings(timesteps)
        return c_skip * noisy + c_out * clean

    @torch.no_grad()
    def teacher_step(
        self, noisy: torch.Tensor, start: torch.Tensor, end: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """One guided DDIM step of the teacher from `start` to `end`: classifier-free (both halves in one batch), or
        autoguided (the teacher and its guide, one call each)."""
        noisy_twice, start_twice = torch.cat([noisy, noisy]), torch.cat([start, start])
        if self.guide is None:
            null_labels = torch.full_like(class_labels, self.teacher.null_class_id)
            output = self.teacher(noisy_twice, start_twice, torch.cat([class_labels, null_labels])).sample.float()
        else:
            output = torch.cat([self.teacher(noisy, start, class_labels).sample.float(),
                                self.guide(noisy, start, class_labels).sample.float()])  # fmt: skip
        clean, eps = self.clean_and_noise(output, noisy_twice, start_twice)
        # the teacher's conditional prediction, extrapolated away from the unconditional one or the guide's
        (clean_cond, clean_away), (eps_cond, eps_away) = clean.chunk(2), eps.chunk(2)
        clean = clean_away + self.guidance_scale * (clean_cond - clean_away)
        eps = eps_away + self.guidance_scale * (eps_cond - eps_away)
        alpha_end = self.alphas_cumprod[end][:, None, None, None]
        return alpha_end.sqrt() * clean + (1 - alpha_end).sqrt() * eps

    def __call__(
        self,
        student: torch.nn.Module,
        target_network: torch.nn.Module,
        clean_images: torch.Tensor,
        class_labels: torch.Tensor,
        noise: torch.Tensor,
        uniform_timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The loss for one batch. `uniform_timesteps` (uniform over the training timesteps, as training draws them)
        pick the DDIM grid step: t // k is uniform over the N steps."""
        index = torch.div(uniform_timesteps, self.skip, rounding_mode="floor")
        start = (index + 1) * self.skip - 1  # the DDIM grid: k - 1, 2k - 1, ..., T - 1 (LCMScheduler's)
        end = (start - self.skip).clamp(min=0)
        noisy = self.alphas_cumprod[start].sqrt()[:, None, None, None] * clean_images + (
            1 - self.alphas_cumprod[start]
        ).sqrt()[:, None, None, None] * noise
        prediction = self.consistency_output(student, noisy, start, class_labels)

        with torch.no_grad():
            previous = self.teacher_step(noisy, start, end, class_labels)
            target = self.consistency_output(target_network, previous, end, class_labels)

        # pseudo-Huber: like L2 near zero, like L1 for large errors (Song & Dhariwal 2023)
        return (((prediction - target) ** 2 + self.huber_c**2).sqrt() - self.huber_c).mean()


class DistillationObjective:
    """The training loop's objective for distillation: the consistency loss, with the student's EMA as the target
    network (its weights live in the EMA, so checkpoints and exact resume need nothing more).

    `student` is the prepared model, unwrapped: the target network is a copy of it, so it lives on the student's
    device; its weights are replaced by the EMA's before every use. The teacher and the target run under
    `autocast`, the training precision (accelerate autocasts only the prepared model itself).
    """

    def __init__(
        self,
        distillation: ConsistencyDistillation,
        student: torch.nn.Module,
        ema_model: EMAModel,
        autocast: Callable[[], AbstractContextManager],
    ):
        self.distillation = distillation
        self.ema_model = ema_model
        self.autocast = autocast
        self.target_network = copy.deepcopy(student).eval().requires_grad_(False)

    def __call__(
        self,
        model: torch.nn.Module,
        clean_images: torch.Tensor,
        class_labels: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        self.ema_model.copy_to(self.target_network.parameters())
        with self.autocast():
            return self.distillation(model, self.target_network, clean_images, class_labels, noise, timesteps)


def load_teacher(
    teacher_dir: str, dataset: str, label_names: list[str], device: torch.device, network: str = "unet"
) -> ClassConditionedUNet:
    """A network of `--teacher` (its `unet`, or its `guide_unet`), frozen, after checking that it knows the dataset's
    classes."""
    check_folder(teacher_dir)
    teacher = ClassConditionedUNet.from_pretrained(os.path.join(teacher_dir, network), use_safetensors=True)
    teacher_labels = [teacher.config.id2label[key] for key in sorted(teacher.config.id2label, key=int)]
    if teacher_labels != label_names:
        raise UsageError(
            f"The teacher {teacher_dir!r} knows the classes {teacher_labels}, but {dataset!r} has {label_names}; "
            "distil on the dataset the teacher was trained on (--dataset)."
        )
    return teacher.to(device).eval().requires_grad_(False)


class Distillation:
    """distill.py's task for the training loop (the counterpart of `pipeline.training.Denoising`): the student starts
    as a copy of the frozen teacher and learns the consistency loss against its EMA, the target network; the saved
    student samples on the DDIM grid it was distilled on."""

    ema_warmup = False  # the target network: a short, constant-decay average (diffusers' LCM recipe)

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.description = f"distillation of {args.teacher}"
        self.modules: dict[str, torch.nn.Module] = {}  # the teacher (and its guide), then the target network

    def start(self, model: ClassConditionedUNet, label_names: list[str], device: torch.device) -> None:
        teacher = load_teacher(self.args.teacher, self.args.dataset, label_names, device)
        model.load_state_dict(teacher.state_dict())
        self.modules["teacher"] = teacher
        if self.args.teacher_guidance == "autoguidance":
            args = self.args
            self.modules["guide"] = load_teacher(args.teacher, args.dataset, label_names, device, "guide_unet")

    def objective(
        self, accelerator: Accelerator, model: torch.nn.Module, ema_model: EMAModel,
        noise_scheduler: DDIMScheduler, args: argparse.Namespace,
    ) -> DistillationObjective:  # fmt: skip
        distillation = ConsistencyDistillation(self.modules["teacher"], noise_scheduler, args.teacher_guidance_scale,
                                               args.num_ddim_timesteps, args.huber_c,
                                               self.modules.get("guide"))  # fmt: skip
        # The target network is built beside the prepared student, so on its device.
        student = accelerator.unwrap_model(model, keep_torch_compile=False)
        objective = DistillationObjective(distillation, student, ema_model, accelerator.autocast)
        self.modules["target network"] = objective.target_network
        return objective

    def finish_pipeline(self, pipeline: ClassConditionedDDIMPipeline) -> None:
        # LCMScheduler's k: the student samples on the DDIM grid it was distilled on
        pipeline.scheduler.register_to_config(original_inference_steps=self.args.num_ddim_timesteps)


def distil(args: argparse.Namespace) -> None:
    """What distill.py runs: the training loop with the distillation task, behind the one error path."""
    run(args, Distillation(args))
