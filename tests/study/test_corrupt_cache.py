"""A damaged cache never blocks a workdir: the damaged stage is found, named and recomputed.

Every stage's DONE marker is a manifest of the size and sha256 of its files. Here a finished
workdir gets one damaged file per stage (truncated tokens, masks and activation shard, a garbled
measures.json and SAE params, a DONE whose file is missing, a garbled DONE) and the same command
must say which file is corrupt, recompute those stages and write results.json byte-identical to
the clean run. A damaged Orbax checkpoint of a killed SAE training falls back to the previous good
checkpoint (or restarts training), never a traceback; and every file and folder the study writes
follows one mode policy (0o666 / 0o777 less the umask).
"""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
import study_runs

from prunesae_jax import sae


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
    return study_runs.baseline(tmp_path_factory)


def _stage_dir(workdir, stage, **spec):
    """The finished folder of `stage` whose spec.json has the given fields."""
    found = [
        p
        for p in sorted((workdir / 'stages' / stage).iterdir())
        if (p / 'DONE').is_file()
        and all(json.loads((p / 'spec.json').read_text()).get(k) == v for k, v in spec.items())
    ]
    assert found, f'no finished {stage} stage with {spec} in {workdir}'
    return found[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path):
    """Same size, different bytes: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xA5 for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


def test_every_file_and_folder_follows_the_mode_policy(baseline):
    umask = os.umask(0)
    os.umask(umask)
    bad = []
    for p in [baseline, *baseline.rglob('*')]:
        if p.is_symlink():
            continue
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        if stat.S_IMODE(p.stat().st_mode) != want:
            bad.append(f'{p.relative_to(baseline)}: {oct(stat.S_IMODE(p.stat().st_mode))}, expected {oct(want)}')
    assert not bad, bad


def test_damaged_stage_files_are_found_and_recomputed(baseline, tmp_path):
    w = study_runs.copy(baseline, tmp_path / 'w')
    for name in ('results.json', 'report.md', 'timings.json'):
        (w / name).unlink()
    damaged = {}  # stage -> (key, what the log line names)

    def damage(stage, spec, name, how):
        folder = _stage_dir(w, stage, **spec)
        how(folder / name)
        damaged[stage] = (folder.name, name)

    damage('tokens', {}, 'tokens.npz', _truncate)
    damage('prune', {'method': 'magnitude'}, 'masks.npz', _truncate)
    damage('acts', {}, 'store/shard_00000.npy', _truncate)
    damage('sae', {}, 'params.npz', _garble)
    damage('measures', {'method': 'magnitude'}, 'measures.json', _garble)
    damage('ppl', {}, 'ppl.json', lambda p: p.unlink())  # a DONE whose file is missing
    # A garbled DONE (the causal stage is read again because the magnitude measures are redone).
    damage('causal', {}, 'DONE', lambda p: p.write_text('{"key": "garbled'))

    rc, err = study_runs.launch(w)
    assert rc == 0, err[-3000:]
    assert 'Traceback' not in err
    for stage, (key, name) in damaged.items():
        pattern = (
            rf'stage {stage}/{key}: {re.escape(name)} is (corrupt|missing)[^\n]*; recomputing'
            if name != 'DONE'
            else rf'stage {stage}/{key}: DONE is corrupt[^\n]*; recomputing'
        )
        assert re.search(pattern, err), f'{stage}: no line matching {pattern!r} in\n{err[-3000:]}'
    assert (w / 'results.json').read_bytes() == (baseline / 'results.json').read_bytes()
    assert (w / 'report.md').read_bytes() == (baseline / 'report.md').read_bytes()
    assert study_runs.leftovers(w) == []

    # Recomputed stages are verified like the rest: the next run recomputes nothing.
    rc, err = study_runs.launch(w)
    assert rc == 0 and 'recomputing' not in err, err[-3000:]


def test_damaged_sae_checkpoint_falls_back_to_the_previous_one(baseline, tmp_path):
    w = tmp_path / 'w'
    # Killed at the 8th of 8 dense SAE steps: checkpoints of steps 3 and 6 are on disk.
    rc, err = study_runs.launch(w, crash_at='sae_step:8')
    assert rc < 0, err[-3000:]
    (train,) = (w / 'stages' / 'sae').glob('*.train')
    step6 = train / 'checkpoints' / '6'
    assert step6.is_dir() and (train / 'checkpoints' / '3').is_dir()
    _truncate(max((p for p in step6.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size))

    rc, err = study_runs.launch(w)
    assert rc == 0, err[-3000:]
    assert 'Traceback' not in err
    assert re.search(
        r'SAE checkpoint step 6 in \S+ is unusable \([^\n]*corrupt[^\n]*\); falling back '
        r'to step 3',
        err,
    ), err[-3000:]
    assert (w / 'results.json').read_bytes() == (baseline / 'results.json').read_bytes()
    assert study_runs.leftovers(w) == []


# --------------------------------------------------------------------------- the trainer alone


def _train(workdir, **kw):
    x = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    cfg = sae.SAEConfig(32, 128, k=4, dead_tokens=1024)
    t = sae.TrainConfig(
        n_steps=16,
        n_seeds=1,
        batch_size=256,
        lr=3e-3,
        warmup_steps=4,
        progress=False,
        log_every=4,
        checkpoint_every=4,
        snapshot_fracs=(0.5, 1.0),
    )
    return sae.train(cfg, t, x, workdir=str(workdir), **kw)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    return _train(tmp_path_factory.mktemp('uninterrupted'))


@pytest.mark.parametrize(
    'damage', ['newest_checkpoint', 'both_checkpoints', 'snapshot', 'snapshot_garbled', 'config', 'no_sums']
)
def test_trainer_resumes_past_any_damage_bit_identically(damage, uninterrupted, tmp_path, caplog):
    full = uninterrupted
    w = tmp_path / 'w'
    _train(w, stop_at=10)  # "killed" after step 10: checkpoints 4 and 8, snapshot of step 8
    ckpts = w / 'checkpoints'
    if damage == 'newest_checkpoint':  # garbled, same size: back to step 4
        _garble(max((ckpts / '8').rglob('*'), key=lambda p: p.stat().st_size if p.is_file() else -1))
        expect = 'SAE checkpoint step 8'
    elif damage == 'both_checkpoints':  # nothing to fall back to: training restarts
        for step in ('4', '8'):
            _truncate(max((ckpts / step).rglob('*'), key=lambda p: p.stat().st_size if p.is_file() else -1))
        expect = 'restarting training'
    elif damage == 'snapshot':  # the checkpoint of step 8 needs the snapshot of step 8
        (w / 'snapshots' / 'step_8.npy').write_bytes(b'junk')
        expect = 'step_8.npy is corrupt'
    elif damage == 'snapshot_garbled':  # same size: it would load, wrong
        _garble(w / 'snapshots' / 'step_8.npy')
        expect = 'step_8.npy is corrupt (sha256 differs)'
    elif damage == 'config':
        (w / 'config.json').write_text('{"sae": ')
        expect = 'is unreadable'
    else:  # no sums (a checkpoint from before them): orbax's own failure to read it tells
        for p in (w / 'checkpoint_sums').glob('*'):
            p.unlink()
        _truncate(max((ckpts / '8').rglob('*'), key=lambda p: p.stat().st_size if p.is_file() else -1))
        expect = 'SAE checkpoint step 8'
    if damage == 'no_sums':
        (w / 'snapshots' / 'step_8.npy').write_bytes(b'junk')  # and a snapshot that cannot load
    with caplog.at_level('WARNING'):
        resumed = _train(w)
    assert expect in caplog.text
    for k in full.params:
        np.testing.assert_array_equal(full.params[k], resumed.params[k], err_msg=k)
    assert sorted(resumed.snapshots) == sorted(full.snapshots)
    for step, w_dec in full.snapshots.items():
        np.testing.assert_array_equal(w_dec, resumed.snapshots[step])
