"""The `app.py` web demo: pick digits, watch them being denoised, download the grid as a PNG (Gradio; installed
with the `demo` extra). See app.py for how to start it."""

import argparse
import os
import queue
import tempfile
import threading
from collections.abc import Iterator

import gradio as gr
import torch
from diffusers import DiffusionPipeline

from .errors import one_line_errors
from .grid import labelled_grid
from .loading import load_pipeline, shipped_model
from .schedulers import SCHEDULERS, set_scheduler

USAGE = """A web demo of a trained pipeline: pick digits, watch them being denoised, download the grid as a PNG.

    pip install -e ".[demo]"
    python app.py                                            # the model shipped in models/mnist; open http://127.0.0.1:7860
    python app.py --model output/mnist-quick                 # your own trained folder
    MODEL=you/mnist-diffusion python app.py                  # the model from an env var, as a Hugging Face Space has it
    python app.py --model output/mnist-quick --host 0.0.0.0 --port 8080   # reachable from other machines

The folder (or Hub id) is loaded with this package's code and safetensors weights only (`pipeline.loading`).
"""
MAX_STEPS = 200
MAX_IMAGES_PER_DIGIT = 16
MAX_ROWS = 20
MAX_GUIDANCE = 10.0
MAX_SEED = 2**63 - 1
SCALE = 3  # 28-pixel digits are tiny on a screen: show and save the grid 3x larger
PREVIEWS = 10  # intermediate frames shown while sampling


