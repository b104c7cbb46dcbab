"""adc_jax.data: TF-free preparation and reading, batching order, resumption, sharding, padding."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from adc_jax import data
from adc_jax.data import cli
from adc_jax.data.builders import FOOD101_CLASSES, FOOD101_URL, read_idx

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist",
)


def assert_no_tensorflow():
    assert "tensorflow" not in sys.modules, "TensorFlow was imported"


@pytest.fixture
def without_tensorflow(monkeypatch):
    """``import tensorflow`` raises ImportError, as on a machine without it (installed or not)."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Fixtures: real Fashion-MNIST, fake CIFAR tarballs
# ---------------------------------------------------------------------------------------------


def _pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def write_cifar_tarball(path, num_classes: int, n_train: int, n_test: int, seed: int = 0):
    """Writes a small tarball in the official python-pickle layout; returns the expected arrays."""
    rng = np.random.default_rng(seed)
    expected = {}
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        flat = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # R, G, B planes of 32×32
        fine = rng.integers(0, num_classes, n)
        expected[split] = {
            "image": flat.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1),
            "label": fine,
        }
        if num_classes == 100:
            coarse = rng.integers(0, 20, n)
            expected[split]["coarse_label"] = coarse
            files[f"cifar-100-python/{split}"] = {
                b"data": flat,
                b"fine_labels": fine.tolist(),
                b"coarse_labels": coarse.tolist(),
                b"filenames": [b"x.png"] * n,
            }
        elif split == "test":
            files["cifar-10-batches-py/test_batch"] = {b"data": flat, b"labels": fine.tolist()}
        else:  # CIFAR-10 spreads train over five batches
            for i, part in enumerate(np.array_split(np.arange(n), 5)):
                files[f"cifar-10-batches-py/data_batch_{i + 1}"] = {
                    b"data": flat[part],
                    b"labels": fine[part].tolist(),
                }
    meta = "cifar-100-python/meta" if num_classes == 100 else "cifar-10-batches-py/batches.meta"
    files[meta] = {b"unused": True}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            payload = _pickle_bytes(obj)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return expected


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    tarball = root / "cifar-100-python.tar.gz"
    expected = write_cifar_tarball(tarball, 100, n_train=23, n_test=9)
    data_dir = root / "tfds"
    out = data.prepare("cifar100", data_dir, tarball=tarball)
    return data_dir, expected, out


# ---------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------


def test_registry():
    assert set(data.DATASETS) == {"fashion_mnist", "cifar10", "cifar100", "food101"}
    spec = data.get_spec("cifar100")
    assert (spec.num_classes, spec.image_shape, spec.builder_name) == (
        100,
        (32, 32, 3),
        "adc_cifar100",
    )
    assert data.get_spec("food101").split_name("test") == "test"
    assert data.get_spec("food101").builder_name == "adc_food101"
    with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'.*cifar100.*fashion_mnist"):
        data.get_spec("imagenet")


def test_not_prepared_error_names_the_command(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.open_split("cifar100", "train", tmp_path)
    assert f"python -m adc_jax.data prepare cifar100 --data_dir {tmp_path}" in str(e.value)
    with pytest.raises(data.DatasetNotPreparedError, match="prepare food101 .*--archive"):
        data.load_source("food101", "test", tmp_path)
    assert not data.is_prepared("cifar10", tmp_path)
    assert_no_tensorflow()


def test_prepare_rejects_sources_of_another_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"accepts \['tarball'\]"):
        data.prepare("cifar100", tmp_path, idx_dir="/somewhere")


