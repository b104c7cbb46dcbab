"""The README's code runs as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _read(path):
    with open(os.path.join(os.path.dirname(README), path)) as f:
        return f.read()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", _read("README.md"), flags=re.S)


@pytest.mark.slow
def test_compress_example_runs(capsys):
    (example,) = [b for b in python_blocks() if "adc_jax.compress(" in b]
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert printed[0] == "40 62 0.0984"
    assert printed[1] == "(40, 62, 192) (40, 100)"
    assert printed[2] == "(128, 197, 192)"


def test_two_commands_match_ci():
    test_command = 'pip install -e ".[test]" && python -m pytest -q'
    assert test_command in _read("README.md")
    assert test_command in _read(os.path.join(".ci", "run"))


def test_readme_is_short_and_links_every_docs_page():
    text = _read("README.md")
    assert len(text.splitlines()) <= 250
    docs = os.path.join(os.path.dirname(README), "docs")
    pages = sorted(name for name in os.listdir(docs) if name.endswith(".md"))
    missing = [page for page in pages if f"docs/{page}" not in text]
    assert not missing, f"docs pages not linked from the README: {missing}"
    for link in re.findall(r"\]\(((?:docs|colab|configs)/[^)#]+)", text):
        assert os.path.exists(os.path.join(os.path.dirname(README), link)), link
