"""Determinism: the same config in two fresh workdirs writes the same bytes.

results.json, report.md, config.json and every table and figure are byte-identical; wall-clock
times live in timings.json only. Provenance (package versions, git revision, device) is part of
results.json: both runs happen in this checkout, so it matches too.
"""

import json
import re

import pytest
from test_crash import launch  # the smoke config made smaller, run by launch/run_study.py

from prunesae_jax.study import report

# A key that would hold a wall-clock time or a timestamp.
TIMING_KEY = re.compile(
    r'(^|_)(s|sec|secs|seconds|time|times|timing|timings|timestamp|date|'
    r'wall|elapsed|duration)$'
)


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    """The same launcher command twice, in two fresh workdirs (two processes, as a user runs it)."""
    a, b = tmp_path_factory.mktemp('run_a'), tmp_path_factory.mktemp('run_b')
    for w in (a, b):
        rc, err = launch(w)
        assert rc == 0, err
    return a, b, json.loads((a / 'results.json').read_text())


def _files(workdir):
    return sorted(
        ['results.json', 'report.md', 'config.json']
        + [f'tables/{n}.csv' for n in report.TABLES]
        + [f'figures/{n}.png' for n in report.FIGURES]
    )


def _keys(obj, path=''):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f'{path}.{k}', k
            yield from _keys(v, f'{path}.{k}')
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _keys(v, f'{path}[{i}]')


def test_outputs_are_byte_identical(two_runs):
    a, b, _ = two_runs
    for name in _files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_timings_only_in_timings_json(two_runs):
    a, b, results = two_runs
    timed = [p for p, k in _keys(results) if TIMING_KEY.search(k.lower())]
    assert timed == [], timed
    for w in (a, b):
        timings = json.loads((w / 'timings.json').read_text())
        assert timings['total_s'] > 0 and timings['sae'] > 0
        md = (w / 'report.md').read_text()
        assert 'wall time' not in md and '`timings.json`' in md
    prov = results['provenance']
    assert prov['git_revision'] and prov['versions']['jax'] and prov['device']['platform']


def test_report_is_a_function_of_results_json(two_runs, tmp_path):
    """report.md, tables and figures regenerated from results.json alone are the same bytes."""
    a, _, _ = two_runs
    report.write_report(report.load_results(a / 'results.json'), tmp_path)
    for name in _files(a):
        if name not in ('results.json', 'config.json'):
            assert (tmp_path / name).read_bytes() == (a / name).read_bytes(), name
