"""matching.py on constructed dictionaries whose matches are known."""

import numpy as np
import pytest

from prunesae_jax.analysis import matching


def _orthonormal(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q.T.astype(np.float32)  # rows orthonormal


def _random(n, d, seed):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize('match', [matching.mnn_match, matching.optimal_match])
def test_permuted_rescaled_copy_matches_all(match):
    rng = np.random.default_rng(0)
    A = _random(300, 32, 0)
    perm = rng.permutation(300)
    B = A[perm] * rng.uniform(0.5, 3.0, size=(300, 1)).astype(np.float32)  # positive rescale keeps direction
    r = match(A, B, tau=0.7, block_size=64)
    assert r.matched_fraction == 1.0
    assert r.matched.all()
    inv = np.argsort(perm)
    np.testing.assert_array_equal(r.pairs[:, 0], np.arange(300))
    np.testing.assert_array_equal(r.pairs[:, 1], inv)  # B[inv[i]] is A[i]
    np.testing.assert_allclose(r.cosines, 1.0, atol=1e-5)


def test_negated_copy_is_not_a_match():
    A = _random(200, 32, 1)
    B = A.copy()
    B[:100] *= -1.0  # sign kept: cosine -1 to the original
    r = matching.mnn_match(A, B, tau=0.7, block_size=50)
    assert r.matched_fraction == pytest.approx(0.5)
    assert r.matched[100:].all() and not r.matched[:100].any()
    assert matching.mnn_match(A, -A).matched_fraction == 0.0


def test_orthogonal_dictionary_matches_none():
    Q = _orthonormal(64, seed=2)
    A, B = Q[:32], Q[32:]
    r = matching.mnn_match(A, B, tau=0.6, block_size=16)
    assert r.matched_fraction == 0.0
    assert r.pairs.shape == (0, 2)
    assert np.abs(r.max_cos_a).max() < 1e-5
    assert matching.optimal_match(A, B, tau=0.6).matched_fraction == 0.0


def test_noise_at_known_angle_matches_exactly_features_above_tau():
    n = 48
    Q = _orthonormal(128, seed=3)
    A, U = Q[:n], Q[n : 2 * n]
    # Feature i is rotated by theta_i towards its own orthogonal direction u_i, so
    # cos(a_i, b_j) = cos(theta_i) if i == j else 0; no angle sits on a threshold.
    theta = np.deg2rad(np.linspace(0.0, 80.0, n) + 0.37)
    B = (np.cos(theta)[:, None] * A + np.sin(theta)[:, None] * U).astype(np.float32)
    perm = np.random.default_rng(3).permutation(n)
    r = matching.mnn_match(A, B[perm], tau=0.7, block_size=20)
    expected = np.cos(theta) >= 0.7
    np.testing.assert_array_equal(r.matched, expected)
    assert r.matched_fraction == pytest.approx(expected.mean())
    np.testing.assert_allclose(r.max_cos_a, np.cos(theta), atol=1e-5)
    for tau in (0.6, 0.8):
        assert r.fraction_at(tau) == pytest.approx(np.mean(np.cos(theta) >= tau))
        assert matching.mnn_match(A, B, tau=tau).matched_fraction == pytest.approx(np.mean(np.cos(theta) >= tau))


@pytest.mark.parametrize('block_size', [1, 7, 64, 1000])
def test_blockwise_equals_brute_force(block_size):
    A, B = _random(130, 24, 4), _random(97, 24, 5)
    C = A @ B.T / np.linalg.norm(A, axis=1)[:, None] / np.linalg.norm(B, axis=1)[None]
    nn_a, cos_a, nn_b, cos_b = matching.nearest_neighbours(A, B, block_size=block_size)
    np.testing.assert_array_equal(nn_a, C.argmax(1))
    np.testing.assert_array_equal(nn_b, C.argmax(0))
    np.testing.assert_allclose(cos_a, C.max(1), atol=1e-5)
    np.testing.assert_allclose(cos_b, C.max(0), atol=1e-5)
    mc, arg = matching.max_cosine(A, B, block_size=block_size)
    np.testing.assert_allclose(mc, C.max(1), atol=1e-5)
    np.testing.assert_array_equal(arg, C.argmax(1))
    np.testing.assert_allclose(matching.cosine_matrix(A, B), C, atol=1e-5)
    # MNN pairs from the definition.
    r = matching.mnn_match(A, B, tau=-1.0, block_size=block_size)
    mutual = [(i, C[i].argmax()) for i in range(130) if C[:, C[i].argmax()].argmax() == i]
    np.testing.assert_array_equal(r.pairs, np.array(mutual))


def test_optimal_match_is_one_to_one_and_optimal():
    A = _random(40, 16, 6)
    B = _random(40, 16, 7)
    r = matching.optimal_match(A, B, tau=-1.0)
    assert r.method == 'optimal' and matching.mnn_match(A, B).method == 'mnn'
    assert len(set(r.partner.tolist())) == 40
    C = matching.cosine_matrix(A, B)
    # The assignment beats the identity and any single swap.
    total = C[np.arange(40), r.partner].sum()
    assert total >= np.trace(C) - 1e-5
    p = r.partner.copy()
    p[[0, 1]] = p[[1, 0]]
    assert total >= C[np.arange(40), p].sum() - 1e-5


def test_dead_zero_rows_never_match():
    A = _random(20, 8, 8)
    A[3] = 0.0
    B = A.copy()
    r = matching.mnn_match(A, B)
    assert not r.matched[3]
    assert r.matched_fraction == pytest.approx(19 / 20)


def test_bad_input_raises():
    A = _random(4, 8, 9)
    with pytest.raises(ValueError, match='same model width'):
        matching.mnn_match(A, _random(4, 6, 9))
    with pytest.raises(ValueError, match='expected at most 268435456'):
        matching.optimal_match(np.ones((2**14 + 1, 2), np.float32), np.ones((2**14, 2), np.float32))
    with pytest.raises(ValueError, match='tau='):
        matching.mnn_match(A, A, tau=1.5)
    with pytest.raises(ValueError, match='decoder matrix'):
        matching.mnn_match(A[0], A)
    with pytest.raises(ValueError, match='block_size='):
        matching.mnn_match(A, A, block_size=0)
