"""Matching SAE features across dictionaries by the cosine of their decoder directions.

A feature is a row of W_dec [n_latents, d]. Two features are compared by the cosine of
their decoder rows, normalised WITH their sign: a feature and its negation have cosine
-1 and are NOT a match (a TopK/ReLU code is non-negative, so a negated direction writes
the opposite thing into the residual stream).

Mutual nearest neighbours (MNN), the paper's matching (arXiv 2603.25325, RQ1/RQ2): latent
i of A and latent j of B match when j is i's most similar row in B, i is j's most similar
row in A, and cos(i, j) >= tau (tau = 0.7, robustness at 0.6 / 0.8). The matched fraction
is the share of A's latents with such a partner.

`optimal_match` is the one-to-one alternative: the Hungarian assignment (scipy's
linear_sum_assignment) that maximises the total cosine, thresholded at tau the same way.

The nearest-neighbour pass is blockwise and jitted: tiles of [block_size, block_size]
cosines are computed one at a time and folded into running row and column maxima, so
memory is O(block_size^2 + (n_a + n_b) d) and 100k+ latents never build the full
n_a x n_b matrix.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from prunesae_jax.analysis.checks import check_finite
from prunesae_jax.errors import InputError

_EPS = 1e-12
# optimal_match builds the dense cosine matrix in float64 for scipy; cap it at 2 GiB.
_OPTIMAL_MAX_ENTRIES = 2**28


def _as_decoder(D, name: str) -> np.ndarray:
    D = np.asarray(D)
    if D.ndim != 2 or D.shape[0] == 0 or D.shape[1] == 0:
        raise InputError(f'{name} has shape {D.shape}; expected a non-empty decoder matrix [n_latents, d]')
    if not np.issubdtype(D.dtype, np.floating):
        raise InputError(f'{name} has dtype {D.dtype}; expected a floating-point decoder matrix')
    check_finite(D, name, 'finite decoder rows')
    return D


def _check_pair(D_a, D_b) -> tuple[np.ndarray, np.ndarray]:
    A = _as_decoder(D_a, 'D_a')
    B = _as_decoder(D_b, 'D_b')
    if A.shape[1] != B.shape[1]:
        raise InputError(f'D_a has d={A.shape[1]} and D_b has d={B.shape[1]}; expected the same model width d')
    return A, B


def _check_block(block_size: int) -> int:
    if int(block_size) < 1:
        raise InputError(f'block_size={block_size!r}; expected a positive integer such as 4096')
    return int(block_size)


@jax.jit
def _normalize_rows(D):
    D = jnp.asarray(D, jnp.float32)
    norm = jnp.linalg.norm(D, axis=-1, keepdims=True)
    return D / jnp.maximum(norm, _EPS)


def normalize_rows(D):
    """Rows scaled to unit L2 norm (float32), sign kept; all-zero rows (dead latents) stay zero."""
    return _normalize_rows(check_finite(D, 'D', 'finite decoder rows'))


def cosine_matrix(D_a, D_b) -> np.ndarray:
    """Full cosine matrix [n_a, n_b] of decoder rows (sign kept). For small inputs only;
    use nearest_neighbours / mnn_match for large dictionaries."""
    A, B = _check_pair(D_a, D_b)
    return np.asarray(jnp.dot(_normalize_rows(A), _normalize_rows(B).T, precision=jax.lax.Precision.HIGHEST))


@functools.partial(jax.jit, static_argnames=('n_a', 'n_b', 'bs_a', 'bs_b'))
def _nn_pass(A, B, n_a: int, n_b: int, bs_a: int, bs_b: int):
    # A [ka*bs_a, d], B [kb*bs_b, d], zero padded; padded entries are masked to -inf.
    d = A.shape[1]
    ka, kb = A.shape[0] // bs_a, B.shape[0] // bs_b
    A = _normalize_rows(A).reshape(ka, bs_a, d)
    B = _normalize_rows(B).reshape(kb, bs_b, d)
    row_valid = (jnp.arange(ka * bs_a) < n_a).reshape(ka, bs_a)
    col_valid = (jnp.arange(kb * bs_b) < n_b).reshape(kb, bs_b)
    neg = jnp.float32(-jnp.inf)

    def outer(col_state, xs):
        col_max, col_arg = col_state  # [kb, bs_b]
        a_blk, i, rvalid = xs

        def inner(row_state, ys):
            row_max, row_arg = row_state  # [bs_a]
            b_blk, j, cvalid, cmax_j, carg_j = ys
            s = jnp.dot(a_blk, b_blk.T, precision=jax.lax.Precision.HIGHEST)  # [bs_a, bs_b]
            s_r = jnp.where(cvalid[None, :], s, neg)
            bm = s_r.max(axis=1)
            ba = s_r.argmax(axis=1).astype(jnp.int32) + j * bs_b
            # Strict '>' keeps the earliest block on ties, so ties resolve to the lowest index.
            up = bm > row_max
            row_state = (jnp.where(up, bm, row_max), jnp.where(up, ba, row_arg))
            s_c = jnp.where(rvalid[:, None], s, neg)
            cm = s_c.max(axis=0)
            ca = s_c.argmax(axis=0).astype(jnp.int32) + i * bs_a
            upc = cm > cmax_j
            return row_state, (jnp.where(upc, cm, cmax_j), jnp.where(upc, ca, carg_j))

        init_row = (jnp.full((bs_a,), neg), jnp.zeros((bs_a,), jnp.int32))
        row_state, col_state = jax.lax.scan(
            inner, init_row, (B, jnp.arange(kb, dtype=jnp.int32), col_valid, col_max, col_arg)
        )
        return col_state, row_state

    init_col = (jnp.full((kb, bs_b), neg), jnp.zeros((kb, bs_b), jnp.int32))
    (col_max, col_arg), (row_max, row_arg) = jax.lax.scan(
        outer, init_col, (A, jnp.arange(ka, dtype=jnp.int32), row_valid)
    )
    return (
        row_arg.reshape(-1)[:n_a],
        row_max.reshape(-1)[:n_a],
        col_arg.reshape(-1)[:n_b],
        col_max.reshape(-1)[:n_b],
    )


def _pad_rows(X: np.ndarray, multiple: int) -> np.ndarray:
    n = X.shape[0]
    pad = (-n) % multiple
    X = X.astype(np.float32, copy=False)
    if pad:
        X = np.concatenate([X, np.zeros((pad, X.shape[1]), np.float32)], axis=0)
    return X


def nearest_neighbours(D_a, D_b, block_size: int = 4096):
    """Each row's most similar row in the other dictionary, by cosine (sign kept).

    D_a [n_a, d], D_b [n_b, d]. One jitted blockwise pass over [block_size, block_size]
    tiles computes both directions. Ties go to the lowest index.
    Returns (nn_a [n_a] int64, max_cos_a [n_a] float32, nn_b [n_b] int64, max_cos_b [n_b] float32):
    nn_a[i] = argmax_j cos(a_i, b_j), max_cos_a[i] its cosine; likewise from B to A.
    """
    A, B = _check_pair(D_a, D_b)
    bs = _check_block(block_size)
    n_a, n_b = A.shape[0], B.shape[0]
    bs_a, bs_b = min(bs, n_a), min(bs, n_b)
    out = _nn_pass(_pad_rows(A, bs_a), _pad_rows(B, bs_b), n_a=n_a, n_b=n_b, bs_a=bs_a, bs_b=bs_b)
    nn_a, cos_a, nn_b, cos_b = (np.asarray(o) for o in out)
    return nn_a.astype(np.int64), cos_a, nn_b.astype(np.int64), cos_b


def max_cosine(D_a, D_b, block_size: int = 4096):
    """Per-feature survival geometry: for every row of D_a its maximum cosine to any row
    of D_b (sign kept) and the index attaining it. Blockwise; returns
    (max_cos [n_a] float32, argmax [n_a] int64)."""
    nn_a, cos_a, _, _ = nearest_neighbours(D_a, D_b, block_size)
    return cos_a, nn_a


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """Result of matching dictionary A against dictionary B (arrays are numpy).

    pairs [M, 2]: (row of D_a, row of D_b) for every matched pair (cosine >= tau), sorted by row of A.
    cosines [M]: their cosines.  matched_fraction = M / n_a.  matched [n_a]: bool per A latent.
    partner [n_a]: the MNN partner (mnn_match) or the assigned one (optimal_match) in B before
    thresholding, -1 if none;
    partner_cos [n_a]: its cosine, nan if none.  nn_a / max_cos_a [n_a] and nn_b / max_cos_b [n_b]:
    plain nearest neighbours in each direction.
    """

    pairs: np.ndarray
    cosines: np.ndarray
    matched_fraction: float
    matched: np.ndarray
    partner: np.ndarray
    partner_cos: np.ndarray
    nn_a: np.ndarray
    max_cos_a: np.ndarray
    nn_b: np.ndarray
    max_cos_b: np.ndarray
    tau: float
    method: str  # 'mnn' (mnn_match) or 'optimal' (optimal_match)
    n_a: int
    n_b: int

    def fraction_at(self, tau: float) -> float:
        """Matched fraction at another threshold, reusing the partners (neither the MNN
        partners nor the assignment depend on tau)."""
        with np.errstate(invalid='ignore'):
            return float(np.mean(self.partner_cos >= float(tau)))


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not -1.0 <= tau <= 1.0:
        raise InputError(f'tau={tau!r}; expected a cosine threshold in [-1, 1], e.g. 0.7')
    return tau


def _match_result(partner, partner_cos, neighbours, tau: float, method: str, n_b: int) -> MatchResult:
    """MatchResult of the partners [n_a] and their cosines (nan where none), kept at cosine >= tau."""
    nn_a, cos_a, nn_b, cos_b = neighbours
    n_a = partner.shape[0]
    with np.errstate(invalid='ignore'):
        matched = partner_cos >= tau
    idx = np.flatnonzero(matched)
    pairs = np.stack([idx, partner[idx]], axis=1).astype(np.int64)
    return MatchResult(
        pairs=pairs,
        cosines=partner_cos[idx],
        matched_fraction=float(idx.size / n_a),
        matched=matched,
        partner=partner.astype(np.int64),
        partner_cos=partner_cos,
        nn_a=nn_a,
        max_cos_a=cos_a,
        nn_b=nn_b,
        max_cos_b=cos_b,
        tau=tau,
        method=method,
        n_a=n_a,
        n_b=n_b,
    )


def mnn_match(D_a, D_b, tau: float = 0.7, block_size: int = 4096) -> MatchResult:
    """Match the features of two SAEs as mutual nearest neighbours of their decoder rows
    (the paper's RQ1/RQ2 matching).

    D_a [n_a, d], D_b [n_b, d]: decoder matrices (W_dec rows = feature directions).
    a_i and b_j match when nn_a[i] == j, nn_b[j] == i and cos(a_i, b_j) >= tau.
    Blockwise, bounded memory. Cosine keeps the sign: a negated copy of a feature
    (cosine -1) is not a match. matched_fraction = (#matched pairs) / n_a, i.e. the
    share of D_a's latents that have a partner; with D_a the dense-model SAE this is the
    paper's feature survival.
    """
    A, B = _check_pair(D_a, D_b)
    tau = _check_tau(tau)
    neighbours = nearest_neighbours(A, B, block_size)
    nn_a, cos_a, nn_b, _ = neighbours
    mutual = nn_b[nn_a] == np.arange(A.shape[0])
    partner = np.where(mutual, nn_a, -1)
    partner_cos = np.where(mutual, cos_a, np.nan).astype(np.float32)
    return _match_result(partner, partner_cos, neighbours, tau, 'mnn', B.shape[0])


def optimal_match(D_a, D_b, tau: float = 0.7, block_size: int = 4096) -> MatchResult:
    """Match the features of two SAEs one to one by the assignment that maximises the
    total cosine of their decoder rows (Hungarian algorithm), keeping pairs with cosine >= tau.

    D_a [n_a, d], D_b [n_b, d] as in mnn_match. Every latent of the smaller dictionary is
    assigned a distinct partner (scipy.optimize.linear_sum_assignment on the dense cosine
    matrix, sign kept); unlike mnn_match a pair need not be each other's nearest neighbour.
    Dense: for dictionaries up to ~16k x 16k (n_a * n_b <= 2**28). block_size: tile size
    of the nearest-neighbour pass that fills MatchResult's nn_* / max_cos_* fields.
    """
    A, B = _check_pair(D_a, D_b)
    tau = _check_tau(tau)
    n_a, n_b = A.shape[0], B.shape[0]
    if n_a * n_b > _OPTIMAL_MAX_ENTRIES:
        raise InputError(
            f'optimal_match with n_a*n_b={n_a * n_b} cosines; expected at most {_OPTIMAL_MAX_ENTRIES} '
            '(use mnn_match for large dictionaries)'
        )
    neighbours = nearest_neighbours(A, B, block_size)
    C = cosine_matrix(A, B).astype(np.float64)
    rows, cols = linear_sum_assignment(C, maximize=True)
    partner = np.full(n_a, -1, np.int64)
    partner[rows] = cols
    partner_cos = np.full(n_a, np.nan, np.float32)
    partner_cos[rows] = C[rows, cols]
    return _match_result(partner, partner_cos, neighbours, tau, 'optimal', n_b)
