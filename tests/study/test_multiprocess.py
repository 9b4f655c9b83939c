"""The smoke study under jax.distributed: P local processes, each with simulated CPU devices.

Every process runs launch/run_study.py (through tests/study/crash_run.py, which counts the rows
each process captures and reads for training) with the coordinator on localhost, as on a cluster:
$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID and --config.distributed.enabled.
Checked against one process with the same number of devices:
- results.json equals it, to float tolerance (the gradient all-reduce and the calibration sums
  add in another order across processes); every non-float value is equal;
- each process captured and trained on its share of the tokens (counted, not timed);
- only process 0 wrote the workdir's shared files (one workdir, no per-process copies);
- a SIGKILL of one process mid-SAE, then a re-run of all, resumes from the SAE checkpoint and
  writes the same results.json bytes as the uninterrupted multi-process run; a checkpoint of 4
  processes also resumes in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / 'tests' / 'study' / 'crash_run.py'
FLAGS = ['--config=configs/smoke.py', '--config.sae.checkpoint_every=8']
TIMEOUT_S = 600
REL_TOL = 1e-4  # observed: 1.4e-6 at most (2 processes x 2 devices against 1 x 4)

pytestmark = pytest.mark.slow


def _env(n_devices: int, counts: Path | None, **extra) -> dict:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n_devices}', JAX_PLATFORMS='cpu')
    env.pop('PRUNESAE_TEST_CRASH_AT', None)
    if counts is not None:
        env['PRUNESAE_TEST_COUNTS'] = str(counts)
    return {**env, **extra}


def _start(
    workdir: Path, n_proc: int, n_dev: int, port: int, crash: dict[int, str] | None = None, flags: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """n_proc processes of n_dev devices each on `workdir`, coordinator on localhost:port; crash
    {process: crash point}."""
    procs = []
    for i in range(n_proc):
        env = _env(
            n_dev,
            workdir.with_name(f'{workdir.name}.counts{i}'),
            JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
            JAX_NUM_PROCESSES=str(n_proc),
            JAX_PROCESS_ID=str(i),
        )
        if crash and i in crash:
            env['PRUNESAE_TEST_CRASH_AT'] = crash[i]
        log = open(workdir.with_name(f'{workdir.name}.log{i}'), 'w')  # noqa: SIM115  (closed with the process)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(RUN), *FLAGS, f'--workdir={workdir}', '--config.distributed.enabled=True', *flags],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def _wait_all(procs: list[subprocess.Popen], workdir: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    for i, p in enumerate(procs):
        try:
            rc = p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            rc = 'timeout'
        if rc != 0:
            tails = {j: workdir.with_name(f'{workdir.name}.log{j}').read_text()[-3000:] for j in range(len(procs))}
            pytest.fail(f'process {i} ended with {rc}; logs: {tails}')


def _single(workdir: Path, n_dev: int) -> dict:
    """One process of n_dev devices: its results.json (its row counts in _counts(workdir, 1))."""
    proc = subprocess.run(
        [sys.executable, str(RUN), *FLAGS, f'--workdir={workdir}'],
        cwd=ROOT,
        env=_env(n_dev, workdir.with_name(f'{workdir.name}.counts0')),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / 'results.json').read_text())


def _differences(a, b, path: str = '') -> tuple[float, list[str]]:
    """(largest relative float difference, every other difference) between two results dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return 0.0, [f'{path}: keys {sorted(set(a) ^ set(b))}']
        parts = [_differences(a[k], b[k], f'{path}/{k}') for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 0.0, [f'{path}: lengths {len(a)} != {len(b)}']
        parts = [_differences(u, v, f'{path}[{i}]') for i, (u, v) in enumerate(zip(a, b))]
    elif isinstance(a, float) and isinstance(b, float):
        return abs(a - b) / max(abs(a), abs(b), 1e-3), []
    else:
        return 0.0, [] if a == b else [f'{path}: {a!r} != {b!r}']
    return max([0.0] + [p[0] for p in parts]), [d for p in parts for d in p[1]]


def _check_against_single(multi: dict, single: dict) -> None:
    """Equal to float tolerance, apart from the launch: the distributed switch and the device and
    process counts (in the provenance)."""
    multi, single = json.loads(json.dumps(multi)), json.loads(json.dumps(single))
    for r in (multi, single):
        r['config'].pop('distributed')
        r.pop('provenance')
    worst, other = _differences(multi, single)
    assert other == []
    assert worst <= REL_TOL


def _counts(workdir: Path, n_proc: int) -> list[dict]:
    return [json.loads(workdir.with_name(f'{workdir.name}.counts{i}').read_text()) for i in range(n_proc)]


def _check_shares(workdir: Path, n_proc: int, single: Path, results: dict) -> None:
    """Together the processes captured and read what one process did; each captured its share of
    the capture batches (to one batch per condition) and read exactly 1/P of every training batch."""
    (one,), counts = _counts(single, 1), _counts(workdir, n_proc)
    assert sum(c['captured'] for c in counts) == one['captured']
    batch_tokens = results['config']['sae']['capture_batch'] * (results['config']['sae']['seq_len'] - 1)
    for c in counts:
        assert abs(c['captured'] - one['captured'] / n_proc) <= len(results['conditions']) * batch_tokens
        assert c['trained'] * n_proc == one['trained']


def _check_one_writer(workdir: Path) -> None:
    """One workdir, no per-process copies, and every store's shards listed in process order."""
    assert not list(workdir.parent.glob(f'{workdir.name}.process*'))
    for meta in workdir.glob('stages/acts/*/store/metadata.json'):
        files = json.loads(meta.read_text())['shard_files']
        assert files == sorted(files) and {f.split('_')[1] for f in files} == {'p00000', 'p00001'}


def test_two_processes_of_two_devices_equal_one_process(tmp_path, free_port):
    single = _single(tmp_path / 'single', 4)
    multi_dir = tmp_path / 'multi'
    _wait_all(_start(multi_dir, 2, 2, free_port()), multi_dir)
    multi_bytes = (multi_dir / 'results.json').read_bytes()
    multi = json.loads(multi_bytes)
    _check_shares(multi_dir, 2, tmp_path / 'single', multi)
    _check_one_writer(multi_dir)
    assert multi['config']['distributed']['enabled'] and not single['config']['distributed']['enabled']
    _check_against_single(multi, single)

    # SIGKILL of process 1 before its 50th SAE batch (the second condition's step 18, after its
    # checkpoint at step 16); process 0 is killed once it is alone, as a scheduler would.
    killed = tmp_path / 'killed'
    procs = _start(killed, 2, 2, free_port(), crash={1: 'sae_step:50'})
    assert procs[1].wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    procs[0].kill()
    procs[0].wait(timeout=60)
    assert not (killed / 'results.json').exists()
    train_dirs = list(killed.glob('stages/sae/*.train/checkpoints/16'))
    assert len(train_dirs) == 1, 'the second condition had no checkpoint at step 16'
    _wait_all(_start(killed, 2, 2, free_port()), killed)
    assert (killed / 'results.json').read_bytes() == multi_bytes
    resumed = _counts(killed, 2)  # the re-run read only the batches after the checkpoint
    full = _counts(multi_dir, 2)
    assert all(r['trained'] < f['trained'] for r, f in zip(resumed, full))


def test_four_processes_of_one_device_equal_one_process(tmp_path, free_port):
    single = _single(tmp_path / 'single', 4)
    multi_dir = tmp_path / 'multi'
    _wait_all(_start(multi_dir, 4, 1, free_port()), multi_dir)
    multi = json.loads((multi_dir / 'results.json').read_text())
    _check_shares(multi_dir, 4, tmp_path / 'single', multi)
    assert multi['config']['distributed']['enabled'] and not single['config']['distributed']['enabled']
    _check_against_single(multi, single)

    # A checkpoint of 4 processes resumes in one process of 4 devices: it holds global arrays,
    # and the batches do not depend on the process count.
    killed = tmp_path / 'killed'
    procs = _start(killed, 4, 1, free_port(), crash={3: 'sae_step:50'})
    assert procs[3].wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    for p in procs:
        p.kill()
        p.wait(timeout=60)
    assert len(list(killed.glob('stages/sae/*.train/checkpoints/16'))) == 1
    resumed = _single(killed, 4)
    assert _counts(killed, 1)[0]['trained'] < _counts(tmp_path / 'single', 1)[0]['trained']
    _check_against_single(resumed, single)


def test_a_mesh_that_does_not_split_over_the_processes_is_refused_by_every_process(tmp_path, free_port):
    """mesh.data must be a multiple of the process count: every process exits 2 with one line,
    before the workdir is touched."""
    workdir = tmp_path / 'bad'
    flags = ('--config.sae.n_seeds=4', '--config.mesh.seed=4', '--config.mesh.data=1')
    procs = _start(workdir, 2, 2, free_port(), flags=flags)
    for i, p in enumerate(procs):
        assert p.wait(timeout=TIMEOUT_S) == 2
        lines = [
            line for line in workdir.with_name(f'bad.log{i}').read_text().splitlines() if line.startswith('run_study:')
        ]
        assert lines == [
            'run_study: mesh.data=1 does not split over the 2 processes; accepted: a multiple of 2 '
            '(each process then reads its share of every batch)'
        ]
    assert not workdir.exists()
