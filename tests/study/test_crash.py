"""Crash safety: the launcher killed with SIGKILL at chosen places resumes to the same bytes.

One chain of runs in one workdir: each run is killed (a real SIGKILL from
workdir.crash_point, no cleanup) at a different place, during capture, SAE training (after a
checkpoint, so training resumes from it), measures, a stage commit (files written, DONE not yet),
the atomic write of results.json (temp file written, not renamed) and after results.json but
before the report. Every run resumes what the previous one left; the last one finishes and must
write results.json and report.md byte-identical to an uninterrupted run of the same command.
"""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.study import workdir as wd

import study_runs  # tests/study/study_runs.py: shared by the launcher tests

ROOT = pathlib.Path(__file__).resolve().parents[2]

# configs/smoke.py made smaller still (two conditions, 8 SAE steps of 128 tokens, a checkpoint every 3
# steps): one set of overrides for every launcher test.
OVERRIDES = study_runs.OVERRIDES


def tiny_config():
    spec = importlib.util.spec_from_file_location('smoke', ROOT / 'configs' / 'smoke.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    for name, value in OVERRIDES.items():
        *parents, leaf = name.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


launch = study_runs.launch  # (return code, stderr) of one launcher run on the tiny config


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
    """An uninterrupted run of the same command."""
    workdir = tmp_path_factory.mktemp('baseline')
    rc, err = launch(workdir)
    assert rc == 0, err[-3000:]
    # a clean log: Orbax's INFO lines (about 25 per checkpoint; checkpoint_every is 3 here) are not shown
    assert 'CheckpointManager' not in err and 'orbax' not in err.lower(), err[-3000:]
    return workdir


def _leftovers(workdir):
    """Everything a killed run may leave: temp files / folders and SAE checkpoint folders."""
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')
                  if '.tmp' in p.name or p.name.endswith('.train'))


def _stage_tmp(workdir, stage):
    return [p for p in (workdir / 'stages' / stage).glob('.*.tmp-*') if p.is_dir()]


def test_kill_9_everywhere_then_resume_is_identical(baseline, tmp_path):
    w = tmp_path / 'w'

    def killed(point):
        rc, err = launch(w, point)
        assert rc == -signal.SIGKILL, f'{point}: expected SIGKILL, got rc={rc}\n{err}'
        assert not (w / 'results.json').exists() or point == 'after_results'

    # 1. During capture (second batch of the dense condition): a stage temp folder, no DONE.
    killed('capture:2')
    assert len(_stage_tmp(w, 'acts')) == 1
    assert not list((w / 'stages' / 'acts').glob('*/DONE'))

    # 2. During SAE training, at step 6 of 8: the checkpoint of step 3 is there, no SAE stage.
    killed('sae_step:6')
    assert _stage_tmp(w, 'acts') == []  # the killed capture's leftovers were removed
    assert len(list((w / 'stages' / 'acts').glob('*/DONE'))) == 1
    ckpts = list((w / 'stages' / 'sae').glob('*.train/checkpoints/3'))
    assert len(ckpts) == 1, _leftovers(w)
    assert not list((w / 'stages' / 'sae').glob('*/DONE'))

    # 3. During the measures of the pruned condition (the dense SAE resumed from step 3).
    killed('measures:2')
    assert len(list((w / 'stages' / 'measures').glob('*/DONE'))) == 1
    assert len(list((w / 'stages' / 'sae').glob('*/DONE'))) == 2
    assert not list((w / 'stages' / 'sae').glob('*.train'))  # finished trainings are cleaned up

    # 4. Committing those measures: measures.json written, DONE not yet.
    killed('commit@measures')
    (half,) = _stage_tmp(w, 'measures')
    assert (half / 'measures.json').is_file() and not (half / 'DONE').exists()
    assert len(list((w / 'stages' / 'measures').glob('*/DONE'))) == 1  # still unfinished

    # 5. Writing results.json: the temp file is written and fsynced, the rename not done.
    killed('replace@results.json')
    assert _stage_tmp(w, 'measures') == []
    assert len(list(w.glob('.results.json.*.tmp'))) == 1

    # 6. After results.json, before the report.
    killed('after_results')
    assert (w / 'results.json').read_bytes() == (baseline / 'results.json').read_bytes()
    assert not (w / 'report.md').exists()

    # 7. The same command, not killed.
    rc, err = launch(w)
    assert rc == 0, err
    assert (w / 'results.json').read_bytes() == (baseline / 'results.json').read_bytes()
    assert (w / 'report.md').read_bytes() == (baseline / 'report.md').read_bytes()
    assert _leftovers(w) == []


def test_half_written_stages_are_cleaned_on_resume(tmp_path):
    """What a kill leaves (stage folder without DONE, stage temp folders, temp files) is removed
    when the next run takes the workdir; finished stages and SAE checkpoints are kept."""
    cache = wd.StageCache(tmp_path)
    with cache.writing('ppl', 'a' * 16) as t:
        wd.atomic_write_json(t / 'ppl.json', {'ppl': 2.0})
    half = cache.path('ppl', 'b' * 16)
    half.mkdir(parents=True)
    (half / 'ppl.json').write_text('{"ppl": 3')  # torn, and no DONE
    tmp_stage = cache.path('ppl', '.' + 'c' * 16 + '.tmp-xyz')
    tmp_stage.mkdir()
    (tmp_stage / 'ppl.json').write_text('{}')
    train = cache.root / 'sae' / ('d' * 16 + '.train')
    (train / 'checkpoints').mkdir(parents=True)
    stale = [tmp_path / '.results.json.k2j3.tmp', tmp_path / 'tables' / '.ppl.csv.x1.tmp']
    stale[1].parent.mkdir()
    for p in stale:
        p.write_text('half')
    assert not cache.done('ppl', 'b' * 16)  # ignored before any cleaning

    with wd.hold_workdir(tmp_path):
        assert not half.exists() and not tmp_stage.exists()
        assert not any(p.exists() for p in stale)
        assert cache.done('ppl', 'a' * 16) and cache.read_json('ppl', 'a' * 16, 'ppl.json') == {'ppl': 2.0}
        assert train.is_dir()  # an unfinished training resumes from its checkpoints
        # A second run in the same workdir while this one lives is refused.
        with pytest.raises(wd.WorkdirBusy, match='in use by another run'):
            with wd.hold_workdir(tmp_path):
                pass
    with wd.hold_workdir(tmp_path):  # released on exit (and by the kernel on a kill)
        pass


def test_crash_point_kills_the_nth_time(tmp_path):
    code = ('from prunesae_jax.study.workdir import crash_point\n'
            'for i in range(3):\n'
            '    crash_point("p")\n'
            '    print(i, flush=True)\n')

    def run(spec):
        env = {**os.environ, wd.CRASH_ENV: spec}
        return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    killed = run('p:2')
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ['0']
    assert run('p').stdout.split() == []
    alive = run('q')
    assert alive.returncode == 0 and alive.stdout.split() == ['0', '1', '2']


def test_crash_point_bad_spec(monkeypatch):
    monkeypatch.setenv(wd.CRASH_ENV, 'p:0')
    with pytest.raises(InputError, match='PRUNESAE_JAX_CRASH_AT'):
        wd.crash_point('p')
    monkeypatch.delenv(wd.CRASH_ENV)
    wd.crash_point('p')  # unset: a no-op