class Cancelled(Exception):
    """Raised in the pipeline's step callback to end a run nobody is watching any more."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=USAGE.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("MODEL") or shipped_model(),
        help="A folder written by train_conditional.py, or a Hub model id (default: the MODEL environment variable, "
        "else the model shipped in models/mnist).",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="Address to serve on (default: GRADIO_SERVER_NAME, else 127.0.0.1: this machine only).",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="Port to serve on."
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, mps... (default: cuda when available).")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(
            "pass --model DIR_OR_HUB_ID or set the MODEL environment variable (this installation has no shipped model: "
            "models/mnist is missing)"
        )
    return args


def bad_input(message: str) -> gr.Error:
    """An error for the page: Gradio shows `message` there, and the server log stays free of tracebacks."""
    return gr.Error(message, print_exception=False)


def parse_digits(text: str | None, labels: dict[str, int]) -> list[str]:
    """The rows the user asked for: "2026" -> ["2", "0", "2", "6"]; separators (spaces, commas) are ignored.

    For a model whose label names are longer than one character (e.g. Fashion-MNIST's "T-shirt/top"), the names are
    separated by commas instead. Raises `gr.Error` with a message for the page on anything else.
    """
    text = (text or "").strip()
    if all(len(name) == 1 for name in labels):
        rows = [char for char in text if char not in " ,;"]
    else:
        rows = [name.strip() for name in text.split(",") if name.strip()]
    if not rows:
        raise bad_input(f"Enter at least one digit, e.g. 2026 (one grid row per digit; valid: {' '.join(labels)}).")
    unknown = sorted(set(rows) - set(labels))
    if unknown:
        raise bad_input(f"Not a digit this model knows: {', '.join(map(repr, unknown))}. Use {' '.join(labels)}.")
    if len(rows) > MAX_ROWS:
        raise bad_input(f"At most {MAX_ROWS} digits at a time, got {len(rows)}.")
    return rows


def whole_number(value: float | None, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], or `gr.Error` naming the field."""
    if value is None or value != int(value) or not low <= value <= high:
        raise bad_input(f"{name} must be a whole number from {low} to {high}, got {value}.")
    return int(value)


def preview(pipe: DiffusionPipeline, step: int, images: torch.Tensor) -> torch.Tensor:
    """The noisy batch after `step`, as images in [0, 1]."""
    sigmas = getattr(pipe.scheduler, "sigmas", None)
    if pipe.scheduler.init_noise_sigma > 1 and sigmas is not None:  # Euler keeps x_0 + sigma * noise: rescale
        images = images / (1 + sigmas[step + 1] ** 2) ** 0.5
    return (images / 2 + 0.5).clamp(0, 1)


def build_demo(pipe: DiffusionPipeline, model: str) -> gr.Blocks:
    labels = pipe.labels
    saved_scheduler = pipe.scheduler
    default_scheduler = next((name for name, cls in SCHEDULERS.items() if isinstance(saved_scheduler, cls)), "ddim")
    saved = pipe.sampling_settings()  # the steps and guidance `pipe(class_labels)` would use
    autoguided = saved["guidance"] == "autoguidance"
    # guidance needs the unconditional prediction (class dropout in training) or a guide network (autoguidance)
    guided = autoguided or bool(pipe.unet.config.class_dropout_prob)
    # the first input: a year for digits; for other classes (Fashion-MNIST, CIFAR-10), the first two names
    example = "2026" if {"0", "2", "6"} <= set(labels) else ", ".join(list(labels)[:2])
    output_dir = tempfile.mkdtemp(prefix="digits-demo-")

    def generate(
        digits: str, per_digit: float, steps: float, guidance: float, scheduler: str, seed: float
    ) -> Iterator[tuple]:
        rows = parse_digits(digits, labels)
        per_digit = whole_number(per_digit, "Images per digit", 1, MAX_IMAGES_PER_DIGIT)
        steps = whole_number(steps, "Sampling steps", 1, MAX_STEPS)
        seed = whole_number(seed, "Seed", 0, MAX_SEED)
        if guidance is None or not 1.0 <= guidance <= MAX_GUIDANCE:
            raise bad_input(f"Guidance scale must be from 1 to {MAX_GUIDANCE:g}, got {guidance}.")
        if scheduler not in SCHEDULERS:
            raise bad_input(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
        if guidance > 1 and not guided:
            gr.Warning("This model was trained without class dropout: guidance above 1 will likely hurt the images.")

        # Runs go one at a time (concurrency_limit=1 below), so switching the shared pipeline's sampler is safe.
        pipe.scheduler = saved_scheduler
        set_scheduler(pipe, scheduler)
        frames: queue.Queue = queue.Queue()
        every = max(1, steps // PREVIEWS)
        stop = threading.Event()

        def on_step_end(pipe: DiffusionPipeline, step: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
            if stop.is_set():  # the page went away: end this run before the next one starts
                raise Cancelled
            if (step + 1) % every == 0 and step + 1 < steps:
                grid = labelled_grid(preview(pipe, step, callback_kwargs["images"]), rows, per_digit, scale=SCALE)
                frames.put((step + 1, grid))
            return callback_kwargs

        result: dict = {}

        def sample() -> None:  # in a thread, so that this generator can send the frames while the pipeline runs
            try:
                result["images"] = pipe(
                    class_labels=rows,
                    num_images_per_label=per_digit,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="pt",
                    callback_on_step_end=on_step_end,
                ).images
            except Exception as error:  # shown in the page below; the server keeps serving
                result["error"] = error
            finally:
                frames.put(None)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            while (frame := frames.get()) is not None:
                step, grid = frame
                yield gr.Image(grid, label=f"Denoising: step {step} of {steps}"), None
        finally:  # also when Gradio closes this generator early
            stop.set()
            thread.join()
        if "error" in result:
            raise gr.Error(f"Sampling failed: {type(result['error']).__name__}: {result['error']}") from result["error"]

        grid = labelled_grid(result["images"], rows, columns=per_digit, scale=SCALE)
        path = os.path.join(output_dir, f"digits-{''.join(rows)[:40]}-seed{seed}.png")  # Gradio serves a copy
        grid.save(path)
        label = f"{len(rows)} x {per_digit} samples, {steps} {scheduler} steps, guidance {guidance:g}, seed {seed}"
        yield gr.Image(grid, label=label), path

    # delete_cache: Gradio's copies of the grids older than a day are removed once a day.
    with gr.Blocks(title="Class-conditioned diffusion", analytics_enabled=False, delete_cache=(86400, 86400)) as demo:
        gr.Markdown(
            f"# Class-conditioned diffusion\nModel: `{model}`. Pick classes or type them, such as `{example}`: one "
            "row per class, repeats allowed. On a CPU, fewer steps (e.g. 20 with `dpm++`) are much quicker."
        )
        with gr.Row():
            with gr.Column(scale=1):
                picked = gr.CheckboxGroup(list(labels), label="Pick digits")
                digits = gr.Textbox(example, label="Digits (one grid row each)", max_lines=1, elem_id="digits")
                per_digit = gr.Slider(
                    1, MAX_IMAGES_PER_DIGIT, value=8, step=1, label="Images per digit", elem_id="per-digit"
                )
                steps = gr.Number(
                    saved["num_inference_steps"],  # the setting saved with the model
                    label=f"Sampling steps (1 to {MAX_STEPS})",
                    precision=0,
                    elem_id="steps",
                )
                guidance = gr.Slider(
                    1.0,
                    MAX_GUIDANCE,
                    value=saved["guidance_scale"],
                    step=0.5,
                    label="Guidance scale (1 = off"
                    + ("; away from the guide network)" if autoguided else ")")
                    + ("" if guided else "; this model was trained without guidance"),
                )
                scheduler = gr.Dropdown(list(SCHEDULERS), value=default_scheduler, label="Scheduler")
                seed = gr.Number(0, label="Seed (same seed, same images)", precision=0, elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                image = gr.Image(label="Samples", format="png", type="pil", interactive=False, elem_id="grid")
                download = gr.File(label="Download PNG", interactive=False, elem_id="download")
        picked.input(lambda chosen: "".join(sorted(chosen)), picked, digits)
        gr.on(
            [button.click, digits.submit],
            generate,
            [digits, per_digit, steps, guidance, scheduler, seed],
            [image, download],
            concurrency_limit=1,  # one run at a time: they share the pipeline (and the CPU)
            show_progress="minimal",
            api_name="generate",
        )
    return demo


def main(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args.model, trust_remote_code=False, device=args.device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    build_demo(pipe, args.model).launch(server_name=args.host, server_port=args.port, share=False)


def cli(argv: list[str] | None = None) -> None:
    arguments = parse_args(argv)
    with one_line_errors():  # a bad model folder or id
        main(arguments)
