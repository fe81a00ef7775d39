"""Image-classification datasets (MNIST by default) through Hugging Face `datasets`, decoded once into tensors.

The same `datasets.load_dataset(...)` call serves a Hub id (`ylecun/mnist`) and a local folder in that layout.
A split is decoded once (cached on disk by `datasets`) and held in memory as a uint8 tensor; a split whose decoded
images would not fit comfortably in memory stays in the memory-mapped Arrow cache instead and each batch is read
from it on demand, with the same order, results and exact resume.
"""

import argparse
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image

from .errors import UsageError

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"

# The held-out protocol (README "Evaluation"): the train split is cut once into a *fit* part, the only images the
# evaluation classifier learns from, and a *validation* part, the reference for every tuning decision. The cut is
# stratified by class and fixed by this seed, so every run, cache and result row means the same images.
VALIDATION_FRACTION = 1 / 6  # MNIST: 50,000 fit and 10,000 validation images
VALIDATION_SPLIT_SEED = 0


@dataclass(frozen=True)
class DataFormat:
    """How a dataset is read: its image and label columns, and the size its images are used at (None: their own)."""

    image_column: str = IMAGE_COLUMN
    label_column: str = LABEL_COLUMN
    resolution: int | None = None


DEFAULT_FORMAT = DataFormat()  # `image` and `label` columns at the images' own size: MNIST's layout


def add_column_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--image_column and --label_column, the `DataFormat` columns of training's and evaluation's flags."""
    parser.add_argument("--image_column", default=IMAGE_COLUMN, help="The dataset's column of images (cifar10: img).")
    parser.add_argument("--label_column", default=LABEL_COLUMN, help="The dataset's column of class ids.")


@dataclass
class ImageClassData:
    """A split as uint8 images (N, C, H, W), int64 labels and the class names. MNIST's 60,000 training images take
    47 MB: `images` is then a tensor. For splits too large for memory it is the decoded, memory-mapped Arrow table,
    and `take` reads just the rows asked for."""

    images: torch.Tensor | datasets.Dataset  # uint8, (N, channels, resolution, resolution), 0..255
    labels: torch.Tensor  # int64, (N,)
    label_names: list[str]  # label_names[class_id] is the dataset's name for that class

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        if self.in_memory:
            return tuple(self.images.shape[1:])
        return tuple(self.images.features["pixels"].shape)

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


def local_files_key(folder: str) -> str:
    """A key of a local dataset folder's files: their paths, sizes and modification times (what `datasets` itself
    keys local data files by), so it changes when any file is edited, added or removed. Hidden files and folders (a
    `.cache`, `.git`) are left out. Cheap: no file is read."""
    folder = os.path.expanduser(folder)
    entries = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(name for name in files if not name.startswith(".")):
            stat = os.stat(os.path.join(root, name))
            entries.append([os.path.relpath(os.path.join(root, name), folder), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def load_image_class_dataset(
    dataset: str, image_column: str = IMAGE_COLUMN, label_column: str = LABEL_COLUMN
) -> datasets.DatasetDict:
    """Load `dataset` (a Hub id, a local folder in the `ylecun/mnist` layout, or an `imagefolder` of one subfolder per
    class) and check its image and label columns.

    Raises [`UsageError`] naming the problem and the fix when the folder is missing, the Hub is unreachable, a column
    is missing or of the wrong type, or there is only one class.
    """
    # A Hub id is `name` or `namespace/name`; anything else that is not an existing folder is a mistyped path.
    looks_like_path = (
        dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1 or os.sep in dataset.replace("/", "")
    )
    if os.path.isfile(os.path.expanduser(dataset)):
        raise UsageError(
            f"--dataset {dataset!r} is a file; pass the folder that holds the dataset (parquet files in the "
            "`ylecun/mnist` layout like data/mnist, or one subfolder of images per class) or a Hub dataset id."
        )
    if looks_like_path and not os.path.isdir(os.path.expanduser(dataset)):
        raise UsageError(
            f"Dataset folder {dataset!r} does not exist. Pass a folder in the `ylecun/mnist` layout (like data/mnist), "
            "a folder of one subfolder of images per class, or a Hub dataset id."
        )
    try:
        cache_dir = None
        if os.path.isdir(os.path.expanduser(dataset)):
            # datasets files a local folder's cache under the folder's name and config, not its files: changed labels
            # or added images would be read from the old cache. Filed under the files' key, they are read afresh.
            cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "local", local_files_key(dataset))
        dataset_dict = datasets.load_dataset(os.path.expanduser(dataset), cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UsageError(
            f"Could not load dataset {dataset!r}: {error}. Pass a local folder in the `ylecun/mnist` "
            "layout (parquet files with `image` and `label` columns) or of one subfolder of images per class, or a "
            "Hub id on a machine that can reach the Hub."
        ) from error
    except datasets.exceptions.DatasetGenerationError as error:  # e.g. a truncated parquet file (ArrowInvalid)
        raise UsageError(
            f"Could not read dataset {dataset!r}: one of its files is damaged or not in the format its name says "
            f"({error.__cause__ or error}). Restore or remove the file."
        ) from error
    for split_name, split in dataset_dict.items():
        missing = [column for column in (image_column, label_column) if column not in split.column_names]
        if missing:
            raise UsageError(
                f"Dataset {dataset!r} split {split_name!r} has columns {split.column_names} but lacks "
                f"{missing}; name its image and label columns with --image_column and --label_column."
            )
        if not isinstance(split.features[image_column], datasets.Image):
            raise UsageError(
                f"Column {image_column!r} of dataset {dataset!r} holds {split.features[image_column]}, not images; "
                "name the image column with --image_column."
            )
        label_feature = split.features[label_column]
        if not (isinstance(label_feature, datasets.ClassLabel) or (
                isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint")))):
            raise UsageError(
                f"Column {label_column!r} of dataset {dataset!r} holds {label_feature}, not class ids; the labels "
                "must be integers or a ClassLabel (name the right column with --label_column)."
            )  # fmt: skip
    check_every_class_is_trained(dataset_dict, dataset, label_column)
    return dataset_dict


def check_every_class_is_trained(dataset_dict: datasets.DatasetDict, dataset: str, label_column: str) -> None:
    """Refuse a class that other splits have but the train split lacks: the model would never learn it, and a missing
    highest id would even shrink the model's classes."""
    if "train" not in dataset_dict:
        return
    trained = set(dataset_dict["train"].unique(label_column))
    expected = {name: set(split.unique(label_column)) for name, split in dataset_dict.items() if name != "train"}
    untrained = {name: sorted(ids - trained - {-1}) for name, ids in expected.items()}  # -1: unlabelled, refused later
    untrained = {name: ids for name, ids in untrained.items() if ids}
    if untrained:
        where = "; ".join(f"{name}: {ids[:10]}" for name, ids in untrained.items())
        raise UsageError(
            f"Dataset {dataset!r} has classes without a single training image ({where}); add training images of "
            "them, or remove them from the other splits."
        )


