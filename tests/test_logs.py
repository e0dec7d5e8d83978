"""Logs people can read: progress bars only on a terminal (plain periodic lines elsewhere),
``--quiet`` (results, warnings and errors only), long layer lists as counts with the full lists
in the JSON."""

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from omse import runtime
from omse.cli import main
from omse.runtime import name_list, progress, set_quiet


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_off_a_terminal():
    """Not a terminal: one plain line per interval (here every step), a final one, no '\\r'."""
    out = io.StringIO()
    assert list(progress(range(3), desc="weights", stream=out, interval=0)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [ln.split(", ")[0] for ln in lines] == [
        "omse: weights: 1/3 (33%)",
        "omse: weights: 2/3 (67%)",
        "omse: weights: 3/3 (100%)",
        "omse: weights: 3/3 (100%)",  # the closing line
    ]
    assert all(ln.endswith(" s") for ln in lines)


def test_progress_short_loop_writes_nothing_off_a_terminal():
    out = io.StringIO()
    assert sum(progress(range(100), desc="x", stream=out, interval=3600)) == 4950
    assert out.getvalue() == ""


def test_progress_as_a_context_manager():
    """The blockwise form: ``with progress(total=n) as bar: bar.update()``."""
    out = io.StringIO()
    with progress(total=2, desc="blocks", stream=out, interval=0) as bar:
        bar.set_postfix_str("stem")
        bar.update()
        bar.update()
    assert out.getvalue().splitlines()[0].startswith("omse: blocks: 1/2 (50%) stem, ")


def test_progress_bar_on_a_terminal():
    from tqdm.auto import tqdm

    out = _Terminal()
    bar = progress(range(2), desc="weights", stream=out)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1] and "weights" in out.getvalue()


def test_progress_disabled_and_quiet():
    out = io.StringIO()
    assert list(progress(range(2), stream=out, interval=0, disable=True)) == [0, 1]
    set_quiet(True)
    try:
        assert list(progress(range(2), stream=_Terminal(), interval=0)) == [0, 1]
        with progress(total=1, stream=out, interval=0) as bar:
            bar.update()
    finally:
        set_quiet(False)
    assert out.getvalue() == ""


def test_name_list():
    assert name_list(["a", "b"]) == "a, b"
    assert name_list([f"l{i}" for i in range(12)], limit=3) == "l0, l1, l2 and 9 more"


# -- the command line ----------------------------------------------------------------------------

MODULE = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.ModuleList(
            [torch.nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(3)]
        )
        self.rnns = torch.nn.ModuleList([torch.nn.GRU(8, 8, batch_first=True) for _ in range(7)])
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        for c in self.convs:
            x = torch.relu(c(x))
        y = x.mean((2, 3))[:, None]
        for r in self.rnns:
            y = r(y)[0]
        return self.fc(y[:, 0])


def build():
    return Net().eval()
"""


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, one_torch_thread):
    (tmp_path / "omse_logmod.py").write_text(MODULE)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        a = (np.random.RandomState(i).rand(20, 24, 3) * 255).astype("uint8")
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(*argv):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err, [str(w.message) for w in rec]

    return run


ARGS = ["omse_logmod:build", "--calib", "imgs", "--input-size", "16", "--recipe", "fast"]


def test_cli_progress_is_plain_lines_in_a_log(cli, monkeypatch):
    monkeypatch.setattr(runtime, "PROGRESS_SECONDS", 0.0)
    rc, out, err, _ = cli("quantize", *ARGS)
    assert rc == 0, err
    assert "\r" not in err and "\x1b" not in err
    assert any(ln.startswith("omse: weights: ") for ln in err.splitlines()), err


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_quiet_keeps_results_and_warnings(cli, monkeypatch, where, tmp_path):
    """--quiet (before or after the command): the result line only on stdout, no progress on
    stderr, the warnings still raised; the JSON still complete."""
    monkeypatch.setattr(runtime, "PROGRESS_SECONDS", 0.0)
    argv = ["quantize", *ARGS, "--target", "int8", "--out", "q.onnx", "--json", "q.json"]
    argv = ["--quiet", *argv] if where == "before" else [*argv, "--quiet"]
    rc, out, err, warned = cli(*argv)
    assert rc == 0, err
    assert out.splitlines() == [ln for ln in out.splitlines() if "agreement with FP32" in ln]
    assert len(out.splitlines()) == 1, out
    assert err == ""
    assert any("in float" in w for w in warned), warned  # the GRUs: still warned
    res = json.loads((tmp_path / "q.json").read_text())
    assert len(res["left_float"]) == 7 and "uint8_weight_layers" in res
    assert not runtime.is_quiet()  # restored after the command


def test_cli_long_lists_are_counts_with_the_lists_in_the_json(cli, tmp_path):
    argv = ["quantize", *ARGS, "--target", "int8", "--out", "q.onnx", "--json", "q.json"]
    rc, out, err, warned = cli(*argv)
    assert rc == 0, err
    res = json.loads((tmp_path / "q.json").read_text())
    # float layers: the warning names five and counts the rest; the JSON lists all seven
    (msg,) = [w for w in warned if "in float" in w]
    assert msg.startswith("omse leaves 7 layers in float") and "and 2 more" in msg
    assert sorted(res["left_float"]) == [f"rnns.{i} (GRU)" for i in range(7)]
    # 8-bit weight containers of the export: counted in one line, every layer in the JSON
    (line,) = [ln for ln in out.splitlines() if ln.startswith("int8 weights:")]
    n8, nu8 = len(res["int8_weight_layers"]), len(res["uint8_weight_layers"])
    assert n8 + nu8 == 4 and line.startswith(f"int8 weights: {n8} layers INT8")
    assert f"{nu8} UINT8" in line and "convs.0" not in line
    # parameters left float: one line with their count, each listed with its reason in the JSON
    (line,) = [ln for ln in out.splitlines() if "left float" in ln]
    assert line.startswith("28 parameters left float") and "rnns." not in line
    assert len(res["float_weights"]) == 28


def test_quiet_is_in_the_cli_reference():
    from omse.cli import build_parser

    text = build_parser().format_help()
    assert "--quiet" in text and "-q" in text
