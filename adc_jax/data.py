"""Datasets for training: tfds array_record sources, host-side batching, no TensorFlow.

The training process never imports TensorFlow (ARCHITECTURE decision 6): data is prepared once into
array_record shards and read back with tfds' random-access data sources, which need only numpy,
protobuf and array_record. The host does indexing only; augmentation runs on the device
(:mod:`adc_jax.augment`).

Datasets (the registry :data:`DATASETS`; :func:`get_spec` looks one up by name):

==============  =====================  =======  =========  ==================  ===============
name            tfds builder           classes  served     train / test split  sizes
==============  =====================  =======  =========  ==================  ===============
fashion_mnist   ``adc_fashion_mnist``  10       28×28×1    train / test        60 000 / 10 000
cifar10         ``adc_cifar10``        10       32×32×3    train / test        50 000 / 10 000
cifar100        ``adc_cifar100``       100      32×32×3    train / test        50 000 / 10 000
food101         ``food101`` (stock)    101      224×224×3  train / validation  75 750 / 25 250
==============  =====================  =======  =========  ==================  ===============

* ``adc_*`` are the project's own builders (:mod:`adc_jax.datasets`): they store pixels as
  ``tfds.features.Tensor`` and prepare without TensorFlow. The prefix keeps them apart from tfds'
  own ``fashion_mnist`` / ``cifar*`` (whose PNG encoding needs TensorFlow).
* Food-101 uses tfds' stock ``food101`` builder (JPEG bytes as ``tfds.features.Image``). With tfds
  4.9.10 it prepares without TensorFlow too (checked on a small fake archive): its generator passes
  the JPEG files' bytes through unchanged, and reading decodes them with PIL. tfds 4.9.10 then
  needs the package ``importlib_resources``, which it forgets to declare on Python >= 3.9. Images
  vary in size (up to 512 px), so reading resizes each one on the host to 224×224 (PIL bilinear,
  antialiased: what torchvision's ``Resize`` does to PIL images). This moves the paper's resize
  before RandAugment / ColorJitter for this dataset only; their geometric magnitudes are relative
  to the image size. If preparing it here is not an option (it downloads 5 GB), prepare it in a
  separate environment, with or without TensorFlow::

      pip install tensorflow-datasets importlib_resources pillow
      tfds build food101 --data_dir=DATA_DIR --file_format=array_record

  and point ``data_dir`` at ``DATA_DIR``. A copy prepared earlier as TFRecord (tfds' default)
  converts with ``tfds convert_format --dataset_dir=DATA_DIR/food101
  --out_file_format=array_record``.

Preparing (once per data directory)::

    python -m adc_jax.data prepare cifar100 [--data_dir D] [--tarball cifar-100-python.tar.gz]
    python -m adc_jax.data prepare fashion_mnist [--data_dir D] [--idx_dir DIR]
    python -m adc_jax.data list [--data_dir D]

or :func:`prepare` from Python. ``data_dir=None`` means tfds' default (``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``). Fashion-MNIST reads the IDX gz files from ``idx_dir``, else from
``/usr/share/datasets/fashion-mnist/`` (Debian ``dataset-fashion-mnist``), else downloads them;
:func:`prepare_if_local` prepares it automatically when the files are on disk.

Reading and batching (a training loop)::

    train = open_split("cifar100", "train", data_dir)       # whole split in host memory
    it = TrainIterator(train, batch_size=128, seed=0, start_step=step,
                       process_index=jax.process_index(), process_count=jax.process_count())
    for batch in it:          # {"image": uint8 [b, 32, 32, 3], "label": int32 [b]}
        ...                   # device_put, then adc_jax.augment.train_augment under jit
    test = open_split("cifar100", "test", data_dir)
    for batch in eval_batches(test, batch_size=256):   # + "mask": bool [b]
        ...

Under ``tfds.testing.mock_data`` the same calls read tfds' random fake examples.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds

from adc_jax.datasets.builders import (
    AdcCifar10,
    AdcCifar100,
    AdcFashionMnist,
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
    test_split: str  # the split evaluated on (Food-101: tfds calls it "validation")
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
            "food101",
            101,
            (224, 224, 3),
            "train",
            "validation",
            75_750,
            25_250,
            in_memory=False,
        ),
    )
}

_OWN_BUILDERS = {
    "adc_fashion_mnist": AdcFashionMnist,
    "adc_cifar10": AdcCifar10,
    "adc_cifar100": AdcCifar100,
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
    if spec.builder_name in _OWN_BUILDERS:
        return _OWN_BUILDERS[spec.builder_name](data_dir=data_dir, **kwargs)
    return tfds.builder(spec.builder_name, data_dir=data_dir, **kwargs)


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
    if spec.name == "food101":
        msg += (
            "\nor in a separate environment (TensorFlow is not needed):\n"
            "    pip install tensorflow-datasets importlib_resources pillow\n"
            f"    tfds build food101 --data_dir={where.split(' ')[0]} --file_format=array_record"
        )
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
        official python tarball). ``None`` values are ignored.

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
    try:
        builder.download_and_prepare(
            # Prepared copies on tfds' GCS bucket are TFRecord and the adc_* names aren't there.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except ModuleNotFoundError as e:
        if e.name == "importlib_resources":
            raise ModuleNotFoundError(
                "tfds 4.9.10 needs `importlib_resources` to prepare its stock builders on "
                "Python >= 3.9 but does not declare it: pip install importlib_resources",
                name=e.name,
            ) from e
        raise
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
    (``n`` may be 0), with ``(H, W, C) == image_shape``.
    """

    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> Batch: ...