def label_names_of(split: datasets.Dataset, label_column: str = LABEL_COLUMN) -> list[str]:
    """Class names from the label column's `ClassLabel` feature, or the ids as strings for a plain int column."""
    feature = split.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(class_id) for class_id in range(max(split[label_column]) + 1)]


def image_format(
    data: datasets.Dataset, dataset: str, image_column: str = IMAGE_COLUMN, resolution: int | None = None
) -> tuple[str, int]:
    """The PIL mode ("L" or "RGB") and the size the images are trained at.

    The mode is the majority's (grayscale or colour; a mix is converted, with a notice); the size is `resolution`, or
    the images' own when they all share one. Only the image headers are read, once per dataset (cached by `datasets`).
    """

    def header(batch: dict) -> dict:
        colour, size = [], []
        for item in batch[image_column]:
            # closed at once: an image folder holds paths, and thousands of open files exceed the system's limit
            with Image.open(io.BytesIO(item["bytes"]) if item["bytes"] else item["path"]) as image:
                colour.append(len(image.getbands()) >= 3 or image.mode == "P")
                size.append(list(image.size))
        return {"colour": colour, "size": size}

    headers = data.cast_column(image_column, datasets.Image(decode=False)).map(
        header, batched=True, batch_size=2000, remove_columns=data.column_names, desc="Reading image headers"
    )
    colour = sum(headers["colour"])
    mode = "RGB" if colour * 2 > len(headers) else "L"
    if 0 < colour < len(headers):
        logger.warning(
            f"Dataset {dataset!r} mixes {colour} colour and {len(headers) - colour} grayscale images; converting "
            f"them all to {mode}, the majority."
        )
    if resolution is None:
        sizes = {tuple(size) for size in headers["size"]}
        if len(sizes) > 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            shown = ", ".join(f"{width}x{height}" for width, height in sorted(sizes)[:5])
            raise UsageError(
                f"Dataset {dataset!r} holds images of {len(sizes)} sizes ({shown}{', ...' if len(sizes) > 5 else ''}) "
                "or non-square ones; pass --resolution N to resize them all to N x N."
            )
        resolution = next(iter(sizes))[0]
    return mode, resolution


