"""Input checks shared by every public function of prunesae_jax.analysis.

One place decides what a bad array is, so every measure says it the same way:
`check_finite` rejects NaN / inf with an InputError that names the argument and the first
bad index ("D_a has a non-finite value at [12, 3]; expected finite decoder rows"), and
`check_nonempty` rejects an empty array where a mean would be taken.
"""

from __future__ import annotations

import sys

import numpy as np

from prunesae_jax.errors import InputError

# The host-side scan looks at this many elements at a time, so checking a [1M, 16k] code
# matrix never allocates a boolean copy of all of it.
_CHUNK = 2**22


def _where(shape: tuple[int, ...], flat_index: int) -> str:
    if not shape:
        return '[]'
    return '[' + ', '.join(str(int(i)) for i in np.unravel_index(flat_index, shape)) + ']'


def _first_bad(x: np.ndarray) -> int | None:
    flat = x.reshape(-1)
    for a in range(0, flat.shape[0], _CHUNK):
        ok = np.isfinite(flat[a : a + _CHUNK])
        if not ok.all():
            return a + int(np.argmin(ok))
    return None


def check_finite(x, name: str, expected: str):
    """Returns `x` unchanged; raises InputError if it holds NaN or inf.

    x: anything array-like (numpy, jax, a list). Integer and boolean arrays are finite by
    construction and are not scanned; a jax array is checked on its device first and only
    copied to the host to locate the bad value. The message names `name`, the first bad
    index in row-major order and what is `expected`, e.g.
    "D_a has a non-finite value at [12, 3]; expected finite decoder rows".
    """
    jax = sys.modules.get('jax')  # not imported: x cannot be a jax array (keeps stats jax-free)
    if jax is not None and isinstance(x, jax.Array):
        jnp = jax.numpy
        if not jnp.issubdtype(x.dtype, jnp.inexact) or bool(jnp.all(jnp.isfinite(x))):
            return x
        arr = np.asarray(x)
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            try:
                arr = arr.astype(np.float64)
            except (TypeError, ValueError):
                raise InputError(f'{name} holds non-numeric values; expected {expected}') from None
        if not np.issubdtype(arr.dtype, np.inexact):
            return x
    bad = _first_bad(arr)
    if bad is not None:
        value = arr.reshape(-1)[bad]
        raise InputError(f'{name} has a non-finite value at {_where(arr.shape, bad)} ({value}); expected {expected}')
    return x


def check_nonempty(x, name: str, expected: str, axis: int | None = None):
    """Returns `x` unchanged; raises InputError if it has no elements (or none along `axis`)."""
    shape = tuple(np.shape(x))
    if axis is None:
        size = int(np.prod(shape))
    else:
        size = shape[axis] if -len(shape) <= axis < len(shape) else 0
    if size == 0:
        raise InputError(f'{name} is empty (shape {shape}); expected {expected}')
    return x
