"""Evaluate a trained pipeline under a held-out protocol: conditional accuracy, classifier-space FID, optionally CAS.

    python -m pipeline.evaluate --model output/mnist-quick --seeds 0 1 2            # report: the test reference
    python -m pipeline.evaluate --model output/mnist-quick --reference validation  # tuning: the validation one
    python -m pipeline.evaluate --model output/mnist-quick --cas 100               # adds CAS

The protocol (README "Evaluation"): the evaluation classifier learns from the *fit* part of the train split only.
Generated images are compared with a *reference*: the validation part for every tuning decision, the test split
for what is reported. The real-data floor is the same distance for as many real digits, with exactly the generated
set's labels, drawn from the other held-out set (validation digits for the test reference, test digits for the
validation reference): images the classifier never saw and that are not in the reference. Each sampling seed is
scored on its own; the JSON printed gives the mean and standard deviation over the seeds and every seed's figures.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from diffusers import LCMScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchmetrics.image.fid import FrechetInceptionDistance

from .classifier import (
    DEFAULT_CACHE_DIR,
    MNISTClassifier,
    accuracy,
    fit_classifier,
    load_fit_and_validation,
    load_or_train_classifier,
)
from .data import DEFAULT_FORMAT, DataFormat, ImageClassData, add_column_flags, load_split
from .errors import UsageError, one_line_errors
from .loading import load_pipeline
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline
from .schedulers import (
    SCHEDULERS,
    add_guidance_flag,
    add_guidance_interval_flag,
    add_timestep_spacing_flag,
    set_scheduler,
)

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "ylecun/mnist"
REFERENCES = ("test", "validation")


@dataclass
class EvaluationSet:
    """What generated images are judged with and against: the classifier, the reference set and the floor's pool."""

    classifier: MNISTClassifier
    classifier_record: dict
    reference_name: str  # "test" or "validation"
    reference: ImageClassData
    floor_source: str  # the other held-out set
    floor_pool: ImageClassData
    fit: ImageClassData  # what the classifier learned from: the pool of CAS's real-data ceiling
    # The reference's features, computed once and kept (reset_real_features=False): `reset()` drops only generated
    # features. Only the main process evaluates during training: syncing metric state would deadlock.
    frechet_distance: FrechetInceptionDistance

    def to(self, device: torch.device | str) -> "EvaluationSet":
        """Score on `device` (where the images are generated): the classifier and the FID's features move there."""
        self.classifier.to(device)
        self.frechet_distance.to(device)
        return self


def load_evaluation_set(
    dataset: str,
    reference: str = "test",
    classifier_cache_dir: str | None = None,
    classifier_train_samples: int | None = None,
    data_format: DataFormat = DEFAULT_FORMAT,
) -> EvaluationSet:
    """The cached classifier (trained on first use) and the held-out sets for `reference` ("test" or "validation"),
    read from `dataset` as `data_format` says (its columns, and the generated images' resolution)."""
    if reference not in REFERENCES:
        raise UsageError(f"Unknown reference {reference!r}; use one of {list(REFERENCES)}.")
    fit_and_validation = load_fit_and_validation(dataset, data_format)
    classifier, record = load_or_train_classifier(
        dataset,
        classifier_cache_dir,
        max_train_samples=classifier_train_samples,
        fit_and_validation=fit_and_validation,
        data_format=data_format,
    )
    fit, validation, _ = fit_and_validation
    held_out = {"test": load_split(dataset, "test", data_format), "validation": validation}
    floor_source = "validation" if reference == "test" else "test"
    metric = FrechetInceptionDistance(feature=classifier, reset_real_features=False, sync_on_compute=False)
    add_reference_features(metric, classifier, held_out[reference], classifier_cache_dir)
    return EvaluationSet(
        classifier=classifier,
        classifier_record=record,
        reference_name=reference,
        reference=held_out[reference],
        floor_source=floor_source,
        floor_pool=held_out[floor_source],
        fit=fit,
        frechet_distance=metric,
    )


REAL_FEATURES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")  # FID's reference state


