"""The code blocks of the README and of the documentation pages, as the tests run them.

A ```python block runs as written, in a fresh namespace in a temporary folder. A block may be
left out only with a visible reason: an HTML comment on the line just before it,
``<!-- skip: the reason -->`` (shown on the page's source, reported by pytest as the skip reason),
or ``<!-- needs: module -->`` when it needs an optional package (run where it is installed).
``omse ...`` lines of ```bash blocks (continuations joined, comments dropped) are parsed by the
CLI's parser.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^(?:<!-- (skip|needs): (.*?) -->\n)?```(\w+)\n(.*?)^```$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    path: Path
    index: int  # 1-based, among the file's blocks of its language
    lang: str
    code: str
    skip: str | None  # the reason, from <!-- skip: ... -->
    needs: str | None  # a module, from <!-- needs: ... -->

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.lang}{self.index}"


def blocks(path: Path, lang: str) -> list[Block]:
    out = []
    for m in _BLOCK.finditer(path.read_text()):
        if m.group(3) == lang:
            kind, why = m.group(1), m.group(2)
            out.append(
                Block(
                    path,
                    len(out) + 1,
                    lang,
                    m.group(4),
                    why if kind == "skip" else None,
                    why if kind == "needs" else None,
                )
            )
    return out


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def commands(block: Block) -> list[list[str]]:
    """The ``omse ...`` command lines of a bash block, as argv lists (without ``omse``); lines
    of torchrun/python -m omse count too."""
    out = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and (words[0] == "omse" or (words[0] == "torchrun" and "omse" in words)):
            argv = words[words.index("omse") + 1 :]
            if not {"-h", "--help"} & set(argv):  # help exits; nothing to check
                out.append(argv)
    return out
