"""Says so when JAX runs on the CPU of a machine with an accelerator it could use.

``pip install adc-jax`` brings a CPU-only jaxlib; on a GPU or TPU machine JAX then runs on the CPU,
and the only sign is a log line among many. A training run calls :func:`warn_if_cpu_fallback`
first, which warns in one line with the install that fixes it (the README's install section lists
them).
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import warnings

import jax

# Distributions that give JAX an accelerator backend, by platform.
_PLUGINS = {
    "gpu": ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm7-plugin"),
    "tpu": ("libtpu", "libtpu-nightly"),
}
# The adc-jax extra (and JAX's) that installs each; CUDA 12 runs on most NVIDIA drivers.
_EXTRAS = {"gpu": "cuda12", "tpu": "tpu"}


def _installed(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _visible_hardware() -> list[str]:
    """Accelerators this machine shows to its processes, whatever JAX can use."""
    found = []
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        found.append("gpu")
    # TPU VMs: /dev/accel* (v2-v4) or VFIO groups (v5e and later).
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        found.append("tpu")
    return found


def cpu_fallback_message() -> str | None:
    """Why JAX's CPU backend looks like a fallback here, and the fix; ``None`` if it does not.

    Silent when JAX uses an accelerator or when ``JAX_PLATFORMS`` asks for the CPU only.
    """
    if jax.default_backend() != "cpu":
        return None
    requested = os.environ.get("JAX_PLATFORMS", "")
    if requested and set(requested.lower().split(",")) <= {"cpu", ""}:
        return None
    for platform, names in _PLUGINS.items():
        plugins = _installed(names)
        if plugins:
            return (
                f"JAX runs on the CPU although {', '.join(plugins)} is installed: the {platform} "
                'backend failed to start (JAX logged why; `python -c "import jax; '
                f"jax.devices('{platform}')\"` repeats the error)."
            )
    hardware = _visible_hardware()
    if not hardware:
        return None
    extra = _EXTRAS[hardware[0]]
    return (
        f"JAX runs on the CPU but this machine has a {hardware[0].upper()}: the installed jaxlib "
        f"is CPU-only. Install JAX for it: pip install -e '.[{extra}]' in a clone, or "
        f"pip install 'jax[{extra}]'."
    )


def warn_if_cpu_fallback() -> None:
    """Warns (one line) when :func:`cpu_fallback_message` finds a fallback to the CPU."""
    message = cpu_fallback_message()
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
