"""Test setup: 8 simulated CPU devices, so the multi-device paths run on any machine.

The flag must be set before JAX initialises its backends; conftest runs before test modules
import jax. Single-device tests are unaffected: they run on device 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

# Compilation dominates test time on a CPU. Several tests (a run and its resumption, the same
# model under several methods) compile identical programs: a persistent cache for the whole test
# run makes the repeats cheap. A fresh directory per test run, so nothing stale is ever read: the
# first process of the run (pytest itself, or pytest-xdist's controller) makes it and removes it
# when it exits; the xdist workers it starts inherit the variable and share the directory (JAX
# writes each entry atomically).
_CACHE_VAR = "ADC_JAX_TEST_XLA_CACHE"
if _CACHE_VAR not in os.environ:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="adc_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): one worker per core, at most 4 (each holds its own compiled
    programs and datasets, a few GiB)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """Fashion-MNIST prepared once per test run from the real IDX files (about 10 s)."""
    from adc_jax import data

    if not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("apt-get install dataset-fashion-mnist")
    data_dir = tmp_path_factory.mktemp("tfds_fashion")
    data.prepare("fashion_mnist", data_dir)
    return data_dir


# ---- The tiny split ViT of test_split.py and test_select.py (tests/split_kit.py) ---------------


@pytest.fixture(scope="session")
def model():
    import split_kit

    return split_kit.make_model()


@pytest.fixture(scope="session")
def params(model):
    return model.init(jax.random.key(0))


@pytest.fixture(scope="session")
def batch():
    import split_kit

    return split_kit.make_batch()