# ---------------------------------------------------------------------------------------------
# Real Fashion-MNIST and fake CIFAR, prepared without TensorFlow
# ---------------------------------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_reads_back_the_idx_files_exactly(fashion_dir):
    assert data.is_prepared("fashion_mnist", fashion_dir)

    def idx(name):
        return read_idx(os.path.join(FASHION_DIR, f"{name}-ubyte.gz"))

    # The whole test split through the in-memory path the training loop uses.
    arrays = data.load_arrays("fashion_mnist", "test", fashion_dir)
    assert arrays["image"].dtype == np.uint8 and arrays["label"].dtype == np.int32
    np.testing.assert_array_equal(arrays["image"], idx("t10k-images-idx3")[..., None])
    np.testing.assert_array_equal(arrays["label"], idx("t10k-labels-idx1"))
    # Train: all 60 000 there, in the files' order (checked on a sample to keep the test fast).
    train = data.load_source("fashion_mnist", "train", fashion_dir)
    assert len(train) == 60_000
    sample = np.random.default_rng(0).choice(60_000, 500, replace=False)
    batch = data.RecordSource(train, (28, 28, 1)).get_batch(sample)
    np.testing.assert_array_equal(batch["image"], idx("train-images-idx3")[sample, ..., None])
    np.testing.assert_array_equal(batch["label"], idx("train-labels-idx1")[sample])
    # Already prepared: both are no-ops.
    assert data.prepare_if_local("fashion_mnist", fashion_dir)
    data.prepare("fashion_mnist", fashion_dir)
    assert_no_tensorflow()


@needs_fashion
def test_fashion_mnist_record_source_matches_memory(fashion_dir):
    records = data.open_split("fashion_mnist", "test", fashion_dir, in_memory=False, worker_count=0)
    memory = data.open_split("fashion_mnist", "test", fashion_dir)
    assert isinstance(records, data.RecordSource) and isinstance(memory, data.ArraySource)
    idx = np.array([9999, 0, 17, 4242, 17])
    a, b = records.get_batch(idx), memory.get_batch(idx)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert_no_tensorflow()


def test_cifar100_prepares_from_a_tarball_and_reads_back(cifar100):
    data_dir, expected, out = cifar100
    assert out.startswith(os.fspath(data_dir)) and data.is_prepared("cifar100", data_dir)
    for split in ("train", "test"):
        arrays = data.load_arrays("cifar100", split, data_dir)
        np.testing.assert_array_equal(arrays["image"], expected[split]["image"])
        np.testing.assert_array_equal(arrays["label"], expected[split]["label"])
    source = data.load_source("cifar100", "test", data_dir)
    assert [int(source[i]["coarse_label"]) for i in range(len(source))] == list(
        expected["test"]["coarse_label"]
    )
    # tfds' own entry point finds the registered builder too.
    via_tfds = tfds.data_source("adc_cifar100", split="train", data_dir=data_dir, download=False)
    np.testing.assert_array_equal(via_tfds[5]["image"], expected["train"]["image"][5])
    assert_no_tensorflow()


