"""SIGINT (Ctrl-C) and SIGTERM: one line naming the stage, exit 130 / 143, and a resumable workdir.

One chain in one workdir: a run interrupted by SIGINT while it trains the dense SAEs, the same
command interrupted by SIGTERM in the pruned condition, then the same command to the end, which
must write results.json byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import study_runs

_LINE = re.compile(
    r'^run_study: interrupted during (\S+)(?: \(condition ([^)]+)\))?; re-run the same '
    r'command to resume$'
)


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
    return study_runs.baseline(tmp_path_factory)


def _interrupt(workdir, when: str, sig: int) -> tuple[int, str]:
    """Runs the launcher until a stderr line matches `when`, then sends `sig`; (rc, stderr)."""
    proc = subprocess.Popen(
        study_runs.command(workdir),
        cwd=study_runs.ROOT,
        env=study_runs.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if re.search(when, line):
                proc.send_signal(sig)
                break
        seen.append(proc.communicate(timeout=300)[1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, ''.join(seen)


def _check_interrupted(rc, err, want_rc, conditions, workdir):
    assert rc == want_rc, err[-3000:]
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert sum(ln.startswith('run_study: ') for ln in lines) == 1, err[-3000:]
    m = _LINE.match(lines[-1])
    assert m, lines[-1]
    stage, condition = m.groups()
    assert stage in ('tokens', 'prune', 'ppl', 'acts', 'sae', 'causal', 'measures'), lines[-1]
    assert condition in conditions, lines[-1]
    # The interrupted stage left nothing half-written: no temp folders, no stage without DONE.
    stages = workdir / 'stages'
    assert not [p for p in stages.glob('*/.*') if '.tmp-' in p.name], list(stages.rglob('*'))
    assert all((p / 'DONE').is_file() for p in stages.glob('*/*') if p.is_dir() and not p.name.endswith('.train'))
    assert not (workdir / 'results.json').exists()


def test_sigint_and_sigterm_print_one_line_and_the_same_command_resumes(baseline, tmp_path):
    w = tmp_path / 'w'
    rc, err = _interrupt(w, r'\[sae\] dense', signal.SIGINT)
    _check_interrupted(rc, err, 130, ('dense', 'magnitude@0.5'), w)

    rc, err = _interrupt(w, r'\[sae\] magnitude', signal.SIGTERM)
    _check_interrupted(rc, err, 143, ('magnitude@0.5',), w)

    rc, err = study_runs.launch(w)
    assert rc == 0, err[-3000:]
    assert (w / 'results.json').read_bytes() == (baseline / 'results.json').read_bytes()
    assert (w / 'report.md').read_bytes() == (baseline / 'report.md').read_bytes()
    assert study_runs.leftovers(w) == []
