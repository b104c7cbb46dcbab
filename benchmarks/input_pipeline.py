r"""Images per second of the host input pipeline (Grain) per worker count: CIFAR-100, Food-101.

    python benchmarks/input_pipeline.py                      # both datasets, 0, 1 and 2 workers
    python benchmarks/input_pipeline.py --dataset food101 --workers 0,2,4,8 --batches 60

What runs is the training loop's own path: :class:`adc_jax.data.TrainIterator` over the split a
training run opens, timed from the first batch to the last (the workers' start is reported apart);
the device and its augmentation are not involved. The data are synthetic at the real sizes, since
the datasets cannot be downloaded everywhere:

* ``cifar100``: 50 000 (``--cifar-images``) random 32×32×3 uint8 images held in memory (an
  ``ArraySource``, as ``open_split("cifar100")`` gives).
* ``food101``: a ``food-101.tar.gz`` generated in the official layout with ``--images``
  photo-like JPEGs (a smooth colour field plus texture, 341–512 px a side, quality 85, like the
  originals), prepared by the real builder (:class:`adc_jax.data.builders.AdcFood101`:
  resized to 224×224, stored as JPEG), then read as a ``RecordSource`` that decodes every image.
  Preparation throughput and the stored bytes per image are reported too, and so are the bytes
  and one-core decode time per image of the original JPEG (decoded and resized at every step, as
  with tfds' stock builder), the stored 224×224 JPEG and raw 224×224 pixels (``format`` records).

``--workers 0`` reads in ``--prefetch`` threads of this process; ``N`` > 0 in N Grain worker
processes. Every record is one JSON line with the machine (CPU model, cores, load at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import sys
import tarfile
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from adc_jax import data  # noqa: E402
from adc_jax.data.builders import FOOD101_CLASSES  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("cifar100", "food101", "both"), default="both")
    p.add_argument("--workers", default="0,1,2", help="comma-separated Grain worker counts")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="timed batches per worker count")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--images", type=int, default=1024, help="food101: images in the archive")
    p.add_argument("--cifar-images", type=int, default=50_000, help="cifar100: split size")
    p.add_argument("--workdir", default=None, help="where the Food-101 archive is prepared")
    return p.parse_args(argv)


# ---- Synthetic data -------------------------------------------------------------------------


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: a bicubic-upsampled random colour field plus Gaussian texture.

    Resized to 224×224 its JPEGs are as large as a real photo's (matplotlib's grace_hopper.jpg)
    and no faster to decode (the ``format`` records; ``docs/input_pipeline.md``).
    """
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    texture = rng.normal(0.0, 12.0, (height, width, 1)).astype(np.float32)
    return np.clip(field + texture, 0, 255).astype(np.uint8)