class ArraySource:
    """A split held in host memory: batches are numpy fancy indexing, nothing else.

    Args:
      images: uint8 ``[N, H, W, C]``.
      labels: integer ``[N]`` (stored as int32).
    """

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


def _read_examples(source: Sequence[Any], indices: Sequence[int]) -> list[dict[str, Any]]:
    """Reads records by index, batched where the source allows it."""
    indices = [int(i) for i in indices]
    if not indices:
        return []
    # tfds 4.9.10's `mock_data` installs `__getitems__` on its mocked record reader as a plain
    # attribute, so the batched read passes the keys where `self` should be and fails; per-record
    # reads work. Real sources get the batched read (4× faster on Fashion-MNIST).
    if isinstance(getattr(source, "data_source", None), mock.NonCallableMock):
        return [source[i] for i in indices]
    return list(source.__getitems__(indices))


def _fit_image(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Gives one decoded image the served ``(H, W, C)``: channel fix-up, then PIL resize."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    h, w, c = shape
    if image.shape[-1] != c:
        if image.shape[-1] == 1:
            image = np.repeat(image, c, axis=-1)
        elif image.shape[-1] == 4 and c == 3:
            image = image[..., :3]  # drop alpha
        else:
            raise ValueError(f"Cannot serve a {image.shape} image as {shape}.")
    if image.shape[:2] != (h, w):
        from PIL import Image  # tfds decodes JPEGs with PIL already; only Food-101 gets here

        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        # Bilinear with antialiasing: torchvision's Resize on PIL images, as the paper's code ran.
        image = np.asarray(pil.resize((w, h), Image.BILINEAR)).reshape(h, w, c)
    return image


def _stack(examples: list[dict[str, Any]], shape: tuple[int, int, int]) -> Batch:
    images = np.empty((len(examples), *shape), np.uint8)
    for i, ex in enumerate(examples):
        images[i] = _fit_image(ex["image"], shape)
    labels = np.asarray([int(ex["label"]) for ex in examples], np.int32).reshape(len(examples))
    return {"image": images, "label": labels}


class RecordSource:
    """A split read by index from a tfds random-access data source (array_record).

    Decoding and any resize run in ``num_workers`` threads (PIL releases the GIL while it decodes).

    Args:
      source: what ``builder.as_data_source(split)`` returns.
      image_shape: the ``(H, W, C)`` batches carry; other sizes are resized (PIL bilinear).
      num_workers: decode threads per batch.
    """

    def __init__(
        self, source: Sequence[Any], image_shape: tuple[int, int, int], num_workers: int = 8
    ):
        self.source = source
        self.image_shape = tuple(image_shape)
        self.num_workers = max(1, num_workers)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, indices: np.ndarray) -> Batch:
        return _stack(_read_examples(self.source, indices), self.image_shape)

    def get_batch(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, np.int64)
        chunks = [c for c in np.array_split(indices, self.num_workers) if len(c)]
        if len(chunks) <= 1:
            return self._read(indices)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
        parts = list(self._pool.map(self._read, chunks))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


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
    num_workers: int = 8,
) -> ArraySource | RecordSource:
    """One split as a :class:`BatchSource`.

    Args:
      name: a key of :data:`DATASETS`.
      split: ``"train"``, ``"test"`` or a tfds split string.
      data_dir: tfds data directory; ``None``: tfds' default.
      in_memory: load the whole split into host RAM once (default: the dataset's
        ``DatasetSpec.in_memory``: Fashion-MNIST and CIFAR yes, Food-101 no).
      num_workers: decode threads of a :class:`RecordSource`.
    """
    spec = get_spec(name)
    if spec.in_memory if in_memory is None else in_memory:
        arrays = load_arrays(name, split, data_dir)
        return ArraySource(arrays["image"], arrays["label"])
    return RecordSource(load_source(name, split, data_dir), spec.image_shape, num_workers)


