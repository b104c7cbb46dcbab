"""The datasets the project knows (:data:`DATASETS`), and preparing them as array_record shards."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from adc_jax.data.builders import (
    AdcCifar10,
    AdcCifar100,
    AdcFashionMnist,
    AdcFood101,
    local_fashion_mnist_files,
)

Batch = dict[str, np.ndarray]

# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the project needs to know about one dataset."""

    name: str  # registry key, e.g. "cifar100"
    builder_name: str  # tfds name of the builder that prepares and reads it
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the uint8 images batches carry
    train_split: str
    test_split: str  # the split evaluated on
    train_size: int
    test_size: int
    in_memory: bool  # small enough to load a whole split into host RAM once
    source_args: tuple[str, ...] = ()  # keyword arguments `prepare` accepts for local raw files

    def split_name(self, split: str) -> str:
        """Maps ``"train"`` / ``"test"`` to this dataset's split names; others pass through."""
        return {"train": self.train_split, "test": self.test_split}.get(split, split)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "fashion_mnist",
            "adc_fashion_mnist",
            10,
            (28, 28, 1),
            "train",
            "test",
            60_000,
            10_000,
            in_memory=True,
            source_args=("idx_dir",),
        ),
        DatasetSpec(
            "cifar10",
            "adc_cifar10",
            10,
            (32, 32, 3),
            "train",
            "test",
            50_000,
            10_000,
            in_memory=True,
            source_args=("tarball",),
        ),
        DatasetSpec(
            "cifar100",
            "adc_cifar100",
            100,
            (32, 32, 3),
            "train",
            "test",
            50_000,
            10_000,
            in_memory=True,
            source_args=("tarball",),
        ),
        DatasetSpec(
            "food101",
            "adc_food101",
            101,
            (224, 224, 3),
            "train",
            "test",
            75_750,
            25_250,
            in_memory=False,
            source_args=("archive",),
        ),
    )
}

_BUILDERS = {
    "adc_fashion_mnist": AdcFashionMnist,
    "adc_cifar10": AdcCifar10,
    "adc_cifar100": AdcCifar100,
    "adc_food101": AdcFood101,
}


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``; ValueError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {sorted(DATASETS)}.") from None


dataset_info = get_spec  # the name the training loop reads the registry by


class DatasetNotPreparedError(RuntimeError):
    """The dataset has no array_record copy in the data directory; the message says how to fix."""


def prepare_command(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The shell command that prepares ``name`` (for error messages and docs)."""
    cmd = f"python -m adc_jax.data prepare {name}"
    return cmd if data_dir is None else f"{cmd} --data_dir {os.fspath(data_dir)}"


def _builder(
    spec: DatasetSpec, data_dir: str | os.PathLike | None, **kwargs: Any
) -> tfds.core.DatasetBuilder:
    data_dir = None if data_dir is None else os.fspath(data_dir)
    return _BUILDERS[spec.builder_name](data_dir=data_dir, **kwargs)


def _has_random_access(builder: tfds.core.DatasetBuilder) -> bool:
    formats = builder.info.available_file_formats()
    return bool(formats & set(tfds.core.FileFormat.with_random_access()))


def is_prepared(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``name`` is prepared in ``data_dir`` in a random-access format (array_record)."""
    builder = _builder(get_spec(name), data_dir)
    return builder.is_prepared() and _has_random_access(builder)


def _not_prepared_message(spec: DatasetSpec, data_dir, builder) -> str:
    where = os.fspath(data_dir) if data_dir is not None else f"{builder.data_dir_root} (default)"
    msg = (
        f"Dataset {spec.name!r} (tfds builder {spec.builder_name!r}) is not prepared as "
        f"array_record in {where}. Prepare it once with:\n    "
        f"{prepare_command(spec.name, data_dir)}"
    )
    if spec.source_args:
        msg += f" [--{spec.source_args[0]} LOCAL_FILE]"
    if builder.is_prepared():
        msg += (
            f"\nA copy in {builder.info.file_format} format exists; convert it with:\n"
            f"    tfds convert_format --dataset_dir={builder.data_dir} "
            "--out_file_format=array_record"
        )
    return msg


def load_source(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> Sequence[Any]:
    """The tfds random-access data source of one split (``builder.as_data_source``).

    Args:
      name: a key of :data:`DATASETS`.
      split: ``"train"``, ``"test"`` (mapped to the dataset's split names) or any tfds split
        string (``"train[:1000]"``).
      data_dir: tfds data directory; ``None``: tfds' default.

    Returns:
      A sequence of example dicts (``"image"`` uint8 ``[H, W, C]``, ``"label"`` int, ...).

    Raises:
      DatasetNotPreparedError: with the command that prepares it.
    """
    spec = get_spec(name)
    builder = _builder(spec, data_dir)
    # Ask for the source first and check preparation only on failure: under
    # `tfds.testing.mock_data` nothing is prepared but `as_data_source` returns fake examples.
    try:
        return builder.as_data_source(spec.split_name(split))
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        if builder.is_prepared() and _has_random_access(builder):
            raise
        raise DatasetNotPreparedError(_not_prepared_message(spec, data_dir, builder)) from e


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------


def prepare(
    name: str, data_dir: str | os.PathLike | None = None, **source_paths: str | os.PathLike | None
) -> str:
    """Prepares ``name`` as array_record shards in ``data_dir``, without TensorFlow.

    A no-op if it is already prepared there.

    Args:
      name: a key of :data:`DATASETS`.
      data_dir: tfds data directory; ``None``: tfds' default.
      **source_paths: local raw files instead of downloading. ``fashion_mnist``: ``idx_dir``
        (directory of the four IDX gz files); ``cifar10`` / ``cifar100``: ``tarball`` (the
        official python tarball); ``food101``: ``archive`` (``food-101.tar.gz``). ``None``
        values are ignored.

    Returns:
      The prepared dataset's directory (``data_dir/<builder>/<version>``).
    """
    spec = get_spec(name)
    source_paths = {k: v for k, v in source_paths.items() if v is not None}
    unknown = sorted(set(source_paths) - set(spec.source_args))
    if unknown:
        raise ValueError(
            f"prepare({name!r}) got unknown source paths {unknown}; it accepts "
            f"{list(spec.source_args) or 'none'}."
        )
    builder = _builder(spec, data_dir, file_format="array_record", **source_paths)
    if builder.is_prepared() and not _has_random_access(builder):
        raise DatasetNotPreparedError(_not_prepared_message(spec, data_dir, builder))
    builder.download_and_prepare(
        # Prepared copies on tfds' GCS bucket are TFRecord and the adc_* names aren't there.
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return os.fspath(builder.data_dir)


def prepare_if_local(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Prepares ``name`` if it is not prepared and its raw files are on this machine.

    Only Fashion-MNIST qualifies (IDX files in ``/usr/share/datasets/fashion-mnist/``): a training
    run can call this before :func:`open_split` and never download anything. Returns whether the
    dataset is prepared afterwards.
    """
    spec = get_spec(name)
    if is_prepared(name, data_dir):
        return True
    if spec.name == "fashion_mnist" and local_fashion_mnist_files() is not None:
        prepare(name, data_dir)
        return True
    return False
