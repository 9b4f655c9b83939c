r"""Peak resident memory per pipeline stage of one study run (a profiling driver, not a benchmark).

  python bench/memprofile.py --config=configs/default.py --workdir=/tmp/memprof \
      --config.pruning.sparsities='(0.0, 0.5)' --config.sae.epochs=1

Wraps the stage functions of prunesae_jax.study.stages (and the model load) so that each call logs, on stderr, the
resident set size (VmRSS) on entry and exit and the peak (VmHWM) reached while it ran. The
kernel's peak counter is reset at every stage boundary (writing 5 to /proc/self/clear_refs), so
a stage's peak is its own; nested stages (e.g. the transfer measures inside the measures stage)
also raise the peak of the stages around them. Reducing the grid (one sparsity, one SAE epoch)
keeps every stage's memory the same and makes a profile take minutes instead of the whole run.
Linux only (/proc).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Study config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Study workdir (use an empty one).')
flags.mark_flag_as_required('workdir')


def _stage_names(stages) -> list[str]:
    """The study's stage functions: those defined in prunesae_jax.study.stages whose name ends in
    '_stage'. Found by name, so that the profile follows the pipeline as its stages change."""
    names = [
        n
        for n, f in vars(stages).items()
        if callable(f) and getattr(f, '__module__', None) == stages.__name__ and n.endswith('_stage')
    ]
    if not names:
        raise app.UsageError('prunesae_jax.study.stages defines no *_stage function to profile')
    return names


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class Profiler:
    """A stack of open stages; at every boundary the peak since the last one is charged to all."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.stack: list[list] = []  # [name, peak_kb]
        self.global_peak = 0
        self.rows: list[tuple[str, float, int, int, int]] = []
        self.can_reset = _reset_peak()

    def _boundary(self) -> int:
        hwm = _status_kb('VmHWM')
        self.global_peak = max(self.global_peak, hwm)
        for entry in self.stack:
            entry[1] = max(entry[1], hwm)
        _reset_peak()
        return hwm

    def wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self._boundary()
            rss_in = _status_kb('VmRSS')
            self.stack.append([name, rss_in])
            try:
                return fn(*args, **kwargs)
            finally:
                self._boundary()
                _, peak = self.stack.pop()
                rss_out = _status_kb('VmRSS')
                row = (name, time.perf_counter() - self.t0, rss_in, peak, rss_out)
                self.rows.append(row)
                print(
                    f'[mem] {row[1]:7.1f}s {name:16s} rss in {rss_in / 2**20:6.2f} GB  '
                    f'peak {peak / 2**20:6.2f} GB  rss out {rss_out / 2**20:6.2f} GB',
                    file=sys.stderr,
                    flush=True,
                )

        return wrapped


def main(argv):
    del argv
    from prunesae_jax.study import inputs, pipeline, stages  # pylint: disable=g-import-not-at-top

    prof = Profiler()
    if not prof.can_reset:
        print('[mem] /proc/self/clear_refs not writable: peaks are cumulative', file=sys.stderr)
    for name in _stage_names(stages):  # the pipeline calls stages.<name> and inputs.load at call time
        setattr(stages, name, prof.wrap(name, getattr(stages, name)))
    inputs.load = prof.wrap('load', inputs.load)
    pipeline.run(_CONFIG.value, _WORKDIR.value)
    prof._boundary()  # pylint: disable=protected-access
    print(
        f'[mem] total {time.perf_counter() - prof.t0:.1f}s, peak RSS {prof.global_peak / 2**20:.2f} GB '
        f'(VmHWM, max over stages)',
        file=sys.stderr,
        flush=True,
    )


if __name__ == '__main__':
    app.run(main)
