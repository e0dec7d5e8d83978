"""Safe output writing: atomic, no silent overwrite, no partial file after an interruption."""

import os

import pytest

from omse.errors import OmseError
from omse.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_with,
    check_output_path,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_creates_file_and_parents(tmp_path):
    out = tmp_path / "a" / "b" / "x.bin"
    atomic_write_bytes(out, b"hello")
    assert out.read_bytes() == b"hello"
    assert _leftovers(out.parent) == ["x.bin"]


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "x.txt"
    out.write_text("keep me")
    mtime = out.stat().st_mtime_ns
    with pytest.raises(OmseError, match="already exists.*--force"):
        atomic_write_text(out, "new")
    assert out.read_text() == "keep me" and out.stat().st_mtime_ns == mtime
    atomic_write_text(out, "new", force=True)
    assert out.read_text() == "new"
    assert _leftovers(tmp_path) == ["x.txt"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, SystemExit])
def test_interrupted_writer_leaves_nothing(tmp_path, exc):
    out = tmp_path / "model.safetensors"

    def writer(tmp):
        tmp.write_bytes(b"partial" * 1000)
        raise exc()

    with pytest.raises(exc):
        atomic_write_with(out, writer)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_file(tmp_path):
    out = tmp_path / "x.json"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(out, force=True) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert out.read_text() == "old"
    assert _leftovers(tmp_path) == ["x.json"]


def test_atomic_path_is_in_the_same_folder(tmp_path):
    out = tmp_path / "y.onnx"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        assert not out.exists()
        tmp.write_bytes(b"1")
    assert out.read_bytes() == b"1"


def test_output_may_not_be_an_input(tmp_path):
    inp = tmp_path / "in.safetensors"
    inp.write_bytes(b"weights")
    with pytest.raises(OmseError, match="one of the inputs"):
        check_output_path(inp, force=True, inputs=(inp,))
    link = tmp_path / "sub" / ".." / "in.safetensors"
    (tmp_path / "sub").mkdir()
    with pytest.raises(OmseError, match="one of the inputs"):
        check_output_path(link, force=True, inputs=(inp,))
    assert inp.read_bytes() == b"weights"


def test_output_may_not_be_a_directory(tmp_path):
    with pytest.raises(OmseError, match="directory"):
        check_output_path(tmp_path, force=True)


def test_new_output_passes(tmp_path):
    assert check_output_path(tmp_path / "new.json") == tmp_path / "new.json"


def test_written_file_is_complete_when_visible(tmp_path):
    # the final name only ever appears with the full content (rename, not streaming writes)
    out = tmp_path / "big.bin"
    seen = []

    def writer(tmp):
        for _ in range(10):
            with open(tmp, "ab") as f:
                f.write(os.urandom(1000))
            seen.append(out.exists())

    atomic_write_with(out, writer)
    assert seen == [False] * 10 and out.stat().st_size == 10_000
