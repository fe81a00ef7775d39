"""Datasets other than MNIST, built here (no Hub): a CIFAR-10-layout parquet folder (`img`, `label` as a ClassLabel,
32x32 RGB) and an `imagefolder` of class subfolders, from the data layer up to training, loading, sampling and
evaluation in fresh processes; bad inputs get one clear error each; MNIST reads exactly as before."""

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import evaluate, sampling
from pipeline.data import DataFormat, load_split
from tests.conftest import DATASET, TINY_TRAIN_FLAGS, run_cli, train_here

COLOURS = {"airplane": (40, 60, 220), "cat": (220, 60, 40)}  # one colour per class: a model can tell them apart


def coloured_images(count: int, colour: tuple[int, int, int], size: int = 32, mode: str = "RGB") -> list:
    """`count` images of `colour` with a little per-image noise, so that no two are the same."""
    rng = np.random.default_rng(sum(colour) + count)
    images = []
    for _ in range(count):
        pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype("uint8")
        images.append(Image.fromarray(pixels).convert(mode))
    return images


def write_cifar_layout(folder: Path, per_class: dict[str, int]) -> None:
    """Parquet train and test splits with columns `img` and `label` (ClassLabel), as `uoft-cs/cifar10` has them."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(COLOURS))})
    for split, count in per_class.items():
        images, labels = [], []
        for class_id, colour in enumerate(COLOURS.values()):
            images += coloured_images(count, colour)
            labels += [class_id] * count
        (folder / "plain_text").mkdir(parents=True, exist_ok=True)
        dataset = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        dataset.to_parquet(folder / "plain_text" / f"{split}-00000-of-00001.parquet")


def write_imagefolder(folder: Path, per_class: dict[str, int]) -> None:
    """`split/class_name/NNN.png`: the layout `datasets.load_dataset(folder)` reads as an imagefolder."""
    for split, count in per_class.items():
        for name, colour in COLOURS.items():
            (folder / split / name).mkdir(parents=True)
            for index, image in enumerate(coloured_images(count, colour)):
                image.save(folder / split / name / f"{index:03d}.png")


@pytest.fixture(scope="module")
def cifar_layout(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar_layout")
    write_cifar_layout(folder, {"train": 24, "test": 8})
    return folder


def test_cifar_layout_reads_as_colour_at_its_own_size(cifar_layout):
    data = load_split(str(cifar_layout), "train", DataFormat(image_column="img"))
    assert data.images.shape == (48, 3, 32, 32) and data.label_names == ["airplane", "cat"]
    first = np.array(coloured_images(24, COLOURS["airplane"])[0]).transpose(2, 0, 1)
    assert torch.equal(data.images[0], torch.from_numpy(first))  # channels in order, no grey conversion


def test_imagefolder_class_names_come_from_the_folders(tmp_path):
    write_imagefolder(tmp_path, {"train": 3, "test": 2})
    data = load_split(str(tmp_path), "train")
    assert data.label_names == ["airplane", "cat"] and data.images.shape == (6, 3, 32, 32)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_mixed_modes_become_the_majority_with_a_notice(tmp_path, caplog):
    images = coloured_images(2, COLOURS["cat"]) + coloured_images(1, COLOURS["cat"], mode="L")
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1]}).to_parquet(tmp_path / "train.parquet")
    assert load_split(str(tmp_path)).images.shape == (3, 3, 32, 32)
    assert "mixes 2 colour and 1 grayscale images; converting them all to RGB" in caplog.text


def test_mixed_sizes_need_a_resolution(tmp_path):
    images = coloured_images(1, COLOURS["cat"], size=32) + coloured_images(1, COLOURS["cat"], size=40)
    datasets.Dataset.from_dict({"image": images, "label": [0, 1]}).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"2 sizes \(32x32, 40x40\).*pass --resolution N"):
        load_split(str(tmp_path))
    assert load_split(str(tmp_path), data_format=DataFormat(resolution=16)).images.shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"img": "images", "label": "ints"}, r"lacks \['image'\]; name its image and label columns with "
                                             r"--image_column and --label_column"),
        ({"image": "images", "label": "strings"}, "not class ids; the labels must be integers or a ClassLabel"),
        ({"image": "ints", "label": "ints"}, "not images; name the image column with --image_column"),
        ({"image": "images", "label": "one class"}, "a class-conditioned model needs at least two"),
    ],
)  # fmt: skip
def test_bad_columns_are_named_with_the_fix(tmp_path, columns, message):
    values = {"images": coloured_images(2, COLOURS["cat"]), "ints": [0, 1], "strings": ["cat", "dog"],
              "one class": [0, 0]}  # fmt: skip
    datasets.Dataset.from_dict({name: values[kind] for name, kind in columns.items()}).to_parquet(
        tmp_path / "train.parquet"
    )
    with pytest.raises(ValueError, match=message):
        load_split(str(tmp_path))


def test_mnist_reads_exactly_as_the_raw_images():
    # The default path must not move MNIST's numbers: same pixels, one channel, 28x28, no conversion on the way.
    data = load_split(DATASET, "test")
    raw = datasets.load_dataset(DATASET, split="test")
    assert data.images.shape == (10_000, 1, 28, 28)
    for index in (0, 1234, 9999):
        assert torch.equal(data.images[index, 0], torch.from_numpy(np.asarray(raw[index]["image"])))


def test_mnist_trains_to_the_same_weights_as_with_the_old_defaults(trained_dir, tmp_path):
    # `trained_dir` ran with the new defaults (size and channels from the data); the old ones, spelled out, must give
    # the very same weights, bit for bit, so MNIST's numbers cannot move (trained here, in this process: the same bits
    # as the launched `trained_dir` trains with the same flags).
    train_here(["--output_dir", str(tmp_path / "run"), "--max_train_steps", "4", "--train_batch_size", "8",
                *TINY_TRAIN_FLAGS, "--resolution", "28", "--image_column", "image", "--label_column",
                "label"])  # fmt: skip
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "run" / weights).read_bytes() == (trained_dir / weights).read_bytes()
    unet = json.loads((tmp_path / "run" / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["out_channels"], unet["sample_size"]) == (1, 1, 28)


def train_tiny(dataset: Path, output_dir: Path, *flags: str) -> None:
    train_here(["--dataset", str(dataset), "--output_dir", str(output_dir), "--max_train_steps", "2",
                "--train_batch_size", "8", "--class_dropout_prob", "0.1", *TINY_TRAIN_FLAGS, *flags])  # fmt: skip


def evaluate_here(argv: list[str], capsys) -> dict:
    """`python -m pipeline.evaluate ARGV` in this process: the JSON line it prints."""
    capsys.readouterr()
    evaluate.main(evaluate.parse_args(argv))
    return json.loads(capsys.readouterr().out.splitlines()[-1])


LOAD_THREE_WAYS = """
import sys
from diffusers import DiffusionPipeline
from pipeline import ClassConditionedDDIMPipeline
for pipe in (ClassConditionedDDIMPipeline.from_pretrained(sys.argv[1]),
             DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)):
    images = pipe(class_labels=["cat", 0], num_inference_steps=2).images
    print(type(pipe).__name__, [(image.mode, image.size) for image in images])