def write_food101_archive(path: str, num_images: int, seed: int = 0) -> None:
    """``food-101.tar.gz`` in the official layout: images of the first classes, 3/4 train."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(512, 384), (384, 512), (512, 512), (512, 341)]
    ids = [f"{FOOD101_CLASSES[i % 101]}/{100000 + i}" for i in range(num_images)]
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for i, image_id in enumerate(ids):
            h, w = sizes[i % len(sizes)]
            buf = io.BytesIO()
            Image.fromarray(photo_like(rng, h, w)).save(buf, "JPEG", quality=85)
            add(f"food-101/images/{image_id}.jpg", buf.getvalue())
        cut = num_images * 3 // 4
        add("food-101/meta/classes.txt", "\n".join(FOOD101_CLASSES).encode())
        add("food-101/meta/train.txt", "\n".join(ids[:cut]).encode())
        add("food-101/meta/test.txt", "\n".join(ids[cut:]).encode())


# ---- Measurement ----------------------------------------------------------------------------


def measure(source, args, workers: int) -> dict[str, Any]:
    """Images per second of ``args.batches`` batches after the first (which starts the workers)."""
    start = time.perf_counter()
    it = data.TrainIterator(
        source, batch_size=args.batch, seed=0, worker_count=workers, prefetch=args.prefetch
    )
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    it.close()
    assert batch["image"].shape == (args.batch, *source.image_shape)
    return {
        "workers": workers,
        "images_per_second": round(args.batches * args.batch / elapsed, 1),
        "first_batch_s": round(first, 3),
        "timed_batches": args.batches,
    }


def cifar100(args, env) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    n = args.cifar_images
    source = data.ArraySource(rng.integers(0, 256, (n, 32, 32, 3), np.uint8), np.arange(n) % 100)
    return [
        {"record": "input", "dataset": "cifar100", "stored": "uint8 32x32x3, in memory", **env}
        | measure(source, args, workers)
        for workers in args.worker_counts
    ]


def food101(args, env) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        archive = os.path.join(tmp, "food-101.tar.gz")
        write_food101_archive(archive, args.images)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # tfds' progress; stdout is JSON lines
            prepared = data.prepare("food101", os.path.join(tmp, "tfds"), archive=archive)
        prepare_s = time.perf_counter() - start
        shards = glob.glob(os.path.join(prepared, "*.array_record-*"))
        stored = sum(os.path.getsize(f) for f in shards)
        source = data.open_split("food101", "train", os.path.join(tmp, "tfds"))
        common_fields = {
            "record": "input",
            "dataset": "food101",
            "stored": "JPEG 224x224x3 q90, array_record",
            "stored_bytes_per_image": round(stored / args.images),
            "prepare_images_per_second": round(args.images / prepare_s, 1),
            "train_images": len(source),
            **env,
        }
        return [common_fields | measure(source, args, workers) for workers in args.worker_counts]


def formats(args, env, count: int = 64) -> list[dict[str, Any]]:
    """Bytes and one-thread decode time per Food-101 image, for three ways of storing it.

    ``original``: a 512 px JPEG as in the archive, decoded and resized to 224×224 at every step
    (tfds' stock builder); ``jpeg224``: what :class:`AdcFood101` stores; ``raw224``: uint8 pixels;
    and, to check the synthetic images against a real one, ``jpeg224`` of matplotlib's sample
    photo when matplotlib is installed.
    """
    from PIL import Image

    from adc_jax.data.builders import resize_to_jpeg

    rng = np.random.default_rng(1)
    originals = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(photo_like(rng, 512, 384 + 128 * (i % 2))).save(buf, "JPEG", quality=85)
        originals.append(buf.getvalue())
    stored = [resize_to_jpeg(o, 224, 90) for o in originals]
    raw = [np.asarray(Image.open(io.BytesIO(s))).tobytes() for s in stored]
    # A real photo beside the synthetic ones, where matplotlib ships it (the plots extra).
    try:
        from matplotlib import cbook

        with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
            photo = [resize_to_jpeg(f.read(), 224, 90)]
    except (ImportError, OSError):
        photo = []

    def decode_resize(b):
        with Image.open(io.BytesIO(b)) as image:
            return np.asarray(image.convert("RGB").resize((224, 224), Image.BILINEAR))

    def decode(b):
        with Image.open(io.BytesIO(b)) as image:
            return np.asarray(image)

    def copy(b):
        return np.frombuffer(b, np.uint8).reshape(224, 224, 3).copy()

    out = []
    for name, blobs, fn in (
        ("original", originals, decode_resize),
        ("jpeg224", stored, decode),
        ("raw224", raw, copy),
        ("jpeg224 of a photo (grace_hopper.jpg)", photo, decode),
    ):
        if not blobs:
            continue
        fn(blobs[0])
        start = time.perf_counter()
        repeats = 3 * count // len(blobs)
        for _ in range(repeats):
            for b in blobs:
                fn(b)
        ms = (time.perf_counter() - start) / (repeats * len(blobs)) * 1e3
        size = float(np.mean([len(b) for b in blobs]))
        out.append(
            {
                "record": "format",
                "format": name,
                "bytes_per_image": round(size),
                "decode_ms_per_image": round(ms, 3),
                **env,
            }
        )
    return out


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.worker_counts = [int(w) for w in args.workers.split(",")]
    import grain
    import PIL
    from PIL import features

    env = {
        k: v
        for k, v in common.environment().items()
        if k in ("cpu", "cpu_count", "python", "load_1min")
    }
    env |= {
        "grain": grain.__version__ if hasattr(grain, "__version__") else _version("grain"),
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "batch": args.batch,
        "prefetch": args.prefetch,
    }
    records = []
    if args.dataset in ("cifar100", "both"):
        records += cifar100(args, env)
    if args.dataset in ("food101", "both"):
        records += formats(args, env) + food101(args, env)
    for record in records:
        common.emit(record)
    print_table(records, file=sys.stderr)
    return records


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def print_table(records, file) -> None:
    r0 = records[0]  # the environment fields are the same in every record
    print(
        f"\n{r0['cpu']}, {r0['cpu_count']} cores (load {r0['load_1min']} at the start), "
        f"batch {r0['batch']}, grain {r0['grain']}, Pillow {r0['pillow']}",
        file=file,
    )
    print("| dataset | stored | workers | images/s | first batch (s) |", file=file)
    print("|---|---|---|---|---|", file=file)
    for r in records:
        if r["record"] != "input":
            continue
        print(
            f"| {r['dataset']} | {r['stored']} | {r['workers']} | {r['images_per_second']:.0f} "
            f"| {r['first_batch_s']:.2f} |",
            file=file,
        )
    for r in records:
        if r["record"] == "format":
            print(
                f"Food-101 image stored as {r['format']}: {r['bytes_per_image']} bytes, "
                f"{r['decode_ms_per_image']:.3f} ms to serve on one core",
                file=file,
            )
    food = [r for r in records if r.get("dataset") == "food101"]
    if food:
        print(
            f"Food-101 preparation: {food[0]['prepare_images_per_second']:.0f} images/s, "
            f"{food[0]['stored_bytes_per_image']} stored bytes per image.",
            file=file,
        )


if __name__ == "__main__":
    main()
