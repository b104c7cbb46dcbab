"""Sources: one split that returns batches of numpy arrays by index (in memory or from records)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol
from unittest import mock

import numpy as np

from adc_jax.data.registry import Batch, get_spec, load_source


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


def parse_classes(text: str) -> tuple[int, ...]:
    """``"5-9"``, ``"0,2,4"`` or a mix (``"0-2,7"``) → the class ids in that order; ``""`` → ()."""
    classes = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            ids = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise ValueError(
                f"dataset.classes must list class ids like '5-9' or '0,2,4'; got {text!r}."
            ) from None
        classes.extend(ids)
    if len(set(classes)) != len(classes):
        raise ValueError(f"dataset.classes lists a class twice: {text!r}.")
    return tuple(classes)


class Subset:
    """Some examples of a split (``rows``, in that order), their labels optionally mapped.

    Args:
      source: a :class:`BatchSource`.
      rows: indices into ``source``.
      relabel: ``None``, or an int32 array mapping each of ``source``'s labels to a new one.
    """

    def __init__(self, source: BatchSource, rows: np.ndarray, relabel: np.ndarray | None = None):
        self.source = source
        self.rows = np.asarray(rows, np.int64)
        self.relabel = relabel
        self.image_shape = source.image_shape
        self.worker_count = source.worker_count

    def __len__(self) -> int:
        return len(self.rows)

    def get_batch(self, indices: np.ndarray) -> Batch:
        batch = self.source.get_batch(self.rows[np.asarray(indices, np.int64)])
        if self.relabel is None:
            return batch
        return {**batch, "label": self.relabel[batch["label"]]}


def class_subset(source: BatchSource, classes: Sequence[int], num_classes: int) -> Subset:
    """The examples of some classes, relabelled ``0..len(classes)-1`` in that order.

    For fine-tuning on a task the model has not seen (pretrain on Fashion-MNIST's classes 0–4,
    fine-tune on 5–9 with a new head). The rows are found once, from the source's ``labels``
    (in-memory splits) or by reading the split.

    Args:
      source: a :class:`BatchSource`.
      classes: class ids of ``source``; class ``classes[i]`` becomes label ``i``.
      num_classes: the source's class count, to check the ids against.
    """
    classes = np.asarray(classes, np.int64)
    if classes.size == 0 or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(
            f"dataset.classes must be ids in 0..{num_classes - 1}; got {classes.tolist()}."
        )
    labels = getattr(source, "labels", None)
    if labels is None:
        labels = np.concatenate(
            [
                source.get_batch(np.arange(i, min(i + 4096, len(source))))["label"]
                for i in range(0, len(source), 4096)
            ]
        )
    relabel = np.full(num_classes, -1, np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    return Subset(source, np.flatnonzero(relabel[labels] >= 0), relabel)


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
