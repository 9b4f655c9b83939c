"""Seed-level bootstraps (stats.seed_bootstrap_ci and friends) against the exact resampling
distribution, enumerated by brute force over every draw of the seeds.

A call with n_boot=1 returns one resample's value as both ends of its interval, so calls with
seeds 0..K-1 sample the bootstrap distribution the function actually uses; the tests compare
those frequencies with the enumeration.
"""

import itertools
from collections import Counter

import numpy as np
import pytest

from prunesae_jax import analysis
from prunesae_jax.analysis import stats

K = 3000  # sampled resamples per distribution check


def _draws(n):
    """Every draw of n seeds with replacement (n^n equally likely tuples) as count vectors."""
    for t in itertools.product(range(n), repeat=n):
        yield np.bincount(t, minlength=n)


def _weighted(pairs, values, row_counts, col_counts):
    num = den = 0.0
    for (i, j), v in zip(pairs, values):
        w = row_counts[i] * col_counts[j]
        num += w * v
        den += w
    return round(num / den, 9) if den > 0 else None


def _exact(dist_items):
    c = Counter(dist_items)
    total = sum(c.values())
    return {k: v / total for k, v in c.items()}


def _sampled(fn):
    out = []
    for s in range(K):
        iv = fn(s)
        assert (np.isnan(iv.low) and np.isnan(iv.high)) or iv.low == iv.high
        out.append(None if np.isnan(iv.low) else round(float(iv.low), 9))
    return _exact(out)


def _close(sampled, exact, tol=0.035):
    assert set(sampled) <= set(exact), f'values the resampling cannot produce: {set(sampled) - set(exact)}'
    for k, p in exact.items():
        assert sampled.get(k, 0.0) == pytest.approx(p, abs=tol), (k, sampled, exact)


def test_seed_bootstrap_matches_enumeration_of_seed_draws():
    # Seed 2 is a bad seed: its pairs share 0.1, the good pair (0, 1) 0.9.
    pairs = [(0, 1), (0, 2), (1, 2)]
    values = [0.9, 0.1, 0.1]
    exact = _exact(_weighted(pairs, values, c, c) for c in _draws(3))
    # Draws of one seed only ({0,0,0}, ...) keep no pair and are dropped.
    assert exact[None] == pytest.approx(3 / 27)
    # A pair bootstrap would reach (0.9 + 0.9 + 0.1) / 3 = 0.633: two copies of the pair (0, 1)
    # need seed 0 and seed 1 twice each, impossible in 3 draws; the seed bootstrap never gives it.
    assert round(1.9 / 3, 9) not in exact
    sampled = _sampled(lambda s: stats.seed_bootstrap_ci(values, pairs, 3, n_boot=1, seed=s))
    _close(sampled, exact)
    iv = stats.seed_bootstrap_ci(values, pairs, 3, n_boot=4000, seed=0)
    assert iv.estimate == pytest.approx(np.mean(values))
    assert (iv.min, iv.max, iv.n_seeds, iv.few_seeds) == (0.1, 0.9, 3, True)
    assert iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.9)
    assert iv._asdict()['max'] == 0.9 and iv.interval == (iv.estimate, iv.low, iv.high)


def test_seed_bootstrap_two_seeds_and_bad_pairs():
    # Two seeds, one pair: every kept resample holds only that pair, so the CI collapses.
    iv = stats.seed_bootstrap_ci([0.4], [(0, 1)], 2, n_boot=200)
    assert iv[:3] == (0.4, 0.4, 0.4)
    with pytest.raises(ValueError, match='distinct seeds'):
        stats.seed_bootstrap_ci([0.4, 0.5], [(0, 1), (1, 1)], 2)
    with pytest.raises(ValueError, match=r'expected seed indices in \[0, 2\)'):
        stats.seed_bootstrap_ci([0.4], [(0, 2)], 2)


def test_two_way_bootstrap_matches_enumeration():
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)]
    values = [0.0, 1.0, 2.0, 3.0, 5.0, 4.0]
    exact = _exact(_weighted(pairs, values, a, b) for a in _draws(2) for b in _draws(3))
    sampled = _sampled(lambda s: stats.two_way_bootstrap_ci(values, pairs, 2, 3, n_boot=1, seed=s))
    _close(sampled, exact)
    # Only i != j listed (pairing 'distinct'): resamples keeping no listed pair are dropped.
    pairs = [(0, 1), (1, 0)]
    exact = _exact(_weighted(pairs, [0.2, 0.6], a, b) for a in _draws(2) for b in _draws(2))
    assert exact[None] == pytest.approx(2 / 16)
    _close(_sampled(lambda s: stats.two_way_bootstrap_ci([0.2, 0.6], pairs, 2, 2, n_boot=1, seed=s)), exact)


def test_matched_bootstrap_is_the_plain_bootstrap_over_seeds():
    v = np.array([0.3, 0.5, 0.9, 0.4])
    iv = stats.matched_bootstrap_ci(v, n_boot=500, seed=3)
    np.testing.assert_allclose(iv[:3], stats.bootstrap_ci(v, n_boot=500, seed=3), atol=1e-12)
    assert (iv.min, iv.max, iv.n_seeds) == (0.3, 0.9, 4)


