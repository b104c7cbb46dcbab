"""The README's code runs as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_compress_example_runs(capsys):
    (example,) = [b for b in python_blocks() if "adc_jax.compress(" in b]
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert printed[0] == "40 62 0.0984"
    assert printed[1] == "(40, 62, 192) (40, 100)"
    assert printed[2] == "(128, 197, 192)"


def test_two_commands_match_ci():
    with open(README) as f:
        text = f.read()
    test_command = 'pip install -e ".[test]" && python -m pytest -q'
    assert test_command in text
    with open(os.path.join(os.path.dirname(README), ".ci", "run")) as f:
        assert test_command in f.read()