@torch.no_grad()
def add_reference_features(
    metric: FrechetInceptionDistance, classifier: MNISTClassifier, reference: ImageClassData, cache_dir: str | None
) -> None:
    """The reference images' side of the FID: their features' sums and covariance, computed once per classifier and
    reference (~8 s for MNIST's 10,000 on 2 cores) and cached beside the classifiers. The key hashes the classifier's
    weights and the reference's pixels, so a changed classifier or dataset never reuses stale statistics."""
    path = None
    if reference.in_memory:  # a split read lazily is too large to hash cheaply: computed every time
        digest = hashlib.sha256(reference.images.numpy().tobytes())
        for tensor in classifier.state_dict().values():
            digest.update(tensor.cpu().numpy().tobytes())
        path = os.path.join(cache_dir or DEFAULT_CACHE_DIR, f"fid-reference-{digest.hexdigest()[:16]}.safetensors")
        if os.path.exists(path):
            for name, tensor in load_file(path).items():
                setattr(metric, name, tensor)
            return
    for batch in torch.arange(len(reference)).split(1000):
        metric.update(reference.take(batch).float() / 255, real=True)
    if path:  # written whole, then renamed: a crash or a second process never leaves half a file
        partial = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file({name: getattr(metric, name) for name in REAL_FEATURES}, partial)
            os.replace(partial, path)
        except (OSError, SafetensorError) as error:  # a cache saves time only: a read-only or full disk costs that
            logger.warning(f"Could not cache the reference's FID features in {path} ({error}); computing them again "
                           "next time.")  # fmt: skip
            if os.path.exists(partial):
                os.remove(partial)


@torch.no_grad()
def generate_for_evaluation(
    pipe: ClassConditionedDDIMPipeline,
    num_images_per_label: int,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 500,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str | None = None,
    accelerator: Accelerator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (float32, on the CPU) and their requested labels, every class equally often.

    Image i starts from the noise of its own generator, seeded with `seed` and i, so the images do not depend on how
    they are batched or shared out. With `accelerator`, each process draws a contiguous share of them on its device
    (under the training precision's autocast), and every process gets the whole set back in order: N processes
    draw the same images as one, each drawing 1/N. `None` steps or guidance (scale, interval) use the pipeline's
    saved defaults.
    """
    num_classes = pipe.unet.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(num_images_per_label)
    share = range(len(labels))
    if accelerator is not None:
        # Equal shares, so the gather has equal shapes; indices past the end are padding, drawn and then dropped.
        per_process = math.ceil(len(labels) / accelerator.num_processes)
        share = range(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
    indices = [min(index, len(labels) - 1) for index in share]
    batches = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            images = pipe(
                labels[batch].tolist(),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_interval=guidance_interval,
                guidance=guidance,
                generator=[torch.Generator().manual_seed(seed * 1_000_003 + index) for index in batch],
                output_type="pt",
            ).images
        batches.append(images.float())
    images = torch.cat(batches)
    if accelerator is not None:
        images = accelerator.gather(images.contiguous())[: len(labels)]  # the shares in process order, then padding
    return images.cpu(), labels


def draw_like(pool: ImageClassData, labels: torch.Tensor, seed: int) -> ImageClassData:
    """Real images from `pool` with exactly `labels` (so as class-balanced as the generated set), without repeats."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.empty_like(labels)
    for class_id in labels.unique().tolist():
        wanted = (labels == class_id).nonzero().squeeze(1)
        members = (pool.labels == class_id).nonzero().squeeze(1)
        if len(wanted) > len(members):
            raise UsageError(
                f"The real-data pool has only {len(members)} images of class {class_id}, fewer than the {len(wanted)} "
                "asked for; lower --num_images_per_label."
            )
        indices[wanted] = members[torch.randperm(len(members), generator=generator)[: len(wanted)]]
    return pool.select(indices)


@torch.no_grad()
def score_images(images: torch.Tensor, labels: torch.Tensor, evaluation_set: EvaluationSet, seed: int = 0) -> dict:
    """Conditional accuracy, FID against the reference, and the real-data floor: the same distance for real digits
    with the same labels, drawn from the floor's pool with `seed`."""
    classifier = evaluation_set.classifier
    device = next(classifier.parameters()).device  # see EvaluationSet.to
    predictions = torch.cat([classifier.classify(batch.to(device)).argmax(1).cpu() for batch in images.split(1000)])
    correct = predictions == labels
    per_class = {str(c): round(correct[labels == c].float().mean().item(), 4) for c in labels.unique().tolist()}

    metric = evaluation_set.frechet_distance

    def frechet_distance(generated: torch.Tensor) -> float:
        metric.reset()  # drops the previous generated features only
        for batch in generated.split(1000):
            metric.update(batch.to(device), real=False)
        return round(metric.compute().item(), 4)

    real = draw_like(evaluation_set.floor_pool, labels, seed)
    return {
        "cond_accuracy": {"overall": round(correct.float().mean().item(), 4), "per_class": per_class},
        "fid": frechet_distance(images),
        "fid_real_floor": frechet_distance(real.take(torch.arange(len(real))).float() / 255),
        "num_images": len(images),
    }


def mean_and_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for a single value), rounded for reading."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
    }


