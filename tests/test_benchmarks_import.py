"""Every script of ``benchmarks/`` imports against the current API (a renamed or moved function
fails here, not the next time someone runs the benchmark): one subprocess imports them all, so
no script's import-time settings (``OMP_WAIT_POLICY``, ``sys.path``) reach the test process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_script_imports():
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    assert len(names) > 20, names
    code = (
        "import importlib, sys, traceback\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "bad = []\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        bad.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
