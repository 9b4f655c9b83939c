"""SparseGPT against a NumPy transcription of the reference loop; reconstruction error ordering."""

import numpy as np
import pytest

from prunesae_jax.pruning.scores import magnitude_scores, wanda_scores
from prunesae_jax.pruning.select import per_matrix_mask, per_row_mask
from prunesae_jax.pruning.sparsegpt import hessian_from_inputs, sparsegpt_prune


def ref_sparsegpt(W, X, sparsity=0.0, n=0, m=0, blocksize=128, percdamp=0.01):
    """The reference's fasterprune in float64, torch layout W_t [rows = outputs, columns = inputs]."""
    W = W.T.astype(np.float64).copy()
    H = X.T.astype(np.float64) @ X.astype(np.float64)
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor: H^-1 = U^T U
    prune_mask = np.zeros_like(W, bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if n == 0:
            tmp = W1**2 / np.diag(Hinv1)[None, :] ** 2
            k = int(tmp.size * sparsity)  # exact count (the reference uses <= thresh)
            mask1 = np.zeros(tmp.size, bool)
            mask1[np.argsort(tmp.ravel(), kind='stable')[:k]] = True
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = np.zeros_like(W1, bool)
        for i in range(count):
            w, d = W1[:, i], Hinv1[i, i]
            if n != 0 and i % m == 0:
                tmp = W1[:, i : i + m] ** 2 / np.diag(Hinv1)[i : i + m][None, :] ** 2
                idx = np.argsort(tmp, axis=1, kind='stable')[:, :n]
                np.put_along_axis(mask1[:, i : i + m], idx, True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        prune_mask[:, i1:i2] = mask1
    return W.T, ~prune_mask.T


def _layer(seed=0, d_in=96, d_out=40, tokens=512):
    rng = np.random.default_rng(seed)
    # correlated inputs with uneven scales, as real activations
    X = rng.standard_normal((tokens, d_in)) @ (np.eye(d_in) + 0.3 * rng.standard_normal((d_in, d_in)))
    X = (X * np.exp(rng.standard_normal(d_in))).astype(np.float32)
    W = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    return W, X


@pytest.mark.parametrize('kw', [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_sparsegpt_matches_numpy_reference(kw):
    W, X = _layer()
    H = hessian_from_inputs(X)
    W_new, keep = sparsegpt_prune(W, H, kw.get('sparsity'), nm=kw.get('nm'), block_size=32)
    n, m = kw.get('nm', (0, 0))
    W_ref, keep_ref = ref_sparsegpt(W, X, kw.get('sparsity', 0.0), n, m, blocksize=32)
    W_new, keep = np.asarray(W_new), np.asarray(keep)
    assert (keep != keep_ref).mean() < 2e-3  # float32 vs float64 may flip a near tie
    agree = keep == keep_ref
    np.testing.assert_allclose(W_new[agree & keep], W_ref[agree & keep], rtol=2e-2, atol=2e-3)
    assert (W_new[~keep] == 0).all()
    if 'nm' in kw:
        assert (keep.reshape(-1, 4, W.shape[1]).sum(1) == 2).all()
    else:  # exactly int(block_numel * s) per block of 32 inputs
        assert [int((~keep[a : a + 32]).sum()) for a in range(0, 96, 32)] == [int(32 * 40 * 0.5)] * 3


def test_sparsegpt_partial_last_block_and_errors():
    W, X = _layer()  # 96 inputs in blocks of 64 and 32 (padded inside)
    W_new, keep = sparsegpt_prune(W, hessian_from_inputs(X), 0.5, block_size=64)
    W_ref, keep_ref = ref_sparsegpt(W, X, 0.5, blocksize=64)
    assert (np.asarray(keep) != keep_ref).mean() < 2e-3
    counts = [int((~np.asarray(keep)[a : a + 64]).sum()) for a in range(0, 96, 64)]
    assert counts == [64 * 40 // 2, 32 * 40 // 2]
    with pytest.raises(ValueError, match='Hessian has shape'):
        sparsegpt_prune(W, np.eye(3, dtype=np.float32), 0.5)
    with pytest.raises(ValueError, match='multiple of M=8'):
        sparsegpt_prune(W, hessian_from_inputs(X), nm=(4, 8), block_size=12)
    H = np.asarray(hessian_from_inputs(X)).copy()
    H[0, 0] = np.nan
    with pytest.raises(ValueError, match='non-finite'):
        sparsegpt_prune(W, H, 0.5, block_size=64)


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    W, X = _layer(seed=1, tokens=2048)
    x_sq = (X.astype(np.float64) ** 2).sum(0)

    def err(W2):
        return float(np.linalg.norm(X @ W - X @ np.asarray(W2, np.float64)))

    magnitude = W * np.asarray(per_matrix_mask(magnitude_scores(W), 0.5))
    wanda = W * np.asarray(per_row_mask(wanda_scores(W, x_sq), 0.5))
    sparsegpt, keep = sparsegpt_prune(W, hessian_from_inputs(X), 0.5, block_size=32)
    e = {'magnitude': err(magnitude), 'wanda': err(wanda), 'sparsegpt': err(sparsegpt)}
    print("||WX - W'X|| at 50%:", {k: round(v, 2) for k, v in e.items()})
    assert 1 - np.asarray(keep).mean() == 0.5
    assert e['sparsegpt'] < e['wanda'] < e['magnitude']
