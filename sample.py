"""Sample digits from a trained `ClassConditionedDDIMPipeline` into a PNG grid, one row per requested label.

python sample.py --model output/mnist --output grid.png                        # 0..9, one image each
python sample.py --model output/mnist --class_labels 3 7 --num_images_per_label 8 --seed 1 --output 37.png
"""

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A folder written by train_conditional.py, or a Hub model id.")
    parser.add_argument(
        "--class_labels",
        nargs="+",
        default=None,
        help="Class ids or label names to draw, one grid row each (default: every class).",
    )
    parser.add_argument("--num_images_per_label", type=int, default=8, help="Images per label (grid columns).")
    parser.add_argument(
        "--num_inference_steps", type=int, default=50, help="Denoising steps: more is cleaner and linearly slower."
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic, 1 is DDPM-like.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the starting noise; same seed, same grid.")
    parser.add_argument("--output", default="grid.png", help="Where to write the PNG grid.")
    args = parser.parse_args(argv)
    if args.num_images_per_label < 1:
        parser.error(f"--num_images_per_label must be at least 1, got {args.num_images_per_label}")
    if args.num_inference_steps < 1:
        parser.error(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
    return args


def class_label(text: str) -> int | str:
    """A CLI label: an id when it is a number ("3" is class 3), else a label name."""
    return int(text) if text.lstrip("-").isdigit() else text


def main(args: argparse.Namespace) -> None:
    import torch
    from torchvision.utils import make_grid, save_image

    from pipeline import ClassConditionedDDIMPipeline

    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise ValueError(
            f"{args.model!r} is not a saved pipeline (no model_index.json); pass the --output_dir of "
            "a finished train_conditional.py run."
        )
    pipe = ClassConditionedDDIMPipeline.from_pretrained(args.model)
    class_labels = (
        [class_label(text) for text in args.class_labels]
        if args.class_labels
        else list(range(pipe.unet.config.num_classes))
    )
    images = pipe(
        class_labels=class_labels,
        num_images_per_label=args.num_images_per_label,
        num_inference_steps=args.num_inference_steps,
        eta=args.eta,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    ).images
    # One row per label: the pipeline returns all images of a label together.
    grid = make_grid(images, nrow=args.num_images_per_label, padding=2, pad_value=1.0)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_image(grid, args.output)
    print(f"Wrote {len(class_labels)} x {args.num_images_per_label} images to {args.output}")


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (ValueError, TypeError, OSError) as error:  # bad model folder or labels: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
