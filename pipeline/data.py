"""Image-classification datasets (MNIST by default) through Hugging Face `datasets`, decoded once into tensors.

The same `datasets.load_dataset(...)` call serves a Hub id (`ylecun/mnist`) and a local folder in that layout.
A split is decoded once (cached on disk by `datasets`) and held in memory as a uint8 tensor; a split whose decoded
images would not fit comfortably in memory stays in the memory-mapped Arrow cache instead and each batch is read
from it on demand, with the same order, results and exact resume.
"""

import hashlib
import logging
import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from .errors import UsageError

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"

# The held-out protocol (README "Evaluation"): the train split is cut once into a *fit* part, the only images the
# evaluation classifier learns from, and a *validation* part, the reference for every tuning decision. The cut is
# stratified by class and fixed by this seed, so every run, cache and result row means the same images.
VALIDATION_FRACTION = 1 / 6  # MNIST: 50,000 fit and 10,000 validation images
VALIDATION_SPLIT_SEED = 0


@dataclass
class ImageClassData:
    """A split as uint8 images (N, 1, H, W), int64 labels and the class names. MNIST's 60,000 training images take
    47 MB: `images` is then a tensor. For splits too large for memory it is the decoded, memory-mapped Arrow table,
    and `take` reads just the rows asked for."""

    images: torch.Tensor | datasets.Dataset  # uint8, (N, 1, resolution, resolution), 0..255
    labels: torch.Tensor  # int64, (N,)
    label_names: list[str]  # label_names[class_id] is the dataset's name for that class

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 images at `indices`, from memory or from the memory-mapped Arrow cache."""
        if self.in_memory:
            return self.images[indices]
        return self.images[indices.tolist()]["pixels"]

    def subset(self, count: int) -> "ImageClassData":
        """The first `count` rows."""
        return self.select(torch.arange(min(count, len(self))))

    def select(self, indices: torch.Tensor) -> "ImageClassData":
        """The rows at `indices`, in that order."""
        images = self.images[indices] if self.in_memory else self.images.select(indices.tolist())
        return ImageClassData(images, self.labels[indices], self.label_names)


def fit_validation_indices(
    labels: torch.Tensor, fraction: float = VALIDATION_FRACTION, seed: int = VALIDATION_SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Cut a train split into *fit* and *validation* row indices (both sorted), stratified by class.

    Each class gives `round(fraction * its size)` rows, drawn by a permutation seeded with `seed`. The returned record
    (seed, fraction, sizes and a digest of the validation indices) names the cut in caches and result rows.
    """
    generator = torch.Generator().manual_seed(seed)
    validation = []
    for class_id in labels.unique().tolist():
        members = (labels == class_id).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        validation.append(members[: round(len(members) * fraction)])
    validation = torch.cat(validation).sort().values
    in_validation = torch.zeros(len(labels), dtype=torch.bool)
    in_validation[validation] = True
    fit = (~in_validation).nonzero().squeeze(1)
    digest = hashlib.sha256(validation.numpy().astype("<i8").tobytes()).hexdigest()[:16]
    record = {"seed": seed, "fraction": round(fraction, 6), "fit_size": len(fit), "validation_size": len(validation),
              "validation_indices_sha256": digest}  # fmt: skip
    return fit, validation, record


def load_image_class_dataset(dataset: str) -> datasets.DatasetDict:
    """Load `dataset` (a Hub id or a local folder) and check it has `image` and `label` columns.

    Raises [`UsageError`] naming the problem and the fix when the folder is missing, the Hub is unreachable or the
    columns are wrong.
    """
    # A Hub id is `name` or `namespace/name`; anything else that is not an existing folder is a mistyped path.
    looks_like_path = (
        dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1 or os.sep in dataset.replace("/", "")
    )
    if os.path.isfile(os.path.expanduser(dataset)):
        raise UsageError(
            f"--dataset {dataset!r} is a file; pass the folder that holds the dataset (the `ylecun/mnist` layout: "
            "mnist/train-*.parquet and mnist/test-*.parquet, like data/mnist) or a Hub dataset id."
        )
    if looks_like_path and not os.path.isdir(os.path.expanduser(dataset)):
        raise UsageError(
            f"Dataset folder {dataset!r} does not exist. Pass a folder in the `ylecun/mnist` layout "
            "(like data/mnist) or a Hub dataset id."
        )
    try:
        dataset_dict = datasets.load_dataset(os.path.expanduser(dataset))
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UsageError(
            f"Could not load dataset {dataset!r}: {error}. Pass a local folder in the `ylecun/mnist` "
            "layout (parquet files with `image` and `label` columns), or a Hub id on a machine that "
            "can reach the Hub."
        ) from error
    for split_name, split in dataset_dict.items():
        missing = [column for column in (IMAGE_COLUMN, LABEL_COLUMN) if column not in split.column_names]
        if missing:
            raise UsageError(
                f"Dataset {dataset!r} split {split_name!r} has columns {split.column_names} but lacks "
                f"{missing}; it needs an `image` column of images and a `label` column of class ids."
            )
    return dataset_dict


