import json
import os

import numpy as np
import pytest

from prunesae_jax import sae


def _x(n=3000, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize('dtype,tol', [('float16', 2e-3), ('bfloat16', 1e-2), ('float32', 0.0)])
def test_store_roundtrip_and_metadata(tmp_path, dtype, tol):
    x = _x()
    w = sae.ActivationStore.create(
        str(tmp_path / 's'), 16, dtype, {'layer': 3, 'model_id': 'm', 'mask_id': 'wanda50'}, shard_tokens=1000
    )
    for i in range(0, 3000, 700):
        w.append(x[i : i + 700])
    st = w.close()
    assert len(st) == 3000 and st.d_in == 16
    assert sorted(f for f in os.listdir(tmp_path / 's') if f.startswith('shard')) == [
        'shard_00000.npy',
        'shard_00001.npy',
        'shard_00002.npy',
    ]
    meta = json.load(open(tmp_path / 's' / 'metadata.json'))
    assert meta['n_tokens'] == 3000 and meta['layer'] == 3 and meta['mask_id'] == 'wanda50' and meta['dtype'] == dtype
    got = sae.ActivationStore(str(tmp_path / 's')).read(0, 3000)
    np.testing.assert_allclose(got, x, rtol=tol, atol=tol)


def test_shuffled_batches_are_seeded_and_cover_an_epoch(tmp_path):
    x = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    w = sae.ActivationStore.create(str(tmp_path / 's'), 4, 'float32', shard_tokens=300)
    w.append(x)
    st = w.close()
    b1 = [st.batch(100, 7, i)[:, 0] for i in range(10)]
    b2 = [b for _, b in zip(range(10), st.batches(100, seed=7))]
    np.testing.assert_array_equal(np.concatenate(b1), np.concatenate([b[:, 0] for b in b2]))
    assert sorted(np.concatenate(b1) / 4) == list(range(1000))  # one epoch = every row once
    assert not np.array_equal(b1[0], st.batch(100, 8, 0)[:, 0])  # another seed, another order
    np.testing.assert_array_equal(st.batch(100, 7, 3), next(st.batches(100, seed=7, start_step=3)))
    np.testing.assert_array_equal(sae.ArrayStore(x).batch(100, 7, 3), st.batch(100, 7, 3))  # same stream in memory


def test_store_errors(tmp_path):
    w = sae.ActivationStore.create(str(tmp_path / 's'), 4)
    bad = np.ones((5, 4), np.float32)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match='non-finite activation'):
        w.append(bad)
    with pytest.raises(ValueError, match='d_in=4'):
        w.append(np.ones((5, 3)))
    w.append(np.ones((5, 4)))
    w.close()
    with pytest.raises(ValueError, match='already exists'):
        sae.ActivationStore.create(str(tmp_path / 's'), 4)
    with pytest.raises(FileNotFoundError):
        sae.ActivationStore(str(tmp_path / 'nope'))
    with pytest.raises(ValueError, match="dtype='int8'"):
        sae.ActivationStore.create(str(tmp_path / 't'), 4, 'int8')


def test_train_from_disk_store_matches_in_memory(tmp_path):
    x = _x(2048, 16)
    w = sae.ActivationStore.create(str(tmp_path / 's'), 16, 'float32', shard_tokens=500)
    w.append(x)
    st = w.close()
    cfg = sae.SAEConfig(16, 64, k=4)
    t = sae.TrainConfig(n_steps=6, batch_size=256, progress=False, log_every=0)
    a, b = sae.train(cfg, t, st), sae.train(cfg, t, x)
    np.testing.assert_array_equal(a.params['W_dec'], b.params['W_dec'])
