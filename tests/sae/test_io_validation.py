"""Pretrained-dictionary files that must load with their exact meaning, or be refused with one line.

Every case here calls the loaders directly. The references are written out in numpy from the other
tools' own inference code (SAELens TopKSAE / BatchTopKTrainingSAE with rescale_acts_by_decoder_norm,
SAELens < 6 configs, Gemma Scope's JumpReLU, sparsify's TopK).
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from prunesae_jax import sae
from prunesae_jax.errors import InputError
from prunesae_jax.sae import core

D, N = 12, 40


def _tensors(seed=0, dec_scale=True):
    r = np.random.default_rng(seed)
    t = {
        'W_enc': r.normal(size=(D, N)).astype(np.float32),
        'b_enc': r.normal(0, 0.3, N).astype(np.float32),
        'W_dec': r.normal(size=(N, D)).astype(np.float32),
        'b_dec': r.normal(0, 0.3, D).astype(np.float32),
    }
    if dec_scale:  # decoder rows of very different norms, so a dropped rescale changes which latents win
        t['W_dec'] *= r.uniform(0.05, 3.0, (N, 1)).astype(np.float32)
    return t


def _saelens(path, cfg, tensors):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, 'sae_weights.safetensors'))
    with open(os.path.join(path, 'cfg.json'), 'w') as f:
        json.dump(cfg, f)
    return str(path)


def _x(seed=5, n=64):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _topk_dense(pre, k):
    idx = np.argsort(-pre, 1)[:, :k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    return z


# --------------------------------------------------------------------------- values: dtype family, finiteness


def test_saelens_nan_weight_is_refused_naming_the_tensor(tmp_path):
    t = _tensors()
    t['W_dec'][3, 4] = np.nan
    path = _saelens(tmp_path / 's', {'architecture': 'standard', 'd_in': D, 'd_sae': N}, t)
    with pytest.raises(InputError, match=r"'W_dec'.*non-finite.*\(3, 4\)"):
        sae.load_sae(path)


def test_int32_tensor_is_refused_not_cast(tmp_path):
    t = _tensors()
    t['b_dec'] = np.arange(D, dtype=np.int32)
    path = _saelens(tmp_path / 's', {'architecture': 'standard'}, t)
    with pytest.raises(InputError, match=r"'b_dec' has dtype int32; accepted: a floating dtype"):
        sae.load_saelens(path)


def test_gemmascope_inf_threshold_and_float64_overflow_are_refused(tmp_path):
    r = np.random.default_rng(1)
    p = {
        'W_enc': r.normal(size=(D, N)),
        'W_dec': r.normal(size=(N, D)),
        'b_enc': r.normal(size=N),
        'b_dec': r.normal(size=D),
        'threshold': r.uniform(0.1, 1, N),
    }
    p['threshold'][7] = np.inf
    np.savez(tmp_path / 'params.npz', **p)
    with pytest.raises(InputError, match=r"'threshold'.*non-finite.*\(7,\)"):
        sae.load_gemmascope(str(tmp_path))
    p['threshold'][7] = 0.5
    p['W_enc'][0, 0] = 1e300  # finite in float64, inf once cast to float32
    np.savez(tmp_path / 'params.npz', **p)
    with pytest.raises(InputError, match=r"'W_enc'.*non-finite"):
        sae.load_gemmascope(str(tmp_path))


def test_shape_mismatch_and_cfg_disagreeing_with_weights(tmp_path):
    t = _tensors()
    t['b_enc'] = t['b_enc'][:-1]
    with pytest.raises(InputError, match=r'b_enc has shape \(39,\); expected \[40\]'):
        sae.load_saelens(_saelens(tmp_path / 'a', {'architecture': 'standard'}, t))
    with pytest.raises(InputError, match=r'd_sae=64 but the weights have 40'):
        sae.load_saelens(_saelens(tmp_path / 'b', {'architecture': 'standard', 'd_sae': 64}, _tensors()))


# --------------------------------------------------------------------------- SAELens meanings


def test_saelens_topk_rescale_acts_by_decoder_norm_is_folded_exactly(tmp_path):
    t = _tensors()
    cfg = {
        'architecture': 'topk',
        'k': 5,
        'd_in': D,
        'd_sae': N,
        'apply_b_dec_to_input': True,
        'rescale_acts_by_decoder_norm': True,
        'normalize_activations': 'none',
        'metadata': {'sae_lens_version': '6.14.0'},
    }
    c, p = sae.load_sae(_saelens(tmp_path / 's', cfg, t))
    assert c.architecture == 'topk' and c.k == 5
    x = _x()
    # SAELens TopKSAE: hidden_pre * |W_dec| -> TopK(relu) ; decode(acts / |W_dec|)
    norms = np.linalg.norm(t['W_dec'], axis=1)
    z_ref = _topk_dense(((x - t['b_dec']) @ t['W_enc'] + t['b_enc']) * norms, 5)
    np.testing.assert_allclose(np.asarray(core.encode(c, p, x)), z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(core.reconstruct(c, p, x)), (z_ref / norms) @ t['W_dec'] + t['b_dec'], rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(np.linalg.norm(p['W_dec'], axis=1), 1.0, atol=1e-5)


def test_saelens_batchtopk_training_checkpoint_keeps_its_threshold(tmp_path):
    t = _tensors(2)
    t['topk_threshold'] = np.array(1.7, np.float64)  # SAELens keeps the EMA as a float64 scalar buffer
    cfg = {
        'architecture': 'batchtopk',
        'k': 6.0,
        'd_in': D,
        'd_sae': N,
        'rescale_acts_by_decoder_norm': True,
        'topk_threshold_lr': 0.01,
        'metadata': {'sae_lens_version': '6.20.1'},
    }
    c, p = sae.load_sae(_saelens(tmp_path / 'b', cfg, t))
    assert c.architecture == 'batchtopk' and c.k == 6
    x = _x(7)
    # saved for inference SAELens folds the norms and uses JumpReLU with threshold = topk_threshold
    norms = np.linalg.norm(t['W_dec'], axis=1)
    pre = ((x - t['b_dec']) @ t['W_enc'] + t['b_enc']) * norms
    z_ref = np.maximum(pre, 0) * (pre > 1.7)
    assert 0 < (z_ref > 0).mean() < 0.5  # the threshold really cuts
    np.testing.assert_allclose(np.asarray(core.encode(c, p, x)), z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(core.reconstruct(c, p, x)), (z_ref / norms) @ t['W_dec'] + t['b_dec'], rtol=1e-4, atol=1e-3
    )
    del t['topk_threshold']
    with pytest.raises(InputError, match='without topk_threshold'):
        sae.load_sae(_saelens(tmp_path / 'c', cfg, t))


def test_pre_6_saelens_topk_config_reads_k_from_activation_fn_kwargs(tmp_path):
    t = _tensors(3, dec_scale=False)
    cfg = {
        'architecture': 'standard',
        'activation_fn_str': 'topk',
        'activation_fn_kwargs': {'k': 7},
        'd_in': D,
        'd_sae': N,
        'apply_b_dec_to_input': False,
        'normalize_activations': False,
        'sae_lens_training_version': '3.22.0',
        'hook_point': 'blocks.3.hook_resid_post',
    }
    c, p = sae.load_sae(_saelens(tmp_path / 'old', cfg, t))
    assert (c.architecture, c.k, c.apply_b_dec_to_input) == ('topk', 7, False)
    x = _x(8)
    np.testing.assert_allclose(
        np.asarray(core.encode(c, p, x)), _topk_dense(x @ t['W_enc'] + t['b_enc'], 7), rtol=1e-4, atol=1e-4
    )


def test_topk_without_k_is_refused_not_defaulted(tmp_path):
    for name, cfg in (
        ('v6', {'architecture': 'topk', 'metadata': {'sae_lens_version': '6.5.0'}}),
        ('old', {'architecture': 'standard', 'activation_fn_str': 'topk'}),
    ):
        with pytest.raises(InputError, match='TopK SAE without k'):
            sae.load_sae(_saelens(tmp_path / name, cfg, _tensors()))
    with pytest.raises(InputError, match="activation_fn_str='tanh-relu'"):
        sae.load_sae(_saelens(tmp_path / 'tanh', {'activation_fn_str': 'tanh-relu'}, _tensors()))


def test_saelens_jumprelu_negative_thresholds_keep_relu_semantics(tmp_path):
    t = _tensors(4)
    t['threshold'] = np.random.default_rng(4).uniform(-1, 1, N).astype(np.float32)
    c, p = sae.load_sae(_saelens(tmp_path / 'j', {'architecture': 'jumprelu', 'd_in': D, 'd_sae': N}, t))
    x = _x(9)
    pre = (x - t['b_dec']) @ t['W_enc'] + t['b_enc']
    np.testing.assert_allclose(
        np.asarray(core.encode(c, p, x)), np.maximum(pre, 0) * (pre > t['threshold']), rtol=1e-4, atol=1e-4
    )


def test_unknown_saelens_tensor_or_architecture_is_refused(tmp_path):
    t = _tensors()
    t['W_skip'] = np.eye(D, dtype=np.float32)
    with pytest.raises(InputError, match=r"\['W_skip'\] this loader has no meaning for"):
        sae.load_sae(_saelens(tmp_path / 'skip', {'architecture': 'standard'}, t))
    with pytest.raises(InputError, match="architecture 'gated'"):
        sae.load_sae(_saelens(tmp_path / 'g', {'architecture': 'gated'}, _tensors()))


# --------------------------------------------------------------------------- sparsify / Gemma Scope refusals


def _sparsify(path, cfg, extra=None):
    os.makedirs(path, exist_ok=True)
    t = _tensors()
    st = {
        'encoder.weight': np.ascontiguousarray(t['W_enc'].T),
        'encoder.bias': t['b_enc'],
        'W_dec': t['W_dec'],
        'b_dec': t['b_dec'],
        **(extra or {}),
    }
    save_file(st, os.path.join(path, 'sae.safetensors'))
    with open(os.path.join(path, 'cfg.json'), 'w') as f:
        json.dump({'activation': 'topk', 'k': 4, 'd_in': D, **cfg}, f)
    return str(path)


@pytest.mark.parametrize(
    'cfg,match',
    [
        ({'activation': 'groupmax'}, "activation='groupmax'"),
        ({'transcode': True}, 'transcode=True'),
        ({'skip_connection': True}, 'skip_connection=True'),
    ],
)
def test_sparsify_groupmax_and_transcoders_are_refused(tmp_path, cfg, match):
    with pytest.raises(InputError, match=match):
        sae.load_sae(_sparsify(tmp_path / 's', cfg))


def test_sparsify_w_skip_without_flag_is_refused(tmp_path):
    with pytest.raises(InputError, match='W_skip'):
        sae.load_sae(_sparsify(tmp_path / 's', {}, {'W_skip': np.eye(D, dtype=np.float32)}))


def test_gemmascope_skip_transcoder_is_refused(tmp_path):
    t = {k.lower(): v for k, v in _tensors().items()}
    t['threshold'] = np.full(N, 0.1, np.float32)
    t['affine_skip_connection'] = np.eye(D, dtype=np.float32)
    save_file(t, str(tmp_path / 'params.safetensors'))
    with pytest.raises(InputError, match='skip transcoder'):
        sae.load_sae(str(tmp_path))


# --------------------------------------------------------------------------- damaged files


def _truncate(path, keep=0.6):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[: int(len(data) * keep)])


def test_truncated_or_malformed_files_give_input_error(tmp_path):
    # Gemma Scope v2 safetensors and v1 npz, truncated
    t = {k.lower(): v for k, v in _tensors().items()}
    t['threshold'] = np.full(N, 0.1, np.float32)
    (tmp_path / 'g2').mkdir()
    save_file(t, str(tmp_path / 'g2' / 'params.safetensors'))
    _truncate(tmp_path / 'g2' / 'params.safetensors')
    (tmp_path / 'g1').mkdir()
    np.savez(tmp_path / 'g1' / 'params.npz', **t)
    _truncate(tmp_path / 'g1' / 'params.npz')
    for d in ('g2', 'g1'):
        with pytest.raises(InputError, match='corrupt or unreadable'):
            sae.load_sae(str(tmp_path / d))
    # sparsify: invalid JSON, a cfg that is a list, a missing tensor, a truncated weight file
    s = _sparsify(tmp_path / 'sp', {})
    (tmp_path / 'sp' / 'cfg.json').write_text('{"k": 4,')
    with pytest.raises(InputError, match='not valid JSON'):
        sae.load_sae(s)
    (tmp_path / 'sp' / 'cfg.json').write_text('[4]')
    with pytest.raises(InputError, match='holds a JSON list'):
        sae.load_sae(s)
    (tmp_path / 'sp' / 'cfg.json').write_text('{"k": 4}')
    tt = _tensors()
    save_file(
        {'encoder.weight': np.ascontiguousarray(tt['W_enc'].T), 'W_dec': tt['W_dec'], 'b_dec': tt['b_dec']},
        str(tmp_path / 'sp' / 'sae.safetensors'),
    )
    with pytest.raises(InputError, match=r"lacks tensor\(s\) \['encoder.bias'\]"):
        sae.load_sae(s)
    _truncate(tmp_path / 'sp' / 'sae.safetensors')
    with pytest.raises(InputError, match='corrupt or unreadable'):
        sae.load_sae(s)
    # SAELens: truncated weights, then a folder whose cfg.json was never written
    p = _saelens(tmp_path / 'sl', {'architecture': 'standard'}, _tensors())
    _truncate(tmp_path / 'sl' / 'sae_weights.safetensors')
    with pytest.raises(InputError, match='corrupt or unreadable'):
        sae.load_saelens(p)
    os.remove(tmp_path / 'sl' / 'cfg.json')
    with pytest.raises(InputError, match='does not exist'):
        sae.load_saelens(p)
