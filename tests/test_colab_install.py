"""colab/install.py on a simulated Colab TPU image: pip installs adc-jax around the runtime's JAX.

A fresh virtual environment (no system site-packages) gets only what a Colab TPU image pairs: an
older jax and jaxlib from PyPI and a libtpu (a stand-in wheel built here, at the version that
``jax[tpu]`` of that release pins). The notebook's exact install command then runs with
``--dry-run --report``: the resolution must succeed and move none of the three, while the same
install without the pins moves JAX. Needs PyPI (skips when it cannot be reached); the first run
downloads jaxlib (~80 MB) into pip's cache.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = os.path.join(ROOT, "colab", "install.py")
OLD_JAX = "0.4.38"
LIBTPU = "0.0.7"  # jax[tpu]==0.4.38 pins libtpu==0.0.7
PIP_TIMEOUT = 900

pytestmark = pytest.mark.slow


def build_wheel(directory, name: str, version: str) -> str:
    """A minimal pure-Python wheel ``name==version`` holding an empty package."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: adc-jax tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = ""
    for path, payload in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(payload)}\n"
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for member, payload in files.items():
            wheel.writestr(member, payload)
    return path


def pip(python, *args, check=True):
    result = subprocess.run(
        [python, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    if check and result.returncode:
        raise AssertionError(f"pip {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def colab_python(tmp_path_factory):
    """The Python of a fresh venv holding jax, jaxlib (old, from PyPI) and a stand-in libtpu."""
    root = tmp_path_factory.mktemp("colab_image")
    probe = pip(
        sys.executable,
        "download",
        "--no-deps",
        "--timeout",
        "30",
        "-d",
        str(root / "probe"),
        f"jax=={OLD_JAX}",
        check=False,
    )
    if probe.returncode:
        pytest.skip(f"PyPI not reachable: {probe.stderr.strip().splitlines()[-1:]}")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    libtpu = build_wheel(str(root), "libtpu", LIBTPU)
    pip(python, "install", "-q", f"jax=={OLD_JAX}", f"jaxlib=={OLD_JAX}", libtpu)
    return python


def resolve(python, tmp_path, name, *install_args) -> dict[str, str]:
    """``{package: version}`` that pip would install (dry run, report)."""
    report = tmp_path / f"{name}.json"
    result = subprocess.run(
        [python, *install_args, "--dry-run", "--report", str(report), "-q"],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(report) as f:
        installs = json.load(f)["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}


def test_the_notebooks_install_keeps_the_runtimes_jax(colab_python, tmp_path):
    # The notebook runs: python colab/install.py REPO_DIR -q
    planned = resolve(colab_python, tmp_path, "pinned", INSTALL, ROOT)
    assert "adc-jax" in planned and "flax" in planned and "grain" in planned
    assert not {"jax", "jaxlib", "libtpu", "libtpu-nightly"} & set(planned), planned
    assert "tensorflow" not in planned  # it can knock JAX off the TPU
    # Without the pins pip would upgrade JAX and leave libtpu behind: the failure this prevents.
    free = resolve(colab_python, tmp_path, "free", "-m", "pip", "install", f"{ROOT}[plots]")
    assert free.get("jax", OLD_JAX) != OLD_JAX and "libtpu" not in free
