"""The code passes ruff with the configuration in pyproject.toml (lint rules and formatting)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ['prunesae_jax', 'launch', 'bench', 'configs', 'tests']


def _ruff(*args):
    return subprocess.run(
        [sys.executable, '-m', 'ruff', *args, '--no-cache', *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_check():
    out = _ruff('check')
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_ruff_format():
    out = _ruff('format', '--check')
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
