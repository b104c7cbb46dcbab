"""Training and evaluation batches read by Grain, deterministic by (seed, step)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator

import grain
import numpy as np
from absl import flags

from adc_jax.data.registry import Batch, DatasetSpec, prepare_if_local
from adc_jax.data.sources import BatchSource, open_split


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
