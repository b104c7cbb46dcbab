"""The project's own tfds builders: datasets that prepare without TensorFlow.

Importing this package registers the builders with tfds under project-prefixed names
(``adc_fashion_mnist``, ``adc_cifar10``, ``adc_cifar100``, ``adc_food101``), so
``tfds.data_source("adc_cifar100", data_dir=...)`` works from any process that has imported it.
Use :mod:`adc_jax.data` for preparing, reading and batching; this package only knows how to turn
the official raw files into array_record shards.
"""

from adc_jax.datasets.builders import (
    AdcCifar10,
    AdcCifar100,
    AdcFashionMnist,
    AdcFood101,
    read_cifar_tarball,
    read_food101_meta,
    read_idx,
)

__all__ = [
    "AdcCifar10",
    "AdcCifar100",
    "AdcFashionMnist",
    "AdcFood101",
    "read_cifar_tarball",
    "read_food101_meta",
    "read_idx",
]
