"""SparseGPT (Frantar & Alistarh 2023): blockwise OBS pruning with a damped inverse Hessian.

For one linear layer with calibration inputs X [tokens, d_in] and H = X^T X, the columns (inputs)
are visited in blocks of 128; inside a block each pruned weight's error is spread over the
not-yet-visited inputs through the upper Cholesky factor of H^-1, and after the block the
accumulated error is propagated to the rest of the matrix. Masks are chosen per block (adaptive
mask selection) with score w^2 / [H^-1]_ii^2, exactly int(block_numel * sparsity) per block, or
N:M over M consecutive inputs chosen when the loop reaches the group.

Our kernels are [d_in, d_out]; internally we work on W^T [d_out, d_in] like the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.pruning.select import check_nm, check_sparsity, lowest_k, nm_prune_rows


def inverse_hessian_factor(H, damp: float = 0.01):
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that H^-1 = U^T U.

    Inputs that never fire (zero diagonal) get a unit diagonal as in the reference. Raises
    ValueError when H is not finite or the damped matrix is not positive definite.
    """
    H = jnp.asarray(H, jnp.float32)
    U = _inverse_hessian_factor(H, jnp.float32(damp))
    if not bool(jnp.all(jnp.isfinite(U))):
        raise InputError(
            'SparseGPT: the damped Hessian is not finite positive definite; '
            'expected finite calibration statistics (try a larger damp than %g)' % damp
        )
    return U


@jax.jit
def _inverse_hessian_factor(H, damp):
    diag = jnp.diag(H)
    dead = diag == 0
    H = H + jnp.diag(dead.astype(H.dtype))
    H = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(H.shape[0], dtype=H.dtype)
    L = jnp.linalg.cholesky(H)
    Hinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(H.shape[0], dtype=H.dtype))
    Hinv = (Hinv + Hinv.T) / 2  # symmetric to rounding, so the second Cholesky is stable
    return jnp.triu(jnp.linalg.cholesky(Hinv).T)


