"""The analysis array functions (RQ1-RQ5) on constructed arrays where the answer is known."""

import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax import analysis


def _orthonormal(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q.T.astype(np.float32)


def _rotate(A, U, idx, deg):
    """Rotate rows idx of A by `deg` degrees towards the matching rows of U (orthogonal to A)."""
    B = A.copy()
    t = np.deg2rad(deg)
    B[idx] = np.cos(t) * A[idx] + np.sin(t) * U[idx]
    return B


# ----------------------------------------------------------------------------- RQ1


def test_seed_stability_known_fractions_and_divergence():
    n = 40
    Q = _orthonormal(128, seed=0)
    A, U, V = Q[:n], Q[n : 2 * n], Q[2 * n : 3 * n]
    s1 = A.copy()
    s1[:4] = U[:4]  # seed 1 replaces 4 features by orthogonal ones
    s2 = A.copy()
    s2[:10] = V[:10]  # seed 2 replaces 10 features by other orthogonal ones
    perm = np.random.default_rng(0).permutation(n)
    res = analysis.seed_stability(np.stack([A, s1[perm], s2]), n_boot=500, seed=1)
    np.testing.assert_array_equal(res.pair_indices, [[0, 1], [0, 2], [1, 2]])
    expected = np.array([36, 30, 30]) / n
    for k in range(3):  # orthogonal replacements fail at every tau
        np.testing.assert_allclose(res.fractions[k], expected)
    assert res.shared.estimate == pytest.approx(expected.mean())
    assert res.divergence.estimate == pytest.approx(1 - expected.mean())
    assert res.shared.low <= res.shared.estimate <= res.shared.high
    assert res.divergence.low == pytest.approx(1 - res.shared.high)
    assert res.kendalls_w == pytest.approx(1.0)  # all taus rank the pairs identically (with a tie)
    again = analysis.seed_stability(np.stack([A, s1[perm], s2]), n_boot=500, seed=1)
    assert again.shared == res.shared and np.array_equal(again.fractions, res.fractions)


def test_seed_stability_identical_seeds_share_everything():
    A = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    res = analysis.seed_stability([A, A[::-1], A * 2.0], n_boot=100)
    assert res.shared == (1.0, 1.0, 1.0)
    assert res.divergence == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match='at least 2'):
        analysis.seed_stability([A])


def test_tau_agreement_is_kendalls_w():
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.4, 0.05], [0.7, 0.3, 0.0]])
    assert analysis.tau_agreement(scores) == pytest.approx(1.0)
    assert analysis.tau_agreement([[1, 2, 3], [3, 2, 1]]) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- RQ2


