"""Shared by the recovery tests (test_crash.py, test_corrupt_cache.py, test_interrupts.py): the
launcher on a reduced smoke config in a subprocess, and one uninterrupted baseline run per pytest
session. A run with a crash point goes through tests/study/crash_run.py, which kills it there.

The config is configs/smoke.py made smaller (the overrides of test_crash.py): two conditions
(dense, magnitude 50%), 8 SAE steps of 128 tokens with a checkpoint every 3 steps; a run takes
about 10-15 s on two cores.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import crash_run  # tests/study/crash_run.py: the launcher killed at a chosen point
import jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = {
    'pruning.methods': ('magnitude',),
    'calibration.n_samples': 2,
    'ppl.max_tokens': 4096,
    'sae.n_tokens': 512,
    'sae.batch_size': 128,
    'sae.epochs': 2,
    'sae.checkpoint_every': 3,
    'analysis.n_bootstrap': 20,
    'analysis.transfer_tokens': 2048,
    'analysis.causal_tokens': 1024,
    'analysis.causal_features': 4,
}


def env(crash_at: str | None = None) -> dict[str, str]:
    """The launcher's environment: CPU, the session's compilation cache, the crash point if any."""
    out = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
    out.pop(crash_run.CRASH_ENV, None)
    if crash_at:
        out[crash_run.CRASH_ENV] = crash_at
    if jax.config.jax_compilation_cache_dir:  # share the session's compiled programs
        out.update(
            JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
        )
    return out


def command(workdir: str | os.PathLike, crash_at: str | None = None) -> list[str]:
    """The launcher's command line; with `crash_at`, tests/study/crash_run.py's (same flags)."""
    flags = [f'--config.{k}={v!r}' for k, v in OVERRIDES.items()]
    script = pathlib.Path(crash_run.__file__) if crash_at else ROOT / 'launch' / 'run_study.py'
    return [sys.executable, str(script), '--config=configs/smoke.py', f'--workdir={workdir}', *flags]


def launch(workdir: str | os.PathLike, crash_at: str | None = None) -> tuple[int, str]:
    """(return code, stderr) of one run of the launcher; `crash_at` ('<point>[:<n>]', see
    tests/study/crash_run.py) kills it with SIGKILL there."""
    proc = subprocess.run(
        command(workdir, crash_at),
        cwd=ROOT,
        env=env(crash_at),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    return proc.returncode, proc.stderr


_BASELINE: dict[str, pathlib.Path] = {}


def baseline(tmp_path_factory) -> pathlib.Path:
    """The workdir of an uninterrupted run (made once per session, shared by the modules)."""
    if 'path' not in _BASELINE:
        path = tmp_path_factory.mktemp('recovery_baseline') / 'w'  # the study creates it
        rc, err = launch(path)
        assert rc == 0, err[-3000:]
        _BASELINE['path'] = path
    return _BASELINE['path']


def copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def leftovers(workdir: pathlib.Path) -> list[str]:
    """Temp files / folders and SAE checkpoint folders a finished run must not leave."""
    return sorted(
        str(p.relative_to(workdir)) for p in workdir.rglob('*') if '.tmp' in p.name or p.name.endswith('.train')
    )
