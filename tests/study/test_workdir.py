"""Atomic writes, stable stage keys, the stage cache's commit-by-rename, provenance."""

import json
import os

import ml_collections
import numpy as np
import pytest

from prunesae_jax.study import workdir as wd


def test_atomic_writes_round_trip(tmp_path):
    wd.atomic_write_json(tmp_path / 'a' / 'x.json', {'b': (1, 2.5), 'a': np.float32(0.5),
                                                     'n': float('nan'), 'arr': np.arange(3)})
    assert json.loads((tmp_path / 'a' / 'x.json').read_text()) == {
        'a': 0.5, 'arr': [0, 1, 2], 'b': [1, 2.5], 'n': None}
    wd.atomic_write_npz(tmp_path / 'y.npz', {'w': np.ones((2, 3), np.float32)})
    with np.load(tmp_path / 'y.npz') as z:
        np.testing.assert_array_equal(z['w'], np.ones((2, 3)))
    wd.atomic_write_text(tmp_path / 'y.npz', 'replaced')
    assert (tmp_path / 'y.npz').read_text() == 'replaced'
    assert sorted(os.listdir(tmp_path)) == ['a', 'y.npz']  # no temp files left behind


def test_failed_write_leaves_old_file(tmp_path):
    p = tmp_path / 'r.json'
    wd.atomic_write_json(p, {'v': 1})
    with pytest.raises(ValueError, match='cannot write'):
        wd.atomic_write_json(p, {'v': object()})
    assert json.loads(p.read_text()) == {'v': 1}
    assert os.listdir(tmp_path) == ['r.json']


def test_stable_hash_is_canonical():
    a = ml_collections.ConfigDict({'x': 1, 'y': (0.3, 0.5), 'z': {'b': 'w', 'a': 2}})
    b = {'z': {'a': 2, 'b': 'w'}, 'y': [0.3, 0.5], 'x': 1}
    assert wd.stable_hash(a) == wd.stable_hash(b)
    assert wd.stable_hash(a) != wd.stable_hash({**b, 'x': 2})
    assert len(wd.stable_hash(b)) == 16
    k1 = wd.StageCache.key('ppl', {'w': 1}, upstream=['abc'])
    assert k1 == wd.StageCache.key('ppl', {'w': 1}, upstream=['abc'])
    assert k1 != wd.StageCache.key('ppl', {'w': 1}, upstream=['abd'])
    assert k1 != wd.StageCache.key('acts', {'w': 1}, upstream=['abc'])


def test_stage_cache_commit_and_crash(tmp_path):
    cache = wd.StageCache(tmp_path)
    key = cache.key('sae', {'k': 8})
    assert not cache.done('sae', key)
    with pytest.raises(RuntimeError):
        with cache.writing('sae', key) as tmp:
            wd.atomic_write_json(tmp / 'half.json', {'v': 1})
            raise RuntimeError('killed')
    assert not cache.done('sae', key)
    assert os.listdir(tmp_path / 'stages' / 'sae') == []  # the partial stage is gone
    # A stale temp folder of a kill -9 is removed by the next attempt.
    (tmp_path / 'stages' / 'sae' / f'.{key}.tmp-dead').mkdir()
    with cache.writing('sae', key, spec={'k': 8}) as tmp:
        wd.atomic_write_npz(tmp / 'p.npz', {'W': np.arange(4.0)})
    assert cache.done('sae', key)
    assert os.listdir(tmp_path / 'stages' / 'sae') == [key]
    np.testing.assert_array_equal(cache.read_npz('sae', key, 'p.npz')['W'], np.arange(4.0))
    assert cache.read_json('sae', key, 'spec.json') == {'k': 8}


def test_provenance_fields():
    prov = wd.provenance(ml_collections.ConfigDict({'model': 'm'}))
    assert prov['config'] == {'model': 'm'}
    for pkg in ('jax', 'flax', 'optax', 'orbax-checkpoint', 'transformers', 'numpy', 'scipy',
                'prunesae_jax'):
        assert pkg in prov['versions']
    assert prov['versions']['numpy'] == np.__version__
    assert prov['device']['platform'] == 'cpu'
    assert isinstance(prov['git_revision'], str) and prov['git_revision']
    json.dumps(prov)
