"""launch/run_study.py with a real SIGKILL at a chosen point: the crash tests' hook.

  PRUNESAE_TEST_CRASH_AT=<point>[:<n>] python tests/study/crash_run.py --config=... --workdir=...

runs the launcher exactly as `python launch/run_study.py --config=... --workdir=...` would (same
flags, same signal handling, same exit statuses), after patching a few public library functions
so that the process kills itself with SIGKILL (no cleanup, no atexit: what `kill -9` or a power
cut does) the n-th time (default: the first) the point is reached. Points, and the function each
one wraps:

  capture          after each captured batch: prunesae_jax.sae.store.StoreWriter.append returned
  sae_step         before each SAE training batch: prunesae_jax.sae.store.ActivationStore.batch
  measures         a condition's measures computed, nothing written: StageCache.writing
                   (prunesae_jax/study/workdir.py) called for the stage 'measures'
  commit@<stage>   a stage's files written, its DONE not yet: workdir.manifest, which
                   StageCache.writing calls for DONE, called on a temp folder of <stage>
  replace@<name>   an atomic write of a file named <name> between its fsynced temp file and the
                   rename: os.replace as prunesae_jax/io.py sees it (its module attribute `os`)
  after_results    results.json written, the report not yet: prunesae_jax.study.report.write_report

With $PRUNESAE_TEST_COUNTS=<path> (with or without a crash point) it also counts the activation
rows this process stored (StoreWriter.append) and read for SAE training batches
(ActivationStore.batch), and writes {"captured": n, "trained": n} to <path> when it exits normally:
the multi-process tests check each process's share with it.

The library carries no test code: these patches live here only, and $PRUNESAE_TEST_CRASH_AT and
$PRUNESAE_TEST_COUNTS are read by this file only. A point whose function was renamed fails on
install (AttributeError), and a point never reached lets the run finish, which the crash tests
report as a missing SIGKILL.
"""

from __future__ import annotations

import functools
import os
import pathlib
import runpy
import signal
import sys
from typing import Any, Callable

CRASH_ENV = 'PRUNESAE_TEST_CRASH_AT'
COUNTS_ENV = 'PRUNESAE_TEST_COUNTS'
LAUNCHER = pathlib.Path(__file__).resolve().parents[2] / 'launch' / 'run_study.py'
POINTS = ('capture', 'sae_step', 'measures', 'commit@<stage>', 'replace@<name>', 'after_results')
_PLAIN = tuple(p for p in POINTS if '@' not in p)
_NAMED = tuple(p.split('@')[0] for p in POINTS if '@' in p)


class CrashAt:
    """Parses '<point>' or '<point>:<n>' and kills the process the n-th time `reached(point)`."""

    def __init__(self, spec: str):
        point, sep, nth = spec.rpartition(':')
        if not sep or not nth.isdigit():
            point, nth = spec, '1'
        kind, at, name = point.partition('@')
        known = point in _PLAIN or (kind in _NAMED and at and name)
        if not known or int(nth) < 1:
            raise ValueError(
                f'${CRASH_ENV}={spec!r}; accepted: <point> or <point>:<n> with n >= 1, <point> one of {POINTS}'
            )
        self.point, self.nth, self.hits = point, int(nth), 0

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.hits += 1
        if self.hits == self.nth:
            os.kill(os.getpid(), signal.SIGKILL)


def _before(owner: Any, name: str, point: Callable[..., str | None], crash: CrashAt) -> None:
    """Replaces owner.<name> by a wrapper that calls crash.reached(point(*args)) first (None: no
    point reached by this call)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        where = point(*args, **kwargs)
        if where is not None:
            crash.reached(where)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


class _OsWithCrash:
    """The os module as prunesae_jax/io.py sees it, with a crash point before each os.replace."""

    def __init__(self, crash: CrashAt):
        self._crash = crash

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src, dst, **kwargs) -> None:
        self._crash.reached(f'replace@{pathlib.Path(dst).name}')
        os.replace(src, dst, **kwargs)


def install(crash: CrashAt) -> None:
    """Patches the library functions listed in the module docstring (this process only)."""
    from prunesae_jax import io as io_lib  # pylint: disable=g-import-not-at-top
    from prunesae_jax.sae import store  # pylint: disable=g-import-not-at-top
    from prunesae_jax.study import report, workdir  # pylint: disable=g-import-not-at-top

    append = store.StoreWriter.append

    @functools.wraps(append)
    def append_then_crash(self, *args, **kwargs):
        append(self, *args, **kwargs)
        crash.reached('capture')

    store.StoreWriter.append = append_then_crash
    _before(store.ActivationStore, 'batch', lambda *a, **k: 'sae_step', crash)
    _before(
        workdir.StageCache, 'writing', lambda self, stage, *a, **k: 'measures' if stage == 'measures' else None, crash
    )
    # StageCache.writing's temp folder is stages/<stage>/.<key>.tmp-*: its parent names the stage.
    _before(workdir, 'manifest', lambda root, *a, **k: f'commit@{pathlib.Path(root).parent.name}', crash)
    io_lib.os = _OsWithCrash(crash)
    _before(report, 'write_report', lambda *a, **k: 'after_results', crash)


def count_rows(path: str) -> None:
    """Counts the rows this process captures and reads for training; writes them to path at exit."""
    import atexit  # pylint: disable=g-import-not-at-top
    import json  # pylint: disable=g-import-not-at-top

    from prunesae_jax.sae import store  # pylint: disable=g-import-not-at-top

    counts = {'captured': 0, 'trained': 0}
    append, batch = store.StoreWriter.append, store.ActivationStore.batch

    @functools.wraps(append)
    def counted_append(self, x, *args, **kwargs):
        counts['captured'] += len(x)
        return append(self, x, *args, **kwargs)

    @functools.wraps(batch)
    def counted_batch(self, *args, **kwargs):
        out = batch(self, *args, **kwargs)
        counts['trained'] += len(out)
        return out

    store.StoreWriter.append, store.ActivationStore.batch = counted_append, counted_batch
    atexit.register(lambda: pathlib.Path(path).write_text(json.dumps(counts)))


def main() -> None:
    if os.environ.get(COUNTS_ENV):
        count_rows(os.environ[COUNTS_ENV])
    if os.environ.get(CRASH_ENV):
        install(CrashAt(os.environ[CRASH_ENV]))
    sys.argv = [str(LAUNCHER), *sys.argv[1:]]
    runpy.run_path(str(LAUNCHER), run_name='__main__')


if __name__ == '__main__':
    main()