def label_names_of(split: datasets.Dataset) -> list[str]:
    """Class names from the `label` column's `ClassLabel` feature, or the ids as strings for a plain int column."""
    feature = split.features[LABEL_COLUMN]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(class_id) for class_id in range(max(split[LABEL_COLUMN]) + 1)]


def fits_in_memory(num_bytes: int) -> bool:
    """Whether `num_bytes` take at most half of the memory available now."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return num_bytes <= available // 2


def load_split(
    dataset: str, split: str = "train", resolution: int = 28, in_memory: bool | None = None
) -> ImageClassData:
    """Decode one split into uint8 images and int64 labels.

    Decoding runs once through `Dataset.map`, whose result `datasets` caches on disk under the dataset's fingerprint:
    later runs load the cached arrays (~0.2 s for MNIST's train split) instead of decoding 60,000 PNGs (~4 s).
    Images of another mode or size are converted to grayscale and resized to `resolution`, with a logged notice.

    Args:
        dataset (`str`):
            A Hub dataset id (`ylecun/mnist`) or a local folder in that layout.
        split (`str`, *optional*, defaults to `"train"`):
            Which split to load.
        resolution (`int`, *optional*, defaults to 28):
            Height and width of the returned images.
        in_memory (`bool`, *optional*):
            Hold the images in memory (`True`) or read them from the memory-mapped cache per batch (`False`). By
            default: in memory when the decoded split takes at most half of the memory available, with a notice
            otherwise.

    Returns:
        [`ImageClassData`]: images, labels and the label names.
    """
    dataset_dict = load_image_class_dataset(dataset)
    if split not in dataset_dict:
        raise UsageError(f"Dataset {dataset!r} has no split {split!r}; it has {list(dataset_dict)}.")
    data = dataset_dict[split]
    if len(data) == 0:
        raise UsageError(f"Split {split!r} of dataset {dataset!r} is empty.")

    first_image = data[0][IMAGE_COLUMN]
    if first_image.mode != "L" or first_image.size != (resolution, resolution):
        logger.warning(
            f"Dataset {dataset!r} holds {first_image.mode} images of {first_image.size[0]}x"
            f"{first_image.size[1]}; converting them to grayscale {resolution}x{resolution}."
        )

    def to_pixels(batch: dict) -> dict:
        pixels = []
        for image in batch[IMAGE_COLUMN]:
            image = image.convert("L")
            if image.size != (resolution, resolution):
                image = image.resize((resolution, resolution))
            pixels.append(np.asarray(image, dtype=np.uint8)[None])
        return {"pixels": np.stack(pixels)}

    features = datasets.Features(
        {
            "pixels": datasets.Array3D((1, resolution, resolution), "uint8"),
            LABEL_COLUMN: data.features[LABEL_COLUMN],
        }
    )
    decoded = data.map(
        to_pixels,
        batched=True,
        batch_size=2000,
        remove_columns=[IMAGE_COLUMN],
        features=features,
        desc=f"Decoding {split} images",
    )
    labels = decoded.with_format("torch", columns=[LABEL_COLUMN], dtype=torch.int64)[:][LABEL_COLUMN]
    pixels = decoded.with_format("torch", columns=["pixels"], dtype=torch.uint8)
    if in_memory is None:
        in_memory = fits_in_memory(len(decoded) * resolution * resolution)
        if not in_memory:
            logger.warning(
                f"The decoded {split} split ({len(decoded) * resolution**2 / 2**30:.1f} GiB) would take more than half "
                "of the free memory: reading each batch from the memory-mapped datasets cache instead."
            )
    images = pixels[:]["pixels"] if in_memory else pixels
    return ImageClassData(images=images, labels=labels, label_names=label_names_of(data))
