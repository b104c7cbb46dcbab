"""train_and_evaluate end to end: real data, mock CIFAR-100, resume, the budget, clear errors."""

import json
import math
import os
import sys

import config_kit
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adc_jax import data, split, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny(fashion_dir):
    """The Fashion-MNIST config on the tiny test ViT: a few seconds per run."""
    return config_kit.tiny_config(fashion_dir)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(config, workdir):
    exp = train.setup(config)
    return train.Checkpoints(workdir, 1).restore(exp.initial_state)


@pytest.mark.slow
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
    assert summary["compute_dtype"] == "float32" and summary["images_per_second"] > 0  # CPU: auto
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_eight_devices_run(tiny, tmp_path):
    tiny.devices.count = 8
    tiny.budget.steps = 2
    summary = train.train_and_evaluate(tiny, str(tmp_path))
    assert summary["num_devices"] == 8 and math.isfinite(summary["test_accuracy"])


@pytest.mark.slow
def test_cifar100_config_code_path_without_tensorflow(tmp_path):
    """The paper's CIFAR-100 config (tiny model) through mock tfds data and augmentation."""
    config = config_kit.load("deit_t_cifar100", "runlocal")
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


@pytest.mark.slow
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


def test_compute_dtype_auto_follows_the_platform():
    assert train.compute_dtype("auto", "cpu") == np.float32
    assert train.compute_dtype("auto", "gpu") == train.compute_dtype("auto", "tpu") == jnp.bfloat16
    assert train.compute_dtype("float32", "tpu") == np.float32
    assert train.compute_dtype("bfloat16", "cpu") == jnp.bfloat16
    with pytest.raises(ValueError, match="model.dtype must be auto, float32 or bfloat16"):
        train.compute_dtype("float16")


def test_speed_and_seconds_to_target_from_metrics_rows(tmp_path):
    rows = [
        {"step": 2, "loss": 2.0, "images_per_second": 10.0},  # the first row holds compilation
        {"step": 4, "loss": 1.5, "images_per_second": 100.0},
        {"step": 4, "test_accuracy": 0.6, "wall_seconds": 30.0},
        {"step": 6, "loss": 1.0, "images_per_second": 110.0},
        {"step": 6, "test_accuracy": 0.8, "wall_seconds": 50.0},
        {"step": 8, "test_accuracy": 0.9, "wall_seconds": 70.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train._speed(str(path), 0.0) == {"images_per_second": 100.0}
    assert train._speed(str(path), 0.75)["seconds_to_target"] == 50.0
    assert train._speed(str(path), 0.95)["seconds_to_target"] is None


def test_deit_tiny_fashion_mnist_config():
    """DeiT-Tiny at 224 px on the 28 px grey images: setup() tiles them to RGB and resizes on
    the device (the :runlocal variant runs that path in tests/test_benchmarks.py)."""
    c = config_kit.load("deit_t_fashion_mnist")
    model = (c.model.name, c.model.split_index, c.model.dtype)
    assert model == ("deit_tiny_patch16_224", 3, "auto")
    run = (c.dataset.name, c.method.name, c.method.xi, c.target_accuracy)
    assert run == ("fashion_mnist", "adc", 0.1, 0.8)
    assert config_kit.load("deit_t_fashion_mnist", "runlocal").model.name == "vit_test_patch4_16"
    with pytest.raises(ValueError, match="expected 'runlocal'"):
        config_kit.load("deit_t_fashion_mnist", "full")


@pytest.mark.slow
def test_a_class_subset_is_a_smaller_task(tiny):
    tiny.dataset.classes = "5-9"
    exp = train.setup(tiny)
    assert (exp.info.num_classes, exp.info.train_size, exp.info.test_size) == (5, 30_000, 5_000)
    assert exp.cost.uplink["labels"] == 8 * 5 * 4  # T = 8 soft labels over the 5 classes
    assert exp.model.config.num_classes == 5
    labels = train.open_data(tiny, "train").get_batch(np.arange(1000))["label"]
    assert set(labels.tolist()) == {0, 1, 2, 3, 4}
    tiny.dataset.train_examples = 1000
    assert train.dataset_info(tiny).train_size == 1000
    assert set(train.open_data(tiny, "train").get_batch(np.arange(1000))["label"]) <= set(range(5))
    tiny.dataset.classes = "5-10"
    with pytest.raises(ValueError, match=r"ids in 0\.\.9"):
        train.setup(tiny)
