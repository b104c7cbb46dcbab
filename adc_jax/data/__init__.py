"""Datasets for training: tfds array_record sources read through Grain, no TensorFlow.

One job per module: ``registry`` (the datasets and their preparation), ``builders`` (the
project's tfds builders), ``sources`` (a split as batches by index), ``iterators`` (training and
evaluation batches on Grain) and ``cli`` (``python -m adc_jax.data``).

The training process never imports TensorFlow: data is prepared once into array_record shards by
the project's own tfds builders (:mod:`adc_jax.data.builders`) and read back with tfds'
random-access data sources, which need only numpy, protobuf and array_record (and Pillow for
Food-101's JPEGs).
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
(resized once, at preparation; why in :mod:`adc_jax.data.builders`). Their names carry the
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

from adc_jax.data.iterators import TrainIterator, eval_batches, num_eval_batches, train_batches
from adc_jax.data.registry import (
    DATASETS,
    Batch,
    DatasetNotPreparedError,
    DatasetSpec,
    dataset_info,
    get_spec,
    is_prepared,
    load_source,
    prepare,
    prepare_command,
    prepare_if_local,
)
from adc_jax.data.sources import (
    WORKERS_ENV,
    ArraySource,
    BatchSource,
    RecordSource,
    Subset,
    class_subset,
    default_worker_count,
    load_arrays,
    open_split,
    parse_classes,
)

__all__ = [
    "DATASETS",
    "WORKERS_ENV",
    "ArraySource",
    "Batch",
    "BatchSource",
    "DatasetNotPreparedError",
    "DatasetSpec",
    "RecordSource",
    "Subset",
    "TrainIterator",
    "class_subset",
    "dataset_info",
    "default_worker_count",
    "eval_batches",
    "get_spec",
    "is_prepared",
    "load_arrays",
    "load_source",
    "num_eval_batches",
    "open_split",
    "parse_classes",
    "prepare",
    "prepare_command",
    "prepare_if_local",
    "train_batches",
]
