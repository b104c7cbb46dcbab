"""Configs for the tests: the repository's config files, the tiny Fashion-MNIST run, and
finished run directories made up for tests of what reads them.

Most end-to-end tests train the Fashion-MNIST config on the tiny test ViT (16×16 RGB: the images
are resized and tiled on the device) for a few steps: :func:`tiny_fields` lists those overrides
once, as ``{dotted field: value}``, for a config object (:func:`tiny_config`) or for a command
line (:func:`as_flags`).
"""

import json
import os

from adc_jax import sweep
from adc_jax.defaults import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
    """The path of ``configs/<name>.py``."""
    return os.path.join(ROOT, "configs", f"{name}.py")


def load(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)``."""
    return load_config(config_path(name) + (f":{arg}" if arg else ""))


def tiny_fields(data_dir, **changes) -> dict:
    """The tiny run's overrides of ``configs/vit_fashion_mnist.py``: 6 steps of 16 images on one
    device, logged every 2, checkpointed every 3; ``changes`` (dotted names) on top."""
    fields = {
        "model.name": "vit_test_patch4_16",
        "dataset.data_dir": str(data_dir),
        "batch_size": 16,
        "eval_batch_size": 1000,
        "budget.steps": 6,
        "log_every_steps": 2,
        "checkpoint_every_steps": 3,
        "devices.count": 1,
        "progress": False,
    }
    return {**fields, **changes}


def with_fields(config, fields: dict):
    """``config`` with ``{dotted field: value}`` set (an unknown field raises)."""
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"Unknown config field {dotted!r}.")
        node[leaf] = value
    return config


def tiny_config(data_dir, **changes):
    """The tiny run as a config object."""
    return with_fields(load("vit_fashion_mnist"), tiny_fields(data_dir, **changes))


def as_flags(fields: dict) -> list[str]:
    """``--config.<field>=<value>`` command-line overrides."""
    return [f"--config.{key}={value}" for key, value in fields.items()]


def fake_run(root, method, xi, seed, accuracy, *, model="deit_tiny_patch16_224", name=None):
    """A finished workdir as train_and_evaluate and the sweep leave it (``name``: the sweep's
    ``<method>-xi<ξ>-s<seed>`` by default)."""
    workdir = os.path.join(root, name or sweep.run_name(method, xi, seed))
    os.makedirs(workdir)
    per_step = 1000.0 * xi
    steps = round(10 / xi)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"method": method, "xi_target": xi, "seed": seed, "xi_paper": xi}, f)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(
            {
                "method": method,
                "model": model,
                "dataset": "cifar100",
                "test_accuracy": accuracy,
                "steps": steps,
                "xi_nominal": xi,
                "xi_measured": xi * 1.1,
                "bytes_up": steps * per_step,
                "bytes_down": steps * per_step,
                "wall_seconds": 5.0,
                "resumed_from_step": 0,
            },
            f,
        )
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in (steps // 2, steps):
            row = {"step": step, "bytes_up": step * per_step, "bytes_down": step * per_step}
            f.write(json.dumps({**row, "test_accuracy": accuracy * step / steps}) + "\n")
