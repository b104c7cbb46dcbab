"""adc_jax.accelerator: one warning when JAX falls back to the CPU on an accelerator machine."""

import importlib.metadata

import jax
import pytest

from adc_jax import accelerator


@pytest.fixture
def on_cpu(monkeypatch):
    """JAX on its CPU backend, JAX_PLATFORMS unset, no plugin installed, no device files."""
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    real_version = importlib.metadata.version
    installed = {}

    def version(name):
        if name in installed:
            return installed[name]
        if any(name in names for names in accelerator._PLUGINS.values()):
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(accelerator, "_visible_hardware", lambda: [])
    return installed


def test_a_cpu_machine_gets_no_warning(on_cpu):
    assert accelerator.cpu_fallback_message() is None


def test_a_gpu_machine_with_a_cpu_only_jaxlib_is_told_the_install(on_cpu, monkeypatch):
    monkeypatch.setattr(accelerator, "_visible_hardware", lambda: ["gpu"])
    message = accelerator.cpu_fallback_message()
    assert "has a GPU" in message and "pip install -e '.[cuda12]'" in message
    with pytest.warns(RuntimeWarning, match=r"jax\[cuda12\]"):
        accelerator.warn_if_cpu_fallback()
    monkeypatch.setattr(accelerator, "_visible_hardware", lambda: ["tpu"])
    assert "'.[tpu]'" in accelerator.cpu_fallback_message()


def test_an_installed_plugin_that_did_not_start_is_named(on_cpu):
    on_cpu["libtpu"] = "0.0.21"
    message = accelerator.cpu_fallback_message()
    assert "libtpu 0.0.21 is installed" in message and "jax.devices('tpu')" in message


def test_no_warning_when_the_cpu_is_asked_for_or_an_accelerator_runs(on_cpu, monkeypatch):
    monkeypatch.setattr(accelerator, "_visible_hardware", lambda: ["gpu"])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert accelerator.cpu_fallback_message() is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert accelerator.cpu_fallback_message() is not None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert accelerator.cpu_fallback_message() is None