# ---------------------------------------------------------------------------------------------
# Batching
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


class _Prefetcher:
    """Runs ``produce(i)`` for i = 0, 1, ... in a daemon thread, ``size`` results ahead."""

    def __init__(self, produce: Callable[[int], Any], count: int | None, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(produce, count), daemon=True, name="adc_jax.data.prefetch"
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce, count):
        i = 0
        try:
            while count is None or i < count:
                if not self._put(("item", produce(i))):
                    return
                i += 1
            self._put(("end", None))
        except BaseException as e:  # re-raised in the consumer's thread
            self._put(("error", e))

    def get(self) -> Any:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _TrainOrder:
    """The pure part of :class:`TrainIterator`: global step -> this process's indices and batch.

    Kept apart so that the prefetch thread references this and not the iterator, which can then
    be garbage-collected (and its thread stopped) when dropped without ``close()``.
    """

    def __init__(self, source, batch_size, seed, process_index, local_batch_size):
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.local_batch_size = local_batch_size
        self.steps_per_epoch = len(source) // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._perm  # one read: the prefetch thread may replace it concurrently
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        self._perm = (epoch, perm)
        return perm

    def indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.batch_size + self.process_index * self.local_batch_size
        return self.permutation(epoch)[start : start + self.local_batch_size]

    def batch(self, step: int) -> Batch:
        return self.source.get_batch(self.indices(step))


