"""The MNIST classifier the evaluation judges samples with: accuracy on the requested class, and its features for FID.

Inception features mean little on 28x28 digits, so quality is measured in the feature space of a small CNN trained
on the *fit* part of the train split of the same dataset (never on the validation part or the test split). It is
trained once (about three minutes on 2 CPU cores) and cached as safetensors in a folder keyed by the dataset's
fingerprint, the fit/validation cut and the training settings.
"""

import hashlib
import json
import logging
import os
import shutil

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import (
    DEFAULT_FORMAT,
    IMAGE_COLUMN,
    LABEL_COLUMN,
    DataFormat,
    ImageClassData,
    fit_validation_indices,
    load_image_class_dataset,
    load_split,
    local_files_key,
)

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "class_conditioned_mnist")
CLASSIFIER_VERSION = 2  # bump when the architecture or the recipe below changes, so old caches are not reused
TRAIN_BATCH_SIZE = 128


class MNISTClassifier(nn.Module):
    """Two conv blocks and a 128-wide hidden layer: ~99.3% test accuracy on MNIST; its 128 features feed FID. The
    same recipe serves other datasets: `in_channels` and `resolution` follow their images."""

    num_features = 128  # read by torchmetrics' FID for a custom feature extractor

    def __init__(self, num_classes: int = 10, in_channels: int = 1, resolution: int = 28):
        super().__init__()
        pooled = resolution // 2 // 2  # the size after the two 2x2 max-pools
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * pooled * pooled, self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1], shape (N, C, H, W) -> (N, 128)."""
        return self.features((images - 0.1307) / 0.3081)  # MNIST's pixel mean and std

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of images in [0, 1]."""
        return self.head(self(images))


