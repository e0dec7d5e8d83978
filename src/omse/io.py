"""Safe output writing: atomic (temporary file in the same folder, then rename), no silent
overwrite, never a partial file after an interruption."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OmseError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_path", "check_output_path"]


def check_output_path(path: str | Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse to overwrite an existing file without ``force``, and never an input file."""
    p = Path(path)
    for i in inputs:
        if i is not None and p.exists() and Path(i).exists() and p.resolve() == Path(i).resolve():
            raise OmseError(f"output {p} is one of the inputs; choose another output path")
    if p.exists() and not force:
        raise OmseError(f"output {p} already exists; pass --force (force=True) to overwrite it")
    if p.exists() and p.is_dir():
        raise OmseError(f"output {p} is a directory")
    return p


@contextlib.contextmanager
def atomic_path(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``,
    on any exception (KeyboardInterrupt included) it is removed."""
    p = check_output_path(path, force)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, force: bool = False) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, force: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode(), force)


def atomic_write_with(
    path: str | Path, writer: Callable[[Path], None], force: bool = False
) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, force) as tmp:
        writer(tmp)
    return Path(path)
