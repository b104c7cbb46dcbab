"""train_and_evaluate end to end: real data, mock CIFAR-100, resume, the budget, clear errors."""

import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adc_jax import data, split, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture
def tiny(fashion_dir):
    """The Fashion-MNIST config on the tiny test ViT: a few seconds per run."""
    c = load_config("vit_fashion_mnist")
    c.model.name = "vit_test_patch4_16"  # 16×16 RGB: Fashion-MNIST is resized and tiled
    c.dataset.data_dir = str(fashion_dir)
    c.batch_size = 16
    c.eval_batch_size = 1000
    c.budget.steps = 6
    c.log_every_steps = 2
    c.checkpoint_every_steps = 3
    c.devices.count = 1
    c.progress = False
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(config, workdir):
    exp = train.setup(config)
    return train.Checkpoints(workdir, 1).restore(exp.initial_state)


def test_fashion_mnist_run_writes_metrics_summary_and_checkpoints(tiny, tmp_path):
    summary = train.train_and_evaluate(tiny, str(tmp_path))
    for key in (
        "test_accuracy",
        "steps",
        "bytes_up",
        "bytes_down",
        "samples_equivalent",
        "xi_nominal",
        "xi_measured",
        "wall_seconds",
        "num_devices",
        "method",
        "model",
        "dataset",
    ):
        assert key in summary
    assert summary["steps"] == 6 and summary["method"] == "adc"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["samples_equivalent"] == pytest.approx(6 * 0.25 * 16)
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["test_accuracy"] == summary["test_accuracy"]
    assert json.loads((tmp_path / "config.json").read_text())["method"]["xi"] == 0.25
    rows = read_metrics(tmp_path)
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert logged[-1]["bytes_up"] == summary["bytes_up"]
    assert rows[-1]["test_accuracy"] == summary["test_accuracy"]


def test_restarted_run_continues_exactly(tiny, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.train_and_evaluate(tiny, str(whole))
    interrupted = tiny.copy_and_resolve_references()
    interrupted.budget.max_steps = 3  # "killed" after step 3 (its checkpoint is written)
    train.train_and_evaluate(interrupted, str(parts))
    with open(parts / "metrics.jsonl", "a") as f:  # what a process killed after step 3 left
        f.write('{"step": 5, "loss": 123.0}\n{"step": 6, "lo')
    summary = train.train_and_evaluate(tiny, str(parts))  # the same command again
    assert summary["resumed_from_step"] == 3

    a, b = final_state(tiny, str(whole)), final_state(tiny, str(parts))
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r and r["step"] != 3}
    assert losses(read_metrics(whole)) == losses(read_metrics(parts))  # one trajectory
    steps = [r["step"] for r in read_metrics(parts) if "loss" in r]
    assert steps == sorted(steps) and 123.0 not in losses(read_metrics(parts)).values()


def test_budget_buys_steps_in_proportion_to_xi(tiny):
    tiny.budget.steps = 0
    tiny.budget.base_epochs = 2.0
    tiny.batch_size = 128
    steps = {}
    for name, xi in (("base", 1.0), ("adc", 0.1)):
        tiny.method.name, tiny.method.xi = name, xi
        steps[name] = train.setup(tiny).schedule.total_steps
    assert steps["base"] == math.floor(2 * 60_000 / 128)
    assert steps["adc"] == math.floor(2 * 60_000 / (0.1 * 128))
    assert steps["adc"] / steps["base"] == pytest.approx(10.0, rel=0.01)


def test_eight_devices_run(tiny, tmp_path):
    tiny.devices.count = 8
    tiny.budget.steps = 2
    summary = train.train_and_evaluate(tiny, str(tmp_path))
    assert summary["num_devices"] == 8 and math.isfinite(summary["test_accuracy"])


def test_cifar100_config_code_path_without_tensorflow(tmp_path):
    """The paper's CIFAR-100 config (tiny model) through mock tfds data and augmentation."""
    config = load_config("deit_t_cifar100", "runlocal")
    config.dataset.data_dir = str(tmp_path / "tfds")
    config.progress = False
    config.devices.count = 1
    assert config.dataset.augment
    with tfds.testing.mock_data(num_examples=48):
        summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["dataset"] == "cifar100" and summary["steps"] == 4
    assert math.isfinite(summary["test_accuracy"])
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dataset.name", "mnist2", "Unknown dataset|unknown dataset"),
        ("model.name", "vit_huge", "vit_huge"),
        ("method.name", "zip", "Unknown method 'zip'"),
        ("method.xi", 1.5, r"xi \(1.5\) must be in \(0, 1\]"),
        ("model.split_index", 4, "split"),
        ("batch_size", 20, r"Batch size \(20\) must be divisible by the number of devices \(8\)"),
        ("method.name", "c3sl", r"Batch size per device \(2\) must be divisible by C3-SL's ratio"),
    ],
)
def test_clear_errors(tiny, field, value, message):
    tiny.devices.count = 8
    section, _, key = field.rpartition(".")
    (tiny[section] if section else tiny)[key] = value
    with pytest.raises(ValueError, match=message):
        train.setup(tiny)


def test_unprepared_dataset_names_the_prepare_command(tiny, tmp_path):
    tiny.dataset.name = "cifar100"
    tiny.dataset.data_dir = str(tmp_path)
    with pytest.raises(data.DatasetNotPreparedError, match="python -m adc_jax.data prepare"):
        train.setup(tiny)


def test_state_is_a_plain_pytree(tiny):
    state = train.setup(tiny).initial_state
    assert isinstance(state, split.TrainState)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_every_method_trains_through_train_py(tiny, tmp_path):
    """Each method, two steps of the real loop; evaluation uncompressed but for BottleNet++."""
    from adc_jax.methods import METHODS

    tiny.budget.steps = 2
    tiny.fused_step = True  # one program per method keeps the compile time down
    tiny.eval_batch_size = 2000
    tiny.method.num_subvectors = 17  # FedLite: q must divide N·D = 17·32
    for name, cls in sorted(METHODS.items()):
        tiny.method.name = name
        summary = train.train_and_evaluate(tiny, str(tmp_path / name))
        rows = [r for r in read_metrics(tmp_path / name) if "loss" in r]
        assert rows and all(math.isfinite(r["loss"]) for r in rows), name
        assert 0.0 <= summary["test_accuracy"] <= 1.0
        assert cls.active_at_eval == (name == "bottlenet")
        assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
