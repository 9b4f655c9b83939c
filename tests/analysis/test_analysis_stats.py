"""stats.py against scipy and against cases with a known answer."""

import numpy as np
import pytest
import scipy.stats

from prunesae_jax.analysis import stats


def _tied(rng, n):
    return rng.integers(0, 6, size=n).astype(np.float64)


def test_rankdata_averages_ties():
    np.testing.assert_array_equal(stats.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    np.testing.assert_array_equal(stats.rankdata([2, 2, 2]), [2.0, 2.0, 2.0])
    assert stats.rankdata(np.array([1, 0], np.int32)).dtype == np.float64
    with pytest.raises(ValueError, match='expected a 1-D array'):
        stats.rankdata(np.zeros((2, 2)))
    with pytest.raises(ValueError, match='finite values to rank'):
        stats.rankdata([1.0, np.nan])


def test_spearman_is_pearson_of_average_ranks():
    # Bit for bit: spearman is `pearson` of scipy's ranks (not spearmanr's np.corrcoef).
    rng = np.random.default_rng(13)
    for _ in range(5):
        x, y = _tied(rng, 60), rng.normal(size=60)
        assert stats.spearman(x, y) == stats.pearson(scipy.stats.rankdata(x), scipy.stats.rankdata(y))


def test_spearman_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x, y = _tied(rng, 50), _tied(rng, 50)
        assert stats.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
        x, y = rng.normal(size=30), rng.normal(size=30)
        assert stats.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert stats.spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert np.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


def test_pearson_matches_scipy():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=25), rng.normal(size=25)
    assert stats.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)


def test_kendalls_w_matches_friedman_with_tie_correction():
    rng = np.random.default_rng(3)
    for m, n in [(3, 8), (5, 12), (2, 5)]:
        r = _tied(rng, m * n).reshape(m, n)
        chi2 = scipy.stats.friedmanchisquare(*r.T).statistic  # items are the treatments
        assert stats.kendalls_w(r) == pytest.approx(chi2 / (m * (n - 1)), rel=1e-10)


def test_kendalls_w_known_values():
    # Identical rankings -> 1, also with ties (the tie correction makes it exact).
    assert stats.kendalls_w([[1, 2, 3, 4], [10, 20, 30, 40]]) == pytest.approx(1.0)
    assert stats.kendalls_w([[1, 2, 2, 4], [1, 5, 5, 9], [0, 3, 3, 7]]) == pytest.approx(1.0)
    # Two raters in exactly opposite order -> 0.
    assert stats.kendalls_w([[1, 2, 3, 4], [4, 3, 2, 1]]) == pytest.approx(0.0)
    assert np.isnan(stats.kendalls_w([[1, 1, 1], [2, 2, 2]]))


def test_bootstrap_ci_deterministic_and_close_to_scipy():
    rng = np.random.default_rng(4)
    x = rng.normal(loc=2.0, size=200)
    a = stats.bootstrap_ci(x, n_boot=4000, seed=7)
    b = stats.bootstrap_ci(x, n_boot=4000, seed=7)
    assert a == b
    assert a.estimate == pytest.approx(x.mean())
    # The same generator draws the same resamples as scipy's percentile bootstrap; only the
    # quantile arithmetic differs, in the last bits.
    ref = scipy.stats.bootstrap(
        (x,), np.mean, n_resamples=4000, method='percentile', rng=np.random.Generator(np.random.PCG64(7))
    ).confidence_interval
    assert a.low == pytest.approx(ref.low, rel=1e-12)
    assert a.high == pytest.approx(ref.high, rel=1e-12)
    # Custom paired statistic, and the one-row case collapses.
    y = x + rng.normal(size=200)
    iv = stats.bootstrap_ci(np.stack([x, y], 1), lambda d: stats.spearman(d[:, 0], d[:, 1]), n_boot=300)
    assert iv.low < iv.estimate < iv.high
    assert stats.bootstrap_ci([0.25]) == stats.Interval(0.25, 0.25, 0.25)


def test_cluster_bootstrap_resamples_whole_clusters():
    clusters = [np.zeros(10), np.ones(100)]
    stat = lambda cs: float(np.concatenate(cs).mean())
    iv = stats.cluster_bootstrap_ci(clusters, stat, n_boot=500, seed=0)
    assert iv.estimate == pytest.approx(100 / 110)
    # With two clusters only three pooled means are reachable: 0, 100/110 and 1.
    reachable = {0.0, 100 / 110, 1.0}
    assert min(abs(iv.low - v) for v in reachable) < 1e-12
    assert min(abs(iv.high - v) for v in reachable) < 1e-12
    assert iv == stats.cluster_bootstrap_ci(clusters, stat, n_boot=500, seed=0)
    assert stats.cluster_bootstrap_ci([np.ones(3)], stat) == stats.Interval(1.0, 1.0, 1.0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match='ci='):
        stats.bootstrap_ci([1.0, 2.0], ci=1.5)
    with pytest.raises(ValueError, match='n_boot='):
        stats.bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match='expected two 1-D'):
        stats.spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match='clusters is empty'):
        stats.cluster_bootstrap_ci([], lambda c: 0.0)


def test_spearman_ci_equals_generic_bootstrap_with_ties():
    rng = np.random.default_rng(12)
    x = _tied(rng, 80)  # heavy ties in both variables
    y = x + _tied(rng, 80)
    fast = stats.spearman_ci(x, y, n_boot=300, seed=5)
    slow = stats.bootstrap_ci(np.stack([x, y], 1), lambda a: stats.spearman(a[:, 0], a[:, 1]), n_boot=300, seed=5)
    assert fast.estimate == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    # Chunked draws (small chunks) give the same numbers as one chunk.
    old = stats._CHUNK_ELEMS
    try:
        stats._CHUNK_ELEMS = 200
        np.testing.assert_allclose(stats.spearman_ci(x, y, n_boot=300, seed=5), fast, atol=1e-12)
    finally:
        stats._CHUNK_ELEMS = old


def test_difference_ci_resamples_both_samples():
    rng = np.random.default_rng(14)
    a, b = rng.normal(1.0, size=40), rng.normal(0.0, size=25)
    iv = stats.difference_ci(a, b, n_boot=3000, seed=3)
    assert iv == stats.difference_ci(a, b, n_boot=3000, seed=3)
    assert iv.estimate == pytest.approx(a.mean() - b.mean())
    se = np.sqrt(a.var(ddof=1) / 40 + b.var(ddof=1) / 25)  # the normal-theory width, roughly
    assert iv.low == pytest.approx(iv.estimate - 1.96 * se, abs=0.4 * se)
    assert iv.high == pytest.approx(iv.estimate + 1.96 * se, abs=0.4 * se)
    assert stats.difference_ci([2.0, 2.0], [0.5]) == stats.Interval(1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match='expected at least one value in each'):
        stats.difference_ci([1.0], [])
