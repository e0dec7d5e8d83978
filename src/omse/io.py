"""Safe output writing: atomic (temporary file in the same folder, then rename), no silent
overwrite, never a partial file after an interruption."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OmseError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_path",
    "atomic_dir",
    "check_output_path",
]


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


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an existing
    folder needs ``force``; it is removed only after the new one is in place), on any exception
    (KeyboardInterrupt included) the temporary folder is removed and ``path`` is left as it was."""
    import shutil

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OmseError(f"output {p} exists and is not a folder")
    if p.exists() and not force:
        raise OmseError(f"output {p} already exists; pass --force (force=True) to overwrite it")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    old = None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        if p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".old", dir=p.parent))
            os.replace(p, old / p.name)
        os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / p.name).exists() and not p.exists():
            os.replace(old / p.name, p)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
