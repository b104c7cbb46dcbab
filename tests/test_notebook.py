"""The Colab notebook: committed clean, and runs top to bottom headlessly in its tiny mode.

Tiny mode (``ADC_NOTEBOOK_TINY=1``) is the notebook's own CPU path: no install, no TPU (the check
only warns), fake CIFAR-100 through ``tfds.testing.mock_data``, the tiny model of
``deit_t_cifar100.py:runlocal``; everything else (config, sweep runner, plots) is what a Colab
user runs.
"""

import csv
import os

import jax
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "adc_jax_tpu.ipynb")


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_with_outputs_cleared():
    nb = read_notebook()
    nbformat.validate(nb)
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None


def test_repo_url_is_set_in_one_place_in_the_parameters_cell():
    cells = code_cells(read_notebook())
    assert "parameters" in cells[0].metadata.get("tags", [])
    for name in ("REPO_URL =", "TINY =", "BUDGET_FRACTION =", "ADC_NOTEBOOK_TINY"):
        assert name in cells[0].source
    assert sum(c.source.count("REPO_URL =") for c in cells) == 1
    source = "\n".join(c.source for c in cells)
    assert "Change runtime type" in source and "TensorFlow" in source
    assert "import tensorflow\n" not in source
    # Installed by colab/install.py, which pins the runtime's JAX (tests/test_colab_install.py).
    assert 'os.path.join(REPO_DIR, "colab", "install.py"), REPO_DIR' in source
    assert "pip" not in source.replace("install.py", "")  # no other pip call that could move JAX


@pytest.mark.slow
def test_notebook_runs_in_tiny_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("ADC_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("ADC_NOTEBOOK_WORKDIR", str(tmp_path))
    # The kernel inherits the test run's persistent compilation cache (tests/conftest.py), which
    # the CIFAR-100 runlocal test of test_train.py shares with the notebook's ADC run.
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    nb = read_notebook()
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()

    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert len(images) == 2 and len(tables) == 1
    assert "| Base | 1 |" in tables[0] and "| ADC | 0.1 |" in tables[0]
    assert "No TPU attached" in text and "TensorFlow imported: False" in text
    with open(tmp_path / "deit_t_cifar100_bytes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["xi_target"]) for r in rows] == [("base", "1.0"), ("adc", "0.1")]
    for name in ("base-xi1-s0", "adc-xi0.1-s0"):
        assert (tmp_path / name / "summary.json").exists()
