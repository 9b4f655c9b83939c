"""Every public analysis function rejects NaN / inf with an InputError that names the argument
and the first bad index, and rejects empty input where it would take a mean."""

import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax import analysis
from prunesae_jax.analysis import checks, matching, stats
from prunesae_jax.errors import InputError


def _dec(n=20, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _with(x, idx, value=np.nan):
    x = np.array(x, dtype=np.float64 if np.asarray(x).dtype == np.float64 else np.float32)
    x[idx] = value
    return x


def test_check_finite_names_argument_and_first_index():
    x = np.zeros((30, 4), np.float32)
    x[12, 3] = np.nan
    x[20, 0] = np.inf
    expected = r'^D_a has a non-finite value at \[12, 3\] \(nan\); expected finite decoder rows$'
    with pytest.raises(InputError, match=expected):
        checks.check_finite(x, 'D_a', 'finite decoder rows')
    # On a jax array too, and integer arrays pass without a scan.
    with pytest.raises(InputError, match=r'codes has a non-finite value at \[20, 0\] \(inf\)'):
        checks.check_finite(jnp.asarray(np.where(np.isnan(x), 0, x)), 'codes', 'finite activations')
    assert checks.check_finite(np.arange(4), 'i', 'ints') is not None
    # The chunked host scan finds a bad value past the first chunk.
    old = checks._CHUNK
    try:
        checks._CHUNK = 7
        with pytest.raises(InputError, match=r'at \[12, 3\]'):
            checks.check_finite(x, 'D_a', 'finite decoder rows')
    finally:
        checks._CHUNK = old


D = _dec()
D_bad = _with(D, (12, 3))
X = _dec(50, 8, 1)


@pytest.mark.parametrize(
    'call, pattern',
    [
        (lambda: matching.mnn_match(D_bad, D), r'D_a has a non-finite value at \[12, 3\]'),
        (lambda: matching.mnn_match(D, _with(D, (4, 0), np.inf)), r'D_b has a non-finite value at \[4, 0\]'),
        (lambda: matching.max_cosine(D, D_bad), r'D_b has a non-finite value at \[12, 3\]'),
        (lambda: matching.cosine_matrix(D_bad, D), r'D_a has a non-finite value'),
        (lambda: matching.normalize_rows(D_bad), r'D has a non-finite value at \[12, 3\]'),
        (lambda: stats.bootstrap_ci([0.1, np.nan, 0.3]), r'data has a non-finite value at \[1\]'),
        (lambda: stats.spearman([1, 2, 3], [1, np.inf, 3]), r'y has a non-finite value at \[1\]'),
        (lambda: stats.pearson([np.nan, 2, 3], [1, 2, 3]), r'x has a non-finite value at \[0\]'),
        (lambda: stats.spearman_ci([1, 2, 3], [1, 2, np.nan]), r'y has a non-finite value at \[2\]'),
        (lambda: stats.kendalls_w([[1, 2, 3], [1, np.nan, 2]]), r'ratings has a non-finite value at \[1, 1\]'),
        (
            lambda: stats.seed_bootstrap_ci([0.5, np.nan], [(0, 1), (0, 2)], 3),
            r'values has a non-finite value at \[1\]',
        ),
        (lambda: stats.seed_difference_ci([0.1], [(0, 0)], [np.inf], [(0, 0)], 1), r'non-finite value at \[0\]'),
        (lambda: analysis.firing_quintiles(_with(np.arange(10.0), 7)), r'rates has a non-finite value at \[7\]'),
        (lambda: analysis.firing_rate(_with(X, (3, 2))), r'codes has a non-finite value at \[3, 2\]'),
        (lambda: analysis.fvu(X, _with(X, (9, 1))), r'x_hat has a non-finite value at \[9, 1\]'),
        (lambda: analysis.l0(jnp.asarray(_with(X, (0, 5), np.inf))), r'codes has a non-finite value at \[0, 5\]'),
        (lambda: analysis.jaccard_active(X, _with(X, (2, 2))), r'codes_b has a non-finite value at \[2, 2\]'),
        (lambda: analysis.kl_divergence(_with(X, (1, 1)), X), r'logits_ref has a non-finite value at \[1, 1\]'),
        (
            lambda: analysis.fragility(_with(np.ones((2, 10)), (1, 4)), np.ones((2, 10))),
            r'survived has a non-finite value at \[1, 4\]',
        ),
        (lambda: analysis.seed_stability([D, D_bad]), r'decoders\[1\] has a non-finite value at \[12, 3\]'),
        (
            lambda: analysis.survival_causal_correlation([0.1, 0.2, 0.3], [1.0, np.nan, 0.0]),
            r'effect has a non-finite value at \[1\]',
        ),
        (lambda: analysis.ce_loss_recovered(3.0, np.nan, 6.0), r'spliced_loss has a non-finite value'),
        (lambda: analysis.attribution(X, _with(X, (4, 4))), r'grads has a non-finite value at \[4, 4\]'),
    ],
)
def test_non_finite_input_raises(call, pattern):
    with pytest.raises(InputError, match=pattern):
        call()


@pytest.mark.parametrize(
    'call, pattern',
    [
        (lambda: analysis.fvu(np.zeros((0, 4)), np.zeros((0, 4))), r'x is empty'),
        (lambda: analysis.l0(np.zeros((0, 4))), r'codes is empty'),
        (lambda: analysis.jaccard_active(np.zeros((0, 4)), np.zeros((0, 4))), r'codes_a is empty'),
        (lambda: analysis.firing_rate(np.zeros((0, 4))), r'codes is empty'),
        (lambda: analysis.kl_divergence(X, X, mask=np.zeros(50)), r'mask is all zero'),
        (
            lambda: analysis.next_token_loss(np.zeros((2, 3, 5)), np.zeros((2, 3), int), np.zeros((2, 3))),
            r'no next-token target',
        ),
    ],
)
def test_empty_input_raises(call, pattern):
    with pytest.raises(InputError, match=pattern):
        call()
