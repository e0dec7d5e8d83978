"""MkDocs hooks (mkdocs.yml ``hooks:``): the generated parts of the documentation.

- ``<!-- omse:cli -->`` in a page becomes the command-line reference, generated from
  :func:`omse.cli.build_parser` (every command, every option with its help and default), so it
  cannot drift from the parser (``tests/test_docs.py`` checks that every flag is in it);
- ``<!-- omse:results NAME -->`` becomes the benchmark tables of section ``NAME`` of
  ``benchmarks/render_readme.py`` (``models``, ``transformer``, ``peers``, ``latency``), rendered
  from ``results/*.json`` at build time;
- the PNG plots under ``results/`` are added to the site as ``results/...``, so the benchmark
  pages show the committed figures.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MARKER = "<!-- omse:cli -->"
RESULTS_MARKER = re.compile(r"<!-- omse:results (\w+) -->")


def _option_line(action: argparse.Action, fmt: argparse.HelpFormatter) -> str:
    """One option as a markdown list item: its flags (with the value it takes), help, default."""
    if action.option_strings:
        flags = ", ".join(f"`{s}`" for s in action.option_strings)
        takes = action.nargs != 0
        if takes:
            if action.choices is not None:
                value = "{" + ",".join(str(c) for c in action.choices) + "}"
            else:
                value = action.metavar or action.dest.upper()
            if isinstance(action.nargs, int) and action.nargs > 1:
                value = " ".join([value] * action.nargs)
            flags += f" `{value}`"
    else:  # a positional argument
        flags = f"`{action.metavar or action.dest}`"
    text = fmt._expand_help(action) if action.help else ""
    text = text.replace("\n", " ").strip()
    default = action.default
    if (
        action.option_strings
        and default not in (None, False, [], argparse.SUPPRESS)
        and action.nargs != 0
        and "default" not in text
    ):
        text = f"{text} (default: `{default}`)" if text else f"default: `{default}`"
    return f"- {flags}: {text}" if text else f"- {flags}"


def _parser_section(name: str, parser: argparse.ArgumentParser, help_text: str) -> list[str]:
    fmt = parser._get_formatter()
    lines = parser.format_usage().rstrip().splitlines()
    pad = len("usage: ")
    usage = "\n".join(
        [lines[0].removeprefix("usage: ")]
        + [ln[pad:] if ln.startswith(" " * pad) else ln for ln in lines[1:]]
    )
    out = [f"## `{name}`", ""]
    if help_text:
        out += [help_text[0].upper() + help_text[1:] + ".", ""]
    out += ["```text", usage, "```", ""]
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if not isinstance(a, argparse._SubParsersAction | argparse._HelpAction)
        ]
        if not actions:
            continue
        title = {"positional arguments": "Arguments", "options": "Options"}.get(
            group.title or "", (group.title or "").capitalize()
        )
        out += [f"**{title}**", ""]
        out += [_option_line(a, fmt) for a in actions]
        out.append("")
    return out


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The command-line reference (markdown) of ``parser`` (default: ``omse``'s)."""
    if parser is None:
        from omse.cli import build_parser

        parser = build_parser()
    out = _parser_section(parser.prog, parser, "options for every command")
    out[0] = f"## `{parser.prog}` (options before the command)"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for cmd, sub in action.choices.items():
                out += _parser_section(f"{parser.prog} {cmd}", sub, helps.get(cmd, ""))
    return "\n".join(out).rstrip() + "\n"


def results_section(name: str, results_dir: Path | None = None) -> str:
    """Section ``name`` of benchmarks/render_readme.py, rendered from ``results/*.json``."""
    bench_dir = str(ROOT / "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import render_readme

    if name not in render_readme.SECTIONS:
        raise ValueError(
            f"<!-- omse:results {name} -->: no such section {list(render_readme.SECTIONS)}"
        )
    text = render_readme.render_section(results_dir or ROOT / "results", name)
    if not text:
        raise ValueError(f"<!-- omse:results {name} -->: no results in results/ for it")
    return text


def expand(markdown: str) -> str:
    """A page's markdown with the markers replaced."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return RESULTS_MARKER.sub(lambda m: results_section(m.group(1)), markdown)


# --- mkdocs events ---------------------------------------------------------------------------


def on_files(files, config):  # noqa: ARG001
    from mkdocs.structure.files import File

    for png in sorted((ROOT / "results").rglob("*.png")):
        uri = png.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001
    return expand(markdown)