"""


def test_cifar_layout_end_to_end(cifar_layout, tmp_path, capsys):
    output_dir = tmp_path / "run"
    train_tiny(cifar_layout, output_dir, "--image_column", "img")
    unet = json.loads((output_dir / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["out_channels"], unet["sample_size"]) == (3, 3, 32)
    assert unet["id2label"] == {"0": "airplane", "1": "cat"}
    assert Image.open(output_dir / "samples.png").mode == "RGB"  # the validation grid keeps the colour

    lines = run_cli([sys.executable, "-c", LOAD_THREE_WAYS, str(output_dir)]).stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["[('RGB', (32, 32)), ('RGB', (32, 32))]"] * 2
    grid = tmp_path / "grid.png"
    sampling.cli(["--model", str(output_dir), "--num_images_per_label", "2", "--num_inference_steps", "2", "--output",
                  str(grid)])  # fmt: skip
    assert Image.open(grid).mode == "RGB" and Image.open(grid).height == 2 * 34 + 2

    results = evaluate_here(["--model", str(output_dir), "--seeds", "0", "--num_images_per_label", "4",
                             "--num_inference_steps", "2", "--dataset", str(cifar_layout), "--image_column", "img",
                             "--classifier_cache_dir", str(tmp_path / "classifiers")], capsys)  # fmt: skip
    assert results["num_images"] == 8 and 0 <= results["cond_accuracy"]["mean"] <= 1
    # The classifier learned from the fit part of this dataset (40 of its 48 training images), cached under its key.
    assert results["classifier"]["num_fit_images"] == 40
    assert len(list((tmp_path / "classifiers").glob("classifier-*"))) == 1


def test_imagefolder_end_to_end(tmp_path, capsys):
    write_imagefolder(tmp_path / "data", {"train": 12, "test": 4})
    output_dir = tmp_path / "run"
    train_tiny(tmp_path / "data", output_dir, "--resolution", "16")
    unet = json.loads((output_dir / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["sample_size"], unet["id2label"]) == (3, 16, {"0": "airplane", "1": "cat"})
    lines = run_cli([sys.executable, "-c", LOAD_THREE_WAYS, str(output_dir)]).stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["[('RGB', (16, 16)), ('RGB', (16, 16))]"] * 2
    grid = tmp_path / "grid.png"
    sampling.cli(["--model", str(output_dir), "--class_labels", "cat", "--num_images_per_label", "2",
                  "--num_inference_steps", "2", "--output", str(grid)])  # fmt: skip
    assert Image.open(grid).mode == "RGB" and Image.open(grid).height == 16 + 2 * 2
    # evaluated at the model's 16 pixels against the folder's test/ images; 2 per class: the floor's pool holds 2
    results = evaluate_here(["--model", str(output_dir), "--dataset", str(tmp_path / "data"), "--seeds", "0",
                             "--num_images_per_label", "2", "--num_inference_steps", "2", "--classifier_cache_dir",
                             str(tmp_path / "classifiers")], capsys)  # fmt: skip
    assert results["num_images"] == 4 and results["classifier"]["num_fit_images"] == 20
