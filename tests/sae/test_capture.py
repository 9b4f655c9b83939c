import json

import jax
import numpy as np
import pytest

from prunesae_jax import models, sae, testing
from prunesae_jax.errors import NonFiniteError


def test_capture_store_matches_resid_post_and_trains(tmp_path):
    cfg = testing.tiny_config()
    params = models.init_params(cfg, 0)
    toks = np.random.default_rng(0).integers(1, cfg.vocab_size, (6, 12)).astype(np.int32)
    am = np.ones_like(toks)
    am[4, 9:] = 0  # padding is never stored
    st = sae.capture_activations(
        cfg, params, toks, 1, str(tmp_path / 's'), attention_masks=am, model_id='tiny', dtype='float32', batch_size=4
    )
    assert len(st) == 6 * 11 - 3 and st.metadata['layer'] == 1 and st.metadata['model_id'] == 'tiny'
    ref = np.asarray(models.resid_post(cfg, params, toks, am, layers=(1,))[1])
    keep = am.astype(bool)
    keep[:, 0] = False
    np.testing.assert_allclose(st.read(0, len(st)), ref[keep], atol=1e-5)
    d = cfg.hidden_size
    r = sae.capture_and_train(
        cfg,
        params,
        toks,
        1,
        sae.SAEConfig(d, 2 * d, k=4),
        sae.TrainConfig(n_steps=3, batch_size=32, progress=False, log_every=0),
    )
    assert r.params['W_dec'].shape == (1, 2 * d, d) and np.isfinite(r.final['fvu']).all()


def test_capture_writes_float16_resid_post_without_bos_in_row_order(tmp_path):
    # the store's bytes: resid_post of every sequence, BOS dropped, row after row, cast to float16,
    # in shards of shard_tokens rows; metadata.json with sorted keys and indent 1
    cfg = testing.tiny_config()
    params = models.init_params(cfg, 0)
    toks = np.random.default_rng(1).integers(1, cfg.vocab_size, (5, 9)).astype(np.int32)
    calls = []
    st = sae.capture_activations(
        cfg,
        params,
        toks,
        1,
        str(tmp_path / 's'),
        model_id='m',
        mask_id='k',
        batch_size=2,
        shard_tokens=16,
        on_batch=lambda i, n: calls.append((i, n)),
    )
    assert calls == [(0, 3), (1, 3), (2, 3)]
    h = np.asarray(models.resid_post(cfg, params, toks, layers=(1,))[1], np.float32)
    want = h[:, 1:].reshape(-1, h.shape[-1]).astype(np.float16)
    shards = [np.load(tmp_path / 's' / f'shard_{i:05d}.npy') for i in range(3)]
    assert [len(s) for s in shards] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate(shards), want)
    meta = dict(
        d_in=cfg.hidden_size,
        dtype='float16',
        exclude_bos=True,
        layer=1,
        mask_id='k',
        model_id='m',
        n_sequences=5,
        n_tokens=40,
        seq_len=9,
        shard_rows=[16, 16, 8],
        mean_norm=float(np.linalg.norm(h[:, 1:].reshape(-1, h.shape[-1]), axis=1).sum()) / 40,
    )
    text = (tmp_path / 's' / 'metadata.json').read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True)
    got = json.loads(text)
    assert got.pop('mean_norm') == pytest.approx(meta.pop('mean_norm'), rel=1e-6) and got == meta
    assert len(st) == 40


def test_capture_names_the_first_non_finite_batch(tmp_path):
    cfg = testing.tiny_config()
    params = models.init_params(cfg, 0)
    bad = {**params, 'embed': params['embed'].at[50].set(np.nan)}
    toks = np.full((6, 8), 9, np.int32)
    toks[4, 5] = 50  # only sequence 4, in the third batch of two
    with pytest.raises(NonFiniteError) as err:
        sae.capture_activations(cfg, bad, toks, 1, str(tmp_path / 's'), batch_size=2)
    e = err.value
    assert (e.what, e.stage, e.layer, e.step) == ('resid_post activations', 'capture', 1, 2)
    assert e.detail == 'capture batch of 2 sequences'


def test_capture_with_masks_changes_activations():
    cfg = testing.tiny_config()
    params = models.init_params(cfg, 0)
    masks = jax.tree.map(lambda a: None, params)
    masks['layers'] = [
        dict({k: None for k in lp}, **{k: np.zeros(lp[k].shape, bool) for k in ('down_proj',)})
        for lp in params['layers']
    ]
    toks = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 8)).astype(np.int32)
    dense = sae.capture_activations(cfg, params, toks, 0, None)
    pruned = sae.capture_activations(cfg, params, toks, 0, None, masks=masks, mask_id='no_mlp')
    assert pruned.metadata['mask_id'] == 'no_mlp' and dense.metadata['mask_id'] == 'dense'
    assert not np.allclose(dense.read(0, len(dense)), pruned.read(0, len(pruned)))
