"""Shared helpers for the bench/ scripts: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'BENCHMARKS.md')


def machine() -> str:
    """One line naming the CPU, core count, jax backend and the date of the run."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    try:
        rev = (
            subprocess.run(
                ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=os.path.dirname(BENCHMARKS)
            ).stdout.strip()
            or 'unknown'
        )
    except OSError:
        rev = 'unknown'
    return (
        f'{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}, '
        f'git {rev}, {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'
    )


def write_section(title: str, body: str, path: str = BENCHMARKS) -> None:
    """Replaces the '## title' section of BENCHMARKS.md (or appends it), atomically."""
    head = f'## {title}'
    text = open(path).read() if os.path.exists(path) else '# Benchmarks\n'
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == head), None)
    section = head + '\n\n' + body.strip('\n') + '\n'
    if start is None:
        new = text.rstrip('\n') + '\n\n' + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ')), len(lines))
        tail = ''.join(lines[end:])
        new = ''.join(lines[:start]) + section + ('\n' + tail if tail else '')
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.bench_')
    with os.fdopen(fd, 'w') as f:
        f.write(new)
    os.replace(tmp, path)


def best_of(fn, repeats: int) -> float:
    """Minimum wall time of fn() over repeats calls (fn must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
