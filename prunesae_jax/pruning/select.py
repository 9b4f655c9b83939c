"""Turning scores into keep-masks with exact counts: per_row, per_matrix, global and N:M.

Every rule removes exactly the stated number of lowest-scoring weights; ties are broken by
position (stable sort: the earlier weight is pruned first), so masks are reproducible and equal
to a NumPy stable-argsort reference. Scores are [d_in, d_out] like our kernels; a Wanda "output
row" is a column here, and N:M groups are M consecutive inputs (axis 0) of one output column.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError

GROUPS = ('per_row', 'per_matrix', 'global')


def check_sparsity(sparsity) -> float:
    """Returns sparsity as float or raises: it must be a number in [0, 1)."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        s = float('nan')
    if not 0.0 <= s < 1.0:  # NaN fails too
        raise InputError(f'sparsity={sparsity!r} is not valid; accepted: a number in [0, 1)')
    return s


def check_group(group: str) -> str:
    """Returns group or raises unless it is one of GROUPS."""
    if group not in GROUPS:
        raise InputError(f'group={group!r} is not valid; accepted: {" | ".join(GROUPS)}')
    return group


def check_nm(nm, d_in: int | None = None) -> tuple[int, int]:
    """Validates an N:M pattern (keep M-N of every M consecutive inputs) against a width d_in."""
    try:
        n, m = (int(v) for v in nm)
    except (TypeError, ValueError):
        raise InputError(f'nm={nm!r} is not valid; accepted: a pair of ints (N, M) like (2, 4)') from None
    if not 1 <= n < m:
        raise InputError(f'nm={nm!r} is not valid; accepted: (N, M) with 1 <= N < M')
    if d_in is not None and d_in % m:
        raise InputError(
            f'nm={nm!r} does not fit: input width {d_in} is not divisible by M={m}; '
            'accepted: an M that divides every prunable input width'
        )
    return n, m


def _sortable(x):
    """float32 -> uint32 keys with the same order (-0.0 counts as +0.0, as in a comparison sort)."""
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))


