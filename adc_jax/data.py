"""Datasets for training: tfds array_record sources read through Grain, no TensorFlow.

The training process never imports TensorFlow: data is prepared once into array_record shards by
the project's own tfds builders (:mod:`adc_jax.datasets`) and read back with tfds' random-access
data sources, which need only numpy, protobuf and array_record (and Pillow for Food-101's JPEGs).
Batches are produced by Grain (``grain.MapDataset``): the host indexes and decodes, and
augmentation runs on the device (:mod:`adc_jax.augment`).

Datasets (the registry :data:`DATASETS`; :func:`get_spec` looks one up by name):

==============  =====================  =======  =========  ==================  ===============
name            tfds builder           classes  served     train / test split  sizes
==============  =====================  =======  =========  ==================  ===============
fashion_mnist   ``adc_fashion_mnist``  10       28×28×1    train / test        60 000 / 10 000
cifar10         ``adc_cifar10``        10       32×32×3    train / test        50 000 / 10 000
cifar100        ``adc_cifar100``       100      32×32×3    train / test        50 000 / 10 000
food101         ``adc_food101``        101      224×224×3  train / test        75 750 / 25 250
==============  =====================  =======  =========  ==================  ===============

The builders store Fashion-MNIST and CIFAR as raw uint8 tensors and Food-101 as 224×224 JPEGs
(resized once, at preparation; why in :mod:`adc_jax.datasets.builders`). Their names carry the
``adc_`` prefix to keep them apart from tfds' own builders, whose PNG encoding or archive
extraction needs TensorFlow.

Preparing (once per data directory)::

    python -m adc_jax.data prepare cifar100 [--data_dir D] [--tarball cifar-100-python.tar.gz]
    python -m adc_jax.data prepare food101 [--data_dir D] [--archive food-101.tar.gz]
    python -m adc_jax.data prepare fashion_mnist [--data_dir D] [--idx_dir DIR]
    python -m adc_jax.data list [--data_dir D]

or :func:`prepare` from Python. ``data_dir=None`` means tfds' default (``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``). Without a local file the official one is downloaded. Fashion-MNIST
reads the IDX gz files from ``idx_dir``, else from ``/usr/share/datasets/fashion-mnist/`` (Debian
``dataset-fashion-mnist``); :func:`prepare_if_local` prepares it automatically when the files are
on disk.

Reading and batching (a training loop)::

    train = open_split("cifar100", "train", data_dir)       # whole split in host memory
    it = TrainIterator(train, batch_size=128, seed=0, start_step=step,
                       process_index=jax.process_index(), process_count=jax.process_count())
    for batch in it:          # {"image": uint8 [b, 32, 32, 3], "label": int32 [b]}
        ...                   # device_put, then adc_jax.augment.train_augment under jit
    test = open_split("cifar100", "test", data_dir)
    for batch in eval_batches(test, batch_size=256):   # + "mask": bool [b]
        ...

The order of the training examples is a function of (seed, step) alone: Grain's ``shuffle``
permutes each epoch, global step ``s`` reads its batch ``s mod steps_per_epoch``, and each process
keeps its slice of that global batch. The batches are the same whatever the number of processes
and of Grain's worker processes, and a run restarted at step ``s`` continues exactly
(:class:`TrainIterator`). Under ``tfds.testing.mock_data`` the same calls read tfds' random fake
examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol
from unittest import mock

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from adc_jax.datasets.builders import (
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


# ---------------------------------------------------------------------------------------------
# Sources: a split that returns batches of numpy arrays by index
# ---------------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """A split: ``len`` examples, and ``get_batch(indices)`` returning numpy arrays.

    ``get_batch`` returns ``{"image": uint8 [n, H, W, C], "label": int32 [n]}`` for ``n`` indices
    (``n`` may be 0), with ``(H, W, C) == image_shape``. ``worker_count`` is how many Grain worker
    processes batch it by default (0: threads of the calling process).
    """

    image_shape: tuple[int, int, int]
    worker_count: int

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> Batch: ...


WORKERS_ENV = "ADC_JAX_DATA_WORKERS"


def default_worker_count() -> int:
    """Grain worker processes for a split decoded on the fly (Food-101): half the cores, at most 16.

    ``$ADC_JAX_DATA_WORKERS`` overrides it (a training run opens its splits with the default).
    One worker served 1 000–1 700 Food-101 images/s on a shared core here, and the fastest
    DeiT-Tiny step measured on an H200 consumes about 10 700 images/s (``docs/input_pipeline.md``);
    the other half of the cores stays with the training process.
    """
    value = os.environ.get(WORKERS_ENV, "")
    if value:
        if not value.isdigit():
            raise ValueError(f"{WORKERS_ENV} must be a number of worker processes, not {value!r}.")
        return int(value)
    return max(1, min(16, (os.cpu_count() or 2) // 2))


class ArraySource:
    """A split held in host memory: batches are numpy fancy indexing, nothing else.

    Args:
      images: uint8 ``[N, H, W, C]``.
      labels: integer ``[N]`` (stored as int32).
    """

    # Indexing costs microseconds: moving batches between processes would cost more.
    worker_count = 0

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}."
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {labels.shape} do not match images {images.shape}.")
        self.images = images
        self.labels = labels.astype(np.int32)
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, np.int64)
        return {"image": self.images[indices], "label": self.labels[indices]}


def _is_mocked(source: Sequence[Any]) -> bool:
    return isinstance(getattr(source, "data_source", None), mock.NonCallableMock)


def _read_examples(source: Sequence[Any], indices: Sequence[int]) -> list[dict[str, Any]]:
    """Reads records by index, batched where the source allows it."""
    indices = [int(i) for i in indices]
    if not indices:
        return []
    # tfds 4.9.10's `mock_data` installs `__getitems__` on its mocked record reader as a plain
    # attribute, so the batched read passes the keys where `self` should be and fails; per-record
    # reads work. Real sources get the batched read (4× faster on Fashion-MNIST).
    if _is_mocked(source):
        return [source[i] for i in indices]
    return list(source.__getitems__(indices))


def _stack(examples: list[dict[str, Any]], shape: tuple[int, int, int]) -> Batch:
    images = np.empty((len(examples), *shape), np.uint8)
    for i, ex in enumerate(examples):
        images[i] = ex["image"]  # decoded by tfds (JPEG: PIL), stored at the served shape
    labels = np.asarray([int(ex["label"]) for ex in examples], np.int32).reshape(len(examples))
    return {"image": images, "label": labels}


class RecordSource:
    """A split read by index from a tfds random-access data source (array_record).

    ``get_batch`` reads the records in one call and decodes them (Food-101: JPEG, with PIL) in the
    calling thread; Grain runs it in :attr:`worker_count` worker processes.

    Args:
      source: what ``builder.as_data_source(split)`` returns.
      image_shape: the ``(H, W, C)`` of the stored images.
      worker_count: Grain worker processes that batch this split; ``None``:
        :func:`default_worker_count`. A source under ``tfds.testing.mock_data`` always gets 0: the
        mock lives in this process only.
    """

    def __init__(
        self,
        source: Sequence[Any],
        image_shape: tuple[int, int, int],
        worker_count: int | None = None,
    ):
        self.source = source
        self.image_shape = tuple(image_shape)
        if worker_count is None:
            worker_count = default_worker_count()
        self.worker_count = 0 if _is_mocked(source) else int(worker_count)

    def __len__(self) -> int:
        return len(self.source)

    def get_batch(self, indices: np.ndarray) -> Batch:
        return _stack(_read_examples(self.source, indices), self.image_shape)


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


def load_arrays(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> Batch:
    """Reads a whole split into host memory: ``{"image": uint8 [N, H, W, C], "label": int32 [N]}``.

    Meant for the small datasets (Fashion-MNIST: 2–4 s for 60 000 images on one core).
    """
    spec = get_spec(name)
    source = load_source(name, split, data_dir)
    n = len(source)
    parts = [
        _stack(_read_examples(source, range(start, min(start + 10_000, n))), spec.image_shape)
        for start in range(0, n, 10_000)
    ]
    if not parts:
        return {"image": np.zeros((0, *spec.image_shape), np.uint8), "label": np.zeros(0, np.int32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def open_split(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    in_memory: bool | None = None,
    worker_count: int | None = None,
) -> ArraySource | RecordSource:
    """One split as a :class:`BatchSource`.

    Args:
      name: a key of :data:`DATASETS`.
      split: ``"train"``, ``"test"`` or a tfds split string.
      data_dir: tfds data directory; ``None``: tfds' default.
      in_memory: load the whole split into host RAM once (default: the dataset's
        ``DatasetSpec.in_memory``: Fashion-MNIST and CIFAR yes, Food-101 no).
      worker_count: Grain worker processes of a :class:`RecordSource` (``None``:
        :func:`default_worker_count`).
    """
    spec = get_spec(name)
    if spec.in_memory if in_memory is None else in_memory:
        arrays = load_arrays(name, split, data_dir)
        return ArraySource(arrays["image"], arrays["label"])
    return RecordSource(load_source(name, split, data_dir), spec.image_shape, worker_count)


# ---------------------------------------------------------------------------------------------
# Batching, with Grain
# ---------------------------------------------------------------------------------------------


def _local_batch_size(batch_size: int, process_count: int, process_index: int) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    if batch_size % process_count:
        raise ValueError(
            f"Global batch size ({batch_size}) must be divisible by the number of processes "
            f"({process_count}); each process loads batch_size // process_count examples."
        )
    return batch_size // process_count


def _grain_iterator(
    read: Callable[[int], Batch], start: int, stop: int, worker_count: int, prefetch: int
) -> grain.DatasetIterator:
    """Grain's iterator over ``read(i)`` for ``i`` in ``[start, stop)``, in that order.

    Every element is a whole batch. ``worker_count`` > 0: worker processes compute them (worker
    ``w`` the ``i ≡ w`` mod ``worker_count``; Grain hands them back in order), one at a time, each
    keeping up to ``max(1, prefetch)`` finished ones. 0: ``prefetch`` threads of this process
    compute ``prefetch`` elements ahead; with ``prefetch`` 0, each one is computed in the caller's
    thread when it is asked for.
    """
    ds = grain.MapDataset.range(start, stop).map(read)
    if worker_count:
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
    else:
        read_options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    it = ds.to_iter_dataset(read_options)
    if worker_count:
        # Grain 0.2.18's mp_prefetch reads one of its absl flags, which raises in a program that
        # never parsed flags (a notebook, a test, a script without absl.app); later Grain
        # releases fall back to the default (google/grain#1355). Mark them parsed, as that issue
        # advises: it changes no flag's value.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=max(1, prefetch)
            )
        )
    return iter(it)


def _shuffle_seed(seed: int) -> int:
    """The 32-bit seed of Grain's shuffle for a run's ``seed``.

    Grain shuffles epoch ``e`` with seed ``s + e``; drawing ``s`` from the run's seed keeps runs
    with consecutive seeds (the paper's 0, 1, 2) from sharing epoch orders.
    """
    return int(np.random.SeedSequence([seed, 0xADC]).generate_state(1)[0])


class _TrainIndices:
    """Global step -> this process's example indices; a picklable function for Grain's workers.

    Step ``s`` reads batch ``o = s % steps_per_epoch`` of epoch ``e = s // steps_per_epoch``:
    positions ``[o·B, (o+1)·B)`` of Grain's shuffle of epoch ``e``, of which process ``p`` keeps
    ``[p·b, (p+1)·b)``.
    """

    def __init__(self, num_examples, batch_size, seed, process_index, local_batch_size):
        self.order = grain.MapDataset.range(num_examples).shuffle(seed=_shuffle_seed(seed))
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.steps_per_epoch = num_examples // batch_size
        self.offset = process_index * local_batch_size
        self.local_batch_size = local_batch_size

    def __call__(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        # Element e·N + i of the shuffled range is element i of epoch e's permutation.
        start = epoch * self.num_examples + position * self.batch_size + self.offset
        stop = start + self.local_batch_size
        return np.array([self.order[i] for i in range(start, stop)], np.int64)


@dataclasses.dataclass(frozen=True)
class _ReadTrainBatch:
    source: BatchSource
    indices: _TrainIndices

    def __call__(self, step: int) -> Batch:
        return self.source.get_batch(self.indices(step))


class TrainIterator:
    """Endless training batches: shuffled per epoch, last partial batch dropped, resumable.

    Global step ``s`` reads epoch ``s // steps_per_epoch``, batch ``s % steps_per_epoch`` of that
    epoch's order, a permutation drawn by Grain's ``MapDataset.shuffle`` from ``seed`` and the
    epoch. The batch of a step depends on (seed, step) alone, so a run restarted with
    ``start_step=s`` continues exactly as an uninterrupted one. ``steps_per_epoch = N //
    batch_size``: the examples past the last full batch are skipped for that epoch (a different
    set each epoch).

    Multi-host: every process orders the same global batch of ``batch_size`` examples and reads
    its contiguous slice ``[p·b, (p+1)·b)``, ``b = batch_size // process_count``; together the
    processes read the batch one process would.

    Batches are read by Grain ahead of use, in ``worker_count`` worker processes (or threads of
    this process when it is 0); they are the same for any ``worker_count``.

    Args:
      source: a :class:`BatchSource` (e.g. from :func:`open_split`).
      batch_size: global batch size (all processes together).
      seed: non-negative int; the data order's seed.
      start_step: global step of the first batch yielded.
      process_index, process_count: this process and how many there are.
      worker_count: Grain worker processes; ``None``: the source's ``worker_count`` (0 for
        in-memory splits, :func:`default_worker_count` for Food-101).
      prefetch: batches prepared ahead; 0 reads in the caller's thread.

    Yields:
      ``{"image": uint8 [b, H, W, C], "label": int32 [b]}``. :attr:`step` is the global step of
      the next batch to be yielded (save it, or the training step, to resume).
    """

    def __init__(
        self,
        source: BatchSource,
        *,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        worker_count: int | None = None,
        prefetch: int = 2,
    ):
        self._iterator: grain.DatasetIterator | None = None
        local = _local_batch_size(batch_size, process_count, process_index)
        if len(source) < batch_size:
            raise ValueError(
                f"The split has {len(source)} examples, fewer than one batch of {batch_size}."
            )
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be >= 0.")
        self._indices = _TrainIndices(len(source), batch_size, int(seed), process_index, local)
        self.source = source
        self.batch_size = batch_size
        self.local_batch_size = local
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self.steps_per_epoch = self._indices.steps_per_epoch
        if worker_count is None:
            worker_count = getattr(source, "worker_count", 0)
        self.worker_count = worker_count
        self.prefetch = prefetch
        self._step = int(start_step)

    @property
    def step(self) -> int:
        """Global step of the next batch :meth:`__next__` returns."""
        return self._step

    def epoch_and_offset(self, step: int) -> tuple[int, int]:
        """``(epoch, batch position within the epoch)`` of a global step."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices of global step ``step``: int64 ``[b]``."""
        return self._indices(step)

    def batch(self, step: int) -> Batch:
        """This process's batch of global step ``step``, read in the caller's thread."""
        return self.source.get_batch(self._indices(step))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            read = _ReadTrainBatch(self.source, self._indices)
            self._iterator = _grain_iterator(
                read, self._step, sys.maxsize, self.worker_count, self.prefetch
            )
        out = next(self._iterator)
        self._step += 1
        return out

    def close(self) -> None:
        """Stops Grain's threads and workers (iteration may go on from :attr:`step` afterwards)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def train_batches(
    dataset: str | DatasetSpec,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int | None = None,
    prefetch: int = 2,
) -> TrainIterator:
    """The training split of ``dataset`` as a :class:`TrainIterator`, from ``start_step`` on.

    Prepares Fashion-MNIST first if it is not prepared and its IDX files are on this machine
    (:func:`prepare_if_local`); any other unprepared dataset raises
    :class:`DatasetNotPreparedError` naming the prepare command.
    """
    name = dataset.name if isinstance(dataset, DatasetSpec) else dataset
    prepare_if_local(name, data_dir)
    return TrainIterator(
        open_split(name, "train", data_dir),
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        prefetch=prefetch,
    )


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Global evaluation batches covering ``num_examples``: ``ceil(num_examples / batch_size)``."""
    return math.ceil(num_examples / batch_size)


