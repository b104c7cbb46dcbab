"""Installs adc-jax into this Python without moving the JAX that is already installed.

Usage (what the Colab notebook runs; extra arguments go to ``pip install``)::

    python colab/install.py REPO_DIR [-q] [--dry-run --report report.json]

A Colab TPU runtime ships jax, jaxlib and libtpu built for each other. pip would otherwise fetch
the newest version of any package the image lacks, and a new flax pulls a new jax and jaxlib while
libtpu stays: JAX then loses the TPU. So the versions present of the packages below are written
to a constraints file and ``pip install -c constraints.txt REPO_DIR[plots]`` must resolve around
them (older flax, optax, orbax where the newest need a newer JAX). Packages that are absent stay
free. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile

# JAX and the pieces built against a given jaxlib: its accelerator plugins and libtpu.
PINNED = (
    "jax",
    "jaxlib",
    "libtpu",
    "libtpu-nightly",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
)
EXTRAS = "plots"


def pins() -> list[str]:
    """``name==version`` of every package of :data:`PINNED` installed in this Python."""
    out = []
    for name in PINNED:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def command(repo_dir: str, constraints: str, pip_args: list[str]) -> list[str]:
    """The pip command line: this Python's pip, the constraints, the package with its extras."""
    target = f"{os.path.abspath(repo_dir)}[{EXTRAS}]"
    return [sys.executable, "-m", "pip", "install", "-c", constraints, target, *pip_args]


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    repo_dir, pip_args = argv[0], argv[1:]
    fixed = pins()
    print("Pinned (already installed):", ", ".join(fixed) or "nothing")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(tmp, "constraints.txt")
        with open(constraints, "w") as f:
            f.write("".join(f"{line}\n" for line in fixed))
        cmd = command(repo_dir, constraints, pip_args)
        print("$", " ".join(cmd), flush=True)
        return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
