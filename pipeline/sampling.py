"""The `sample.py` command: load a trained `ClassConditionedDDIMPipeline`, sample the requested classes and write a
PNG grid (and, with --output_dir, one PNG per image). `USAGE` is its help text."""

import argparse
import contextlib
import os
from collections.abc import Callable

from .errors import UsageError, one_line_errors
from .loading import shipped_model
from .schedulers import SCHEDULERS, add_guidance_flag, add_guidance_interval_flag, add_timestep_spacing_flag

USAGE = """Sample from a trained `ClassConditionedDDIMPipeline` into a PNG grid, one labelled row per requested class.

    python sample.py --output grid.png                        # the model shipped in models/mnist, no training needed
    python sample.py --model output/mnist-quick --output grid.png                    # every class, 8 images each
    python sample.py --model output/mnist-quick --class_labels 3 7 --num_images_per_label 16 --seed 1 --output 37.png
    python sample.py --model output/mnist-quick --scheduler dpm++ --num_inference_steps 10 --guidance_scale 2
    python sample.py --model output/mnist-quick --class_labels 2 0 2 6 --output_dir digits/   # one PNG per image

The folder is loaded with this package's code. Its own copy of the code (saved pipelines carry one, for users
without this package) is never run unless you pass --trust_remote_code.
"""

DTYPES = ["float32", "float16", "bfloat16"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=USAGE.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE
    )
    parser.add_argument(
        "--model",
        default=None,
        help="A folder written by train_conditional.py, or a Hub model id (default: the model shipped in "
        "models/mnist).",
    )
    parser.add_argument(
        "--class_labels",
        nargs="+",
        default=None,
        help="Class ids (3) or label names ('3', or e.g. 'T-shirt' for other datasets) to draw, one grid row each "
        "(default: every class).",
    )
    parser.add_argument("--num_images_per_label", type=int, default=8, help="Images per label (grid columns).")
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="Denoising steps: more is cleaner and linearly slower (default: the model's saved default).",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance scale (1 = off; default: the model's saved default); needs a model trained "
        "with --class_dropout_prob.",
    )
    add_guidance_interval_flag(parser)
    add_guidance_flag(parser)
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), default=None, help="Sampler (default: the one saved with the model)."
    )
    add_timestep_spacing_flag(parser)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic, 1 is DDPM-like.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the starting noise; same seed, same images.")
    parser.add_argument("--output", default="grid.png", help="Where to write the PNG grid.")
    parser.add_argument("--output_dir", default=None, help="Also write every image as its own PNG in this folder.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda when available).")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Precision to sample in.")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Load with the code saved in the model folder (diffusers' DiffusionPipeline), e.g. where this package's "
        "version differs. Off by default: only pass it for folders you trust.",
    )
    args = parser.parse_args(argv)
    args.model = args.model or shipped_model()
    if args.model is None:
        parser.error("pass --model DIR_OR_HUB_ID (this installation has no shipped model: models/mnist is missing)")
    if args.num_images_per_label < 1:
        parser.error(f"--num_images_per_label must be at least 1, got {args.num_images_per_label}")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        parser.error(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
    # Checked before any sampling, so a typo does not cost a whole run.
    extensions = image_extensions()
    if os.path.splitext(args.output)[1].lower() not in extensions:
        parser.error(f"--output {args.output!r} needs an image file extension; one of {' '.join(extensions)}")
    return args


def image_extensions() -> list[str]:
    """The file extensions PIL can write an image to (.png, .jpg, .webp, ...)."""
    from PIL import Image

    Image.init()
    return sorted(extension for extension, image_format in Image.registered_extensions().items()
                  if image_format in Image.SAVE)  # fmt: skip


def class_label(text: str) -> int | str:
    """A CLI label: an id when it is a number ("3" is class 3), else a label name."""
    return int(text) if text.lstrip("-").isdigit() else text


def main(args: argparse.Namespace) -> None:
    from .run_folder import locked_folder

    # --output_dir has one writer at a time, found busy before anything is loaded or sampled
    with locked_folder(args.output_dir, "--output_dir") if args.output_dir else contextlib.nullcontext():
        sample_and_write(args)


def sample_and_write(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from .grid import labelled_grid
    from .loading import load_pipeline
    from .schedulers import set_scheduler

    pipe = load_pipeline(args.model, args.trust_remote_code, device=args.device, dtype=getattr(torch, args.dtype))
    if args.scheduler or args.timestep_spacing:
        set_scheduler(pipe, args.scheduler, args.timestep_spacing)

    class_labels = [class_label(text) for text in args.class_labels] if args.class_labels else list(
        range(pipe.unet.config.num_classes)
    )  # fmt: skip
    try:  # checked before sampling; the pipeline's own message lists the valid ids and names
        class_ids = pipe.get_label_ids(class_labels)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--class_labels: {error}") from error
    images = pipe(
        class_labels=class_labels,
        num_images_per_label=args.num_images_per_label,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        guidance=args.guidance,
        eta=args.eta,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    ).images
    if not torch.isfinite(images).all():  # nothing is written: a black grid with exit code 0 would look like success
        raise UsageError(
            f"The model in {args.model!r} produced NaN or infinite images (its weights, or a sampler setting, make "
            "the sampling diverge); nothing was written."
        )
    # Row names as the model calls its classes: `get_label_ids` maps ids and names to ids, id2label back to names.
    id_to_name = {class_id: name for name, class_id in pipe.labels.items()}
    row_names = [id_to_name[class_id] for class_id in class_ids]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        grid = labelled_grid(images, row_names, columns=args.num_images_per_label)
        image_format = Image.registered_extensions()[os.path.splitext(args.output)[1].lower()]
        write_whole(args.output, lambda partial: grid.save(partial, format=image_format))
    except OSError as error:  # a read-only or full disk, a folder where the file should go
        raise UsageError(f"Cannot write --output {args.output!r}: {error}") from error
    print(f"Wrote {len(class_labels)} x {args.num_images_per_label} images to {args.output}")
    if args.output_dir:
        from torchvision.utils import save_image

        try:
            for index, image in enumerate(images):
                name = row_names[index // args.num_images_per_label].replace("/", "_")
                path = os.path.join(args.output_dir, f"{index:04d}_{name}.png")
                write_whole(path, lambda partial, image=image: save_image(image.float(), partial, format="png"))
        except OSError as error:
            raise UsageError(f"Cannot write into --output_dir {args.output_dir!r}: {error}") from error
        print(f"Wrote {len(images)} PNG files to {args.output_dir}")


def write_whole(path: str, write: Callable[[str], None]) -> None:
    """`write(partial)` to a temporary name beside `path`, then rename: an interrupted run leaves no broken image."""
    partial = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def cli(argv: list[str] | None = None) -> None:
    """The command line: bad input (model folder, labels, output path) ends in one line and exit code 2."""
    arguments = parse_args(argv)
    # Ctrl-C: every image already written is complete (see main)
    with one_line_errors(interrupted="interrupted; the images written so far are complete"):
        main(arguments)