@dataclasses.dataclass(frozen=True)
class _ReadEvalBatch:
    """Global evaluation batch ``j`` -> this process's slice of it, padded past the end."""

    source: BatchSource
    batch_size: int
    local_batch_size: int
    process_index: int

    def __call__(self, j: int) -> Batch:
        local = self.local_batch_size
        positions = j * self.batch_size + self.process_index * local + np.arange(local)
        mask = positions < len(self.source)
        real = self.source.get_batch(positions[mask])
        image = np.zeros((local, *self.source.image_shape), np.uint8)
        label = np.zeros(local, np.int32)
        image[mask] = real["image"]
        label[mask] = real["label"]
        return {"image": image, "label": label, "mask": mask}


def eval_batches(
    source: BatchSource,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int | None = None,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Sequential evaluation batches of one static shape, the last one padded and masked.

    Global batch ``j`` holds examples ``[j·B, (j+1)·B)``; positions past the end are padding
    (zero image, label 0, ``mask`` False). Each process gets its contiguous slice
    ``[p·b, (p+1)·b)`` of every global batch, ``b = batch_size // process_count``, and all
    processes get the same number of batches (:func:`num_eval_batches`), so collective steps line
    up. Over all processes and batches every example appears exactly once with ``mask`` True.
    Read by Grain like :class:`TrainIterator`'s batches (``worker_count``, ``prefetch``).

    Yields:
      ``{"image": uint8 [b, H, W, C], "label": int32 [b], "mask": bool [b]}``.
    """
    local = _local_batch_size(batch_size, process_count, process_index)
    if worker_count is None:
        worker_count = getattr(source, "worker_count", 0)
    read = _ReadEvalBatch(source, batch_size, local, process_index)
    it = _grain_iterator(read, 0, num_eval_batches(len(source), batch_size), worker_count, prefetch)
    try:
        yield from it
    finally:
        it.close()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adc_jax.data {prepare NAME, list} [--data_dir D] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m adc_jax.data", description="Prepare and list adc-jax datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare a dataset as array_record (no TensorFlow)")
    p.add_argument("name", choices=sorted(DATASETS))
    p.add_argument("--data_dir", default=None, help="tfds data dir (default: tfds' default)")
    p.add_argument("--idx_dir", default=None, help="fashion_mnist: dir of the IDX gz files")
    p.add_argument("--tarball", default=None, help="cifar10/cifar100: the python tarball")
    p.add_argument("--archive", default=None, help="food101: food-101.tar.gz")
    ls = sub.add_parser("list", help="list datasets and whether they are prepared")
    ls.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, spec in DATASETS.items():
            state = "prepared" if is_prepared(name, args.data_dir) else "not prepared"
            print(f"{name:14s} {spec.builder_name:18s} {spec.num_classes:4d} classes  {state}")
        return 0
    sources = {"idx_dir": args.idx_dir, "tarball": args.tarball, "archive": args.archive}
    spec = get_spec(args.name)
    sources = {k: v for k, v in sources.items() if v is not None}
    bad = sorted(set(sources) - set(spec.source_args))
    if bad:
        parser.error(f"{args.name} does not take {['--' + b for b in bad]}")
    print(prepare(args.name, args.data_dir, **sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
