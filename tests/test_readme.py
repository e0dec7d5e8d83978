"""The README's examples and the public API's docstring examples run as written.

Every ```python block of README.md is executed in a fresh namespace in a temporary folder (the
blocks write their outputs there; the mechanism is ``tests/docblocks.py``, shared with the
documentation's pages, ``tests/test_docs.py``); every ``omse ...`` line of its ```bash blocks is
parsed by the CLI's parser; the docstring examples of ``omse.quantize``, ``omse.export_onnx``,
``omse.save``, ``omse.load`` and ``omse.report`` run as doctests. The README stays short.
"""

import doctest
import importlib.util
import re
import warnings

import pytest
from docblocks import README, blocks, commands

import omse

BLOCKS = blocks(README, "python")
COMMANDS = [c for b in blocks(README, "bash") for c in commands(b)]
API = [omse.quantize, omse.export_onnx, omse.save, omse.load, omse.report]
MAX_LINES = 250


def run_block(block, tmp_path, monkeypatch):
    """Run a ```python block as written in ``tmp_path`` (warnings silenced), honouring its
    ``<!-- skip: ... -->`` / ``<!-- needs: module -->`` marker."""
    if block.skip:
        pytest.skip(block.skip)
    if block.needs and importlib.util.find_spec(block.needs) is None:
        pytest.skip(f"the block needs {block.needs} (an optional extra); not installed here")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block.code, block.id, "exec"), {"__name__": "__main__"})


def parse_command(argv):
    """A command line the parser accepts (and whose recipe flags make a valid configuration)."""
    from omse.cli import _config_from_args, build_parser

    args = build_parser().parse_args(argv)
    if hasattr(args, "recipe"):
        _config_from_args(args)


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES} (the rest: docs/)"


def test_readme_names_no_issue_numbers():
    assert not re.search(r"\(#\d+\)|\bissue #?\d+", README.read_text(), flags=re.I)


def test_readme_links_resolve():
    """Every relative link of the README (to the docs' pages, the changelog, the licence) names
    a file of the repository."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links no documentation page"
    missing = [link for link in local if not (README.parent / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md needs a PyTorch and an ONNX example"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block, tmp_path, monkeypatch, fmnist_split, one_torch_thread):
    run_block(block, tmp_path, monkeypatch)


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


def test_readme_commands_are_there():
    assert len(COMMANDS) >= 3


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:2]) for a in COMMANDS])
def test_readme_command_parses(argv):
    """Each command line of the README is one the parser accepts."""
    parse_command(argv)
