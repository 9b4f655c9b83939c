"""Selection rules against independent NumPy references (stable argsort, exact counts)."""

import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.pruning.scores import magnitude_scores, wanda_scores
from prunesae_jax.pruning.select import (
    LazyScores,
    global_masks,
    group_mask,
    nm_mask,
    per_matrix_mask,
    per_row_mask,
)

# ----------------------------------------------------------------------------- NumPy references
# Written in the torch layout of the Wanda reference (W_t [d_out, d_in], rows = outputs), then
# transposed, so that the [d_in, d_out] convention of the package is checked too.


def ref_wanda_per_row(W, x_sq):
    """Wanda reference: metric = |W| * sqrt(scaler_row); per output row zero the int(d_in*s) lowest."""
    Wt = W.T.astype(np.float64)
    metric = np.abs(Wt) * np.sqrt(x_sq.astype(np.float64))[None, :]
    return metric


def ref_per_row_keep(metric_t, s):
    d_out, d_in = metric_t.shape
    k = int(d_in * s)
    idx = np.argsort(metric_t, axis=1, kind='stable')[:, :k]
    prune = np.zeros(metric_t.shape, bool)
    np.put_along_axis(prune, idx, True, axis=1)
    return ~prune.T


def ref_flat_keep(scores_list, s):
    """Exactly int(total*s) lowest over the concatenation (per matrix: a list of one)."""
    flat = np.concatenate([a.ravel() for a in scores_list])
    k = int(flat.size * s)
    prune = np.zeros(flat.size, bool)
    prune[np.argsort(flat, kind='stable')[:k]] = True
    out, off = [], 0
    for a in scores_list:
        out.append(~prune[off : off + a.size].reshape(a.shape))
        off += a.size
    return out


def ref_nm_keep(scores, n, m):
    d_in, d_out = scores.shape
    keep = np.ones_like(scores, bool)
    for o in range(d_out):
        for g in range(0, d_in, m):
            idx = np.argsort(scores[g : g + m, o], kind='stable')[:n]
            keep[g + idx, o] = False
    return keep


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- tests

SPARSITIES = [0.0, 0.1, 0.3, 0.5, 0.6, 0.77]


@pytest.mark.parametrize('s', SPARSITIES)
def test_wanda_per_row_matches_reference(s):
    W = _rand((48, 40), 1)
    X = _rand((300, 48), 2) * np.linspace(0.1, 3, 48, dtype=np.float32)  # uneven feature norms
    x_sq = (X.astype(np.float64) ** 2).sum(0).astype(np.float32)
    scores = wanda_scores(W, x_sq)
    np.testing.assert_allclose(np.asarray(scores), ref_wanda_per_row(W, x_sq).T, rtol=1e-6)
    keep = np.asarray(per_row_mask(scores, s))
    ref = ref_per_row_keep(np.asarray(scores).T, s)
    assert keep.dtype == bool and keep.shape == W.shape
    np.testing.assert_array_equal(keep, ref)
    # exactly int(d_in * s) zeros in every output column
    assert (keep.shape[0] - keep.sum(0) == int(48 * s)).all()
    # a different ranking than per_matrix: the Wanda rule is not |W|
    if 0 < s:
        assert not np.array_equal(keep, np.asarray(per_row_mask(magnitude_scores(W), s)))


@pytest.mark.parametrize('s', SPARSITIES)
def test_magnitude_per_matrix_matches_reference(s):
    W = _rand((64, 24), 3)
    W[5, :3] = 0.0  # ties at zero are pruned in flat order
    keep = np.asarray(per_matrix_mask(magnitude_scores(W), s))
    (ref,) = ref_flat_keep([np.abs(W)], s)
    np.testing.assert_array_equal(keep, ref)
    assert W.size - keep.sum() == int(W.size * s)


@pytest.mark.parametrize('s', [0.0, 0.3, 0.5, 0.6])
def test_magnitude_global_matches_reference(s):
    shapes = [(32, 48), (48, 32), (32, 16), (16, 64)]
    Ws = [_rand(sh, 10 + j) * (j + 1) for j, sh in enumerate(shapes)]  # different scales per matrix
    Ws[1][:2, :5] = 0.0
    Ws[2][3, :] = Ws[0][0, 0]  # exact ties across matrices at a mid value
    got = global_masks(LazyScores([jnp.asarray(w) for w in Ws], magnitude_scores), s)
    ref = ref_flat_keep([np.abs(w) for w in Ws], s)
    total = sum(w.size for w in Ws)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), r)
    assert total - sum(int(np.asarray(g).sum()) for g in got) == int(total * s)
    if s > 0:  # one threshold: per-matrix fractions differ (small-scale matrices lose more)
        fr = [1 - np.asarray(g).mean() for g in got]
        assert fr[0] > fr[3]


def test_global_ties_at_threshold_exact():
    # every score equal: the first k in canonical order go
    a, b = np.ones((4, 4), np.float32), np.ones((4, 2), np.float32)
    got = global_masks([a, b], 0.5)
    ref = ref_flat_keep([a, b], 0.5)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), r)
    assert 24 - sum(int(np.asarray(g).sum()) for g in got) == 12


@pytest.mark.parametrize('n,m', [(2, 4), (4, 8), (1, 4)])
def test_nm_matches_reference_and_holds_in_every_group(n, m):
    S = np.abs(_rand((64, 24), 4))
    S[8:12, 0] = 1.0  # a fully tied group
    keep = np.asarray(nm_mask(S, (n, m)))
    np.testing.assert_array_equal(keep, ref_nm_keep(S, n, m))
    groups = keep.reshape(64 // m, m, 24)
    assert (groups.sum(axis=1) == m - n).all()
    assert 1 - keep.mean() == pytest.approx(n / m)


def test_group_mask_dispatch_and_errors():
    S = np.abs(_rand((16, 8), 5))
    np.testing.assert_array_equal(np.asarray(group_mask(S, 0.5, 'per_row')), np.asarray(per_row_mask(S, 0.5)))
    with pytest.raises(ValueError, match=r"group='per_column' is not valid; accepted: per_row \| per_matrix"):
        group_mask(S, 0.5, 'per_column')
    with pytest.raises(ValueError, match='global_masks'):
        group_mask(S, 0.5, 'global')
    for bad in (1.0, -0.1, 1.5, 'half', None):
        with pytest.raises(ValueError, match=r'sparsity'):
            per_row_mask(S, bad)
    with pytest.raises(ValueError, match='1 <= N < M'):
        nm_mask(S, (4, 4))
    with pytest.raises(ValueError, match='1 <= N < M'):
        nm_mask(S, (0, 4))
    with pytest.raises(ValueError, match='not divisible by M=8'):
        nm_mask(np.ones((12, 4), np.float32), (2, 8))
    with pytest.raises(ValueError, match='shape'):
        wanda_scores(S, np.ones(8, np.float32))