@functools.partial(jax.jit, static_argnames=('block_size', 'n', 'm', 'd_real'))
def _sparsegpt(Wt, U, dead, k_per_block, *, block_size: int, n: int, m: int, d_real: int):
    # Wt: [d_out, d_pad] float32 (padded with zero columns); U: [d_pad, d_pad] upper factor.
    d_out, d_pad = Wt.shape
    bs = block_size
    Wt = jnp.where(dead[None, :], 0.0, Wt)
    cols = jnp.arange(d_pad)
    diag_u = jnp.diag(U)

    def block(b, carry):
        Wt, pruned = carry
        i1 = b * bs
        W1 = jax.lax.dynamic_slice(Wt, (0, i1), (d_out, bs))
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (bs, bs))
        d1 = jax.lax.dynamic_slice(diag_u, (i1,), (bs,))
        real = (i1 + jnp.arange(bs)) < d_real  # padded inputs are never selected
        if n == 0:  # unstructured: exactly k lowest w^2 / d^2 of the block, stable order
            tmp = jnp.where(real[None, :], W1**2 / d1[None, :] ** 2, jnp.inf).reshape(-1)
            mask1 = lowest_k(tmp, k_per_block[b]).reshape(d_out, bs)
        else:
            mask1 = jnp.zeros((d_out, bs), jnp.bool_)

        def column(i, c):
            W1, Q1, Err1, mask1 = c
            if n != 0:  # choose the group's N lowest with the weights updated so far, as the reference
                g = jax.lax.dynamic_slice(W1, (0, i), (d_out, m)) ** 2
                g = g / jax.lax.dynamic_slice(d1, (i,), (m,))[None, :] ** 2
                mask1 = jnp.where(i % m == 0, jax.lax.dynamic_update_slice(mask1, nm_prune_rows(g, n), (0, i)), mask1)
            w = W1[:, i]
            d = U1[i, i]
            q = jnp.where(mask1[:, i], 0.0, w)
            err = (w - q) / d
            # U1 is upper triangular, so this only touches columns >= i (column i becomes q).
            W1 = W1 - err[:, None] * U1[i][None, :]
            return W1, Q1.at[:, i].set(q), Err1.at[:, i].set(err), mask1

        zeros = jnp.zeros((d_out, bs), jnp.float32)
        _, Q1, Err1, mask1 = jax.lax.fori_loop(0, bs, column, (W1, zeros, zeros, mask1))
        Wt = jax.lax.dynamic_update_slice(Wt, Q1, (0, i1))
        rows_u = jax.lax.dynamic_slice(U, (i1, 0), (bs, d_pad))
        Wt = Wt - jnp.where(cols[None, :] >= i1 + bs, Err1 @ rows_u, 0.0)
        pruned = jax.lax.dynamic_update_slice(pruned, mask1, (0, i1))
        return Wt, pruned

    pruned = jnp.zeros((d_out, d_pad), jnp.bool_)
    Wt, pruned = jax.lax.fori_loop(0, d_pad // bs, block, (Wt, pruned))
    return Wt, pruned


def sparsegpt_prune(W, H, sparsity=None, *, nm=None, block_size: int = 128, damp: float = 0.01):
    """Prunes one kernel W [d_in, d_out] with Hessian H = sum_t x_t x_t^T [d_in, d_in].

    Give either sparsity in [0, 1) (unstructured, per 128-input block) or nm=(N, M).
    Returns (W_new [d_in, d_out] in W's dtype with pruned entries exactly 0, keep-mask bool).
    """
    W = jnp.asarray(W)
    d_in, d_out = W.shape
    if tuple(H.shape) != (d_in, d_in):
        raise InputError(f'Hessian has shape {tuple(H.shape)}; expected ({d_in}, {d_in}) for W {W.shape}')
    if isinstance(block_size, bool) or int(block_size) < 1:
        raise InputError(f'block_size={block_size!r} is not valid; accepted: a positive int')
    if nm is not None:
        n, m = check_nm(nm, d_in)
        if block_size % m:
            raise InputError(f'block_size={block_size} is not valid for N:M {n}:{m}; accepted: a multiple of M={m}')
        s = 0.0
    else:
        n, m = 0, 1
        s = check_sparsity(sparsity if sparsity is not None else -1)
    W_new, keep, ok = _sparsegpt_prune(
        W, jnp.asarray(H, jnp.float32), jnp.float32(damp), sparsity=s, n=n, m=m, block_size=int(block_size)
    )
    if not bool(ok):
        raise InputError(
            'SparseGPT: non-finite inverse Hessian or weights; expected finite calibration '
            f'statistics and a positive definite damped Hessian (damp={damp})'
        )
    return W_new, keep


@functools.partial(jax.jit, static_argnames=('sparsity', 'n', 'm', 'block_size'))
def _sparsegpt_prune(W, H, damp, *, sparsity: float, n: int, m: int, block_size: int):
    d_in, d_out = W.shape
    bs = block_size
    U = _inverse_hessian_factor(H, damp)
    d_pad = -(-d_in // bs) * bs
    pad = d_pad - d_in
    Wt = W.astype(jnp.float32).T
    dead = jnp.diag(H) == 0
    if pad:  # padded inputs: zero weights, decoupled unit Hessian entries (U stays block diagonal)
        Wt = jnp.pad(Wt, ((0, 0), (0, pad)))
        U = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(jnp.r_[jnp.zeros(d_in), jnp.ones(pad)])
        dead = jnp.pad(dead, (0, pad))
    counts = [min(bs, d_in - i1) for i1 in range(0, d_pad, bs)]
    k_per_block = jnp.asarray(np.asarray([int(c * d_out * sparsity) for c in counts], np.int32))
    Wt, pruned = _sparsegpt(Wt, U, dead, k_per_block, block_size=bs, n=n, m=m, d_real=d_in)
    W_new = Wt[:, :d_in].T
    ok = jnp.all(jnp.isfinite(U)) & jnp.all(jnp.isfinite(W_new))
    return W_new.astype(W.dtype), ~pruned[:, :d_in].T, ok


def hessian_from_inputs(X):
    """H = X^T X in float32 for inputs X [tokens, d_in] (helper for tests and one-layer use)."""
    X = np.asarray(X, np.float32)
    return jnp.asarray(X.T @ X)
