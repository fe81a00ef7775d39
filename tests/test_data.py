import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data import DataFormat, load_split
from pipeline.errors import UsageError
from tests.conftest import DATASET


def test_vendored_mnist_splits():
    train = load_split(DATASET, "train")
    test = load_split(DATASET, "test")
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.images.shape == (60_000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.label_names == [str(i) for i in range(10)]
    # The official class counts of the training split.
    assert torch.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert train.images.min() == 0 and train.images.max() == 255
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the first MNIST training digits


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_split(str(tmp_path / "nope"))


def test_folder_without_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Could not load dataset"):
        load_split(str(tmp_path))


def test_missing_columns_are_named(tmp_path):
    datasets.Dataset.from_dict({"img": [Image.new("L", (28, 28))], "target": [1]}).to_parquet(
        tmp_path / "train.parquet"
    )
    with pytest.raises(ValueError, match=r"lacks \['image', 'label'\]"):
        load_split(str(tmp_path))


def test_missing_split_is_named():
    with pytest.raises(ValueError, match="has no split 'validation'"):
        load_split(DATASET, "validation")


def test_rgb_images_are_resized_and_keep_their_colour(tmp_path):
    images = [Image.new("RGB", (32, 32), color=(255, 255, 255)), Image.new("RGB", (32, 32))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1]}, features=features).to_parquet(
        tmp_path / "train.parquet"
    )
    data = load_split(str(tmp_path), data_format=DataFormat(resolution=28))
    assert data.images.shape == (2, 3, 28, 28)
    assert data.images[0].min() == 255 and data.images[1].max() == 0
    assert data.label_names == ["a", "b"]


def test_hub_id_goes_through_load_dataset(monkeypatch):
    # No network here: the Hub id must reach `datasets.load_dataset` and come back as a clear error.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Could not load dataset 'ylecun/mnist'"):
        load_split("ylecun/mnist")


def test_lazy_split_reads_the_same_images_on_demand():
    in_memory = load_split(DATASET, "test")
    lazy = load_split(DATASET, "test", in_memory=False)
    assert in_memory.in_memory and not lazy.in_memory
    indices = torch.tensor([9999, 0, 17, 17, 4242])
    assert torch.equal(lazy.take(indices), in_memory.take(indices))
    assert torch.equal(lazy.labels, in_memory.labels)
    assert torch.equal(lazy.subset(5).take(torch.arange(5)), in_memory.images[:5])


def small_copy(tmp_path, monkeypatch, rows: dict[str, int] = {"train": 200, "test": 100}, keep=None):  # noqa: B006
    """A copy of data/mnist named like it, with the first `rows` of each split (rows passing `keep`), and its own
    datasets cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    source, copy = Path(DATASET), tmp_path / "mnist"
    (copy / "mnist").mkdir(parents=True)
    shutil.copy(source / "README.md", copy / "README.md")
    for split, count in rows.items():
        name = f"{split}-00000-of-00001.parquet"
        table = pq.read_table(source / "mnist" / name).slice(0, count)
        if keep is not None:
            table = table.filter(pa.array([keep(split, label) for label in table.column("label").to_pylist()]))
        pq.write_table(table, copy / "mnist" / name)
    return copy


def test_a_changed_local_dataset_is_read_afresh(tmp_path, monkeypatch):
    # datasets 5.2 files a local folder in the Hub layout under its name and config: a copy named like data/mnist
    # whose labels were fixed used to load the old labels from the warm cache.
    copy = small_copy(tmp_path, monkeypatch)
    before = load_split(str(copy), "test").labels  # the cache is warm now
    test_file = copy / "mnist" / "test-00000-of-00001.parquet"
    table = pq.read_table(test_file)
    index = table.schema.get_field_index("label")
    fixed = pa.array([(label + 1) % 10 for label in table.column("label").to_pylist()], table.schema.field(index).type)
    pq.write_table(table.set_column(index, table.schema.field(index), fixed), test_file)
    after = load_split(str(copy), "test").labels
    assert torch.equal(after, (before + 1) % 10)


def test_a_damaged_data_file_is_one_line(tmp_path, monkeypatch):
    copy = small_copy(tmp_path, monkeypatch)
    test_file = copy / "mnist" / "test-00000-of-00001.parquet"
    test_file.write_bytes(test_file.read_bytes()[:5000])  # truncated: ArrowInvalid deep in datasets
    with pytest.raises(UsageError, match="damaged or not in the format .*Parquet magic bytes not found"):
        load_split(str(copy), "train")


def test_a_class_without_training_images_is_refused(tmp_path, monkeypatch):
    # 9 is the highest id: a plain int column would even have shrunk the model to 9 classes
    copy = small_copy(tmp_path, monkeypatch, keep=lambda split, label: split != "train" or label != 9)
    with pytest.raises(UsageError, match=r"classes without a single training image \(test: \[9\]\)"):
        load_split(str(copy), "train")
