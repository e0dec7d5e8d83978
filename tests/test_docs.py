"""The documentation (docs/, mkdocs.yml) is true to the code.

- every ```python block of every page runs as written (``tests/docblocks.py``: a fresh namespace,
  a temporary folder; a block is left out only with a visible ``<!-- skip: reason -->``, and
  those are few) and every ``omse ...`` line of its ```bash blocks parses;
- the CLI reference, generated from the parser (scripts/docs_hooks.py), names every flag;
- every page is in the navigation, and the benchmark tables render from results/*.json.

``make docs`` (run by ``make test``) builds the site with warnings as errors.
"""

import importlib.util
import re
from pathlib import Path

import pytest
from docblocks import DOCS, ROOT, blocks, commands, doc_pages
from test_readme import parse_command, run_block

PY = [b for p in doc_pages() for b in blocks(p, "python")]
CMDS = [(b, c) for p in doc_pages() for b in blocks(p, "bash") for c in commands(b)]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_have_examples():
    assert len(PY) >= 8 and len(CMDS) >= 15


def test_few_blocks_skipped():
    skipped = [b.id for b in PY if b.skip]
    assert len(skipped) <= 2, f"too many docs blocks skipped: {skipped}"


@pytest.mark.parametrize("block", PY, ids=[b.id for b in PY])
def test_docs_block_runs(block, tmp_path, monkeypatch, fmnist_split, one_torch_thread):
    run_block(block, tmp_path, monkeypatch)


@pytest.mark.parametrize("argv", [c for _, c in CMDS], ids=[f"{b.id}:{c[0]}" for b, c in CMDS])
def test_docs_command_parses(argv):
    parse_command(argv)


def test_cli_reference_names_every_flag():
    """The generated reference lists every command and every option string of the parser."""
    import argparse

    from omse.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text()
    assert "<!-- omse:cli -->" in page
    text = _hooks().expand(page)
    parser = build_parser()
    parsers = [("omse", parser)]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            parsers += [(f"omse {n}", p) for n, p in a.choices.items()]
    missing = []
    for name, p in parsers:
        section = text.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        for a in p._actions:
            for flag in a.option_strings:
                if flag not in ("-h", "--help") and f"`{flag}`" not in section:
                    missing.append(f"{name} {flag}")
    assert not missing, f"not in the CLI reference: {missing}"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in doc_pages():
        rel = page.relative_to(DOCS).as_posix()
        assert f" {rel}" in nav, f"{rel} is not in mkdocs.yml's nav"


def test_results_markers_render():
    hooks = _hooks()
    pages = {p: p.read_text() for p in doc_pages()}
    names = {m for t in pages.values() for m in re.findall(r"<!-- omse:results (\w+) -->", t)}
    assert names == {"models", "tflite", "transformer", "peers", "latency"}
    for name in names:
        assert "|---" in hooks.results_section(name)
    with pytest.raises(ValueError, match="no such section"):
        hooks.results_section("nope")
    with pytest.raises(ValueError, match="no results"):
        hooks.results_section("peers", Path("/nonexistent"))