class TrainIterator:
    """Endless training batches: shuffled per epoch, last partial batch dropped, resumable.

    Global step ``s`` reads epoch ``s // steps_per_epoch``, position ``s % steps_per_epoch`` of
    that epoch's permutation ``np.random.default_rng([seed, epoch]).permutation(N)``. The batch of
    a step depends on (seed, step) alone, so a run restarted with ``start_step=s`` continues
    exactly as an uninterrupted one. ``steps_per_epoch = N // batch_size``: the examples past the
    last full batch are skipped for that epoch (a different set each epoch).

    Multi-host: every process computes the same global batch of ``batch_size`` indices and keeps
    its contiguous slice ``[p·b, (p+1)·b)``, ``b = batch_size // process_count``.

    Args:
      source: a :class:`BatchSource` (e.g. from :func:`open_split`).
      batch_size: global batch size (all processes together).
      seed: non-negative int; the data order's seed.
      start_step: global step of the first batch yielded.
      process_index, process_count: this process and how many there are.
      prefetch: batches prepared ahead in a background thread; 0 reads in the caller's thread.

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
        prefetch: int = 2,
    ):
        self._prefetcher: _Prefetcher | None = None
        local = _local_batch_size(batch_size, process_count, process_index)
        if len(source) < batch_size:
            raise ValueError(
                f"The split has {len(source)} examples, fewer than one batch of {batch_size}."
            )
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be >= 0.")
        self._order = _TrainOrder(source, batch_size, int(seed), process_index, local)
        self.source = source
        self.batch_size = batch_size
        self.local_batch_size = local
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self.steps_per_epoch = self._order.steps_per_epoch
        self.prefetch = prefetch
        self._step = int(start_step)

    @property
    def step(self) -> int:
        """Global step of the next batch :meth:`__next__` returns."""
        return self._step

    def epoch_and_offset(self, step: int) -> tuple[int, int]:
        """``(epoch, batch position within the epoch)`` of a global step."""
        return divmod(step, self.steps_per_epoch)

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``: int64 ``[N]``."""
        return self._order.permutation(epoch)

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices of global step ``step``: int64 ``[b]``."""
        return self._order.indices(step)

    def batch(self, step: int) -> Batch:
        """This process's batch of global step ``step`` (no iterator state involved)."""
        return self._order.batch(step)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        if self.prefetch <= 0:
            out = self._order.batch(self._step)
        else:
            if self._prefetcher is None:
                order, start = self._order, self._step
                self._prefetcher = _Prefetcher(
                    lambda i: order.batch(start + i), None, self.prefetch
                )
            out = self._prefetcher.get()
        self._step += 1
        return out

    def close(self) -> None:
        """Stops the prefetch thread (iteration may go on from :attr:`step` afterwards)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

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
        prefetch=prefetch,
    )


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Global evaluation batches covering ``num_examples``: ``ceil(num_examples / batch_size)``."""
    return math.ceil(num_examples / batch_size)


def eval_batches(
    source: BatchSource,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Sequential evaluation batches of one static shape, the last one padded and masked.

    Global batch ``j`` holds examples ``[j·B, (j+1)·B)``; positions past the end are padding
    (zero image, label 0, ``mask`` False). Each process gets its contiguous slice
    ``[p·b, (p+1)·b)`` of every global batch, ``b = batch_size // process_count``, and all
    processes get the same number of batches (:func:`num_eval_batches`), so collective steps line
    up. Over all processes and batches every example appears exactly once with ``mask`` True.

    Yields:
      ``{"image": uint8 [b, H, W, C], "label": int32 [b], "mask": bool [b]}``.
    """
    local = _local_batch_size(batch_size, process_count, process_index)
    n = len(source)
    shape = tuple(source.image_shape)

    def produce(j: int) -> Batch:
        positions = j * batch_size + process_index * local + np.arange(local)
        mask = positions < n
        real = source.get_batch(positions[mask])
        image = np.zeros((local, *shape), np.uint8)
        label = np.zeros(local, np.int32)
        image[mask] = real["image"]
        label[mask] = real["label"]
        return {"image": image, "label": label, "mask": mask}

    count = num_eval_batches(n, batch_size)
    if prefetch <= 0:
        for j in range(count):
            yield produce(j)
        return
    prefetcher = _Prefetcher(produce, count, prefetch)
    try:
        while True:
            try:
                yield prefetcher.get()
            except StopIteration:
                return
    finally:
        prefetcher.close()


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
    ls = sub.add_parser("list", help="list datasets and whether they are prepared")
    ls.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, spec in DATASETS.items():
            state = "prepared" if is_prepared(name, args.data_dir) else "not prepared"
            print(f"{name:14s} {spec.builder_name:18s} {spec.num_classes:4d} classes  {state}")
        return 0
    sources = {"idx_dir": args.idx_dir, "tarball": args.tarball}
    spec = get_spec(args.name)
    sources = {k: v for k, v in sources.items() if v is not None}
    bad = sorted(set(sources) - set(spec.source_args))
    if bad:
        parser.error(f"{args.name} does not take {['--' + b for b in bad]}")
    print(prepare(args.name, args.data_dir, **sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