def summarize_seeds(per_seed: list[dict]) -> dict:
    """Mean and standard deviation over the sampling seeds of every metric `score_images` gives."""
    classes = per_seed[0]["cond_accuracy"]["per_class"]
    return {
        "cond_accuracy": {
            **mean_and_std([scores["cond_accuracy"]["overall"] for scores in per_seed]),
            "per_class": {
                c: round(statistics.fmean(s["cond_accuracy"]["per_class"][c] for s in per_seed), 4) for c in classes
            },
        },
        "fid": mean_and_std([scores["fid"] for scores in per_seed]),
        "fid_real_floor": mean_and_std([scores["fid_real_floor"] for scores in per_seed]),
    }


def classification_accuracy_score(
    images: torch.Tensor, labels: torch.Tensor, evaluation_set: EvaluationSet, seed: int = 0
) -> dict:
    """CAS (Ravuri & Vinyals, 2019): the evaluation classifier's architecture and recipe trained from scratch on
    generated images, scored on the real reference set, beside the same training on as many real fit images with the
    same labels (the ceiling at that size). Both take the evaluation classifier's number of optimizer steps."""
    num_steps = evaluation_set.classifier_record["num_steps"]
    label_names = evaluation_set.fit.label_names
    # Quantised to uint8 like every real image (and like a saved PNG).
    generated = ImageClassData((images * 255).round().to(torch.uint8), labels, label_names)
    real = draw_like(evaluation_set.fit, labels, seed)
    scores = {}
    for name, data in (("generated", generated), ("real", real)):
        classifier = fit_classifier(data, num_steps, seed=seed, description=f"CAS: classifier on {name} images")
        scores[name] = round(accuracy(classifier, evaluation_set.reference), 4)
    return {"images_per_class": len(labels) // len(labels.unique()), "reference": evaluation_set.reference_name,
            **scores}  # fmt: skip


def evaluate(
    pipe: ClassConditionedDDIMPipeline,
    dataset: str = DEFAULT_DATASET,
    reference: str = "test",
    seeds: tuple[int, ...] = (0,),
    num_images_per_label: int = 100,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str | None = None,
    cas_images_per_label: int | None = None,
    classifier_cache_dir: str | None = None,
    classifier_train_samples: int | None = None,
    data_format: DataFormat = DEFAULT_FORMAT,
) -> dict:
    """Sample `num_images_per_label` images of every class with `pipe` for each seed and score them against
    `reference` (see `score_images`); with `cas_images_per_label`, also the classification accuracy score. The real
    images are read from `dataset`'s columns that `data_format` names, at the pipeline's resolution."""
    data_format = replace(data_format, resolution=pipe.unet.config.sample_size)
    evaluation_set = load_evaluation_set(
        dataset, reference, classifier_cache_dir, classifier_train_samples, data_format
    ).to(pipe.device)
    if evaluation_set.fit.image_shape[0] != pipe.unet.config.in_channels:
        raise UsageError(
            f"The model makes {pipe.unet.config.in_channels}-channel images but {dataset!r} (column "
            f"{data_format.image_column!r}) holds {evaluation_set.fit.image_shape[0]}-channel ones; evaluate against "
            "the dataset the model was trained on (--dataset, --image_column, --label_column)."
        )
    sampling = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                "guidance_interval": guidance_interval, "guidance": guidance}  # fmt: skip
    per_seed = []
    for seed in seeds:
        images, labels = generate_for_evaluation(pipe, num_images_per_label, seed=seed, **sampling)
        per_seed.append({"seed": seed, **score_images(images, labels, evaluation_set, seed)})
        if seed == seeds[0]:
            first_seed_images = images, labels
    results = {
        "reference": reference,
        "floor_source": evaluation_set.floor_source,
        "seeds": list(seeds),
        "num_images": per_seed[0]["num_images"],
        **summarize_seeds(per_seed),
        "per_seed": per_seed,
        "classifier": {key: evaluation_set.classifier_record[key] for key in
                       ("validation_accuracy", "test_accuracy", "num_fit_images", "split")},  # fmt: skip
    }
    if cas_images_per_label:
        images, labels = (
            first_seed_images  # the same images again: the first seed's generation is deterministic
            if cas_images_per_label == num_images_per_label
            else generate_for_evaluation(pipe, cas_images_per_label, seed=seeds[0], **sampling)
        )
        results["cas"] = classification_accuracy_score(images, labels, evaluation_set, seeds[0])
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A saved pipeline folder (or Hub id).")
    parser.add_argument(
        "--dataset",
        default=None,
        help="Dataset for the classifier and the real images "
        "(default: the bundled data/mnist when run from the repository, else ylecun/mnist).",
    )
    add_column_flags(parser)
    parser.add_argument(
        "--reference",
        choices=REFERENCES,
        default="test",
        help="Real images the generated ones are compared with: validation (held out from the train split) for "
        "tuning decisions, test for reporting.",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="Sampling seeds; mean and std are over them."
    )
    parser.add_argument("--num_images_per_label", type=int, default=100, help="Generated images per class and seed.")
    parser.add_argument(
        "--num_inference_steps", type=int, default=None, help="Sampling steps (default: the pipeline's saved default)."
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance scale (default: the pipeline's saved default).",
    )
    add_guidance_interval_flag(parser)
    add_guidance_flag(parser)
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="Sampler to use instead of the one saved with the pipeline.",
    )
    add_timestep_spacing_flag(parser)
    parser.add_argument(
        "--cas",
        type=int,
        default=None,
        metavar="N",
        help="Also the classification accuracy score: a classifier trained on N generated images per class, scored "
        "on the real reference, beside one trained on N real images per class (minutes on a CPU).",
    )
    parser.add_argument("--classifier_cache_dir", default=None, help="Where the evaluation classifier is cached.")
    parser.add_argument(
        "--classifier_train_samples",
        type=int,
        default=None,
        help="Train the evaluation classifier on the first N fit images only (tests).",
    )
    args = parser.parse_args(argv)
    if args.num_images_per_label < 2:
        parser.error("--num_images_per_label must be at least 2 (FID needs a covariance)")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        parser.error("--num_inference_steps must be at least 1")
    if args.cas is not None and args.cas < 1:
        parser.error("--cas must be at least 1 image per class")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ from each other, got {args.seeds}")
    return args


