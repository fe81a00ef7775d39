"""Evaluate a trained pipeline: how often a classifier agrees with the requested class, and classifier-space FID.

    python -m pipeline.evaluate --model output/mnist-quick --num_images_per_label 100 --num_inference_steps 50

prints one JSON object: `cond_accuracy` (overall and per class), `fid` (Frechet distance between the classifier's
penultimate features of generated images and of the test split) and `fid_real_floor`, the same distance for as
many real train images: the best a perfect generator could score at this sample size.
"""

import argparse
import json
import logging
import os
import sys

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from .classifier import MNISTClassifier, load_or_train_classifier
from .data import ImageClassData, load_split
from .loading import load_pipeline
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline
from .schedulers import SCHEDULERS, set_scheduler

DEFAULT_DATASET = "ylecun/mnist"


@torch.no_grad()
def generate_for_evaluation(
    pipe: ClassConditionedDDIMPipeline,
    num_images_per_label: int,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and their requested labels, every class equally often, deterministic for a seed.

    `None` steps or guidance use the pipeline's saved defaults."""
    num_classes = pipe.unet.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(num_images_per_label)
    batches = []
    for index, start in enumerate(range(0, len(labels), batch_size)):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        batches.append(
            pipe(
                labels[start : start + batch_size].tolist(),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="pt",
            )
            .images.float()
            .cpu()
        )
    return torch.cat(batches), labels


@torch.no_grad()
def score_images(
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: MNISTClassifier,
    test: ImageClassData,
    train: ImageClassData,
    seed: int = 0,
) -> dict:
    """Conditional accuracy, FID against the test split, and the real-data FID floor at the same sample size."""
    predictions = torch.cat([classifier.classify(batch).argmax(1) for batch in images.split(1000)])
    correct = predictions == labels
    per_class = {str(c): round(correct[labels == c].float().mean().item(), 4) for c in labels.unique().tolist()}

    # The test split's features are computed once and kept (reset_real_features=False) for both distances. Only
    # the main process evaluates during training: syncing metric state across processes would deadlock.
    metric = FrechetInceptionDistance(feature=classifier, reset_real_features=False, sync_on_compute=False)
    for batch in torch.arange(len(test)).split(1000):
        metric.update(test.take(batch).float() / 255, real=True)

    def frechet_distance(generated: torch.Tensor) -> float:
        metric.reset()  # drops the previous generated features only
        for batch in generated.split(1000):
            metric.update(batch, real=False)
        return round(metric.compute().item(), 4)

    # The floor: as many real train images as generated ones, drawn with the evaluation seed.
    real_indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: len(images)]
    return {
        "cond_accuracy": {"overall": round(correct.float().mean().item(), 4), "per_class": per_class},
        "fid": frechet_distance(images),
        "fid_real_floor": frechet_distance(train.take(real_indices).float() / 255),
        "num_images": len(images),
    }


def evaluate(
    pipe: ClassConditionedDDIMPipeline,
    dataset: str = DEFAULT_DATASET,
    num_images_per_label: int = 100,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    classifier_cache_dir: str | None = None,
    classifier_train_samples: int | None = None,
) -> dict:
    """Sample `num_images_per_label` images of every class with `pipe` and score them (see `score_images`)."""
    classifier, record = load_or_train_classifier(
        dataset, cache_dir=classifier_cache_dir, max_train_samples=classifier_train_samples
    )
    images, labels = generate_for_evaluation(pipe, num_images_per_label, num_inference_steps, guidance_scale, seed)
    scores = score_images(images, labels, classifier, load_split(dataset, "test"), load_split(dataset, "train"), seed)
    return {**scores, "classifier_test_accuracy": record["test_accuracy"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A saved pipeline folder (or Hub id).")
    parser.add_argument(
        "--dataset",
        default=None,
        help="Dataset for the classifier and the real images "
        "(default: the bundled data/mnist when run from the repository, else ylecun/mnist).",
    )
    parser.add_argument("--num_images_per_label", type=int, default=100, help="Generated images per class.")
    parser.add_argument(
        "--num_inference_steps", type=int, default=None, help="Sampling steps (default: the pipeline's saved default)."
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance scale (default: the pipeline's saved default).",
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="Sampler to use instead of the one saved with the pipeline.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated images and of the real subset.")
    parser.add_argument("--classifier_cache_dir", default=None, help="Where the evaluation classifier is cached.")
    parser.add_argument(
        "--classifier_train_samples",
        type=int,
        default=None,
        help="Train the evaluation classifier on the first N images only (tests).",
    )
    args = parser.parse_args(argv)
    if args.num_images_per_label < 2:
        parser.error("--num_images_per_label must be at least 2 (FID needs a covariance)")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        parser.error("--num_inference_steps must be at least 1")
    return args


def default_dataset() -> str:
    """The bundled copy when running from a checkout of the repository, else the Hub id."""
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "mnist")
    return bundled if os.path.isdir(bundled) else DEFAULT_DATASET


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    results = evaluate(
        pipe,
        dataset=args.dataset or default_dataset(),
        num_images_per_label=args.num_images_per_label,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        classifier_cache_dir=args.classifier_cache_dir,
        classifier_train_samples=args.classifier_train_samples,
    )
    settings = {
        "num_inference_steps": args.num_inference_steps or pipe.config.default_num_inference_steps,
        "guidance_scale": args.guidance_scale or pipe.config.default_guidance_scale,
        "seed": args.seed,
    }
    scheduler = type(pipe.scheduler).__name__
    print(json.dumps({"model": args.model, "scheduler": scheduler, **settings, **results}))


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
