"""Mask pytrees: structure, apply inside jit, reports, files, validation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.models import PRUNABLE, init_params
from prunesae_jax.pruning.masks import (
    apply_masks,
    load_masks,
    make_masks,
    masks_from_list,
    masks_from_params,
    prunable_items,
    save_masks,
    sparsity_report,
    validate_masks,
)
from prunesae_jax.testing import tiny_config


@pytest.fixture(scope='module')
def model():
    cfg = tiny_config('gemma3_text', tie_word_embeddings=False)
    return cfg, init_params(cfg, 0)


def _random_masks(params, seed=0, p=0.3):
    rng = np.random.default_rng(seed)
    leaves = [rng.random(w.shape) >= p for _, _, w in prunable_items(params)]
    return masks_from_list(params, leaves)


def test_structure_matches_params_with_none_elsewhere(model):
    cfg, params = model
    masks = make_masks(params)
    assert set(masks) == set(params) == {'embed', 'final_norm', 'lm_head', 'layers'}
    assert masks['embed'] is None and masks['final_norm'] is None and masks['lm_head'] is None
    for ml, pl in zip(masks['layers'], params['layers']):
        assert set(ml) == set(pl)
        for name in pl:
            if name in PRUNABLE:
                assert ml[name].dtype == jnp.bool_ and ml[name].shape == pl[name].shape and bool(ml[name].all())
            else:
                assert ml[name] is None  # norms, q_norm/k_norm
    # 7 prunable matrices per layer, in canonical order
    assert [(i, n) for i, n, _ in prunable_items(params)] == [(i, n) for i in range(cfg.num_layers) for n in PRUNABLE]


def test_apply_masks_in_jit_zeroes_only_pruned_weights(model):
    cfg, params = model
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    masks = _random_masks(params)
    out = jax.jit(apply_masks)(params, masks)
    for key in ('embed', 'final_norm', 'lm_head'):
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(params[key]))
    for (i, name, w), (_, _, m) in zip(prunable_items(params), prunable_items(masks)):
        o = np.asarray(out['layers'][i][name].astype(jnp.float32))
        assert out['layers'][i][name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(o[~np.asarray(m)], 0)
        np.testing.assert_array_equal(o[np.asarray(m)], np.asarray(w.astype(jnp.float32))[np.asarray(m)])
    for name in ('input_norm', 'q_norm', 'post_mlp_norm'):
        np.testing.assert_array_equal(np.asarray(out['layers'][1][name]), np.asarray(params['layers'][1][name]))


def test_sparsity_report_per_matrix_kind_overall(model):
    cfg, params = model
    leaves = []
    for i, name, w in prunable_items(params):
        m = np.ones(w.shape, bool)
        frac = 0.25 if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 0.5
        m.reshape(-1)[: int(m.size * frac)] = False
        leaves.append(m)
    masks = masks_from_list(params, leaves)
    rep = sparsity_report(masks)
    assert rep['per_matrix']['layers.2.q_proj'] == 0.25 and rep['per_matrix']['layers.3.down_proj'] == 0.5
    assert rep['per_kind'] == {'attention': 0.25, 'mlp': 0.5}
    D, F, A, KV = 64, 128, 4 * 16, 2 * 16
    n_attn, n_mlp = D * A * 2 + 2 * D * KV, 3 * D * F
    assert rep['n_total'] == cfg.num_layers * (n_attn + n_mlp)
    assert rep['overall'] == pytest.approx((0.25 * n_attn + 0.5 * n_mlp) / (n_attn + n_mlp))
    # the same report from the masked params (exact zeros)
    rep_p = sparsity_report(apply_masks(params, masks))
    assert rep_p['per_matrix'] == rep['per_matrix'] and rep_p['overall'] == rep['overall']
    assert sparsity_report(masks_from_params(apply_masks(params, masks)))['n_pruned'] == rep['n_pruned']


def test_save_load_roundtrip_atomic(model, tmp_path):
    cfg, params = model
    masks = _random_masks(params, seed=3)
    path = tmp_path / 'sub' / 'masks.npz'
    save_masks(path, masks)
    assert os.listdir(tmp_path / 'sub') == ['masks.npz']  # no temp file left behind
    shapes = jax.eval_shape(lambda: params)
    back = load_masks(path, shapes)
    for (_, _, a), (_, _, b) in zip(prunable_items(masks), prunable_items(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back['embed'] is None and back['layers'][0]['input_norm'] is None
    with pytest.raises(FileNotFoundError, match='not found'):
        load_masks(tmp_path / 'missing.npz', params)
    with pytest.raises(ValueError, match='.npz'):
        save_masks(tmp_path / 'masks.bin', masks)
    other = init_params(tiny_config('gemma3_text', tie_word_embeddings=False, num_layers=2), 0)
    with pytest.raises(ValueError, match='has 4 layers, params have 2'):
        load_masks(path, other)


def test_validate_masks_errors(model):
    cfg, params = model
    masks = make_masks(params)
    validate_masks(params, masks)
    bad = {**masks, 'layers': [dict(l) for l in masks['layers']]}
    bad['layers'][1]['q_proj'] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r'layers.1.q_proj has shape \(3, 3\)'):
        validate_masks(params, bad)
    bad['layers'][1]['q_proj'] = jnp.ones(params['layers'][1]['q_proj'].shape, jnp.float32)
    with pytest.raises(ValueError, match='expected bool'):
        validate_masks(params, bad)
    with pytest.raises(ValueError, match="masks\\['embed'\\] must be None"):
        validate_masks(params, {**masks, 'embed': jnp.ones(params['embed'].shape, bool)})
