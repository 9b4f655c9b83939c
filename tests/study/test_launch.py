"""launch/run_study.py: bad input exits with status 2 and one line, no traceback."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')  # no network: fail at once
    return subprocess.run(
        [sys.executable, str(ROOT / 'launch' / 'run_study.py'), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    'args,needle',
    [
        (['--config=configs/smoke.py', '--config.pruning.sparsities=(0.0, 1.5)'], 'pruning.sparsities'),
        (['--config=configs/smoke.py', '--config.model=gpt-9000'], "config.model='gpt-9000'"),
        (['--config=configs/smoke.py', '--config.pruning.methods=("obs",)'], "'obs'"),
        (['--config=configs/smoke.py', '--config.no_such_field=1'], 'no_such_field'),
        (['--config=configs/missing.py'], 'missing.py'),
        (['--config=configs/smoke.py'], 'workdir'),
        # a hub id that cannot be fetched (offline): one line naming it
        (['--config=configs/smoke.py', '--config.model=no-such-org/no-such-model'], "'no-such-org/no-such-model'"),
    ],
)
def test_bad_input_exits_2(args, needle, tmp_path):
    if needle != 'workdir':
        args = args + [f'--workdir={tmp_path}']
    out = _run(*args, tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and 'Traceback' not in out.stderr