def test_difference_resamples_the_shared_dense_seeds_jointly():
    # Both conditions inherit the dense seed's quality r_i (a bad dense seed 2 lowers both);
    # Wanda is exactly 0.1 above magnitude for every dense seed. Resampling the dense seeds
    # jointly keeps the difference at 0.1 in every resample; resampling the two conditions
    # independently (the old report) would not.
    r = [0.9, 0.8, 0.1]
    pairs = [(i, j) for i in range(3) for j in range(3)]
    a = [r[i] + 0.1 for i, _ in pairs]
    b = [r[i] for i, _ in pairs]
    iv = stats.seed_difference_ci(a, pairs, b, pairs, 3, n_boot=500)
    np.testing.assert_allclose(iv[:5], [0.1] * 5, atol=1e-12)
    assert iv.n_seeds == 3
    # Matched pairs (s, s): the pruned seed goes with its dense seed.
    mp = [(s, s) for s in range(3)]
    iv = stats.seed_difference_ci([x + 0.1 for x in r], mp, r, mp, 3, matched=True, n_boot=500)
    np.testing.assert_allclose(iv[:3], [0.1] * 3, atol=1e-12)
    with pytest.raises(ValueError, match='matched=True'):
        stats.seed_difference_ci(a, pairs, b, pairs, 3, matched=True)


def test_difference_matches_enumeration():
    # 2 dense seeds (shared) x 2 pruned seeds per condition, drawn independently per condition.
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    a = [0.5, 0.7, 0.2, 0.4]
    b = [0.1, 0.3, 0.3, 0.0]
    items = []
    for d in _draws(2):
        for pa in _draws(2):
            for pb in _draws(2):
                items.append(round(_weighted(pairs, a, d, pa) - _weighted(pairs, b, d, pb), 9))
    exact = _exact(items)
    sampled = _sampled(lambda s: stats.seed_difference_ci(a, pairs, b, pairs, 2, n_boot=1, seed=s))
    _close(sampled, exact)
    iv = stats.seed_difference_ci(a, pairs, b, pairs, 2)
    assert iv.estimate == pytest.approx(np.mean(a) - np.mean(b))
    # min / max: per-dense-seed differences (0.6 - 0.2 and 0.3 - 0.15).
    assert (iv.min, iv.max) == pytest.approx((0.15, 0.4))


def _stack3(n=40):
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(128, 128)))
    Q = q.T.astype(np.float32)
    A, U, V = Q[:n], Q[n : 2 * n], Q[2 * n : 3 * n]
    s1 = A.copy()
    s1[:4] = U[:4]
    s2 = A.copy()
    s2[:10] = V[:10]
    return np.stack([A, s1, s2])


def test_seed_stability_ci_resamples_seeds():
    res = analysis.seed_stability(_stack3(), n_boot=800, seed=2)
    primary = res.fractions[res.taus.index(0.7)]
    ref = stats.seed_bootstrap_ci(primary, res.pair_indices, 3, n_boot=800, seed=2)
    assert tuple(res.shared) == pytest.approx(tuple(ref[:3]))
    assert (res.pair_min, res.pair_max, res.n_seeds, res.few_seeds) == (0.75, 0.9, 3, True)
    d = res.shared_dict()
    assert d == {
        'estimate': res.shared.estimate,
        'low': res.shared.low,
        'high': res.shared.high,
        'min': 0.75,
        'max': 0.9,
        'n_seeds': 3,
    }


def test_feature_survival_ci_resamples_seeds_and_distinct_pairing():
    W = _stack3()
    res = analysis.feature_survival(W, W[::-1], n_boot=300, seed=1)
    ref = stats.two_way_bootstrap_ci(res.fractions, res.pair_indices, 3, 3, n_boot=300, seed=1)
    assert tuple(res.survival) == pytest.approx(tuple(ref[:3]))
    assert res.survival_seeds.n_seeds == 3 and res.pairing == 'all'
    dist = analysis.feature_survival(W, W, pairing='distinct', n_boot=100)
    assert [tuple(p) for p in dist.pair_indices] == [(i, j) for i in range(3) for j in range(3) if i != j]
    same = analysis.feature_survival(W, W, pairing='same_seed', n_boot=100)
    assert same.survival == (1.0, 1.0, 1.0)


def test_seed_stability_never_reaches_values_only_a_pair_bootstrap_gives():
    # Pairs (0,1) 0.9, (0,2) 0.75, (1,2) 0.75. Resampling pairs reaches (0.9 + 0.9 + 0.75) / 3 = 0.85;
    # resampling 3 seeds cannot (two copies of pair (0, 1) need both seeds twice). Seed draws give
    # 0.8 ({0,1,2}), 0.9 ({0,0,1}, {0,1,1}) or 0.75 (a draw with seed 2 and one other seed).
    W = _stack3()
    lows = [analysis.seed_stability(W, taus=(0.7,), n_boot=1, seed=s).shared.low for s in range(150)]
    seen = {round(v, 9) for v in lows if not np.isnan(v)}  # nan: a draw of one seed, dropped
    assert seen <= {0.75, 0.8, 0.9} and len(seen) == 3
