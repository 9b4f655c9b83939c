"""Crash safety: the launcher killed with SIGKILL at chosen places resumes to the same bytes.

One chain of runs in one workdir: each run is killed (a real SIGKILL, no cleanup) at a different
place, during capture, SAE training (after a checkpoint, so training resumes from it), measures, a
stage commit (files written, DONE not yet), the atomic write of results.json (temp file written,
not renamed) and after results.json but before the report. Every run resumes what the previous one
left; the last one finishes and must write results.json and report.md byte-identical to an
uninterrupted run of the same command.

The kills come from the test side only: study_runs.launch(workdir, '<point>[:<n>]') runs the
launcher through tests/study/crash_run.py, which patches public library functions (StoreWriter.append,
ActivationStore.batch, StageCache.writing, workdir.manifest, io.py's os.replace, report.write_report)
to kill the process the n-th time the point is reached; its docstring lists the points. The library
itself has no crash points.
"""

import os
import signal
import subprocess
import sys

import crash_run  # tests/study/crash_run.py: the hook
import pytest
import study_runs  # tests/study/study_runs.py: shared by the launcher tests

from prunesae_jax import io as io_lib
from prunesae_jax.study import workdir as wd

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
    assert len(ckpts) == 1, study_runs.leftovers(w)
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
    assert study_runs.leftovers(w) == []


def test_half_written_stages_are_cleaned_on_resume(tmp_path):
    """What a kill leaves (stage folder without DONE, stage temp folders, temp files) is removed
    when the next run takes the workdir; finished stages and SAE checkpoints are kept."""
    cache = wd.StageCache(tmp_path)
    with cache.writing('ppl', 'a' * 16) as t:
        io_lib.atomic_write_json(t / 'ppl.json', {'ppl': 2.0})
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


# --------------------------------------------------------------------------- the hook itself


def _killed_at(spec: str, code: str) -> subprocess.CompletedProcess:
    """Runs `code` after crash_run.install(CrashAt(spec)) in a fresh interpreter."""
    prelude = f'import crash_run\ncrash_run.install(crash_run.CrashAt({spec!r}))\n'
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join([os.path.dirname(crash_run.__file__), os.environ.get('PYTHONPATH', '')]),
    }
    return subprocess.run(
        [sys.executable, '-c', prelude + code], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_hook_kills_the_nth_time():
    code = (
        'from prunesae_jax.study import report\n'
        'for i in range(3):\n'
        '    try:\n'
        '        report.write_report(None, None)\n'
        '    except Exception:\n'
        '        pass\n'
        '    print(i, flush=True)\n'
    )
    killed = _killed_at('after_results:2', code)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ['0'], killed.stderr
    assert _killed_at('after_results', code).stdout.split() == []
    alive = _killed_at('capture', code)
    assert alive.returncode == 0 and alive.stdout.split() == ['0', '1', '2'], alive.stderr


def test_the_hook_stops_between_the_temp_file_and_the_rename(tmp_path):
    """'replace@<name>': the fsynced temp file is there, the old file is untouched."""
    (tmp_path / 'r.json').write_text('old')
    code = (
        'from prunesae_jax import io\n'
        f'io.atomic_write_json({str(tmp_path / "other.json")!r}, 1)\n'
        f'io.atomic_write_json({str(tmp_path / "r.json")!r}, {{"v": 2}})\n'
    )
    killed = _killed_at('replace@r.json', code)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / 'r.json').read_text() == 'old'
    (tmp,) = tmp_path.glob('.r.json.*.tmp')
    assert tmp.read_text() == '{\n  "v": 2\n}\n'
    assert (tmp_path / 'other.json').read_text() == '1\n'


def test_the_hook_stops_a_stage_commit_before_done(tmp_path):
    """'commit@<stage>': the stage's files are in its temp folder, DONE is not; 'measures': nothing
    of the stage is written."""
    code = (
        'import numpy as np\n'
        'from prunesae_jax import io\n'
        'from prunesae_jax.study import workdir\n'
        f'cache = workdir.StageCache({str(tmp_path)!r})\n'
        'for stage in ("tokens", "measures"):\n'
        '    with cache.writing(stage, "k" * 16) as tmp:\n'
        '        io.atomic_write_npz(tmp / "x.npz", {"x": np.arange(3)})\n'
    )
    killed = _killed_at('commit@measures', code)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / 'stages' / 'tokens' / ('k' * 16) / 'DONE').is_file()
    (half,) = (tmp_path / 'stages' / 'measures').glob('.*.tmp-*')
    assert sorted(p.name for p in half.iterdir()) == ['x.npz']

    killed = _killed_at('measures', code.replace(str(tmp_path), str(tmp_path / 'b')))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / 'b' / 'stages' / 'tokens' / ('k' * 16) / 'DONE').is_file()
    assert not (tmp_path / 'b' / 'stages' / 'measures').exists()


def test_the_hook_reaches_the_activation_store():
    """'capture' after StoreWriter.append, 'sae_step' before ActivationStore.batch."""
    code = (
        'import tempfile\n'
        'import numpy as np\n'
        'from prunesae_jax.sae.store import ActivationStore\n'
        'path = tempfile.mkdtemp() + "/store"\n'
        'w = ActivationStore.create(path, 4, "float32", {})\n'
        'for i in range(2):\n'
        '    w.append(np.ones((8, 4), np.float32))\n'
        '    print("appended", i, flush=True)\n'
        'w.close()\n'
        'store = ActivationStore(path)\n'
        'for step in range(3):\n'
        '    print("batch", step, flush=True)\n'
        '    store.batch(4, 0, step)\n'
    )
    killed = _killed_at('capture:2', code)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ['appended', '0'], killed.stderr
    killed = _killed_at('sae_step:2', code)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert killed.stdout.split()[-4:] == ['batch', '0', 'batch', '1']


@pytest.mark.parametrize('spec', ['capture:0', 'nowhere', 'commit@', 'replace'])
def test_the_hook_rejects_a_bad_spec(spec):
    with pytest.raises(ValueError, match=crash_run.CRASH_ENV):
        crash_run.CrashAt(spec)