def lowest_k(scores, k, axis=None):
    """bool mask, True at the k lowest scores along axis (None: over the flattened array).

    Ties are taken in index order, like a stable sort; k may be traced. No sort: the k-th
    smallest key is found by bisection over the 32-bit keys (32 counting passes), which on CPU is
    an order of magnitude faster than XLA's sort and works the same on any backend.
    """
    shape = scores.shape
    keys = _sortable(scores)
    flat = axis is None
    keys = keys.reshape(-1, 1) if flat else jnp.moveaxis(keys, axis, 0)  # [n, ...]
    k = jnp.asarray(k, jnp.int32)

    def step(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys <= mid[None], axis=0, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    rest = keys.shape[1:]
    lo, _ = jax.lax.fori_loop(0, 32, step, (jnp.zeros(rest, jnp.uint32), jnp.full(rest, 0xFFFFFFFF, jnp.uint32)))
    less = keys < lo[None]
    eq = keys == lo[None]
    r = k - jnp.sum(less, axis=0, dtype=jnp.int32)
    take = eq & (jnp.cumsum(eq, axis=0, dtype=jnp.int32) <= r[None])
    out = (less | take) & (k > 0)
    return out.reshape(shape) if flat else jnp.moveaxis(out, 0, axis)


@functools.partial(jax.jit, static_argnums=1)
def _per_row_keep(scores, k: int):
    return ~lowest_k(scores, k, axis=0)


def per_row_mask(scores, sparsity):
    """Keep-mask zeroing exactly int(d_in * sparsity) inputs of each output (Wanda's reference group)."""
    s = check_sparsity(sparsity)
    return _per_row_keep(jnp.asarray(scores, jnp.float32), int(scores.shape[0] * s))


@functools.partial(jax.jit, static_argnums=1)
def _per_matrix_keep(scores, k: int):
    return ~lowest_k(scores, k)


def per_matrix_mask(scores, sparsity):
    """Keep-mask zeroing exactly int(numel * sparsity) lowest scores of the matrix (flat order ties)."""
    s = check_sparsity(sparsity)
    return _per_matrix_keep(jnp.asarray(scores, jnp.float32), int(np.prod(scores.shape) * s))


def nm_prune_rows(g, n: int):
    """g [rows, M] -> bool [rows, M], True at the n lowest of each row (ties: earlier index first).

    Pairwise comparisons (M is small) rank the group without a sort.
    """
    m = g.shape[-1]
    idx = jnp.arange(m)
    a, b = g[..., :, None], g[..., None, :]  # a: the entry ranked, b: the others
    before = (b < a) | ((b == a) & (idx[None, :] < idx[:, None]))
    return jnp.sum(before, axis=-1) < n


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nm_mask(scores, n: int, m: int):
    d_in, d_out = scores.shape
    g = scores.reshape(d_in // m, m, d_out).swapaxes(1, 2)  # [groups, d_out, M]
    return ~nm_prune_rows(g, n).swapaxes(1, 2).reshape(d_in, d_out)


def nm_mask(scores, nm):
    """Keep-mask pruning the N lowest of every M consecutive inputs of each output column."""
    n, m = check_nm(nm, scores.shape[0])
    return _nm_mask(jnp.asarray(scores, jnp.float32), n, m)


def group_mask(scores, sparsity, group: str):
    """per_row or per_matrix selection for one matrix (global needs all matrices: global_masks)."""
    check_group(group)
    if group == 'per_row':
        return per_row_mask(scores, sparsity)
    if group == 'per_matrix':
        return per_matrix_mask(scores, sparsity)
    raise InputError("group 'global' selects over all matrices at once; use global_masks")


@jax.jit
def _global_leaf(scores, t, r):
    # Prune everything below t, and the first r entries equal to t (in flat order).
    less = scores < t
    eq = (scores == t).reshape(-1)
    take = eq & (jnp.cumsum(eq) <= r)
    return ~(less | take.reshape(scores.shape))


def global_masks(scores: Sequence, sparsity) -> list:
    """One threshold over all matrices: prunes exactly int(total * sparsity) lowest scores.

    scores: a sequence of [d_in, d_out] arrays (it may compute each item on access: every item is
    read three times). Memory: one float32 concatenation of all scores (~4 bytes per prunable weight).
    Ties at the threshold are pruned in matrix order, then flat order, like a stable sort.
    """
    s = check_sparsity(sparsity)
    shapes = [tuple(sh) for sh in getattr(scores, 'shapes', None) or (scores[j].shape for j in range(len(scores)))]
    sizes = [int(np.prod(sh)) for sh in shapes]
    total = sum(sizes)
    k = int(total * s)
    if k == 0:
        return [jnp.ones(sh, jnp.bool_) for sh in shapes]
    flat = np.empty(total, np.float32)  # the one full copy
    off = 0
    for j, size in enumerate(sizes):
        flat[off : off + size] = np.asarray(scores[j], np.float32).reshape(-1)
        off += size
    flat.partition(k - 1)  # in place: flat[k-1] is the k-th smallest
    t = flat[k - 1]
    del flat
    n_less = sum(int(np.count_nonzero(np.asarray(scores[j], np.float32) < t)) for j in range(len(scores)))
    r = k - n_less  # how many entries equal to t are pruned, first in canonical order
    out = []
    for j in range(len(scores)):
        a = jnp.asarray(scores[j], jnp.float32)
        n_eq = int(jnp.count_nonzero(a == t))
        out.append(_global_leaf(a, jnp.float32(t), jnp.int32(min(max(r, 0), n_eq))))
        r -= n_eq
    return out


class LazyScores(Sequence):
    """A sequence computing fn(arrays[j]) on access, so global selection holds one score at a time."""

    def __init__(self, arrays: Sequence, fn):
        self._arrays, self._fn = list(arrays), fn
        self.shapes = [tuple(a.shape) for a in self._arrays]

    def __len__(self):
        return len(self._arrays)

    def __getitem__(self, j):
        return self._fn(self._arrays[j])
