"""Each registered measure on small arrays, without a workdir: measure(dense, condition) -> dict."""

import jax
import numpy as np
import pytest

from prunesae_jax.analysis import measures
from prunesae_jax.errors import InputError


def _unit_rows(rng, n, d):
    w = rng.standard_normal((n, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _condition(method, W, settings=None, **kw):
    return measures.Condition(
        method,
        0.0 if method == 'dense' else 0.5,
        np.asarray(W),
        kw.pop('training', {}),
        settings or measures.Settings(n_bootstrap=50),
        **kw,
    )


def test_registry_runs_every_measure_in_its_fixed_order():
    assert sorted(measures.ORDER) == sorted(measures.MEASURES)
    assert measures.ORDER.index('survival') < measures.ORDER.index('fragility')
    assert measures.ORDER.index('survival') < measures.ORDER.index('causal')
    with pytest.raises(InputError, match=r"measure 'nope' is not registered; accepted: causal \| convergence"):
        measures.get('nope')
    with pytest.raises(InputError, match='registered twice'):
        measures.register('stability')(lambda dense, cond: {})


def test_stability_of_permuted_copies_is_one():
    A = _unit_rows(np.random.default_rng(0), 40, 16)
    W = np.stack([A, A[::-1], A[np.random.default_rng(1).permutation(40)]])
    out = measures.get('stability')(None, _condition('dense', W))
    assert out['shared']['estimate'] == 1.0 and out['shared']['n_seeds'] == 3
    assert out['divergence'] == {'estimate': 0.0, 'low': 0.0, 'high': 0.0}
    assert out['n_pairs'] == 3 and out['by_tau'] == {'0.6': 1.0, '0.7': 1.0, '0.8': 1.0}


def test_dense_survival_is_its_seed_floor():
    rng = np.random.default_rng(0)
    A = _unit_rows(rng, 30, 64)
    W = np.stack([A, A[::-1], _unit_rows(rng, 30, 64)])  # seeds 0 and 1 agree, seed 2 shares nothing
    cond = _condition('dense', W)
    out = measures.get('survival')(measures.Dense(W, {}), cond)
    assert out['pairing'] == 'distinct' and out['pairs'] == [[0, 1], [0, 2], [1, 2]]
    assert out['fractions'] == [1.0, 0.0, 0.0]
    assert out['estimate'] == pytest.approx(1 / 3)
    assert out['estimate'] == measures.get('stability')(None, cond)['shared']['estimate']


def test_survival_pairings_and_the_shared_init_null():
    rng = np.random.default_rng(0)
    A, B = _unit_rows(rng, 30, 64), _unit_rows(rng, 30, 64)
    dense = measures.Dense(np.stack([A, B]), {}, W_init=np.stack([A, _unit_rows(rng, 30, 64)]))
    pruned = np.stack([A[::-1], _unit_rows(rng, 30, 64)])  # seed 0 keeps every feature of dense seed 0
    out = measures.get('survival')(dense, _condition('wanda', pruned))
    assert out['pairing'] == 'distinct' and out['pairs'] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert out['fractions'] == [1.0, 0.0, 0.0, 0.0] and out['estimate'] == 0.25
    assert out['by_tau'] == {'0.6': 0.25, '0.7': 0.25, '0.8': 0.25} and 'null' not in out
    shared = measures.get('survival')(
        dense, _condition('wanda', pruned, measures.Settings(pairing='shared', n_bootstrap=50))
    )
    assert shared['pairs'] == [[0, 0], [1, 1]] and shared['fractions'] == [1.0, 0.0]
    # The null: dense seed 0 is its own init (fraction 1), dense seed 1 left its init (0).
    assert shared['null']['estimate'] == 0.5 and shared['null']['n_seeds'] == 2


def _fragility_case(min_firings=1):
    """Two seeds of 100 latents firing at rates that grow with the index; the pruned SAE (shared
    init pairing) keeps exactly the 50 rarest latents of each dense seed."""
    rng = np.random.default_rng(0)
    dense_W = np.stack([_unit_rows(rng, 100, 256) for _ in range(2)])
    pruned = dense_W.copy()
    pruned[:, 50:] = np.stack([_unit_rows(rng, 50, 256) for _ in range(2)])
    rates = np.tile(np.linspace(0.01, 0.5, 100), (2, 1))
    dense = measures.Dense(dense_W, {'firing_rate': rates, 'n_steps': 10, 'batch_size': 100})
    settings = measures.Settings(pairing='shared', n_bootstrap=50, min_firings=min_firings)
    return dense, _condition('wanda', pruned, settings)


def test_fragility_rare_latents_survive():
    dense, cond = _fragility_case()
    out = measures.get('fragility')(dense, cond)
    assert out['per_quintile'] == [1.0, 1.0, 0.5, 0.0, 0.0]
    # Spearman over the 5 bins with the tied survivals (1, 1, 0.5, 0, 0): -sqrt(0.9).
    assert out['effect']['estimate'] == 1.0 and out['rho_quintile'] == pytest.approx(-np.sqrt(0.9))
    assert out['n_latents'] == out['n_latents_total'] == 100 and out['training_tokens'] == 1000
    assert measures.get('fragility')(dense, _condition('dense', dense.W_dec)) is None


def test_fragility_is_not_run_without_enough_firing_latents():
    dense, cond = _fragility_case(min_firings=400)  # only rates >= 0.4 fire 400 times in 1000 tokens
    out = measures.get('fragility')(dense, cond)
    assert set(out) == {'not_run'} and 'the quintiles need >= 50' in out['not_run']


def test_causal_correlates_survival_with_effect_over_live_features():
    rng = np.random.default_rng(0)
    A = _unit_rows(rng, 40, 64)
    noise = _unit_rows(rng, 40, 64)
    ortho = noise - np.sum(noise * A, 1, keepdims=True) * A
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    cos = np.linspace(0.99, 0.6, 40)[:, None]  # later features drift further: lower max cosine
    pruned = cos * A + np.sqrt(1 - cos**2) * ortho
    fires = np.ones(40, int)
    fires[::10] = 0  # 4 dead features: left out
    estimate = np.arange(40.0)  # |effect| grows as survival falls
    causal = {
        'fires': fires.tolist(),
        'estimate': estimate.tolist(),
        'exact_idx': [1, 2, 3],
        'exact': [1.0, 2.0, 3.0],
        'agreement': {'estimate': 1.0, 'low': 1.0, 'high': 1.0},
    }
    dense = measures.Dense(A[None], {}, causal=causal)
    settings = measures.Settings(pairing='shared', n_bootstrap=50)
    out = measures.get('causal')(dense, _condition('wanda', pruned[None], settings))
    assert out['n_features'] == 40 and out['n_live'] == 36 and out['measure'] == 'attribution'
    assert out['correlation']['estimate'] == pytest.approx(-1.0)
    assert len(out['max_cos']) == len(out['effect']) == 36 and out['agreement_features'] == 3
    exact = measures.get('causal')(
        dense,
        _condition('wanda', pruned[None], measures.Settings(pairing='shared', n_bootstrap=50, causal_measure='exact')),
    )
    assert exact['n_features'] == 3 and exact['effect'] == [1.0, 2.0, 3.0]
    assert measures.get('causal')(dense, _condition('dense', A[None])) is None


def test_convergence_reads_the_snapshots():
    A = _unit_rows(np.random.default_rng(0), 20, 32)
    B = _unit_rows(np.random.default_rng(1), 20, 32)
    record = {
        'snapshots': {8: np.stack([A, B]), 16: np.stack([A, A[::-1]])},
        'n_steps': 16,
        'batch_size': 4,
        'train_tokens': 64,
        'init_cos': [0.5, 0.5],
        'curve': {'step': [16]},
        'fvu': [0.1, 0.2],
    }
    out = measures.get('convergence')(None, _condition('dense', np.stack([A, A]), training=record))
    assert out['steps'] == [8, 16] and out['tokens'] == [32, 64] and out['shared'] == [0.0, 1.0]
    assert out['fvu'] == [0.1, 0.2] and out['l0'] is None


def test_transfer_of_the_dense_dictionary_on_the_dense_model():
    from prunesae_jax.models import init_params
    from prunesae_jax.sae import SAEConfig, init
    from prunesae_jax.testing import tiny_config

    cfg = tiny_config('llama')
    params = init_params(cfg, 0)
    rows = np.random.default_rng(0).integers(3, cfg.vocab_size, (3, 9)).astype(np.int32)
    rows[:, 0] = cfg.bos_token_id
    sae_cfg = SAEConfig(d_in=cfg.hidden_size, n_latents=4 * cfg.hidden_size, k=4)
    sae_params = {k: v[0] for k, v in init(jax.random.split(jax.random.key(0), 1), sae_cfg).items()}
    heldout_x = measures.transfer.heldout_activations(cfg, params, rows, 1, 2)
    dense = measures.Dense(np.zeros((2, 1, 1)), {}, dictionary=(sae_cfg, sae_params, 'seed 0'), heldout_x=heldout_x)
    cond = _condition(
        'dense',
        np.zeros((2, 1, 1)),
        measures.Settings(n_bootstrap=50, batch_size=2),
        model_cfg=cfg,
        layer=1,
        params=params,
        heldout=rows,
    )
    out = measures.get('transfer')(dense, cond)
    assert heldout_x.shape == (3 * 8, cfg.hidden_size)
    assert out['dictionary'] == 'seed 0' and out['n_tokens'] == 24 and out['n_sequences'] == 3
    assert out['jaccard'] == 1.0 and out['jaccard_ci'] == [1.0, 1.0]  # the same model: the same codes
    assert out['l0'] == pytest.approx(4.0)  # TopK: exactly k active latents per token
    assert out['ce_zero'] != out['ce_clean'] and out['fvu_ci'][0] <= out['fvu'] <= out['fvu_ci'][1]