def default_dataset() -> str:
    """The bundled copy when running from a checkout of the repository, else the Hub id."""
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "mnist")
    return bundled if os.path.isdir(bundled) else DEFAULT_DATASET


def summary_line(results: dict) -> str:
    """One human-readable line: mean ± std over the seeds."""

    def figure(metric: dict, scale: float = 1.0) -> str:
        std = "" if metric["std"] is None else f" ± {metric['std'] * scale:.1f}"
        return f"{metric['mean'] * scale:.1f}{std}"

    line = (
        f"cond. accuracy {figure(results['cond_accuracy'], 100)} %, FID {figure(results['fid'])} (real-data floor "
        f"{figure(results['fid_real_floor'])}) against the {results['reference']} reference, "
        f"{len(results['seeds'])} seed(s) x {results['num_images']} images"
    )
    if "cas" in results:
        cas = results["cas"]
        line += f"; CAS {cas['generated'] * 100:.1f} % (real-data ceiling {cas['real'] * 100:.1f} %)"
    return line


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler or args.timestep_spacing:
        set_scheduler(pipe, args.scheduler, args.timestep_spacing)
    results = evaluate(
        pipe,
        dataset=args.dataset or default_dataset(),
        reference=args.reference,
        seeds=tuple(args.seeds),
        num_images_per_label=args.num_images_per_label,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        guidance=args.guidance,
        cas_images_per_label=args.cas,
        classifier_cache_dir=args.classifier_cache_dir,
        classifier_train_samples=args.classifier_train_samples,
        data_format=DataFormat(args.image_column, args.label_column),
    )
    # What the pipeline ran with: the saved default wherever a flag was not given.
    settings = pipe.sampling_settings(args.num_inference_steps, args.guidance_scale, args.guidance_interval,
                                      args.guidance)  # fmt: skip
    # LCMScheduler ignores the spacing: a student samples on the grid it was distilled on, which starts at t=999
    spacing = None if isinstance(pipe.scheduler, LCMScheduler) else pipe.scheduler.config.timestep_spacing
    scheduler = {"scheduler": type(pipe.scheduler).__name__, "timestep_spacing": spacing}
    print(summary_line(results), file=sys.stderr)
    print(json.dumps({"model": args.model, **scheduler, **settings, **results}))


if __name__ == "__main__":
    arguments = parse_args()
    with one_line_errors():  # bad model folder, dataset or flags
        main(arguments)
