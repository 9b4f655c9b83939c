"""Synthetic ground truth for SAE tests: sparse combinations of known unit directions."""

import numpy as np


def sparse_mixture(n_tokens=16384, d=64, n_dirs=256, k_true=4, seed=0):
    """x [n_tokens, d] = sum of k_true of n_dirs unit directions with weights in [0.5, 2]; returns (x, dirs)."""
    r = np.random.default_rng(seed)
    dirs = r.normal(size=(n_dirs, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.argsort(r.random((n_tokens, n_dirs)), 1)[:, :k_true]
    c = np.zeros((n_tokens, n_dirs))
    np.put_along_axis(c, idx, r.uniform(0.5, 2.0, (n_tokens, k_true)), 1)
    return (c @ dirs).astype(np.float32), dirs


def recovered(w_dec, dirs, tau=0.9):
    """Fraction of true directions whose best decoder row has cosine > tau (w_dec [n, d] or [S, n, d])."""
    w = np.asarray(w_dec)
    w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    cos = np.einsum('...nd,md->...mn', w, dirs).max(-1)
    return (cos > tau).mean(-1)
