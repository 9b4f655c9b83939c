import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from prunesae_jax import sae
from prunesae_jax.sae import core


def _params(cfg, seed=0, s=2):
    p = core.init(jax.random.split(jax.random.key(seed), s), cfg)
    r = np.random.default_rng(seed)
    p = {k: np.asarray(v) for k, v in p.items()}
    p['b_enc'] = r.normal(0, 0.1, p['b_enc'].shape).astype(np.float32)
    p['b_dec'] = r.normal(0, 0.1, p['b_dec'].shape).astype(np.float32)
    if 'threshold' in p:
        p['threshold'] = r.uniform(0.01, 0.2, p['threshold'].shape).astype(np.float32)
    return p


@pytest.mark.parametrize('arch', ['topk', 'relu', 'jumprelu'])
def test_saelens_roundtrip_exact(tmp_path, arch):
    cfg = sae.SAEConfig(16, 48, architecture=arch, k=5)
    p = _params(cfg)
    path = sae.export_saelens(
        cfg, p, str(tmp_path / 'sae'), seed=1, hook_name='blocks.3.hook_resid_post', model_name='google/gemma-3-1b-pt'
    )
    c = json.load(open(tmp_path / 'sae' / 'cfg.json'))
    assert c['d_in'] == 16 and c['d_sae'] == 48 and c['metadata']['hook_name'] == 'blocks.3.hook_resid_post'
    assert c['architecture'] == {'topk': 'topk', 'relu': 'standard', 'jumprelu': 'jumprelu'}[arch]
    t = load_file(str(tmp_path / 'sae' / 'sae_weights.safetensors'))
    assert t['W_enc'].shape == (16, 48) and t['W_dec'].shape == (48, 16)
    cfg2, p2 = sae.load_sae(path)
    assert (cfg2.d_in, cfg2.n_latents, cfg2.architecture, cfg2.k) == (16, 48, arch, 5 if arch == 'topk' else 32)
    assert set(p2) == set(p)
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k][1])


def test_batchtopk_exports_as_jumprelu_with_same_codes(tmp_path):
    cfg = sae.SAEConfig(16, 48, architecture='batchtopk', k=5)
    p = _params(cfg)
    p['threshold'][:] = 0.05
    cfg2, p2 = sae.load_sae(sae.export_saelens(cfg, p, str(tmp_path / 'b'), seed=0))
    assert cfg2.architecture == 'jumprelu'
    x = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)
    one = {k: v[0] for k, v in p.items()}
    np.testing.assert_allclose(core.encode(cfg2, p2, x), core.encode(cfg, one, x), atol=1e-6)


def test_export_folds_normalisation_scale(tmp_path):
    cfg = sae.SAEConfig(16, 48, k=5)
    p = _params(cfg)
    cfg2, p2 = sae.load_sae(sae.export_saelens(cfg, p, str(tmp_path / 'n'), seed=0, scale=3.0))
    x = np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32)
    one = {k: v[0] for k, v in p.items()}
    np.testing.assert_allclose(
        core.reconstruct(cfg2, p2, x), np.asarray(core.reconstruct(cfg, one, 3.0 * x)) / 3.0, atol=1e-5
    )


def _gemmascope_ref(p, x):
    pre = x @ p['W_enc'] + p['b_enc']  # Gemma Scope does not subtract b_dec
    z = (pre > p['threshold']) * np.maximum(pre, 0)
    return z, z @ p['W_dec'] + p['b_dec']


@pytest.mark.parametrize('version', [1, 2])
def test_gemmascope_import_and_encode(tmp_path, version):
    r = np.random.default_rng(3)
    p = {
        'W_enc': r.normal(size=(16, 40)).astype(np.float32),
        'W_dec': r.normal(size=(40, 16)).astype(np.float32),
        'b_enc': r.normal(size=40).astype(np.float32),
        'b_dec': r.normal(size=16).astype(np.float32),
        'threshold': r.uniform(0.1, 1.0, 40).astype(np.float32),
    }
    if version == 1:
        np.savez(tmp_path / 'params.npz', **p)
    else:
        save_file({k.lower(): v for k, v in p.items()}, str(tmp_path / 'params.safetensors'))
    cfg, q = sae.load_sae(str(tmp_path))
    assert cfg.architecture == 'jumprelu' and not cfg.apply_b_dec_to_input and cfg.n_latents == 40
    for k in p:
        np.testing.assert_array_equal(q[k], p[k])
    x = r.normal(size=(30, 16)).astype(np.float32)
    z_ref, xh_ref = _gemmascope_ref(p, x)
    np.testing.assert_allclose(core.encode(cfg, q, x), z_ref, atol=1e-4)
    np.testing.assert_allclose(core.reconstruct(cfg, q, x), xh_ref, atol=1e-3)
    ev = core.evaluate(cfg, q, x)
    assert float(ev['l0']) == pytest.approx((z_ref != 0).sum(-1).mean())


def test_sparsify_import(tmp_path):
    r = np.random.default_rng(4)
    enc = r.normal(size=(40, 16)).astype(np.float32)
    t = {
        'encoder.weight': enc,
        'encoder.bias': r.normal(size=40).astype(np.float32),
        'W_dec': r.normal(size=(40, 16)).astype(np.float32),
        'b_dec': r.normal(size=16).astype(np.float32),
    }
    save_file(t, str(tmp_path / 'sae.safetensors'))
    json.dump(
        {
            'activation': 'topk',
            'k': 6,
            'num_latents': 40,
            'expansion_factor': 32,
            'normalize_decoder': True,
            'multi_topk': False,
            'skip_connection': False,
            'd_in': 16,
        },
        open(tmp_path / 'cfg.json', 'w'),
    )
    cfg, p = sae.load_sae(str(tmp_path))
    assert cfg.architecture == 'topk' and cfg.k == 6
    np.testing.assert_array_equal(p['W_enc'], enc.T)
    x = r.normal(size=(20, 16)).astype(np.float32)
    pre = np.maximum((x - t['b_dec']) @ enc.T + t['encoder.bias'], 0)  # sparsify: relu, then top-k
    idx = np.argsort(-pre, 1)[:, :6]
    z = np.zeros_like(pre)
    np.put_along_axis(z, idx, np.take_along_axis(pre, idx, 1), 1)
    np.testing.assert_allclose(core.encode(cfg, p, x), z, atol=1e-4)
    np.testing.assert_allclose(core.reconstruct(cfg, p, x), z @ t['W_dec'] + t['b_dec'], atol=1e-3)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        sae.load_sae(str(tmp_path / 'missing'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no SAE files'):
        sae.load_sae(str(tmp_path / 'empty'))
    cfg = sae.SAEConfig(16, 48, k=5)
    with pytest.raises(ValueError, match='seed=7'):
        sae.export_saelens(cfg, _params(cfg), str(tmp_path / 'x'), seed=7)
    with pytest.raises(ValueError, match='d_in=8'):
        cfg2, p2 = sae.load_sae(sae.export_saelens(cfg, _params(cfg), str(tmp_path / 'y')))
        core.encode(cfg2, p2, jnp.zeros((2, 8)))