def fit_classifier(
    train: ImageClassData, num_steps: int, seed: int, batch_size: int = TRAIN_BATCH_SIZE, description: str | None = None
) -> MNISTClassifier:
    """Train for `num_steps` Adam steps (one-cycle LR, random 2-pixel shifts); deterministic for a given seed.

    `description` labels a progress bar (off without one), so that a first run says why it waits.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # initial weights and dropout
    channels, resolution, _ = train.image_shape
    classifier = MNISTClassifier(num_classes=len(train.label_names), in_channels=channels, resolution=resolution)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=num_steps)
    batch_size = min(batch_size, len(train))
    steps_per_epoch = len(train) // batch_size
    classifier.train()
    for step in tqdm(range(num_steps), desc=description, disable=description is None):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train), generator=generator)
        batch = step % steps_per_epoch
        indices = order[batch * batch_size : (batch + 1) * batch_size]
        images = train.take(indices).float() / 255
        # Random shifts of up to 2 pixels make the classifier judge shapes, not exact positions.
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        images = torch.roll(images, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(classifier.classify(images), train.labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    return classifier.eval()


@torch.no_grad()
def accuracy(classifier: MNISTClassifier, data: ImageClassData, batch_size: int = 1000) -> float:
    correct = 0
    for indices in torch.arange(len(data)).split(batch_size):
        images = data.take(indices).float() / 255
        correct += (classifier.classify(images).argmax(1) == data.labels[indices]).sum().item()
    return correct / len(data)


def load_fit_and_validation(
    dataset: str, data_format: DataFormat = DEFAULT_FORMAT
) -> tuple[ImageClassData, ImageClassData, dict]:
    """The train split of `dataset` cut into its *fit* and *validation* parts, and the record of the cut."""
    train = load_split(dataset, "train", data_format)
    fit_indices, validation_indices, split = fit_validation_indices(train.labels)
    return train.select(fit_indices), train.select(validation_indices), split


def load_or_train_classifier(
    dataset: str,
    cache_dir: str | None = None,
    epochs: int = 3,
    seed: int = 0,
    max_train_samples: int | None = None,
    fit_and_validation: tuple[ImageClassData, ImageClassData, dict] | None = None,
    data_format: DataFormat = DEFAULT_FORMAT,
) -> tuple[MNISTClassifier, dict]:
    """The cached classifier for `dataset` (training and caching it on first use) and its record.

    `fit_and_validation` is `load_fit_and_validation(dataset, data_format)`'s result when the caller already has it.

    It learns from the *fit* part of the train split only (the first `max_train_samples` of it, for tests), so that
    the validation part and the test split are digits it never saw. The record holds its validation and test
    accuracy, measured once after training, and the split. The cache key combines the train split's `datasets`
    fingerprint, the split and the training settings, so another dataset, cut or recipe never reuses stale weights.
    """
    dataset_dict = load_image_class_dataset(dataset, data_format.image_column, data_format.label_column)
    fingerprint = dataset_dict["train"]._fingerprint
    if os.path.isdir(os.path.expanduser(dataset)):
        # datasets' fingerprint of a local folder ignores its files: a classifier of the old labels would be reused.
        # (A fresh copy of the files, e.g. a new clone, has new modification times: the classifier is trained again.)
        fingerprint += "-" + local_files_key(dataset)
    fit, validation, split = fit_and_validation or load_fit_and_validation(dataset, data_format)
    settings = {"version": CLASSIFIER_VERSION, "epochs": epochs, "seed": seed, "max_train_samples": max_train_samples}
    columns = [data_format.image_column, data_format.label_column]
    if columns != [IMAGE_COLUMN, LABEL_COLUMN] or fit.image_shape != (1, 28, 28):
        # Other columns, another size or channel count make another classifier (MNIST's settings stay as they were).
        settings.update(columns=columns, image_shape=list(fit.image_shape))
    key = hashlib.sha256(json.dumps([fingerprint, split, settings], sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir or DEFAULT_CACHE_DIR, f"classifier-{key}")
    weights_path, record_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "record.json")

    if os.path.exists(record_path):
        with open(record_path) as file:
            record = json.load(file)
        channels, resolution, _ = record.get("image_shape", [1, 28, 28])
        classifier = MNISTClassifier(num_classes=record["num_classes"], in_channels=channels, resolution=resolution)
        classifier.load_state_dict(load_file(weights_path))
        return classifier.eval(), record

    if max_train_samples:
        fit = fit.subset(max_train_samples)
    num_steps = epochs * (len(fit) // min(TRAIN_BATCH_SIZE, len(fit)))
    logger.warning(
        f"Training the evaluation classifier on {len(fit)} fit images, {num_steps} steps (once; about 3 minutes on 2 "
        f"CPU cores for MNIST; cached in {folder})."
    )
    # On the CPU, so that every machine caches the same classifier. `accelerate launch` gives each process of a GPU
    # run one thread (OMP_NUM_THREADS=1); the other processes wait meanwhile, so this once it takes every core.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))
    try:
        classifier = fit_classifier(fit, num_steps, seed=seed, description="Evaluation classifier (once)")
    finally:
        torch.set_num_threads(threads)
    record = {
        "test_accuracy": accuracy(classifier, load_split(dataset, "test", data_format)),
        "validation_accuracy": accuracy(classifier, validation),
        "num_classes": len(fit.label_names),
        "num_fit_images": len(fit),
        "num_steps": num_steps,
        "dataset_fingerprint": fingerprint,
        "split": split,
        **settings,
    }
    logger.warning(
        f"Evaluation classifier: validation accuracy {record['validation_accuracy']:.4f}, "
        f"test accuracy {record['test_accuracy']:.4f}"
    )
    # Write to a temporary folder and rename, so a crash never leaves weights without their record.
    temporary = folder + f".tmp-{os.getpid()}"
    os.makedirs(temporary, exist_ok=True)
    save_file(classifier.state_dict(), os.path.join(temporary, "model.safetensors"))
    with open(os.path.join(temporary, "record.json"), "w") as file:
        json.dump(record, file, indent=2)
    if os.path.exists(folder):  # another process cached the same classifier meanwhile
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, folder)
    return classifier, record
