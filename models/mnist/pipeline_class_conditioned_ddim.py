"""`ClassConditionedDDIMPipeline`: sample images of chosen classes from a `ClassConditionedUNet`.

This module imports only torch, diffusers (with numpy and huggingface_hub, which diffusers itself requires), the
standard library and the model module: it is the pipeline code that travels inside a saved pipeline folder.
"""

import inspect
import json
import logging
import math
import numbers
import os
import shutil
from collections.abc import Callable, Iterable

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo

from .modeling_class_conditioned_unet import ClassConditionedUNet

logger = logging.getLogger(__name__)


def bytes_per_image(in_channels: int, resolution: int, block_out_channels: list[int]) -> int:
    """A rough lower bound of the memory one image takes in a UNet pass: float32 feature maps of the widest level at
    full size, a few alive at once, and the input."""
    return 4 * resolution**2 * (in_channels + 8 * max(block_out_channels))


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the host's available memory (Linux), else None (unknown: not checked)."""
    if device.type == "cuda":  # the driver's free memory plus what torch holds in its cache but does not use
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device
        )
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None

# "latent" is diffusers' name for the undecoded result: here the final batch in [-1, 1], before mapping to [0, 1].
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# A saved folder carries this file and the model file under these names (see `save_pretrained`).
GUIDANCE_KINDS = ("cfg", "autoguidance")
PIPELINE_FILE_STEM = "pipeline_class_conditioned_ddim"
MODEL_FILE_STEM = "modeling_class_conditioned_unet"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from pipeline import ClassConditionedDDIMPipeline

        >>> pipe = ClassConditionedDDIMPipeline.from_pretrained("output/mnist-quick")
        >>> generator = torch.Generator().manual_seed(0)
        >>> images = pipe(class_labels=[3, 7], num_images_per_label=2, generator=generator).images
        >>> len(images), images[0].size
        (4, (28, 28))
        >>> images[0].save("three.png")
        ```
"""


class ClassConditionedDDIMPipeline(DiffusionPipeline):
    r"""
    Pipeline for class-conditional image generation, e.g. MNIST digits of the classes you ask for.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Parameters:
        unet ([`ClassConditionedUNet`]):
            A class-conditioned UNet that predicts the noise in an image given the timestep and the class label.
        scheduler ([`SchedulerMixin`]):
            A scheduler to denoise the images with. Trained with a [`DDIMScheduler`]; any diffusers scheduler built
            from its config works too (`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`).
        default_num_inference_steps (`int`, *optional*, defaults to 50):
            Steps used when a call does not say; saved in `model_index.json`, so a training recipe can ship the
            best measured setting with the model.
        default_guidance_scale (`float`, *optional*, defaults to 1.0):
            Classifier-free guidance scale used when a call does not say; saved likewise.
        default_guidance_interval (`list[float]`, *optional*, defaults to `None`):
            `[start, stop]`, the part of the denoising steps that is guided when a call does not say (`None`: all of
            them, `[0.0, 1.0]`); saved likewise.
        guide_unet ([`ClassConditionedUNet`], *optional*, defaults to `None`):
            A weaker version of `unet` (an early checkpoint, or a smaller network trained on the same classes) for
            autoguidance ([Karras et al. 2024](https://huggingface.co/papers/2406.02507)): the prediction is moved
            away from the guide's instead of from the unconditional one. Saved in `guide_unet/` beside `unet/`.
        default_guidance (`str`, *optional*, defaults to `"cfg"`):
            The kind of guidance used when a call does not say: `"cfg"` (classifier-free) or `"autoguidance"` (needs
            `guide_unet`); saved likewise.
    """

    model_cpu_offload_seq = "unet->guide_unet"
    _optional_components = ["guide_unet"]
    # One tensor under two names: "latents", as every diffusers pipeline (and its tests) calls the batch being
    # denoised, and "images", as this pipeline's loop and earlier callbacks do.
    _callback_tensor_inputs = ["latents", "images"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiffusionPipeline":
        r"""
        Load a saved pipeline, reading weights from safetensors only unless told otherwise.

        diffusers falls back to pickle (`.bin`) weights, and unpickling a file can run code. Here `use_safetensors`
        defaults to `True`, so a folder that only has pickle weights is refused; pass `use_safetensors=False` to
        load one you trust. Every other argument is [`DiffusionPipeline.from_pretrained`]'s.
        """
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # `unet: ModelMixin`, not `ClassConditionedUNet`: as remote code, diffusers loads the UNet from the copy in unet/,
    # a class object other than the one imported above, and would warn "Expected types for unet" on every load.
    def __init__(
        self,
        unet: ModelMixin,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 1.0,
        # A list, not a tuple: diffusers checks the types of these arguments on loading and knows lists only.
        default_guidance_interval: list[float] | None = None,
        guide_unet: ModelMixin | None = None,
        default_guidance: str = "cfg",
    ):
        super().__init__()
        # Unlike diffusers' DDIMPipeline we keep the scheduler we are given: a saved pipeline may carry a faster
        # sampler as its default, and converting it back to DDIM on load would silently discard that choice.
        self.register_modules(unet=unet, scheduler=scheduler, guide_unet=guide_unet)
        self.register_to_config(
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            default_guidance_interval=list(default_guidance_interval or (0.0, 1.0)),
            default_guidance=default_guidance,
        )
        self.check_guidance(default_guidance)

    def check_guidance(self, guidance: str) -> None:
        """Refuse a kind of guidance this pipeline cannot do, naming the fix."""
        if guidance not in GUIDANCE_KINDS:
            raise ValueError(f"Unknown guidance {guidance!r}; use one of {list(GUIDANCE_KINDS)}.")
        if guidance == "autoguidance":
            if self.guide_unet is None:
                raise ValueError("guidance='autoguidance' needs a guide_unet; this pipeline has none (use 'cfg').")
            if self.guide_unet.config.num_classes != self.unet.config.num_classes:
                raise ValueError(
                    f"The guide_unet knows {self.guide_unet.config.num_classes} classes, the unet "
                    f"{self.unet.config.num_classes}; a guide must be trained on the same classes."
                )

    @classmethod
    def load_config(cls, *args, **kwargs):
        # `save_pretrained` names the code files the folder carries, for `DiffusionPipeline.from_pretrained(folder,
        # trust_remote_code=True)`. Loading through this class, use the classes imported here instead of those copies.
        output = super().load_config(*args, **kwargs)
        config = output[0] if isinstance(output, tuple) else output
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        for name in ("unet", "guide_unet"):
            if config.get(name) == [MODEL_FILE_STEM, "ClassConditionedUNet"]:
                config[name] = [ClassConditionedUNet.__module__, "ClassConditionedUNet"]
        return output

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        **kwargs,
    ):
        r"""
        [`DiffusionPipeline.save_pretrained`] plus the code, so that the folder also loads without this package:
        `DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)`. Weights are always written as
        safetensors, the only format this pipeline loads.

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder to write; created if missing.
            push_to_hub (`bool`, *optional*, defaults to `False`):
                Then upload the whole folder to the Hub repository `repo_id` (created if missing), as diffusers does.
                The folder is saved locally first, so a failed upload leaves a complete local copy. A `README.md`
                already in the folder (the model card training writes) is uploaded as it is; unlike diffusers, no
                generic card is fetched or written.
            repo_id (`str`, *optional*, defaults to `None`):
                The repository to push to; `None` uses the folder's name in your namespace.
            token (`str`, *optional*, defaults to `None`):
                The Hub token; `None` uses the one of `hf auth login`.
            private (`bool`, *optional*, defaults to `None`):
                Create the repository private; `None` follows your account's default. Ignored if it already exists.
            commit_message (`str`, *optional*, defaults to `None`):
                `None` commits "Upload ClassConditionedDDIMPipeline".
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing to the main branch.
            safe_serialization (`bool`, *optional*, defaults to `True`):
                `False` (pickle `.bin` weights, which can run code when loaded) is not honoured: the weights are
                written as safetensors anyway, with a warning, so that `from_pretrained` loads what was saved.
            kwargs:
                Passed to [`DiffusionPipeline.save_pretrained`] (`variant`, `max_shard_size`, ...).
        """
        if not safe_serialization:
            logger.warning(
                "ClassConditionedDDIMPipeline writes safetensors weights only (pickle weights can run code when "
                "loaded, and this pipeline never reads them): ignoring safe_serialization=False."
            )
        # Not passing push_to_hub on: diffusers would upload before the code files below exist.
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        # The pipeline file at the root, the model file beside it (for its relative import) and in unet/.
        model_file = inspect.getsourcefile(ClassConditionedUNet)
        shutil.copyfile(__file__, os.path.join(save_directory, f"{PIPELINE_FILE_STEM}.py"))
        shutil.copyfile(model_file, os.path.join(save_directory, f"{MODEL_FILE_STEM}.py"))
        networks = ["unet"] + (["guide_unet"] if self.guide_unet is not None else [])
        for name in networks:
            shutil.copyfile(model_file, os.path.join(save_directory, name, f"{MODEL_FILE_STEM}.py"))
        index_file = os.path.join(save_directory, "model_index.json")
        with open(index_file) as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_FILE_STEM, "ClassConditionedDDIMPipeline"]
        for name in networks:
            index[name] = [MODEL_FILE_STEM, "ClassConditionedUNet"]
        with open(index_file, "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

        if push_to_hub:
            if repo_id is None:
                repo_id = os.path.basename(os.path.normpath(save_directory))
            repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
            self._upload_folder(
                save_directory, repo_id, token=token, commit_message=commit_message, create_pr=create_pr
            )

    def check_memory(self, batch_size: int, guided: bool) -> None:
        """Refuse a batch that cannot fit in the device's free memory (see `bytes_per_image`; guidance doubles the
        batch), before anything is allocated: calls far beyond it would otherwise try to allocate tens of GB first."""
        config = self.unet.config
        needed = batch_size * bytes_per_image(config.in_channels, config.sample_size, config.block_out_channels)
        needed *= 2 if guided else 1
        free = free_memory_bytes(self._execution_device)
        if free is not None and needed > free:
            raise ValueError(
                f"{batch_size} images at once need at least {needed / 2**30:.1f} GiB, more than the "
                f"{free / 2**30:.1f} GiB free on {self._execution_device}; ask for fewer per call (class_labels x "
                f"num_images_per_label) and call several times."
            )

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> class id, from the model's `id2label` (the dataset's class names), sorted by name."""
        id2label = self.unet.config.id2label or {i: str(i) for i in range(self.unet.config.num_classes)}
        return dict(sorted((str(name), int(class_id)) for class_id, name in id2label.items()))

    def sampling_settings(
        self,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | list[float] | None = None,
        guidance: str | None = None,
    ) -> dict:
        """What a call with these arguments samples with: each `None` becomes the saved default
        (`default_num_inference_steps`, `default_guidance_scale`, `default_guidance_interval`, `default_guidance`).
        `__call__` settles its arguments here, so callers that report their settings (validation, evaluation) read
        them back from it."""
        return {
            # Folders saved before autoguidance existed have no default_guidance: they guide classifier-free.
            "guidance": self.config.get("default_guidance", "cfg") if guidance is None else guidance,
            "num_inference_steps": self.config.default_num_inference_steps
            if num_inference_steps is None
            else num_inference_steps,
            "guidance_scale": self.config.default_guidance_scale if guidance_scale is None else guidance_scale,
            "guidance_interval": list(self.config.default_guidance_interval if guidance_interval is None
                                      else guidance_interval),  # fmt: skip
        }

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the current (or last) call; a step callback may change it via `_guidance_scale`."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        # diffusers' convention: any scale <= 1 means no guidance (the conditional prediction alone).
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """The number of denoising steps of the current (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a step callback to skip the remaining steps."""
        return self._interrupt

    def get_label_ids(self, label: int | str | list[int | str] | torch.Tensor | np.ndarray) -> list[int]:
        r"""
        Map class labels to class ids.

        Args:
            label (`int`, `str`, `list[int | str]`, 1-D `torch.Tensor` or 1-D `np.ndarray`):
                Class ids (`3`, `np.int64(3)`), label names (`"3"`, see [`~ClassConditionedDDIMPipeline.labels`])
                or a list mixing both. A string is always one label name, never split into characters.

        Returns:
            `list[int]`: One class id per label.
        """
        if isinstance(label, (torch.Tensor, np.ndarray)):
            if isinstance(label, torch.Tensor) and label.is_meta:
                raise ValueError("class_labels is a tensor on the meta device, which holds no values; pass real ids.")
            if label.ndim > 1:
                raise ValueError(f"class_labels as a tensor or array must be 1-D, got shape {tuple(label.shape)}.")
            label = label.tolist()  # Python numbers (a float dtype gives floats, refused below); 0-d gives one
        # A string or a scalar (numpy's included) is one label; anything else iterable holds several.
        labels = list(label) if isinstance(label, Iterable) and not isinstance(label, str) else [label]
        if not labels:
            raise ValueError("class_labels is empty: pass at least one class id or name, e.g. class_labels=[3, 7].")
        num_classes = self.unet.config.num_classes
        names = self.labels
        class_ids = []
        for item in labels:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"Unknown label name {item!r}; valid names are {list(names)}.")
                class_ids.append(names[item])
            # numbers.Integral takes numpy's integers too (np.int64 from an array or np.argmax); bool is no class id.
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                if not 0 <= item < num_classes:
                    raise ValueError(f"Class id {item} is out of range: this model knows ids 0 to {num_classes - 1}.")
                class_ids.append(int(item))
            else:
                raise ValueError(
                    f"class_labels must be integer class ids or label names, got {item!r} ({type(item).__name__}); "
                    f"pass e.g. class_labels=[3, 7] or class_labels=['3', '7']."
                )
        return class_ids

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | np.ndarray,
        num_images_per_label: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["ClassConditionedDDIMPipeline", int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["images"],  # noqa: B006 (diffusers' signature)
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images of the requested classes.

        Args:
            class_labels (`int`, `str`, `list[int | str]`, 1-D `torch.Tensor` or 1-D `np.ndarray`):
                The classes to draw: integer ids (`[3, 7]`, numpy integers too) or label names (`["3", "7"]`, see
                [`~ClassConditionedDDIMPipeline.labels`]). Floats are refused rather than rounded.
            num_images_per_label (`int`, *optional*, defaults to 1):
                Images per requested label; the output lists all images of the first label, then the second, and so on.
            num_inference_steps (`int`, *optional*, defaults to `None`):
                Denoising steps. More steps usually give cleaner images, linearly slower. `None` uses the pipeline's
                `default_num_inference_steps` (50 unless the training recipe saved another).
            guidance_scale (`float`, *optional*, defaults to `None`):
                Classifier-free guidance scale s (diffusers' convention; s = 1 + w of the CFG paper). Any value
                <= 1 turns guidance off (values below 1 sample exactly as `1.0`, with a warning); larger values
                follow the class more strictly at the cost of diversity. Needs a model trained with class dropout.
                `None` uses the pipeline's `default_guidance_scale` (1.0 unless the training recipe saved another);
                turning off the guidance a model was saved with also warns. A step callback may change it for the
                remaining steps through `pipe._guidance_scale` (read back as `pipe.guidance_scale`).
            guidance_interval (`tuple[float, float]`, *optional*, defaults to `None`):
                `(start, stop)`: guide only the steps from `int(start * steps)` up to, not including,
                `int(stop * steps)`, the other steps use the conditional prediction alone at half the cost.
                Fractions of the denoising steps, as the `start`/`stop` of diffusers'
                [`~guiders.ClassifierFreeGuidance`]. Guiding only the middle noise levels can improve both sample
                quality and diversity ([Kynkäänniemi et al. 2024](https://huggingface.co/papers/2404.07724)).
                `None` uses the pipeline's `default_guidance_interval` (`(0.0, 1.0)`, every step, unless the
                training recipe saved another).
            guidance (`str`, *optional*, defaults to `None`):
                What a guided step moves away from: `"cfg"`, the model's own unconditional prediction (one batched
                call of 2N images per step), or `"autoguidance"`, the prediction of the pipeline's `guide_unet`, a
                weaker model of the same classes (two calls of N images per step, one per network). `guidance_scale`
                and `guidance_interval` apply to both. `None` uses the pipeline's `default_guidance`.
            eta (`float`, *optional*, defaults to 0.0):
                The η of the [DDIM](https://huggingface.co/papers/2010.02502) paper: `0` is deterministic DDIM, `1`
                is DDPM-like. Passed only to schedulers whose `step` accepts it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic. A list must hold one generator per image, so each image can be
                reproduced on its own.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (list of `PIL.Image`), `"np"` (`np.ndarray` of shape `(N, H, W, C)` in [0, 1]), `"pt"`
                (`torch.Tensor` of shape `(N, C, H, W)` in [0, 1]) or `"latent"` (the final denoised batch as it
                is, a `torch.Tensor` of shape `(N, C, H, W)` in about [-1, 1], unclamped).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] instead of a plain tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each denoising step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`
                with the tensors named in `callback_on_step_end_tensor_inputs`; it returns a dict whose entries
                replace those tensors (return `callback_kwargs` to change nothing). It may also set
                `pipe._guidance_scale` (used from the next step on) or `pipe._interrupt = True` (skip the remaining
                steps and return the batch as it is); `pipe.num_timesteps` tells how many steps there are.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["images"]`):
                Which tensors `callback_kwargs` holds, from `pipe._callback_tensor_inputs`: `"latents"` (diffusers'
                name) and `"images"` are both the current noisy batch; if both are passed and replaced,
                `"latents"` wins. A `PipelineCallback` brings its own `tensor_inputs` instead.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images, or `(images,)` when `return_dict` is `False`.
        """
        # 0. check inputs, all before any network call
        default_guidance_scale = self.config.default_guidance_scale
        explicitly_off = guidance_scale is not None and guidance_scale <= 1.0
        if explicitly_off and (guidance_scale < 1.0 or default_guidance_scale > 1.0):
            # Valid but likely unintended: diffusers' convention turns guidance off at any scale <= 1.
            message = f"guidance_scale={guidance_scale} turns classifier-free guidance off"
            if guidance_scale < 1.0:
                message += "; values below 1 sample exactly as 1.0 does"
            if default_guidance_scale > 1.0:
                message += f"; this model's default is {default_guidance_scale} (guidance_scale=None uses it)"
            logger.warning(message + ".")
        settings = self.sampling_settings(num_inference_steps, guidance_scale, guidance_interval, guidance)
        num_inference_steps, guidance_scale = settings["num_inference_steps"], settings["guidance_scale"]
        guidance_interval, guidance = settings["guidance_interval"], settings["guidance"]
        self.check_guidance(guidance)
        autoguidance = guidance == "autoguidance"
        counts = {"num_images_per_label": num_images_per_label, "num_inference_steps": num_inference_steps}
        for name, value in counts.items():
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
        for name, value in (("guidance_scale", guidance_scale), ("eta", eta)):
            # nan would silently turn guidance off (nan > 1 is False) or make every image nan; inf makes nan images
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
        if len(guidance_interval) != 2 or not 0.0 <= guidance_interval[0] < guidance_interval[1] <= 1.0:
            raise ValueError(
                f"guidance_interval must be (start, stop) with 0 <= start < stop <= 1, got {tuple(guidance_interval)}."
            )
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be at least 1, got {num_images_per_label}.")
        label_ids = self.get_label_ids(class_labels)
        # before the per-image list is built: a huge num_images_per_label is refused, not allocated
        # a guide's call is a second batch of N after the first, not one of 2N
        self.check_memory(len(label_ids) * num_images_per_label, guided=guidance_scale > 1.0 and not autoguidance)
        class_ids = [i for i in label_ids for _ in range(num_images_per_label)]
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}; choose one of {list(OUTPUT_TYPES)}.")
        batch_size = len(class_ids)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You passed {len(generator)} generators for {batch_size} images ({batch_size // num_images_per_label} "
                f"labels x {num_images_per_label} per label); pass one generator per image or a single generator."
            )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown_inputs = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown_inputs:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, "
                f"got {sorted(unknown_inputs)}."
            )
        if not 0.0 <= eta <= 1.0:
            logger.warning(f"eta should be between 0 (DDIM) and 1 (DDPM), got {eta}; results may be unexpected.")
        # On the pipeline rather than local, as in diffusers: a step callback may read and change them.
        self._guidance_scale = guidance_scale
        self._interrupt = False
        if self.do_classifier_free_guidance and not autoguidance and not self.unet.config.class_dropout_prob:
            logger.warning(
                f"guidance_scale={guidance_scale} asks for classifier-free guidance, but this model was trained "
                "without class dropout, so its 'no class' prediction is untrained; expect poor images. Use "
                "guidance_scale=1.0 or retrain with --class_dropout_prob 0.1."
            )

        device = self._execution_device
        config = self.unet.config
        class_labels = torch.tensor(class_ids, device=device)
        # With guidance, the conditional and unconditional halves go through the UNet as one batch of 2N.
        guided_labels = torch.cat([class_labels, torch.full_like(class_labels, self.unet.null_class_id)])

        # 1. sample the starting noise; with a list of generators, image i depends on generator i only
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        images = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        # diffusers' ClassifierFreeGuidance guider rounds its start and stop fractions the same way.
        first_guided, stop_guided = (int(fraction * self._num_timesteps) for fraction in guidance_interval)
        images = images * self.scheduler.init_noise_sigma
        step_parameters = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"eta": eta} if "eta" in step_parameters else {}
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue

            # 2. predict the noise model_output (both guidance halves in one call); decided at every step, since a
            # callback may have switched guidance on or off
            do_guidance = self.do_classifier_free_guidance and first_guided <= i < stop_guided
            do_cfg = do_guidance and not autoguidance
            model_input = torch.cat([images, images]) if do_cfg else images
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_output = self.unet(model_input, t, guided_labels if do_cfg else class_labels).sample

            # 3. perform guidance: move the prediction away from the unconditional one, or from the weaker guide's
            if do_cfg:
                cond_output, uncond_output = model_output.chunk(2)
                model_output = uncond_output + self.guidance_scale * (cond_output - uncond_output)
            elif do_guidance:
                guide_output = self.guide_unet(model_input, t, class_labels).sample
                model_output = guide_output + self.guidance_scale * (model_output - guide_output)

            # 4. compute the previous noisy sample x_t -> x_t-1
            images = self.scheduler.step(model_output, t, images, **step_kwargs).prev_sample

            if callback_on_step_end is not None:
                step_tensors = {"latents": images, "images": images}
                callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                # Both names hand out the same tensor: take the one the callback replaced, "latents" first.
                for name in ("latents", "images"):
                    if callback_outputs.get(name, images) is not images:
                        images = callback_outputs[name]
                        break

        # 5. map [-1, 1] to [0, 1] and convert; "latent" is the batch as denoised
        if output_type != "latent":
            images = (images / 2 + 0.5).clamp(0, 1)
        if output_type in ("np", "pil"):
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