def test_feature_survival_pairs_and_per_feature():
    n = 50
    Q = _orthonormal(128, seed=2)
    A, U = Q[:n], Q[n : 2 * n]
    dense = np.stack([A, A[::-1]])  # same features, different order
    p0 = _rotate(A, U, np.arange(10), 60.0)  # cos 0.5 < 0.7: 10 features lost
    p1 = _rotate(A, U, np.arange(5, 25), 60.0)  # 20 lost
    res = analysis.feature_survival(dense, np.stack([p0, p1]), tau=0.7, n_boot=200)
    np.testing.assert_array_equal(res.pair_indices, [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_allclose(res.fractions, [0.8, 0.6, 0.8, 0.6])
    assert res.survival.estimate == pytest.approx(0.7)
    lost0 = np.zeros(n, bool)
    lost0[:10] = True
    lost1 = np.zeros(n, bool)
    lost1[5:25] = True
    expected = ((~lost0).astype(float) + (~lost1)) / 2
    np.testing.assert_allclose(res.per_feature[0], expected)
    np.testing.assert_allclose(res.per_feature[1], expected[::-1])
    exp_cos = (np.where(lost0, 0.5, 1.0) + np.where(lost1, 0.5, 1.0)) / 2
    np.testing.assert_allclose(res.max_cos[0], exp_cos, atol=1e-5)
    same = analysis.feature_survival(dense, np.stack([p0, p1]), pairing='same_seed', n_boot=200)
    np.testing.assert_allclose(same.fractions, [0.8, 0.6])
    with pytest.raises(ValueError, match='pairing='):
        analysis.feature_survival(dense, dense, pairing='diagonal')


# ----------------------------------------------------------------------------- RQ3


def test_fvu_ends_and_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=5.0, size=(200, 8)).astype(np.float32)
    assert analysis.fvu(x, x) == pytest.approx(0.0, abs=1e-7)
    assert analysis.fvu(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(1.0, rel=1e-5)
    x_hat = x + rng.normal(scale=0.3, size=x.shape).astype(np.float32)
    ref = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert analysis.fvu(x, x_hat) == pytest.approx(ref, rel=1e-4)
    # Around the mean, not around zero: predicting 0 for data with mean 5 is far worse than 1.
    assert analysis.fvu(x, np.zeros_like(x)) > 20
    assert np.isnan(analysis.fvu(np.ones((4, 3)), np.ones((4, 3))))


def test_l0_and_jaccard():
    codes = np.array([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.5]])
    assert analysis.l0(codes) == pytest.approx(4 / 3)
    assert analysis.jaccard_active(codes, codes) == 1.0
    other = np.array([[0.0, 5.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    # token 0: {1,2} vs {1,3} -> 1/3; token 1: both empty -> 1; token 2: disjoint -> 0
    np.testing.assert_allclose(analysis.jaccard_active(codes, other, per_token=True), [1 / 3, 1.0, 0.0])
    assert analysis.jaccard_active(codes, other) == pytest.approx((1 / 3 + 1) / 3)
    big = np.abs(np.random.default_rng(4).normal(size=(100, 64))) * (np.random.default_rng(5).random((100, 64)) < 0.1)
    assert analysis.jaccard_active(big, big * 3.0) == 1.0


def test_next_token_loss_and_kl():
    rng = np.random.default_rng(6)
    B, T, V = 2, 5, 7
    tokens = rng.integers(0, V, size=(B, T))
    assert analysis.next_token_loss(np.zeros((B, T, V)), tokens) == pytest.approx(np.log(V), rel=1e-6)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    assert analysis.next_token_loss(logits, tokens) == pytest.approx(nll.mean(), rel=1e-5)
    mask = np.ones((B, T))
    mask[1, 3:] = 0  # right padding: targets 3, 4 of row 1 drop out
    w = mask[:, 1:] * mask[:, :-1]
    assert analysis.next_token_loss(logits, tokens, mask) == pytest.approx((nll * w).sum() / w.sum(), rel=1e-5)
    assert analysis.kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-6)
    other = rng.normal(size=(B, T, V)).astype(np.float32)
    logq = other - np.log(np.exp(other).sum(-1, keepdims=True))
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    assert analysis.kl_divergence(logits, other) == pytest.approx(kl.mean(), rel=1e-5)
    assert analysis.kl_divergence(logits, other, mask) == pytest.approx((kl * mask).sum() / mask.sum(), rel=1e-5)


def test_ce_loss_recovered_saelens_definition():
    assert analysis.ce_loss_recovered(2.0, 2.0, 10.0) == 1.0
    assert analysis.ce_loss_recovered(2.0, 10.0, 10.0) == 0.0
    assert analysis.ce_loss_recovered(2.0, 4.0, 10.0) == pytest.approx(0.75)
    assert np.isnan(analysis.ce_loss_recovered(2.0, 3.0, 2.0))


# ----------------------------------------------------------------------------- RQ4


def test_firing_rate_and_quintiles():
    codes = np.array([[1.0, 0.0, 0.0], [2.0, 0.5, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    np.testing.assert_allclose(analysis.firing_rate(codes), [0.75, 0.25, 0.0])
    rates = np.array([0.5, 0.0, 0.0, 0.0, 0.9, 0.1, 0.2, 0.3, 0.0, 0.4])
    q = analysis.firing_quintiles(rates)
    np.testing.assert_array_equal(np.bincount(q), [2, 2, 2, 2, 2])  # equal counts despite ties at 0
    np.testing.assert_array_equal(q, [4, 0, 0, 1, 4, 2, 2, 3, 1, 3])
    np.testing.assert_allclose(analysis.survival_by_quintile(np.ones(10), rates), np.ones(5))


def test_planted_rare_features_kept_frequent_rotated():
    n, S = 100, 3
    Q = _orthonormal(256, seed=7)
    A, U = Q[:n], Q[n : 2 * n]
    rng = np.random.default_rng(7)
    dense, pruned, rates = [], [], []
    for s in range(S):
        r = rng.uniform(1e-4, 0.2, size=n)
        q = analysis.firing_quintiles(r)
        # In quintile b a share of b/4 features is rotated by 60 deg (cos 0.5 < tau); seed s
        # keeps an extra 2*s features of Q5 so that seeds differ.
        lost = np.zeros(n, bool)
        for b in range(5):
            members = np.flatnonzero(q == b)
            k = round(len(members) * b / 4) - (2 * s if b == 4 else 0)
            lost[members[:k]] = True
        dense.append(A)
        pruned.append(_rotate(A, U, np.flatnonzero(lost), 60.0))
        rates.append(r)
    surv = analysis.feature_survival(np.stack(dense), np.stack(pruned), pairing='same_seed', n_boot=100)
    fr = analysis.fragility(surv.per_feature, np.stack(rates), n_boot=500, seed=0)
    expected_q5 = np.mean([2 * s / 20 for s in range(S)])
    np.testing.assert_allclose(fr.per_quintile, [1.0, 0.75, 0.5, 0.25, expected_q5])
    assert fr.effect.estimate == pytest.approx(1.0 - expected_q5)
    assert fr.effect.estimate > 0 and fr.effect.low > 0
    assert fr.effect.low <= fr.effect.estimate <= fr.effect.high
    assert fr.rho_quintile == pytest.approx(-1.0)
    assert fr.rho_feature.estimate < -0.5 and fr.rho_feature.high < 0
    np.testing.assert_allclose(fr.per_seed[0], [1.0, 0.75, 0.5, 0.25, 0.0])
    assert analysis.count_rho_minus_one([fr.rho_quintile, -0.9, np.nan, -1.0]) == 2


def test_fragility_flat_survival_has_zero_effect():
    rng = np.random.default_rng(8)
    fr = analysis.fragility(np.ones((2, 50)), rng.random((2, 50)), n_boot=100)
    assert fr.effect == (0.0, 0.0, 0.0)
    assert np.isnan(fr.rho_quintile)  # constant survival: undefined, as in scipy


# ----------------------------------------------------------------------------- RQ5


def test_exact_ablation_equals_gradient_estimate_on_linear_model():
    rng = np.random.default_rng(9)
    N, n = 30, 12
    codes = np.abs(rng.normal(size=(N, n))) * (rng.random((N, n)) < 0.5)
    codes[:, 5] = 0.0  # dead feature: never sampled for exact ablation
    w = jnp.asarray(rng.normal(size=n), jnp.float32)

    def loss_fn(c):
        return jnp.mean(c @ w) + 1.0

    res = analysis.causal_effects(loss_fn, codes, n_exact=20, seed=0)
    assert 5 not in res.exact_idx and len(res.exact_idx) == n - 1
    np.testing.assert_allclose(res.exact, res.estimate[res.exact_idx], atol=1e-5)
    np.testing.assert_allclose(res.estimate, -codes.mean(0) * np.asarray(w), atol=1e-5)
    assert res.pearson == pytest.approx(1.0, abs=1e-6)
    assert res.spearman == pytest.approx(1.0)
    assert res.clean_loss == pytest.approx(float((codes @ np.asarray(w)).mean() + 1.0), rel=1e-5)


def test_exact_ablation_on_nonlinear_model_matches_brute_force():
    rng = np.random.default_rng(10)
    N, n, d = 40, 16, 6
    codes = np.abs(rng.normal(size=(N, n))).astype(np.float32)
    W = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(N, d)).astype(np.float32)

    def loss_fn(c):
        return jnp.mean(jnp.square(c @ W - y))

    res = analysis.causal_effects(loss_fn, codes, features=[0, 3, 7])
    clean = np.mean((codes @ W - y) ** 2)
    for i, e in zip([0, 3, 7], res.exact):
        c = codes.copy()
        c[:, i] = 0
        assert e == pytest.approx(np.mean((c @ W - y) ** 2) - clean, rel=1e-3, abs=1e-5)
    again = analysis.causal_effects(loss_fn, codes, n_exact=5, seed=3)
    assert np.array_equal(again.exact_idx, analysis.causal_effects(loss_fn, codes, n_exact=5, seed=3).exact_idx)
    assert again.pearson > 0.5  # first-order estimate tracks the exact effect here


def test_survival_causal_correlation():
    x = np.linspace(0, 1, 60)
    iv = analysis.survival_causal_correlation(x, -(x**3), n_boot=200)
    # Importance is |effect|: the primary figure is +1, the signed correlation -1 beside it.
    assert iv.estimate == pytest.approx(1.0)
    assert iv.signed.estimate == pytest.approx(-1.0)
    assert (iv.n_live, iv.n_features) == (60, 60)
    rng = np.random.default_rng(11)
    iv = analysis.survival_causal_correlation(rng.random(300), rng.random(300), n_boot=300)
    assert iv.low < 0 < iv.high


def test_survival_causal_correlation_uses_live_features_only():
    # 40 live features whose importance rises with survival, and 40 that never fire (effect
    # exactly 0) at high survival: they would drag the correlation down.
    x = np.concatenate([np.linspace(0, 0.5, 40), np.linspace(0.6, 1.0, 40)])
    effect = np.concatenate([np.linspace(0.1, 2.0, 40), np.zeros(40)])
    fires = np.concatenate([np.full(40, 7), np.zeros(40, int)])
    all_feats = analysis.survival_causal_correlation(x, effect, n_boot=100)
    assert all_feats.estimate < 0.2
    live = analysis.survival_causal_correlation(x, effect, live=fires, n_boot=100)
    assert live.estimate == pytest.approx(1.0) and (live.n_live, live.n_features) == (40, 80)
    mask = analysis.survival_causal_correlation(x, effect, live=fires > 0, n_boot=100)
    assert mask == live
    with pytest.raises(ValueError, match='none of the 80 features fires'):
        analysis.survival_causal_correlation(x, effect, live=np.zeros(80))
    with pytest.raises(ValueError, match='live has 3 values'):
        analysis.survival_causal_correlation(x, effect, live=[1, 0, 1])


def test_causal_agreement_and_firing_counts():
    rng = np.random.default_rng(12)
    N, n = 30, 12
    codes = np.abs(rng.normal(size=(N, n))) * (rng.random((N, n)) < 0.5)
    codes[:, 5] = 0.0
    W = rng.normal(size=(n, 3)).astype(np.float32)

    def loss_fn(c):
        return jnp.mean(jnp.square(c @ W))

    res = analysis.causal_effects(loss_fn, codes, n_exact=8, seed=0)
    np.testing.assert_array_equal(res.fires, (codes != 0).sum(0))
    assert res.fires[5] == 0 and res.estimate[5] == 0.0
    ag = analysis.causal_agreement(res.estimate, res.exact_idx, res.exact, n_boot=200)
    assert ag.estimate == pytest.approx(res.spearman)
    assert ag.low <= ag.estimate <= ag.high
    assert np.isnan(analysis.causal_agreement(res.estimate, [0, 1], [0.1, 0.2]).estimate)
