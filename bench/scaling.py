r"""Study wall time and peak RSS vs the SAE token budget: one fresh study run per multiplier.

  python bench/scaling.py                                  # default config at 1x, 2x, 4x tokens
  python bench/scaling.py --config=configs/smoke.py --multipliers=1,4 --set=sae.epochs=1
  python bench/scaling.py --multipliers=1 --nowrite        # measure only, print the table

Each run is `launch/run_study.py --config=<config> --workdir=<fresh dir> --config.sae.n_tokens=
<multiplier x base>` plus the --set overrides, in its own process, from an empty workdir (the
zoo model's converted checkpoint is reused from its cache). The child's peak resident set size
is the kernel's ru_maxrss of that child alone (os.wait4), its wall time the time to exit; the
1-minute load average is read before and after each run, since other work on the machine slows
the study down (but does not change its memory). The table is written to BENCHMARKS.md under
'Scaling: study wall time and peak RSS vs tokens' (unless --nowrite). Memory that does not grow
with the token count is the point: the activation store is memory-mapped float16 on disk and
the SAE trainer reads it batch by batch.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLE = 'Scaling: study wall time and peak RSS vs tokens'
FLAGS = flags.FLAGS


def _define_flags() -> None:
    """This script's flags. Defined only when the file runs as a script: tests import it as a module
    (tests/study/test_memory.py), and absl refuses a flag that is defined twice."""
    flags.DEFINE_string('config', 'configs/default.py', 'Study config file.')
    flags.DEFINE_list('multipliers', ['1', '2', '4'], 'Multiples of config.sae.n_tokens.')
    flags.DEFINE_multi_string('set', [], 'Extra config override FIELD=VALUE, e.g. sae.epochs=1 (repeatable).')
    flags.DEFINE_string('tmpdir', None, 'Parent of the fresh workdirs (default: a new temp dir).')
    flags.DEFINE_bool('keep', False, 'Keep the workdirs (default: delete each after its run).')
    flags.DEFINE_bool('write', True, 'Replace the section of BENCHMARKS.md (--nowrite: print the table only).')


def base_tokens(config_path: str, overrides: list[str]) -> int:
    """config.sae.n_tokens of the config file, or of a `sae.n_tokens=N` override."""
    for o in overrides:
        key, _, value = o.partition('=')
        if key.strip() == 'sae.n_tokens':
            return int(value)
    spec = importlib.util.spec_from_file_location('_scaling_config', config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.get_config().sae.n_tokens)


def run_once(config_path: str, overrides: list[str], n_tokens: int, workdir: str, log_path: str) -> dict:
    """One study run in a child process: wall seconds, peak RSS (bytes), exit code, load."""
    sets = [o for o in overrides if o.partition('=')[0].strip() != 'sae.n_tokens']
    cmd = [
        sys.executable,
        os.path.join(ROOT, 'launch', 'run_study.py'),
        f'--config={config_path}',
        f'--workdir={workdir}',
        f'--config.sae.n_tokens={n_tokens}',
        '--config.progress=False',
    ]
    cmd += [f'--config.{o}' for o in sets]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path, 'w') as log:
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    return {
        'n_tokens': n_tokens,
        'wall_s': wall,
        'peak_rss': usage.ru_maxrss * 1024,
        'cpu_s': usage.ru_utime + usage.ru_stime,
        'rc': child.returncode,
        'load': (load0, os.getloadavg()[0]),
        'cmd': cmd,
        'log': log_path,
    }


def table(rows: list[dict]) -> str:
    head = (
        '| tokens (x base) | sae.n_tokens | wall | CPU time | peak RSS | 1-min load (start / end) '
        '| exit |\n|---|---|---|---|---|---|---|\n'
    )
    lines = [
        f'| {r["mult"]:g}x | {r["n_tokens"]} | {r["wall_s"] / 60:.1f} min ({r["wall_s"]:.0f} s) | '
        f'{r["cpu_s"]:.0f} s | {r["peak_rss"] / 2**30:.2f} GiB | {r["load"][0]:.1f} / '
        f'{r["load"][1]:.1f} | {r["rc"]} |'
        for r in rows
    ]
    return head + '\n'.join(lines)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}')
    config_path = os.path.abspath(FLAGS.config)
    multipliers = ','.join(FLAGS.multipliers)
    try:
        mults = [float(m) for m in FLAGS.multipliers if m.strip()]
    except ValueError:
        mults = []
    if not mults or any(m <= 0 for m in mults):
        raise app.UsageError(f'--multipliers={multipliers!r}; accepted: positive numbers like 1,2,4')
    base = base_tokens(config_path, FLAGS.set)
    if FLAGS.tmpdir:
        os.makedirs(FLAGS.tmpdir, exist_ok=True)
    parent = tempfile.mkdtemp(prefix='prunesae_scaling_', dir=FLAGS.tmpdir)
    rows = []
    for m in mults:
        n = max(1, int(round(base * m)))
        workdir = os.path.join(parent, f'x{m:g}')
        r = run_once(config_path, FLAGS.set, n, workdir, os.path.join(parent, f'x{m:g}.log'))
        r['mult'] = m
        rows.append(r)
        print(
            f'{m:g}x ({n} tokens): {r["wall_s"]:.0f} s, peak RSS {r["peak_rss"] / 2**30:.2f} GiB, '
            f'exit {r["rc"]} (log {r["log"]})',
            flush=True,
        )
        if not FLAGS.keep and r['rc'] == 0:
            import shutil  # pylint: disable=g-import-not-at-top

            shutil.rmtree(workdir, ignore_errors=True)
    rel = os.path.relpath(config_path, ROOT)
    command = ' '.join(
        ['python bench/scaling.py', f'--config={rel}', f'--multipliers={multipliers}']
        + [shlex.quote(f'--set={s}') for s in FLAGS.set]
    )
    body = (
        f'Machine: {_common.machine()}\n\nCommand: `{command}` (each run from an empty workdir, '
        f"in its own process; base sae.n_tokens = {base}). Peak RSS is the child's ru_maxrss; "
        f'the load average counts other jobs on the machine, which slow the wall time but do '
        f'not change the memory.\n\n{table(rows)}\n'
    )
    if len(rows) >= 2 and rows[0]['rc'] == 0 and rows[-1]['rc'] == 0:
        body += (
            f'\nPeak RSS at {rows[-1]["mult"]:g}x vs {rows[0]["mult"]:g}x tokens: '
            f'{(rows[-1]["peak_rss"] - rows[0]["peak_rss"]) / 2**20:+.0f} MiB '
            f'({rows[-1]["peak_rss"] / rows[0]["peak_rss"]:.2f}x).\n'
        )
    print(body)
    if FLAGS.write:
        _common.write_section(TITLE, body)
    return 0 if all(r['rc'] == 0 for r in rows) else 1


if __name__ == '__main__':
    _define_flags()
    app.run(main)