def fits_in_memory(num_bytes: int) -> bool:
    """Whether `num_bytes` take at most half of the memory available now."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return num_bytes <= available // 2


def load_split(
    dataset: str,
    split: str = "train",
    data_format: DataFormat = DEFAULT_FORMAT,
    in_memory: bool | None = None,
) -> ImageClassData:
    """Decode one split into uint8 images (N, C, H, W) and int64 labels.

    Decoding runs once through `Dataset.map`, whose result `datasets` caches on disk under the dataset's fingerprint:
    later runs load the cached arrays (~0.2 s for MNIST's train split) instead of decoding 60,000 PNGs (~4 s).
    Every split is decoded in the train split's format (`image_format`): grayscale or RGB, resized to `resolution`.

    Args:
        dataset (`str`):
            A Hub dataset id (`ylecun/mnist`), a local folder in that layout, or a folder of one subfolder of images
            per class (`imagefolder`).
        split (`str`, *optional*, defaults to `"train"`):
            Which split to load.
        data_format ([`DataFormat`], *optional*, defaults to `image` and `label` at the images' own size):
            The column of images (`img` in `uoft-cs/cifar10`), the column of class ids (integers or a `ClassLabel`),
            and the height and width of the returned images (by default their own size, when they all share one).
        in_memory (`bool`, *optional*):
            Hold the images in memory (`True`) or read them from the memory-mapped cache per batch (`False`). By
            default: in memory when the decoded split takes at most half of the memory available, with a notice
            otherwise.

    Returns:
        [`ImageClassData`]: images, labels and the label names.
    """
    image_column, label_column, resolution = data_format.image_column, data_format.label_column, data_format.resolution
    dataset_dict = load_image_class_dataset(dataset, image_column, label_column)
    if split not in dataset_dict:
        raise UsageError(f"Dataset {dataset!r} has no split {split!r}; it has {list(dataset_dict)}.")
    data = dataset_dict[split]
    if len(data) == 0:
        raise UsageError(f"Split {split!r} of dataset {dataset!r} is empty.")
    label_names = label_names_of(data, label_column)
    if len(label_names) < 2:
        raise UsageError(
            f"Dataset {dataset!r} has {len(label_names)} class ({label_names}); a class-conditioned model needs at "
            "least two."
        )
    mode, resolution = image_format(dataset_dict.get("train", data), dataset, image_column, resolution)
    channels = len(mode)  # "L": 1, "RGB": 3

    def to_pixels(batch: dict) -> dict:
        pixels = []
        for image in batch[image_column]:
            image = image.convert(mode)
            if image.size != (resolution, resolution):
                image = image.resize((resolution, resolution))
            array = np.asarray(image, dtype=np.uint8)
            pixels.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
        return {"pixels": np.stack(pixels)}

    features = datasets.Features(
        {
            "pixels": datasets.Array3D((channels, resolution, resolution), "uint8"),
            LABEL_COLUMN: data.features[label_column],
        }
    )
    decoded = data.select_columns([image_column, label_column])
    if label_column != LABEL_COLUMN:
        decoded = decoded.rename_column(label_column, LABEL_COLUMN)
    decoded = decoded.map(
        to_pixels,
        batched=True,
        batch_size=2000,
        remove_columns=[image_column],
        features=features,
        desc=f"Decoding {split} images",
    )
    labels = decoded.with_format("torch", columns=[LABEL_COLUMN], dtype=torch.int64)[:][LABEL_COLUMN]
    pixels = decoded.with_format("torch", columns=["pixels"], dtype=torch.uint8)
    image_bytes = len(decoded) * channels * resolution**2
    if in_memory is None:
        in_memory = fits_in_memory(image_bytes)
        if not in_memory:
            logger.warning(
                f"The decoded {split} split ({image_bytes / 2**30:.1f} GiB) would take more than half of the free "
                "memory: reading each batch from the memory-mapped datasets cache instead."
            )
    images = pixels[:]["pixels"] if in_memory else pixels
    return ImageClassData(images=images, labels=labels, label_names=label_names)