def test_cifar10_prepares_from_a_tarball(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    expected = write_cifar_tarball(tarball, 10, n_train=12, n_test=3, seed=1)
    data.prepare("cifar10", tmp_path / "tfds", tarball=tarball)
    arrays = data.load_arrays("cifar10", "train", tmp_path / "tfds")
    np.testing.assert_array_equal(arrays["image"], expected["train"]["image"])
    np.testing.assert_array_equal(arrays["label"], expected["train"]["label"])
    assert_no_tensorflow()


def test_command_line(cifar100, tmp_path, capsys):
    data_dir, _, out = cifar100
    tarball = tmp_path / "cifar-100-python.tar.gz"
    write_cifar_tarball(tarball, 100, n_train=2, n_test=1)
    assert cli.main(["prepare", "cifar100", "--data_dir", str(data_dir)]) == 0  # no-op
    assert capsys.readouterr().out.strip() == out
    with pytest.raises(SystemExit):
        cli.main(["prepare", "cifar100", "--idx_dir", "/x"])
    # The module entry point, in a fresh process.
    result = subprocess.run(
        [sys.executable, "-m", "adc_jax.data", "list", "--data_dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert lines["cifar100"].endswith(" prepared") and lines["cifar10"].endswith("not prepared")


# ---------------------------------------------------------------------------------------------
# tfds.testing.mock_data through the real reading code
# ---------------------------------------------------------------------------------------------


def test_mock_data_reads_through_the_real_code_path(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        train = data.open_split("cifar100", "train", tmp_path)
        records = data.open_split("cifar100", "train", tmp_path, in_memory=False)
        assert isinstance(train, data.ArraySource) and len(train) == len(records) == 40
        assert train.images.shape == (40, 32, 32, 3) and train.images.dtype == np.uint8
        assert train.labels.min() >= 0 and train.labels.max() < 100
        idx = np.arange(40)[::-1]
        np.testing.assert_array_equal(records.get_batch(idx)["image"], train.images[idx])
        batch = next(iter(data.TrainIterator(train, batch_size=16, seed=0, prefetch=0)))
        assert batch["image"].shape == (16, 32, 32, 3)
        # The by-name entry point of the training loop.
        with data.train_batches("cifar100", tmp_path, 16, seed=0, start_step=3) as it:
            by_name = next(it)
        expected = data.TrainIterator(train, batch_size=16, seed=0).batch(3)
        np.testing.assert_array_equal(by_name["image"], expected["image"])
        # Food-101: fake 224×224 JPEGs, decoded on the host; mocked sources stay in-process.
        food = data.open_split("food101", "test", tmp_path)
        assert isinstance(food, data.RecordSource) and food.worker_count == 0
        batch = food.get_batch(np.arange(3))
        assert batch["image"].shape == (3, 224, 224, 3) and batch["image"].dtype == np.uint8
    assert_no_tensorflow()


def write_food101_archive(path, split_counts, seed=0, meta_last=True):
    """A small ``food-101.tar.gz`` in the official layout; returns the expected examples.

    ``split_counts`` maps class name -> (train count, test count). Images are smooth colour fields
    of varying size and mode (RGB, grey, CMYK, as in the real archive), each with its own colours
    so that a swapped image cannot pass. Expected per split: ``[(resized uint8 224×224×3, label)]``
    in the order of ``meta/<split>.txt`` (which lists the classes' images interleaved).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    members, lists = {}, {"train": [], "test": []}
    expected = {"train": {}, "test": {}}
    modes = ["RGB", "L", "CMYK"]
    for name, counts in split_counts.items():
        for split, count in zip(("train", "test"), counts, strict=True):
            for _ in range(count):
                image_id = f"{name}/{rng.integers(10**6, 10**7)}"
                h, w = rng.integers(60, 400, size=2)
                corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
                rgb = Image.fromarray(corners).resize((int(w), int(h)), Image.BILINEAR)
                mode = modes[len(members) % len(modes)]
                buf = io.BytesIO()
                rgb.convert(mode).save(buf, "JPEG", quality=95)
                members[f"food-101/images/{image_id}.jpg"] = buf.getvalue()
                with Image.open(io.BytesIO(buf.getvalue())) as decoded:
                    small = decoded.convert("RGB").resize((224, 224), Image.BILINEAR)
                lists[split].append(image_id)
                expected[split][image_id] = (np.asarray(small), FOOD101_CLASSES.index(name))
    meta = {}
    for split in ("train", "test"):
        order = rng.permutation(len(lists[split]))
        lists[split] = [lists[split][i] for i in order]
        meta[f"food-101/meta/{split}.txt"] = "\n".join(lists[split]) + "\n"
        grouped = {}
        for image_id in lists[split]:
            grouped.setdefault(image_id.split("/")[0], []).append(image_id)
        meta[f"food-101/meta/{split}.json"] = json.dumps(grouped)
    meta["food-101/meta/classes.txt"] = "\n".join(FOOD101_CLASSES) + "\n"
    meta["food-101/meta/labels.txt"] = "\n".join(
        n.replace("_", " ").capitalize() for n in FOOD101_CLASSES
    )
    texts = {k: v.encode() for k, v in meta.items()}
    ordered = {**members, **texts} if meta_last else {**texts, **members}
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in ordered.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {split: [expected[split][i] for i in lists[split]] for split in ("train", "test")}


FOOD_COUNTS = {"apple_pie": (3, 1), "cheese_plate": (2, 2), "waffles": (2, 1)}


def check_food101(data_dir, expected):
    for split in ("train", "test"):
        source = data.open_split("food101", split, data_dir, worker_count=0)
        assert isinstance(source, data.RecordSource) and len(source) == len(expected[split])
        batch = source.get_batch(np.arange(len(source)))
        assert batch["image"].shape == (len(source), 224, 224, 3)
        for image, (want, label), got_label in zip(
            batch["image"], expected[split], batch["label"], strict=True
        ):
            assert got_label == label
            # Re-encoded as JPEG: close to the resized original, far from any other image.
            assert np.abs(image.astype(int) - want.astype(int)).mean() < 2.0


def test_food101_prepares_from_the_archive_without_tensorflow(tmp_path, without_tensorflow):
    archive = tmp_path / "food-101.tar.gz"
    expected = write_food101_archive(archive, FOOD_COUNTS)
    assert (
        cli.main(
            ["prepare", "food101", "--archive", str(archive), "--data_dir", str(tmp_path / "tfds")]
        )
        == 0
    )
    check_food101(tmp_path / "tfds", expected)
    labels = [label for _, label in expected["train"]]
    assert sorted(set(labels)) == [0, 17, 100]  # apple_pie, cheese_plate, waffles
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None


def test_food101_downloads_without_extracting(tmp_path, without_tensorflow):
    """Without --archive the builder downloads the archive only (tfds' extractor needs TF)."""
    archive = tmp_path / "food-101.tar.gz"
    expected = write_food101_archive(archive, FOOD_COUNTS, seed=1, meta_last=False)
    urls = []

    def download(self, url):
        urls.append(url)
        return archive

    def extract(self, *args):
        raise AssertionError("download_and_extract calls tf.io.gfile")

    with (
        mock.patch.object(tfds.download.DownloadManager, "download", download),
        mock.patch.object(tfds.download.DownloadManager, "download_and_extract", extract),
    ):
        data.prepare("food101", tmp_path / "tfds")
    assert urls == [FOOD101_URL]
    check_food101(tmp_path / "tfds", expected)


def test_food101_archive_with_missing_images_is_refused(tmp_path):
    archive = tmp_path / "food-101.tar.gz"
    write_food101_archive(archive, {"apple_pie": (2, 1)})
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if "images" not in m.name]
    with tarfile.open(archive, "w:gz") as tar:  # the meta lists, no image
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(ValueError, match="holds 0 of the 2 images"):
        data.prepare("food101", tmp_path / "tfds", archive=archive)


# ---------------------------------------------------------------------------------------------
# Training order: determinism, epochs, resumption, processes
# ---------------------------------------------------------------------------------------------


def toy_source(n: int = 103) -> data.ArraySource:
    """Image pixel values and labels encode the example index, so batches can be traced."""
    images = np.broadcast_to(
        (np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, 2, 2, 1)
    )
    return data.ArraySource(np.ascontiguousarray(images), np.arange(n))


def take(it, k):
    return [next(it)["label"] for _ in range(k)]


def test_train_order_is_deterministic_and_changes_per_epoch():
    src = toy_source()
    a = data.TrainIterator(src, batch_size=10, seed=3)
    b = data.TrainIterator(src, batch_size=10, seed=3, prefetch=0)
    other = data.TrainIterator(src, batch_size=10, seed=4, prefetch=0)
    assert a.steps_per_epoch == 10
    la, lb = take(a, 20), take(b, 20)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.concatenate(la[:10]), np.concatenate(take(other, 10)))
    epoch0, epoch1 = np.concatenate(la[:10]), np.concatenate(la[10:])
    # Each epoch: 100 distinct examples (3 left over, dropped), in a different order.
    assert len(set(epoch0.tolist())) == 100 and len(set(epoch1.tolist())) == 100
    assert not np.array_equal(epoch0, epoch1)
    assert a.step == 20 and a.epoch_and_offset(20) == (2, 0)
    a.close()


def test_resuming_from_a_step_gives_the_same_batches():
    src = toy_source()
    with data.TrainIterator(src, batch_size=8, seed=0) as full:
        reference = take(full, 30)  # crosses two epoch boundaries (12 steps per epoch)
    with data.TrainIterator(src, batch_size=8, seed=0) as first:
        head = take(first, 17)
    with data.TrainIterator(src, batch_size=8, seed=0, start_step=17) as resumed:
        tail = take(resumed, 13)
    for x, y in zip(reference, head + tail, strict=True):
        np.testing.assert_array_equal(x, y)
    # The images travel with their labels.
    batch = data.TrainIterator(src, batch_size=8, seed=0, prefetch=0).batch(5)
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"] % 256)


def test_process_sharding_partitions_each_global_batch():
    src = toy_source()
    glob = data.TrainIterator(src, batch_size=12, seed=1, prefetch=0)
    procs = [
        data.TrainIterator(src, batch_size=12, seed=1, process_index=p, process_count=4, prefetch=0)
        for p in range(4)
    ]
    for step in (0, 7, 8, 9, 25):
        parts = [it.batch(step)["label"] for it in procs]
        assert all(len(p) == 3 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), glob.batch(step)["label"])
    with pytest.raises(ValueError, match=r"batch size \(10\) must be divisible .* processes \(4\)"):
        data.TrainIterator(src, batch_size=10, seed=0, process_index=0, process_count=4)


def test_consecutive_seeds_share_no_epoch_order():
    """Grain reshuffles epoch e with seed s + e; the run's seed is spread first, so seed 1's first
    epoch is not seed 0's second."""
    src = toy_source()
    zero = data.TrainIterator(src, batch_size=10, seed=0, prefetch=0)
    one = data.TrainIterator(src, batch_size=10, seed=1, prefetch=0)
    epoch = lambda it, e: np.concatenate([it.indices(e * 10 + o) for o in range(10)])
    for e in range(3):
        assert not np.array_equal(epoch(zero, e + 1), epoch(one, e))
        assert not np.array_equal(epoch(zero, e), epoch(one, e))


def global_batches(source, steps, *, process_count=1, start=0, **kwargs):
    """The global batches of ``steps`` steps from ``start``, put together from every process."""
    its = [
        data.TrainIterator(
            source,
            batch_size=8,
            seed=7,
            start_step=start,
            process_index=p,
            process_count=process_count,
            **kwargs,
        )
        for p in range(process_count)
    ]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        out.append({k: np.concatenate([b[k] for b in parts]) for k in ("image", "label")})
    for it in its:
        it.close()
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_do_not_depend_on_the_number_of_processes_or_threads():
    src = toy_source()  # 12 steps per epoch at batch 8: 30 steps cross two epochs
    reference = global_batches(src, 30, prefetch=0)
    assert_same_batches(global_batches(src, 30, process_count=2), reference)
    assert_same_batches(global_batches(src, 30, process_count=4, prefetch=3), reference)
    # Resumed in the middle of the second epoch, by four processes.
    assert_same_batches(global_batches(src, 13, process_count=4, start=17), reference[17:])


@pytest.mark.slow
def test_grain_workers_give_the_same_batches_and_resume_exactly(cifar100):
    """Record sources read by Grain worker processes: the batches of one process without
    workers, for any number of workers and processes, interrupted or not."""
    data_dir, expected, _ = cifar100  # 23 training examples: 2 steps per epoch at batch 8
    memory = data.open_split("cifar100", "train", data_dir)
    records = data.open_split("cifar100", "train", data_dir, in_memory=False, worker_count=2)
    assert memory.worker_count == 0 and records.worker_count == 2
    reference = global_batches(memory, 7, prefetch=0)
    assert_same_batches(global_batches(records, 7), reference)  # 2 workers
    head = global_batches(records, 3, process_count=2, worker_count=1)
    tail = global_batches(records, 4, process_count=2, worker_count=2, start=3)
    assert_same_batches(head + tail, reference)
    # Evaluation through the workers: every test example once, as the in-memory split gives it.
    test = data.open_split("cifar100", "test", data_dir, in_memory=False, worker_count=2)
    batches = list(data.eval_batches(test, batch_size=4))
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(images, expected["test"]["image"])


def test_worker_count_defaults_to_half_the_cores_or_the_environment(monkeypatch):
    monkeypatch.delenv(data.WORKERS_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert data.default_worker_count() == 8
    assert data.RecordSource(range(5), (1, 1, 1)).worker_count == 8
    monkeypatch.setenv(data.WORKERS_ENV, "3")
    assert data.RecordSource(range(5), (1, 1, 1)).worker_count == 3
    assert data.ArraySource(np.zeros((2, 1, 1, 1), np.uint8), np.zeros(2)).worker_count == 0
    monkeypatch.setenv(data.WORKERS_ENV, "many")
    with pytest.raises(ValueError, match="ADC_JAX_DATA_WORKERS must be a number"):
        data.default_worker_count()


def test_prefetch_errors_reach_the_caller():
    class Broken(data.ArraySource):
        def get_batch(self, indices):
            raise RuntimeError("disk on fire")

    src = toy_source()
    it = data.TrainIterator(Broken(src.images, src.labels), batch_size=4, seed=0)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(it)
    it.close()


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
    src = toy_source(103)
    seen = []
    for p in range(process_count):
        batches = list(
            data.eval_batches(src, batch_size=16, process_index=p, process_count=process_count)
        )
        assert len(batches) == data.num_eval_batches(103, 16) == 7
        for b in batches:
            assert b["image"].shape == (16 // process_count, 2, 2, 1)
            assert b["mask"].dtype == bool and b["label"].dtype == np.int32
            assert not b["image"][~b["mask"]].any()  # padding is zeros
            seen.extend(b["label"][b["mask"]].tolist())
    assert sorted(seen) == list(range(103))


def test_class_subset_keeps_and_relabels_the_chosen_classes():
    labels = np.arange(40, dtype=np.int32) % 10
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(2, axis=1)
    source = data.ArraySource(images, labels)
    subset = data.class_subset(source, data.parse_classes("7,5-6"), num_classes=10)
    assert len(subset) == 12 and subset.image_shape == source.image_shape
    batch = subset.get_batch(np.arange(12))
    original = batch["image"][:, 0, 0, 0] % 10  # the image holds its row number
    assert set(original.tolist()) == {5, 6, 7}
    np.testing.assert_array_equal(
        batch["label"], np.select([original == 7, original == 5], [0, 1], 2)
    )

    class Records:  # a source without a labels array: the rows are found by reading it
        image_shape, worker_count = source.image_shape, 0

        def __len__(self):
            return len(source)

        def get_batch(self, indices):
            return source.get_batch(indices)

    read = data.class_subset(Records(), (7, 5, 6), num_classes=10)
    np.testing.assert_array_equal(read.rows, subset.rows)
    assert data.parse_classes("") == () and data.parse_classes(" 0-2, 9") == (0, 1, 2, 9)
    with pytest.raises(ValueError, match="twice"):
        data.parse_classes("1-3,2")
    with pytest.raises(ValueError, match="like '5-9'"):
        data.parse_classes("five")
    with pytest.raises(ValueError, match=r"ids in 0\.\.9"):
        data.class_subset(source, (9, 10), num_classes=10)
