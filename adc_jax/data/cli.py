"""The command line, ``python -m adc_jax.data {prepare NAME, list} [--data_dir D] ...``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from adc_jax.data.registry import DATASETS, get_spec, is_prepared, prepare


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
