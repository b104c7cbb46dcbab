"""tfds builders for Fashion-MNIST, CIFAR-10/100 and Food-101 that prepare without TensorFlow.

The stock tfds builders of the first three store PNG-encoded ``tfds.features.Image`` features, whose
encoder needs TensorFlow at preparation time. Ours store the pixels as
``tfds.features.Tensor(shape=(H, W, C), dtype=np.uint8)`` and the class as a
``tfds.features.ClassLabel``; both serialise with numpy and protobuf alone, so
``download_and_prepare(file_format="array_record")`` runs in a TensorFlow-free process (checked
with tfds 4.9.10). The tensors are stored as one bytes string each (``Encoding.BYTES``): the
default encoding writes every pixel as an int64 varint and made preparing and reading about twice
as slow. Raw pixels cost a little more disk than PNG (CIFAR: ~180 MB) and nothing to decode.

Food-101 is different: its images are JPEGs of varying size (up to 512 px a side). tfds' stock
``food101`` builder extracts the 5 GB archive with its extractor, which calls ``tf.io.gfile``, and
stores the original JPEGs, so every training step would decode 512 px images and resize them on the
host. Ours (:class:`AdcFood101`) reads ``food-101.tar.gz`` with :mod:`tarfile`, decodes every image
once, resizes it to 224×224 and stores it re-encoded as JPEG (quality 90) in a
``tfds.features.Image``: 16 KB an image (1.6 GB for the 101 000, a tenth of raw uint8 pixels),
served in a seventh of the host time that decoding and resizing an original takes (measured in
``docs/input_pipeline.md``). The resize is the paper's (PIL bilinear, antialiased: torchvision's
``Resize`` on PIL images); it moves before RandAugment / ColorJitter, whose geometric magnitudes
are relative to the image size.

Naming: the classes register with tfds under project-prefixed names, ``adc_fashion_mnist``,
``adc_cifar10``, ``adc_cifar100`` and ``adc_food101``, so they never clash with tfds' own builders
and a prepared directory says which builder wrote it.

Example order: ``disable_shuffling=True`` keeps the order of the official files, so record ``i`` of
a prepared split is example ``i`` of the raw files. Training shuffles by itself
(:class:`adc_jax.data.TrainIterator`), so tfds' write-time shuffle would buy nothing.

Sources (the raw files):

* Fashion-MNIST: the four official IDX gz files, from ``idx_dir`` if given, else from
  ``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``) if the files
  are there, else downloaded by the tfds download manager from the official URLs.
* CIFAR-10/100: the official python-pickle tarball (``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz``), from ``tarball`` if given, else downloaded by the download
  manager. The tarball holds Python pickles: only give it files from a source you trust.
* Food-101: the official ``food-101.tar.gz`` (5 GB), from ``archive`` if given, else downloaded by
  the download manager (downloaded only: nothing is extracted to disk). The splits are the
  archive's ``meta/train.txt`` (75 750) and ``meta/test.txt`` (25 250), in their order.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import itertools
import os
import pickle
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import py_utils

# Where the Debian package `dataset-fashion-mnist` puts the original IDX gz files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
FOOD101_IMAGE_SIZE = 224  # stored and served: square, the paper's resize
FOOD101_JPEG_QUALITY = 90
# The archive's meta/classes.txt, in its order: label i is FOOD101_CLASSES[i] (tfds' stock
# builder uses the same order).
FOOD101_CLASSES = (
    "apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap "
    "bread_pudding breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake "
    "ceviche cheesecake cheese_plate chicken_curry chicken_quesadilla chicken_wings "
    "chocolate_cake chocolate_mousse churros clam_chowder club_sandwich crab_cakes creme_brulee "
    "croque_madame cup_cakes deviled_eggs donuts dumplings edamame eggs_benedict escargots "
    "falafel filet_mignon fish_and_chips foie_gras french_fries french_onion_soup french_toast "
    "fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad "
    "grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog "
    "huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich "
    "macaroni_and_cheese macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai "
    "paella pancakes panna_cotta peking_duck pho pizza pork_chop poutine prime_rib "
    "pulled_pork_sandwich ramen ravioli red_velvet_cake risotto samosa sashimi scallops "
    "seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls steak "
    "strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles"
).split()

_CIFAR_CITATION = """\
@techreport{krizhevsky2009learning,
  title={Learning multiple layers of features from tiny images},
  author={Krizhevsky, Alex},
  institution={University of Toronto},
  year={2009}
}"""

_FASHION_MNIST_CITATION = """\
@article{xiao2017fashion,
  title={Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal={arXiv preprint arXiv:1708.07747},
  year={2017}
}"""

_FOOD101_CITATION = """\
@inproceedings{bossard14,
  title={Food-101 -- Mining Discriminative Components with Random Forests},
  author={Bossard, Lukas and Guillaumin, Matthieu and Van Gool, Luc},
  booktitle={European Conference on Computer Vision},
  year={2014}
}"""


# ---------------------------------------------------------------------------------------------
# Raw file readers (plain numpy; usable without tfds)
# ---------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (gzipped or not) of unsigned bytes.

    Returns:
      uint8 array of the shape stored in the header: ``[N, 28, 28]`` for Fashion-MNIST images,
      ``[N]`` for labels.

    Raises:
      ValueError: if the header is not that of an unsigned-byte IDX file or the payload size does
        not match it.
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r}).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says shape {shape} but the file holds {len(data) - offset} bytes."
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def _get(d: Mapping[Any, Any], key: str) -> Any:
    # The official pickles were written by Python 2: loaded with encoding="bytes" their keys are
    # bytes. Accept str keys too (pickles re-written by Python 3 tools).
    if key.encode() in d:
        return d[key.encode()]
    return d[key]


def read_cifar_tarball(path: str | os.PathLike, num_classes: int) -> dict[str, dict[str, Any]]:
    """Reads the official CIFAR python-pickle tarball into arrays.

    Args:
      path: ``cifar-10-python.tar.gz`` (``num_classes=10``) or ``cifar-100-python.tar.gz``
        (``num_classes=100``).
      num_classes: 10 or 100; picks the member names and label keys.

    Returns:
      ``{"train": {...}, "test": {...}}``, each with ``"image"`` uint8 ``[N, 32, 32, 3]`` (HWC;
      the pickles store CHW planes) and ``"label"`` int64 ``[N]``; CIFAR-100 also has
      ``"coarse_label"`` int64 ``[N]``. Examples are in the files' order (CIFAR-10: data batches
      1 to 5).
    """
    if num_classes == 10:
        members = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_keys = {"label": "labels"}
    elif num_classes == 100:
        members = {"train": ["train"], "test": ["test"]}
        label_keys = {"label": "fine_labels", "coarse_label": "coarse_labels"}
    else:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}.")

    wanted = {name for names in members.values() for name in names}
    loaded: dict[str, Mapping[Any, Any]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if member.isfile() and base in wanted:
                f = tar.extractfile(member)
                assert f is not None
                loaded[base] = pickle.load(f, encoding="bytes")
    missing = sorted(wanted - loaded.keys())
    if missing:
        raise ValueError(
            f"{path} lacks {missing}: is it the official CIFAR-{num_classes} python tarball?"
        )

    out: dict[str, dict[str, Any]] = {}
    for split, names in members.items():
        parts = [loaded[n] for n in names]
        data = np.concatenate([np.asarray(_get(p, "data"), np.uint8) for p in parts])
        arrays = {"image": data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)}
        for key, pickle_key in label_keys.items():
            arrays[key] = np.concatenate([np.asarray(_get(p, pickle_key), np.int64) for p in parts])
            if len(arrays[key]) != len(data):
                raise ValueError(f"{path}: {split} has {len(data)} images but {pickle_key} differ.")
        out[split] = arrays
    return out


_FOOD101_META = ("classes", "train", "test")


def read_food101_meta(path: str | os.PathLike) -> dict[str, list[str]]:
    """The lists in ``food-101/meta/`` of the official archive, read without extracting it.

    Returns:
      ``{"classes": [...], "train": [...], "test": [...]}``: the lines of ``classes.txt``,
      ``train.txt`` and ``test.txt``; image ids look like ``"apple_pie/1005649"``. Reading stops
      as soon as the three files are found.
    """
    found: dict[str, list[str]] = {}
    wanted = {f"food-101/meta/{name}.txt": name for name in _FOOD101_META}
    # Stream mode ("r|gz"): one sequential pass, no index of the archive's 101 000 members.
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            name = wanted.get(member.name.removeprefix("./"))
            if name is not None and member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                found[name] = [line for line in f.read().decode().splitlines() if line.strip()]
                if len(found) == len(wanted):
                    break
    missing = sorted(set(wanted) - {f"food-101/meta/{n}.txt" for n in found})
    if missing:
        raise ValueError(
            f"{path} lacks {missing}: is it the official food-101.tar.gz? Download it from "
            f"{FOOD101_URL} or let `python -m adc_jax.data prepare food101` download it."
        )
    return found


def iter_archive_images(path: str | os.PathLike, ids: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """``(id, file bytes)`` of the images ``food-101/images/<id>.jpg`` of ``ids``, in archive order.

    One sequential pass over the gzipped tar; other members are skipped unread.
    """
    wanted = set(ids)
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not (member.isfile() and name.startswith("food-101/images/")):
                continue
            image_id = name[len("food-101/images/") :].removesuffix(".jpg")
            if image_id in wanted:
                f = tar.extractfile(member)
                assert f is not None
                yield image_id, f.read()


def resize_to_jpeg(data: bytes, size: int, quality: int) -> bytes:
    """Decodes one image, makes it RGB, resizes it to ``size``×``size`` and encodes it as JPEG.

    The resize is PIL's bilinear filter, antialiased when shrinking: torchvision's ``Resize`` on
    PIL images, what the paper's code ran. Grey and CMYK images (a few in Food-101) become RGB.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        small = image.convert("RGB").resize((size, size), Image.BILINEAR)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _examples(arrays: Mapping[str, np.ndarray]) -> Iterator[tuple[int, dict[str, Any]]]:
    # Integer keys: with disable_shuffling tfds writes records in key order.
    n = len(arrays["image"])
    for i in range(n):
        yield i, {k: (v[i] if k == "image" else int(v[i])) for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


class _AdcBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the project's builders (not registered itself)."""

    # tfds 4.9.10 locates a builder's checksums file through `code_path`, which evaluates
    # `importlib_resources.abc.Traversable` for builders that live in an installed package, but
    # tfds only depends on `importlib_resources` for Python < 3.9: on 3.11 preparation dies with
    # ModuleNotFoundError. Our builders ship no checksums file, so say so and skip the lookup.
    @py_utils.classproperty
    @classmethod
    def _checksums_path(cls):
        return None


class AdcFashionMnist(_AdcBuilder):
    """Fashion-MNIST (60 000 / 10 000, 28×28×1, 10 classes) as raw uint8 tensors.

    Args:
      idx_dir: directory holding the four official IDX gz files. ``None``: use
        ``/usr/share/datasets/fashion-mnist/`` if it holds them, else download.
      **kwargs: passed to ``tfds.core.DatasetBuilder`` (``data_dir``, ``file_format``, ...).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw uint8 tensors from the official IDX files, original order."}

    def __init__(self, *, idx_dir: str | os.PathLike | None = None, **kwargs: Any):
        self._idx_dir = idx_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST stored as raw uint8 tensors (prepares without TensorFlow).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(28, 28, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    "label": tfds.features.ClassLabel(names=FASHION_MNIST_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation=_FASHION_MNIST_CITATION,
            disable_shuffling=True,
        )

    def _source_files(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        if self._idx_dir is not None:
            paths = {k: os.path.join(self._idx_dir, f) for k, f in FASHION_MNIST_FILES.items()}
            missing = [p for p in paths.values() if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(f"Fashion-MNIST IDX files not found: {missing}")
            return paths
        local = local_fashion_mnist_files()
        if local is not None:
            return local
        return dl_manager.download(
            {k: FASHION_MNIST_URL + f for k, f in FASHION_MNIST_FILES.items()}
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        paths = self._source_files(dl_manager)
        return {
            "train": self._generate_examples(paths["train_images"], paths["train_labels"]),
            "test": self._generate_examples(paths["test_images"], paths["test_labels"]),
        }

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(
                f"Unexpected Fashion-MNIST shapes: images {images.shape}, labels {labels.shape}."
            )
        return _examples({"image": images[..., None], "label": labels})


def local_fashion_mnist_files(
    idx_dir: str | os.PathLike = DEFAULT_FASHION_MNIST_DIR,
) -> dict[str, str] | None:
    """The four Fashion-MNIST IDX gz paths in ``idx_dir``, or ``None`` if any is missing."""
    paths = {k: os.path.join(idx_dir, f) for k, f in FASHION_MNIST_FILES.items()}
    return paths if all(os.path.exists(p) for p in paths.values()) else None


class _AdcCifar(_AdcBuilder, skip_registration=True):
    """Shared code of the CIFAR builders (not registered itself)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw uint8 HWC tensors from the python pickles, original order."}
    NUM_CLASSES: int
    URL: str

    def __init__(self, *, tarball: str | os.PathLike | None = None, **kwargs: Any):
        self._tarball = tarball
        super().__init__(**kwargs)

    def _label_features(self) -> dict[str, tfds.features.FeatureConnector]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"CIFAR-{self.NUM_CLASSES} stored as raw uint8 HWC tensors "
                "(prepares without TensorFlow)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(32, 32, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    **self._label_features(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            citation=_CIFAR_CITATION,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        if self._tarball is not None:
            if not os.path.exists(self._tarball):
                raise FileNotFoundError(f"CIFAR tarball not found: {self._tarball}")
            path = self._tarball
        else:
            path = dl_manager.download(self.URL)
        data = read_cifar_tarball(path, self.NUM_CLASSES)
        return {split: self._generate_examples(arrays) for split, arrays in data.items()}

    def _generate_examples(self, arrays):
        return _examples(arrays)


class AdcCifar10(_AdcCifar):
    """CIFAR-10 (50 000 / 10 000, 32×32×3, 10 classes) as raw uint8 tensors.

    Args:
      tarball: path of ``cifar-10-python.tar.gz``; ``None`` downloads it.
      **kwargs: passed to ``tfds.core.DatasetBuilder``.
    """

    NUM_CLASSES = 10
    URL = CIFAR10_URL

    def _label_features(self):
        return {"label": tfds.features.ClassLabel(names=CIFAR10_NAMES)}


class AdcCifar100(_AdcCifar):
    """CIFAR-100 (50 000 / 10 000, 32×32×3, 100 fine / 20 coarse classes) as raw uint8 tensors.

    Args:
      tarball: path of ``cifar-100-python.tar.gz``; ``None`` downloads it.
      **kwargs: passed to ``tfds.core.DatasetBuilder``.
    """

    NUM_CLASSES = 100
    URL = CIFAR100_URL

    def _label_features(self):
        return {
            "label": tfds.features.ClassLabel(num_classes=100),
            "coarse_label": tfds.features.ClassLabel(num_classes=20),
        }


class AdcFood101(_AdcBuilder):
    """Food-101 (75 750 / 25 250, 101 classes) as 224×224 JPEGs, prepared from the official archive.

    Record ``i`` of a split is line ``i`` of the archive's ``meta/<split>.txt``. Preparing reads
    the archive three times in sequence (the meta lists, then each split's images) and resizes on
    all cores (169 images/s on 2 shared cores: about 10 minutes for the 101 000).

    Args:
      archive: path of ``food-101.tar.gz``; ``None`` downloads it (download only, no extraction).
      **kwargs: passed to ``tfds.core.DatasetBuilder``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "224×224 RGB JPEGs (quality 90) re-encoded from the official archive, meta order."
    }

    def __init__(self, *, archive: str | os.PathLike | None = None, **kwargs: Any):
        self._archive = archive
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = FOOD101_IMAGE_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Food-101 resized to 224×224 (PIL bilinear) and stored as JPEG (prepares without "
                "TensorFlow)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=FOOD101_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
            citation=_FOOD101_CITATION,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        if self._archive is not None:
            if not os.path.exists(self._archive):
                raise FileNotFoundError(f"Food-101 archive not found: {self._archive}")
            path = self._archive
        else:
            path = dl_manager.download(FOOD101_URL)
        meta = read_food101_meta(path)
        if sorted(meta["classes"]) != sorted(FOOD101_CLASSES):
            raise ValueError(
                f"{path}: meta/classes.txt does not list Food-101's 101 classes "
                f"(got {len(meta['classes'])} names)."
            )
        return {split: self._generate_examples(path, meta[split]) for split in ("train", "test")}

    def _generate_examples(self, path, ids: list[str]):
        position = {image_id: i for i, image_id in enumerate(ids)}
        label = {name: i for i, name in enumerate(FOOD101_CLASSES)}
        found = 0
        images = iter_archive_images(path, ids)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            # PIL releases the GIL while it decodes, resizes and encodes: threads use every core.
            while chunk := list(itertools.islice(images, 256)):
                encoded = pool.map(
                    lambda item: resize_to_jpeg(item[1], FOOD101_IMAGE_SIZE, FOOD101_JPEG_QUALITY),
                    chunk,
                )
                for (image_id, _), jpeg in zip(chunk, encoded, strict=True):
                    found += 1
                    example = {"image": jpeg, "label": label[image_id.split("/")[0]]}
                    yield position[image_id], example
        if found != len(ids):
            raise ValueError(
                f"{path} holds {found} of the {len(ids)} images its meta lists name: is the "
                "download complete? Delete it and prepare again."
            )
